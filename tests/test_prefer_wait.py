"""``Prefer: wait=N`` (RFC 7240): the answer waits for the vendor's, and never changes what is stored."""

from __future__ import annotations

import time

import pytest
from aiohttp.test_utils import TestServer

from gateway.intake import preferred_wait
from gateway.simulators.sd import STATE as SD_STATE
from tests.conftest import KEY_746, Gateway, drive
from tests.test_compat import PASCAL


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("wait=10", 10),
        ("WAIT=3", 3),
        ("respond-async, wait=5", 5),
        ('wait="7"', 7),
        ("wait=0", 0),
        ("wait=31", 30),
        ("wait=3600", 30),
        ("handling=lenient; x=1, wait=2", 2),
        ("", None),
        ("respond-async", None),
        ("wait=-1", None),
        ("wait=soon", None),
        ("wait=1.5", None),
        ("wait=١", None),  # a non-ASCII digit
    ],
)
def test_the_wait_preference_is_read_and_capped(header: str, seconds: float | None) -> None:
    assert preferred_wait(header) == seconds


async def test_wait_answers_with_the_vendors_reference(
    gateway: Gateway, sd_server: TestServer
) -> None:
    resp = await gateway.client.post(
        "/v1/reports",
        json=drive(),
        headers={"Authorization": f"Bearer {KEY_746}", "Prefer": "wait=10"},
    )
    body = await resp.json()
    assert resp.status == 202 and resp.headers["Preference-Applied"] == "wait=10"
    [item] = body["reports"]
    [delivery] = item["deliveries"]
    assert item["status"] == delivery["status"] == "delivered"
    [accepted] = sd_server.app[SD_STATE].accepted
    assert delivery["vendor_reference"] == accepted.registrering_id and delivery["message"] is None


async def test_a_vendor_rejection_is_shown_with_its_text(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "client"
    resp = await gateway.client.post(
        "/v1/reports",
        json=drive(),
        headers={"Authorization": f"Bearer {KEY_746}", "Prefer": "wait=10"},
    )
    [item] = (await resp.json())["reports"]
    assert resp.status == 202 and item["status"] == "failed"
    assert item["deliveries"][0]["message"]
    assert "0101901234" not in str(item)


async def test_no_answer_in_time_shows_the_state_then(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "server"  # retried until it gives up: never settled within 1 s
    started = time.monotonic()
    resp = await gateway.client.post(
        "/v1/reports",
        json=drive(),
        headers={"Authorization": f"Bearer {KEY_746}", "Prefer": "wait=1"},
    )
    took = time.monotonic() - started
    [item] = (await resp.json())["reports"]
    assert resp.status == 202 and resp.headers["Preference-Applied"] == "wait=1"
    assert item["status"] in {"queued", "in_flight", "retry_scheduled"} and 1 <= took < 5
    assert (await gateway.get("746", "R-1"))[1]["versions"][0][
        "version"
    ] == 1  # committed all the same


async def test_without_the_preference_nothing_waits(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/reports", json=drive(), headers={"Authorization": f"Bearer {KEY_746}"}
    )
    [item] = (await resp.json())["reports"]
    assert (
        resp.status == 202 and "deliveries" not in item and "Preference-Applied" not in resp.headers
    )
    assert item["status"] == "queued"


async def test_a_repeat_waits_too_and_stores_nothing_twice(
    gateway: Gateway, sd_server: TestServer
) -> None:
    headers = {"Authorization": f"Bearer {KEY_746}", "Prefer": "wait=10"}
    first = await (await gateway.client.post("/v1/reports", json=drive(), headers=headers)).json()
    resp = await gateway.client.post("/v1/reports", json=drive(), headers=headers)
    again = await resp.json()
    assert (
        resp.status == 200
        and again["reports"][0]["deliveries"] == first["reports"][0]["deliveries"]
    )
    assert len(sd_server.app[SD_STATE].accepted) == 1


async def test_the_compat_endpoint_waits_as_well(gateway: Gateway, sd_server: TestServer) -> None:
    resp = await gateway.client.post(
        "/v1/compat/os2indberetning/drive-reports",
        json=[PASCAL],
        headers={"Authorization": f"Bearer {KEY_746}", "Prefer": "wait=10"},
    )
    [item] = (await resp.json())["reports"]
    assert (
        resp.status == 202
        and item["status"] == "delivered"
        and item["deliveries"][0]["vendor_reference"]
    )
