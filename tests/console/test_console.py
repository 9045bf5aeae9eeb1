"""The console over HTTP (aiohttp test client, no browser): sign-in, sessions, CSRF and
Origin, roles and municipalities, actions with the operator's name, and no CPR in any page."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

import pytest

from gateway.console import pages
from gateway.settings import Operator
from tests.conftest import Gateway
from tests.console.conftest import APPROVER_CPR, KNOWN_CPR, OTHER_CPR, csrf_of, sign_in

Seeded = tuple[Gateway, dict[str, Any]]


async def test_pages_need_a_session_and_sign_in_sets_a_strict_cookie(seeded: Seeded) -> None:
    gw, _ = seeded
    client = gw.client
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/signin"
    form = await client.get("/ui/signin")
    token = csrf_of(await form.text())
    signed = await client.post(
        "/ui/signin",
        data={"username": "vera-viewer", "password": "vera-viewer-password", "csrf": token},
        allow_redirects=False,
    )
    assert signed.status == 303
    cookie = next(v for v in signed.headers.getall("Set-Cookie") if v.startswith("pgw_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback (the tests): documented exception
    page = await client.get("/ui/")
    assert page.status == 200 and "vera-viewer" in await page.text()
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


async def test_a_wrong_password_is_refused_and_counted(seeded: Seeded) -> None:
    gw, _ = seeded
    form = await gw.client.get("/ui/signin")
    token = csrf_of(await form.text())
    wrong = await gw.client.post(
        "/ui/signin", data={"username": "vera-viewer", "password": "nope", "csrf": token}
    )
    text = await wrong.text()
    assert wrong.status == 401 and "Wrong user name or password" in text
    token = csrf_of(text)  # each sign-in form has its own token
    unknown = await gw.client.post(
        "/ui/signin", data={"username": "nobody", "password": "nope", "csrf": token}
    )
    assert unknown.status == 401
    assert len(gw.app[__import__("gateway.keys").keys.APP_AUTH_FAILURES]) == 1


async def test_a_form_without_the_csrf_token_is_refused(seeded: Seeded) -> None:
    gw, ids = seeded
    await sign_in(gw.client, "ole-operator")
    resp = await gw.client.post(f"/ui/deliveries/{ids['FAIL']}/replay", data={"reason": "x"})
    assert resp.status == 403 and "CSRF" in await resp.text()
    wrong = await gw.client.post(
        f"/ui/deliveries/{ids['FAIL']}/replay", data={"reason": "x", "csrf": "0" * 64}
    )
    assert wrong.status == 403
    signin = await gw.client.post("/ui/signin", data={"username": "a", "password": "b"})
    assert signin.status == 403  # the sign-in form has its token too
    rows = await gw.store.list_deliveries({"ids": [ids["FAIL"]]}, 1)
    assert rows[0]["status"] == "failed"  # nothing happened


async def test_a_post_from_another_origin_is_refused_even_with_the_token(seeded: Seeded) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "ole-operator")
    resp = await gw.client.post(
        f"/ui/deliveries/{ids['FAIL']}/replay",
        data={"reason": "x", "csrf": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403 and "Origin" in await resp.text()


async def test_a_viewer_sees_no_action_and_a_forged_post_is_403(seeded: Seeded) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "vera-viewer")
    page = await (await gw.client.get(f"/ui/deliveries/{ids['FAIL']}")).text()
    assert "/replay" not in page and "<button" in page  # sign-out is the only button
    assert page.count("<button") == 1
    forged = await gw.client.post(
        f"/ui/deliveries/{ids['FAIL']}/replay", data={"reason": "forged", "csrf": csrf}
    )
    assert forged.status == 403 and "needs role operator" in await forged.text()
    pause = await gw.client.post(
        "/ui/endpoints/746/sd-koersel/pause", data={"reason": "forged", "csrf": csrf}
    )
    assert pause.status == 403
    rows = await gw.store.list_deliveries({"ids": [ids["FAIL"]]}, 1)
    assert rows[0]["status"] == "failed"


async def test_replay_with_a_reason_records_the_operator(seeded: Seeded) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "ole-operator")
    missing = await gw.client.post(
        f"/ui/deliveries/{ids['FAIL']}/replay", data={"reason": " ", "csrf": csrf}
    )
    assert missing.status == 422 and "<strong>reason</strong> is required" in await missing.text()
    done = await gw.client.post(
        f"/ui/deliveries/{ids['FAIL']}/replay",
        data={"reason": "SD rettet fejlen – prøv igen", "csrf": csrf},
        allow_redirects=False,
    )
    assert done.status == 303
    await gw.wait_for("R-FAIL", {"delivered"})
    events = await gw.store.audit_for(ids["FAIL"])
    replay = next(e for e in events if e["actor"] == "ole-operator")
    assert replay["detail"]["reason"] == "SD rettet fejlen – prøv igen"
    page = await (await gw.client.get(f"/ui/deliveries/{ids['FAIL']}")).text()
    assert "SD rettet fejlen – prøv igen" in page and "ole-operator" in page


async def test_an_operator_of_746_never_sees_840(seeded: Seeded) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "søren-746")
    overview = await (await gw.client.get("/ui/")).text()
    assert 'scope="row">746' in overview and 'scope="row">840' not in overview
    listing = await (await gw.client.get("/ui/deliveries")).text()
    assert "R-OK" in listing and "R-840" not in listing
    assert (await gw.client.get(f"/ui/deliveries/{ids['840']}")).status == 404
    assert (await gw.client.get("/ui/deliveries?municipality=840")).status == 403
    act = await gw.client.post(
        f"/ui/deliveries/{ids['840']}/cancel", data={"reason": "x", "csrf": csrf}
    )
    assert act.status == 404
    audit = await (await gw.client.get("/ui/audit")).text()
    assert "R-840" not in audit and f'href="/ui/deliveries/{ids["840"]}"' not in audit
    pause = await gw.client.post(
        "/ui/endpoints/840/sd-koersel/pause", data={"reason": "x", "csrf": csrf}
    )
    assert pause.status == 403


async def test_a_session_ends_when_it_expires_and_at_sign_out(
    make_gateway: Any, console_settings: Any
) -> None:
    gw = await make_gateway(replace(console_settings, session_hours=1.5 / 3600))
    csrf = await sign_in(gw.client, "vera-viewer")
    await asyncio.sleep(1.6)
    assert (await gw.client.get("/ui/", allow_redirects=False)).status == 303
    csrf = await sign_in(gw.client, "vera-viewer")
    out = await gw.client.post("/ui/signout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await gw.client.get("/ui/", allow_redirects=False)).status == 303


async def test_filters_a_cpr_in_full_by_its_hash_and_never_puts_it_in_a_url(
    seeded: Seeded,
) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "ole-operator")
    resp = await gw.client.post(
        "/ui/deliveries/search",
        data={"cpr": "111285-1234", "csrf": csrf},
        allow_redirects=False,
    )
    location = resp.headers["Location"]
    assert resp.status == 303 and "cpr_hash=" in location and KNOWN_CPR not in location
    listing = await (await gw.client.get(location)).text()
    assert "R-FAIL" in listing and "R-OK" not in listing and "xxxxxx-xxxx" in listing
    bad = await gw.client.post("/ui/deliveries/search", data={"cpr": "12345", "csrf": csrf})
    assert bad.status == 400 and "cpr" in await bad.text()


async def test_bulk_replay_counts_first_then_acts_on_what_it_counted(seeded: Seeded) -> None:
    gw, ids = seeded
    csrf = await sign_in(gw.client, "ole-operator")
    preview = await gw.client.post(
        "/ui/bulk",
        data={
            "action": "replay",
            "status": "failed",
            "municipality": "746",
            "reason": "igen",
            "csrf": csrf,
        },
    )
    text = await preview.text()
    assert preview.status == 200 and "Replay 1 deliveries?" in text
    assert (await gw.store.list_deliveries({"ids": [ids["FAIL"]]}, 1))[0]["status"] == "failed"
    ids_field = re.search(r'name="ids" value="([0-9 ]+)"', text)
    assert ids_field and ids_field.group(1) == str(ids["FAIL"])
    done = await gw.client.post(
        "/ui/bulk",
        data={
            "action": "replay",
            "status": "failed",
            "municipality": "746",
            "reason": "igen",
            "confirm": "yes",
            "ids": ids_field.group(1),
            "csrf": csrf,
        },
        allow_redirects=False,
    )
    assert done.status == 303 and "changed=1" in done.headers["Location"]
    await gw.wait_for("R-FAIL", {"delivered"})


async def test_pause_and_resume_an_endpoint_with_a_reason(seeded: Seeded) -> None:
    gw, _ = seeded
    csrf = await sign_in(gw.client, "ole-operator")
    resp = await gw.client.post(
        "/ui/endpoints/746/sd-koersel/pause", data={"reason": "SD nede", "csrf": csrf}
    )
    assert resp.status == 200 and "Endpoint paused." in await resp.text()
    assert await gw.store.paused_endpoints() == {("746", "sd-koersel"): "SD nede"}
    await gw.client.post("/ui/endpoints/746/sd-koersel/resume", data={"reason": "ok", "csrf": csrf})
    assert await gw.store.paused_endpoints() == {}


async def test_no_page_holds_a_cpr_number(seeded: Seeded) -> None:
    gw, ids = seeded
    await sign_in(gw.client, "anne-admin")
    paths = ["/ui/", "/ui/deliveries", "/ui/audit", "/ui/audit?verify=1"]
    paths += [f"/ui/deliveries/{i}" for i in ids.values()]
    seen = ""
    for path in paths:
        resp = await gw.client.get(path)
        assert resp.status == 200, path
        html = await resp.text()
        seen += html
        for cpr in (KNOWN_CPR, APPROVER_CPR, OTHER_CPR):
            for written in (cpr, f"{cpr[:6]}-{cpr[6:]}"):
                assert written not in html, path
    assert "xxxxxx-xxxx" in seen  # the detail says there is a CPR, masked
    assert "Chain verification" in seen and "intact" in seen


def test_overview_rows_merge_endpoints_and_scope() -> None:
    who = Operator("o", "", "viewer", frozenset({"746"}))
    endpoints = [
        {"municipality": "746", "adapter": "sd-koersel", "breaker": "closed", "paused": True},
        {"municipality": "840", "adapter": "sd-koersel", "breaker": "closed", "paused": False},
    ]
    counts = [{"municipality": "746", "adapter": "sd-koersel", "failed": 2, "queued": 1}]
    rows = pages.overview_rows(counts, endpoints, {("746", "sd-koersel"): 200.0}, who, 100.0)
    assert [(r["municipality"], r["failed"], r["queued"], r["held"]) for r in rows] == [
        ("746", 2, 1, 0)
    ]
    assert rows[0]["breaker"] == "open" and rows[0]["paused"] and rows[0]["tone"] == "bad"


def test_ages_read_at_a_glance() -> None:
    assert [pages.age(s) for s in (None, 5, 125, 7300, 200000)] == [
        "–",
        "5 s",
        "2 min",
        "2 h 1 min",
        "2 d 7 h",
    ]


async def test_older_pages_follow_a_cursor_without_gaps_or_repeats(
    make_gateway: Any, console_settings: Any
) -> None:
    from tests.store.test_contract import new

    gw = await make_gateway(console_settings, run_dispatcher=False)
    await gw.store.submit([new(f"P-{i:03}", employee=f"E{i}") for i in range(120)], 1000.0)
    await sign_in(gw.client, "vera-viewer")
    seen: list[int] = []
    path = "/ui/deliveries?municipality=746"
    pages_read = 0
    while path:
        html = await (await gw.client.get(path)).text()
        assert "120 deliveries" in html
        seen += [int(i) for i in re.findall(r'href="/ui/deliveries/([0-9]+)"', html)]
        older = re.search(r'href="(/ui/deliveries\?[^"]+)" rel="next"', html)
        path = older.group(1).replace("&amp;", "&") if older else ""
        pages_read += 1
    assert pages_read == 3 and len(seen) == 120
    assert seen == sorted(set(seen), reverse=True)  # newest first, each once


async def test_sign_in_failures_share_the_per_address_limit(
    make_gateway: Any, console_settings: Any
) -> None:
    gw = await make_gateway(replace(console_settings, auth_failures_per_minute=2))
    for _ in range(2):
        form = await gw.client.get("/ui/signin")
        token = csrf_of(await form.text())
        wrong = await gw.client.post(
            "/ui/signin", data={"username": "vera-viewer", "password": "x", "csrf": token}
        )
        assert wrong.status == 401
    form = await gw.client.get("/ui/signin")
    right = {"username": "vera-viewer", "password": "vera-viewer-password"}
    refused = await gw.client.post("/ui/signin", data={**right, "csrf": csrf_of(await form.text())})
    assert refused.status == 429 and "Retry-After" in refused.headers


def test_cookies_are_secure_except_plain_http_on_loopback() -> None:
    from pathlib import Path

    from gateway.console.sessions import secure_cookies
    from gateway.settings import Settings

    cases = [
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", None, True),  # every interface: other machines reach it
        ("10.0.0.5", None, True),  # behind a TLS proxy
        ("127.0.0.1", Path("cert.pem"), True),
    ]
    for host, cert, secure in cases:
        assert secure_cookies(Settings(listen_host=host, tls_cert_file=cert)) is secure, host


def test_filters_are_checked_and_a_cpr_becomes_its_hash() -> None:
    from gateway.errors import BadRequest
    from gateway.store.common import cpr_lookup_hash
    from tests.conftest import TEST_KEYS

    adapters = ["sd-koersel"]
    assert pages.delivery_filters(
        {"cpr": "111285-1234", "status": "failed"}, adapters, TEST_KEYS
    ) == {"cpr_hash": cpr_lookup_hash(TEST_KEYS, "1112851234"), "status": "failed"}
    assert pages.delivery_filters({"period": "2026-03", "at_risk": "1", "x": "y"}) == {
        "period": "2026-03",
        "at_risk": True,
    }
    for bad in (
        {"status": "lost"},
        {"period": "2026-13"},
        {"municipality": "74"},
        {"cpr": "1"},
        {"adapter": "kmd-nothing"},
    ):
        with pytest.raises(BadRequest):
            pages.delivery_filters(bad, adapters, TEST_KEYS)
    assert "cpr" not in pages.link_query({"cpr_hash": "h:1", "status": "failed"})


@pytest.mark.sqlite_only
async def test_the_audit_page_says_when_the_chain_is_broken(seeded: Seeded) -> None:
    import sqlite3

    gw, _ = seeded
    await sign_in(gw.client, "anne-admin")
    page = await (await gw.client.get("/ui/audit")).text()
    assert "Chain verification" in page and "BROKEN" not in page
    db = sqlite3.connect(gw.store.path)
    db.execute("UPDATE audit_events SET actor = 'mallory' WHERE id = 2")
    db.commit()
    db.close()
    cached = await (await gw.client.get("/ui/audit")).text()
    assert "BROKEN" not in cached  # the last result is shown until asked (or 10 minutes)
    again = await (await gw.client.get("/ui/audit?verify=1")).text()
    assert "BROKEN" in again and "audit trail broken at event 2" in again
