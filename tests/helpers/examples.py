"""The README's examples as data: every fenced block of README.md and of the docs pages it links.

`blocks()` yields each ```bash / ```python block with where it is; `commands(code)` splits a shell
block into logical commands (backslash continuations joined, comments dropped) so a test can tell
a block it runs from one it may not run here (`EXEMPT`: starts the stack, needs Docker or a
cluster, or is a minutes-long measurement).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_LANGS = {"bash", "sh", "shell", "python"}
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")
LINK = re.compile(r"\]\(((?:\./)?docs/[^)#\s]+\.md)(?:#[^)]*)?\)")

# The first words of a command this suite does not run, and why. Every other command in a
# ```bash block runs, as written, against the live stack the test starts.
EXEMPT: dict[str, str] = {
    "make up": "starts the stack this test starts itself (`trifecta up`)",
    "make test": "the suite itself; CI runs it",
    "make chaos": "the slow suite; CI runs it",
    "make install": "installs the venv the suite runs in",
    "make lint": "ruff over the repo; CI's concern, not the service's",
    "make bench": "minutes of measurement; `trifecta bench` prints its own pass/fail",
    "make gpu-check": "needs an NVIDIA GPU",
    "make wheelhouse": "downloads wheels for another machine (Python 3.12)",
    "scripts/gpu_check.sh": "minutes of measurement (a GPU, or its dry run on the CPU)",
    "trifecta up": "starts the stack this test starts itself",
    ".venv/bin/trifecta up": "starts the stack this test starts itself",
    "trifecta bench": "minutes of measurement; it prints its own pass/fail",
    ".venv/bin/trifecta bench": "minutes of measurement; it prints its own pass/fail",
    "trifecta flower": "a second Flower; the stack under test already runs one",
    "trifecta worker": "a worker by hand (on a GPU); the stack under test runs one per model",
    "docker": "no Docker engine on the test machine",
    "aws": "needs an AWS account",
    "kubectl": "needs a Kubernetes cluster",
    ".venv/bin/python -m pytest": "the suite itself",
}


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repo root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every docs page it links (in link order, each once)."""
    readme = ROOT / "README.md"
    out = [readme]
    for m in LINK.finditer(readme.read_text()):
        p = (ROOT / m.group(1)).resolve()
        if p.is_file() and p not in out:
            out.append(p)
    return out


def blocks(langs: set[str] = RUN_LANGS) -> list[Block]:
    found: list[Block] = []
    for p in pages():
        lang, start, buf = None, 0, []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            m = FENCE.match(line)
            if lang is None and m and m.group(1):
                lang, start, buf = m.group(1), i, []
            elif lang is not None and line.startswith("```"):
                if lang in langs:
                    found.append(Block(str(p.relative_to(ROOT)), start, lang, "\n".join(buf) + "\n"))
                lang = None
            elif lang is not None:
                buf.append(line)
    return found


def commands(code: str) -> list[str]:
    """Logical shell commands of a block: continuations joined, comments and blank lines dropped."""
    out, cur = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def exempt_reason(cmd: str) -> str | None:
    bare = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=(?:\$\([^)]*\)|\"[^\"]*\"|'[^']*'|\S+)\s+)+", "", cmd)  # VAR=value prefixes
    for head, why in EXEMPT.items():
        if bare == head or bare.startswith(head + " "):
            return why
    return None
