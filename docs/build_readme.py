"""Assemble README.md from docs/readme/*.md, the settings table (from tasks.settings) and
the figures of the last `trifecta bench` run kept in docs/bench.json.

    .venv/bin/python docs/build_readme.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["00-intro", "core", "shards", "sam3-image", "sam3-video", "vjepa2-mask2former", "operations", "security", "reliability", "performance"]


def bench_table() -> str:
    p = ROOT / "docs" / "bench.json"
    if not p.exists():
        return ""
    d = json.loads(p.read_text())
    rows = ["| goal | figure | target | result |", "| --- | --- | --- | --- |"]
    for g in d["goals"]:
        reported = g["target"] >= 1e9
        tgt = "(reported)" if reported else ("≥ " if g.get("higher_is_better", True) else "≤ ") + f"{g['target']}"
        rows.append(f"| {g['goal']} | {g['figure']} {g['unit']} | {tgt} | {'pass' if g['pass'] else '**FAIL**'} |")
    m = d["machine"]
    head = f"Measured {d['started']} on {m['cores']} cores ({m['cpu']}, Python {m['python']}); load generator {d['load_generator']}.\n\n"
    return head + "\n".join(rows) + "\n"


def main() -> None:
    out = []
    for name in PARTS:
        text = (ROOT / "docs" / "readme" / f"{name}.md").read_text()
        text = text.replace("<!-- BENCH_TABLE -->", bench_table())
        out.append(text.rstrip() + "\n")
    settings = subprocess.run([sys.executable, "-m", "client.cli", "settings"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    extra = (ROOT / "docs" / "readme" / "settings-extra.md").read_text()
    out.append("## Settings\n\nEvery setting is an environment variable (names kept from the source services). `trifecta settings` prints this table.\n\n" + settings + "\n" + extra)
    out.append((ROOT / "docs" / "readme" / "development.md").read_text())
    (ROOT / "README.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
