"""The `shout` family's own endpoint (tests/helpers/shout.py): included by api/app.py because its spec names it."""

from __future__ import annotations

from fastapi import APIRouter

from tasks.models import MODELS

router = APIRouter(tags=["shout (test family)"])


@router.get("/v1/shout/about")
async def about() -> dict[str, str]:
    return {"model": "shout", "description": MODELS["shout"].description}
