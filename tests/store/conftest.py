"""The store every test here works on: the engine of ``store_url`` (SQLite file, PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.store import Store, open_store
from tests.conftest import TEST_KEYS


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url, keys=TEST_KEYS)
    await s.open()
    yield s
    await s.aclose()
