"""Regenerate the generated parts of the docs: `docs/settings.md` (from `tasks.settings`, through
`trifecta settings`, plus `docs/settings-extra.md`) and the bench table in `docs/performance.md`
(from the last `trifecta bench` run kept in `docs/bench.json`, between the BENCH_TABLE markers).

    .venv/bin/python docs/build_docs.py          # rewrite
    .venv/bin/python docs/build_docs.py --check  # exit 1 when a generated part is stale (a test runs this)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BENCH = re.compile(r"(<!-- BENCH_TABLE -->\n).*?(<!-- /BENCH_TABLE -->)", re.S)
CPU = re.compile(r"(<!-- CPU_TABLE -->\n).*?(<!-- /CPU_TABLE -->)", re.S)


def bench_table() -> str:
    p = DOCS / "bench.json"
    if not p.exists():
        return "(no `docs/bench.json` yet: run `trifecta bench` and copy its `bench.json` here)\n"
    d = json.loads(p.read_text())
    rows = ["| goal | figure | target | result |", "| --- | --- | --- | --- |"]
    for g in d["goals"]:
        reported = g["target"] >= 1e9
        tgt = "(reported)" if reported else ("≥ " if g.get("higher_is_better", True) else "≤ ") + f"{g['target']}"
        rows.append(f"| {g['goal']} | {g['figure']} {g['unit']} | {tgt} | {'pass' if g['pass'] else '**FAIL**'} |")
    m = d["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    head = f"Measured {d['started']} on {m['cores']} cores ({m['cpu']}{gpu}, Python {m['python']}); load generator {d['load_generator']}.\n\n"
    if d.get("note"):  # e.g. a smoke run on a shared machine, said before its figures
        head = f"**{d['note']}**\n\n" + head
    return head + "\n".join(rows) + "\n"


def cpu_table() -> str:
    """CPU ms per image by side and process, from the textmask section of docs/bench.json."""
    p = DOCS / "bench.json"
    tm = json.loads(p.read_text()).get("textmask", {}) if p.exists() else {}
    if not tm.get("inputs"):
        return "(no textmask section in `docs/bench.json` yet)\n"
    rows = [
        "| input | model input: service / RapidOCR | naive script | raw call (default session) | service (c=16) | worker | API | Redis |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in tm["inputs"].items():
        m = v["median"]
        s = m["c16"]

        def f(x: float | None) -> str:
            return "–" if x is None else f"{x:.1f}"

        shapes = "x".join(map(str, v["tensor"][-2:])) + " / " + ("x".join(map(str, v["naive_tensor"][-2:])) if v.get("naive_tensor") else "–")
        naive = m.get("naive", {}).get("cpu_ms")
        rows.append(f"| {name} | {shapes} | {f(naive)} | {f(m['raw']['cpu_ms'])} | {f(s['cpu_ms'])} | {f(s.get('cpu_ms_worker'))} | {f(s.get('cpu_ms_api'))} | {f(s.get('cpu_ms_redis'))} |")
    return "\n".join(rows) + "\n"


def settings_page() -> str:
    table = subprocess.run([sys.executable, "-m", "client.cli", "settings"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    extra = (DOCS / "settings-extra.md").read_text()
    return (
        "# Settings\n\nEvery setting is an environment variable (names kept from the source services). "
        "`trifecta settings` prints this table; `docs/build_docs.py` writes this page from it.\n\n" + table.rstrip() + "\n\n" + extra.rstrip() + "\n"
    )


def render() -> dict[Path, str]:
    perf = DOCS / "performance.md"
    text = perf.read_text()
    text = BENCH.sub(lambda m: m.group(1) + bench_table() + m.group(2), text)
    text = CPU.sub(lambda m: m.group(1) + cpu_table() + m.group(2), text)
    return {DOCS / "settings.md": settings_page(), perf: text}


def main() -> int:
    stale = [p for p, t in render().items() if not p.exists() or p.read_text() != t]
    if "--check" in sys.argv:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run .venv/bin/python docs/build_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for p, t in render().items():
        p.write_text(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
