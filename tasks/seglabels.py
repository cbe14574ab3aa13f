"""Class names of the multi-class segmentation models (Mask2Former), shared by the API and the workers.

The source service asked for `wall`, `floor`, `ceiling` and `window`; ADE20K calls the
window `windowpane`, so names go through ALIASES. Names compare without case and
surrounding spaces (ADE20K's label files spell `"bed "`). The API validates requests
against the label names a live worker registered (its checkpoint's `id2label`), so any
checkpoint's names work without the API loading it.
"""

from __future__ import annotations

import re

from tasks.errors import Unprocessable

DEFAULT_CLASSES: tuple[str, ...] = ("wall", "floor", "ceiling", "window")
ALIASES: dict[str, str] = {"window": "windowpane"}
ALL = "all"
# the source service's X-Model value, and any other spelling that means a configured model
MODEL_ALIASES: dict[str, str] = {"mask2former_ade20k": "mask2former", "mask2former-ade20k": "mask2former"}


def norm(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def parse_names(value: object) -> list[str] | str | None:
    """`"a,b"` | `["a", "b"]` | `"all"` → a list of names or ALL; None when nothing was asked."""
    if value is None:
        return None
    if isinstance(value, str):
        if norm(value) == ALL:
            return ALL
        names = [p for p in (x.strip() for x in value.split(",")) if p]
    elif isinstance(value, (list, tuple)):
        names = [str(x).strip() for x in value if str(x).strip()]
        if len(names) == 1 and norm(names[0]) == ALL:
            return ALL
    else:
        raise Unprocessable("classes must be a comma-separated string, a list of names, or \"all\"")
    if not names:
        return None
    return names


def resolve(names: list[str], labels: list[str]) -> list[tuple[str, int]]:
    """(asked name, class id) for each name; 422 listing the valid names if any is unknown."""
    index = {norm(lbl): i for i, lbl in enumerate(labels)}
    out: list[tuple[str, int]] = []
    unknown: list[str] = []
    for name in names:
        n = norm(name)
        i = index.get(n)
        if i is None and n in ALIASES:
            i = index.get(ALIASES[n])
        if i is None:
            unknown.append(name)
        else:
            out.append((name, i))
    if unknown:
        valid = ", ".join(sorted({norm(lbl) for lbl in labels}))
        aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items() if t in index)
        raise Unprocessable(
            f"unknown class name(s) {unknown}; this model knows {len(labels)}: {valid}" + (f" (aliases: {aliases})" if aliases else ""),
            extra={"unknown": unknown, "valid": sorted({norm(lbl) for lbl in labels})},
        )
    if len({n for n, _ in out}) != len(out):
        raise Unprocessable("a class name is asked for twice")
    return out


def key_for(name: str) -> str:
    """A storage-safe output key for a class name (`chest of drawers` → `chest_of_drawers`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", norm(name)).strip("._") or "class"


def too_large_message(w: int, h: int, limit: int) -> str:
    """The 422 for an image over M2F_MAX_PIXELS, saying how far to shrink it."""
    side = int((limit * max(w, h) / max(1, min(w, h))) ** 0.5)
    return (
        f"the image is {w}x{h} = {w * h / 1e6:.1f} MP; Mask2Former makes its masks at the original size and takes at most "
        f"{limit / 1e6:.1f} MP (M2F_MAX_PIXELS). Downscale it (e.g. to {side} px on the long side) and retry"
    )
