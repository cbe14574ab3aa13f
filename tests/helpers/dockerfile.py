"""The Dockerfile read as stages (base, COPY sources, RUN lines, ENTRYPOINT/CMD), without a Docker engine."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_stages() -> list[dict]:
    """Each stage of the Dockerfile, a stage FROM an earlier one starting from its state."""
    lines, cur = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") and not cur:
            continue
        cur += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            if cur.strip():
                lines.append(cur.strip())
            cur = ""
    stages: list[dict] = []
    for ln in lines:
        op, _, rest = ln.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base = next((s for s in stages if s["name"] == m.group(1)), None)  # FROM an earlier stage: inherits its state
            stages.append(
                {
                    "base": m.group(1),
                    "name": m.group(2),
                    "copy": list(base["copy"]) if base else [],
                    "entrypoint": base["entrypoint"] if base else None,
                    "cmd": base["cmd"] if base else None,
                    "run": list(base["run"]) if base else [],
                }
            )
        elif stages and op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            assert "--from" not in rest
            stages[-1]["copy"].append(parts[:-1])
        elif stages and op in ("ENTRYPOINT", "CMD"):
            stages[-1][op.lower()] = json.loads(rest)
        elif stages and op == "RUN":
            stages[-1]["run"].append(rest)
    return stages


# the build targets the README and deploy/ name
TARGETS = ["api", "worker-onnx", "worker-torch", "worker-onnx-cuda", "worker-torch-cuda"]
