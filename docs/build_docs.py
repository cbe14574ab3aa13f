"""Regenerate the generated parts of the docs: `docs/settings.md` (from `tasks.settings`, through
`trifecta settings`, plus `docs/settings-extra.md`) and the bench table in `docs/performance.md`
(from the last `trifecta bench` run kept in `docs/bench.json`, between the BENCH_TABLE markers), and
its short form in README.md (between the BENCH_SUMMARY markers).

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
SUMMARY = re.compile(r"(<!-- BENCH_SUMMARY -->\n).*?(<!-- /BENCH_SUMMARY -->)", re.S)


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


def summary_table() -> str:
    """The README's short form of the last run: per input, the service against both baselines
    (images/s at c=8 / c=16, CPU per image at c=16), then every other goal row of docs/bench.json."""
    p = DOCS / "bench.json"
    if not p.exists():
        return "(no `docs/bench.json` yet)\n"
    d = json.loads(p.read_text())
    goals = {g["goal"]: g for g in d["goals"]}

    def cell(key: str) -> str:
        g = goals.get(key)
        if g is None:
            return "–"
        return f"{g['figure']}" + ("" if g["pass"] else " (**FAIL**)")

    rows = [
        "| input | service / naive script, images/s (c=8 · c=16) | service / raw model call, images/s (c=8 · c=16) | service / naive, CPU per image (c=16) |",
        "| --- | --- | --- | --- |",
    ]
    used: set[str] = set()
    for name in d.get("textmask", {}).get("inputs", {}):
        k = {(c, w): f"textmask {name} c={c}: service / {w}" for c in (8, 16) for w in ("naive images/s", "naive CPU per image")}
        raw = {c: next((g for g in goals if g.startswith(f"textmask {name} c={c}: service / raw")), "") for c in (8, 16)}
        used |= set(k.values()) | set(raw.values())
        rows.append(f"| {name} | {cell(k[(8, 'naive images/s')])} · {cell(k[(16, 'naive images/s')])} | {cell(raw[8])} · {cell(raw[16])} | {cell(k[(16, 'naive CPU per image')])} |")
    rest = [g for g in d["goals"] if g["goal"] not in used and "worker's session options" not in g["goal"]]
    if rest:
        rows += ["", "| other goal | figure | target | result |", "| --- | --- | --- | --- |"]
        for g in rest:
            tgt = "(reported)" if g["target"] >= 1e9 else ("≥ " if g.get("higher_is_better", True) else "≤ ") + f"{g['target']}"
            rows.append(f"| {g['goal']} | {g['figure']} {g['unit']} | {tgt} | {'pass' if g['pass'] else '**FAIL**'} |")
    m = d["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    note = f" {d['note']}." if d.get("note") else ""
    return f"Last run: {d['started']}, {m['cores']} cores ({m['cpu']}{gpu}).{note}\n\n" + "\n".join(rows) + "\n"


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
    readme = ROOT / "README.md"
    rtext = SUMMARY.sub(lambda m: m.group(1) + summary_table() + m.group(2), readme.read_text())
    return {DOCS / "settings.md": settings_page(), perf: text, readme: rtext}


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
