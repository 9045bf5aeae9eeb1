"""Console sessions in the store (migration 11), on both engines: created, found until they
expire, ended; two store instances (two processes on PostgreSQL) see the same sessions."""

from __future__ import annotations

from gateway.store import Store, open_store
from tests.conftest import TEST_KEYS


async def test_a_session_is_found_until_it_expires(store: Store) -> None:
    await store.create_session("h1", "demo-operator", 1000.0, 1060.0)
    assert await store.session_user("h1", 1000.0) == "demo-operator"
    assert await store.session_user("h1", 1059.9) == "demo-operator"
    assert await store.session_user("h1", 1060.0) is None  # the expiry is exclusive
    assert await store.session_user("unknown", 1000.0) is None


async def test_ending_a_session_signs_out_that_session_only(store: Store) -> None:
    await store.create_session("h1", "a", 1000.0, 2000.0)
    await store.create_session("h2", "a", 1000.0, 2000.0)
    await store.end_session("h1")
    assert await store.session_user("h1", 1001.0) is None
    assert await store.session_user("h2", 1001.0) == "a"
    await store.end_session("h1")  # twice: nothing to do, no error


async def test_expired_sessions_are_swept_when_a_new_one_is_made(store: Store) -> None:
    await store.create_session("old", "a", 1000.0, 1010.0)
    await store.create_session("new", "b", 5000.0, 6000.0)
    # the old row is gone, not merely expired: the same hash can be created again
    await store.create_session("old", "c", 5000.0, 6000.0)
    assert await store.session_user("old", 5001.0) == "c"


async def test_a_second_store_instance_sees_the_same_sessions(store: Store, store_url: str) -> None:
    other = open_store(store_url, keys=TEST_KEYS)
    await other.open()
    try:
        await store.create_session("shared", "demo-admin", 1000.0, 2000.0)
        assert await other.session_user("shared", 1500.0) == "demo-admin"
        await other.end_session("shared")
        assert await store.session_user("shared", 1500.0) is None
    finally:
        await other.aclose()


async def test_audit_events_page_newest_first_with_their_municipality(store: Store) -> None:
    from tests.store.test_contract import new

    await store.submit([new("A"), new("B")], 1000.0)
    await store.set_paused("840", "sd-koersel", True, "vendor down", "ops", 1001.0)
    events = await store.audit_events(None, 500)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True) and len(ids) >= 3
    assert events[0]["event"] == "endpoint.paused" and events[0]["municipality"] == "840"
    intake = [e for e in events if e["delivery_id"] is not None]
    assert intake and all(e["municipality"] == "746" for e in intake)
    older = await store.audit_events(ids[0], 1)
    assert [e["id"] for e in older] == [ids[1]]
