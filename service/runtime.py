"""Opening and closing what a process shares: the FHIR client, the model, the record store.

Built once per process from `Settings` (CLI command, app lifespan or batch worker) and passed
down; nothing here is global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fhir_adapters.auth import StaticToken
from service.config import Settings
from service.db.store import SqlSummaryStore
from service.fhir import fhir_client
from service.llm import create_engine
from service.llm.base import Engine
from service.pipeline import Services


@asynccontextmanager
async def open_services(settings: Settings, *, engine: Engine | None = None) -> AsyncIterator[Services]:
    """Yield ready `Services`; the model is loaded before the first FHIR request is made, so a
    missing model fails fast."""
    own_engine = engine is None
    eng = engine if engine is not None else create_engine(settings.llm)
    auth = StaticToken(settings.fhir.bearer_token) if settings.fhir.bearer_token else None
    client = fhir_client(settings.fhir, auth=auth)
    store = SqlSummaryStore.from_url(settings.db.url)
    try:
        yield Services(settings=settings, client=client, engine=eng, store=store)
    finally:
        await client.aclose()
        store.close()
        if own_engine:
            await eng.aclose()
