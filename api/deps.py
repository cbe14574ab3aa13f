"""Typed dependency aliases for the routes (full-stack-fastapi-template style)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.hub import Hub
from storage.blob import BlobStore, open_store
from tasks.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_hub(request: Request) -> Hub:
    return request.app.state.hub


async def get_store(request: Request) -> BlobStore:
    s: Settings = request.app.state.settings
    return open_store(s.storage_url, s.s3_endpoint_url)


async def get_tenant(request: Request) -> str:
    """The caller's tenant (API keys map to tenants when API_KEYS is set)."""
    return getattr(request.state, "tenant", "default")


SettingsDep = Annotated[Settings, Depends(get_settings)]
HubDep = Annotated[Hub, Depends(get_hub)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
