"""Reading docker-compose.yml as compose does, for the deployment tests."""

from __future__ import annotations

import re

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(v: str) -> str:
    """What compose makes of `${VAR:-default}` with nothing set in the environment."""
    return _VAR.sub(lambda m: m.group(2) or "", v)
