"""The console in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser). Without Chromium these tests are skipped, with the reason; in CI
(``PAYROLL_GATEWAY_TEST_PG`` set) they fail instead. SQLite only: the store behaviour behind
every page is tested on both engines in ``test_console.py``.

``PAYROLL_GATEWAY_SCREENSHOTS=DIR`` writes the README's screenshots there."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import KNOWN_CPR, OTHER_CPR

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
Seeded = tuple[Any, dict[str, Any]]


@pytest.fixture(params=["sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if shutil.which(CHROMIUM) is None:
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("PAYROLL_GATEWAY_TEST_PG"):
            pytest.fail(f"{reason}: CI must run the browser tests")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        await chromium.close()


async def open_page(browser: Any, seeded: Seeded) -> tuple[Any, str]:
    gw, _ = seeded
    context = await browser.new_context(viewport={"width": 1500, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(8000)
    return page, str(gw.client.make_url("/ui/")).rstrip("/")


async def sign_in(page: Any, base: str, name: str) -> None:
    """With the keyboard: type, Tab, type, Enter."""
    await page.goto(f"{base}/signin")
    await page.focus("#username")
    await page.keyboard.type(name)
    await page.keyboard.press("Tab")
    await page.keyboard.type(f"{name}-password")
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{base}/")


async def test_an_operator_finds_a_failed_delivery_and_replays_it(
    browser: Any, seeded: Seeded
) -> None:
    gw, ids = seeded
    page, base = await open_page(browser, seeded)
    await sign_in(page, base, "ole-operator")
    row = page.locator("table.overview tbody tr", has_text="746")
    assert "ole-operator" in await page.inner_text("header")
    assert "Ærø Kommune" in await row.locator("th").inner_text()  # UTF-8 end to end
    cells = await row.locator("td").all_inner_texts()
    # Vendor, Queued, Retrying, In flight, Delivered today, Held, In doubt, Correction, Failed
    assert cells[0] == "sd-koersel" and cells[4] == "1" and cells[8] == "1"
    await shoot(page, "console-overview.png")

    # the filter form by keyboard: type to pick the state, Tab on to the employment id, Enter
    await page.click("nav >> text=Deliveries")
    await page.focus("#f-status")
    await page.keyboard.type("failed")
    await page.keyboard.press("Tab")  # the payroll period
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "f-employee"
    await page.keyboard.type("00777")
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/deliveries?*status=failed*")
    assert "employee=00777" in page.url
    assert await page.locator("table.deliveries tbody tr").count() == 1
    await page.click(f"table.deliveries >> text={ids['FAIL']}")

    await page.fill("#reason-replay", "SD har rettet fejlen – prøv igen")
    await page.click("button[value=replay]")
    await page.wait_for_url(f"**/deliveries/{ids['FAIL']}?done=replay")
    await gw.wait_for("R-FAIL", {"delivered"})
    await page.reload()
    assert "delivered" in await page.inner_text("h1")
    audit = await page.inner_text("main table")
    assert "ole-operator" in audit and "SD har rettet fejlen – prøv igen" in audit
    await shoot(page, "console-delivery.png")
    html = await page.content()
    assert KNOWN_CPR not in html and OTHER_CPR not in html


async def test_a_viewer_sees_no_action_buttons(browser: Any, seeded: Seeded) -> None:
    gw, ids = seeded
    page, base = await open_page(browser, seeded)
    await sign_in(page, base, "vera-viewer")
    assert await page.locator("table.overview button").count() == 0
    await page.goto(f"{base}/deliveries/{ids['FAIL']}")
    assert await page.locator("main button").count() == 0
    await page.goto(f"{base}/deliveries?status=failed")
    assert await page.locator("main button").count() == 1  # the filter form's, nothing else
    # a forged POST with the viewer's own cookie and token
    token = await page.locator("input[name=csrf]").first.get_attribute("value")
    answer = await page.request.post(
        f"{base}/deliveries/{ids['FAIL']}/replay",
        form={"reason": "forged", "csrf": token},
        headers={"Origin": base.rsplit("/ui", 1)[0]},
    )
    assert answer.status == 403


async def test_an_operator_of_746_never_sees_840(browser: Any, seeded: Seeded) -> None:
    gw, ids = seeded
    page, base = await open_page(browser, seeded)
    await sign_in(page, base, "søren-746")  # typed with an ø
    assert "søren-746" in await page.inner_text("header")
    assert "840" not in await page.inner_text("table.overview")
    await page.goto(f"{base}/deliveries")
    assert "R-840" not in await page.inner_text("main")
    response = await page.goto(f"{base}/deliveries/{ids['840']}")
    assert response.status == 404


async def test_a_form_without_its_csrf_token_is_refused(browser: Any, seeded: Seeded) -> None:
    gw, ids = seeded
    page, base = await open_page(browser, seeded)
    await sign_in(page, base, "ole-operator")
    await page.goto(f"{base}/deliveries/{ids['FAIL']}")
    await page.evaluate(
        "document.querySelectorAll('form.action input[name=csrf]').forEach(e => e.remove())"
    )
    await page.fill("#reason-replay", "uden token")
    async with page.expect_response(f"**/deliveries/{ids['FAIL']}/replay") as caught:
        await page.click("button[value=replay]")
    assert (await caught.value).status == 403
    assert "CSRF" in await page.inner_text("main")


async def shoot(page: Any, name: str) -> None:
    folder = os.environ.get("PAYROLL_GATEWAY_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / name), full_page=True)
