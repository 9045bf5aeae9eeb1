"""kmd-engangsydelser: plan by differences, render against our schema, send/read-back errors."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import (
    Adapter,
    Channel,
    DeliveredPart,
    InDoubt,
    InvalidPayload,
    Message,
    Plan,
    ReadsBack,
    Rejected,
    Report,
    Transient,
    VendorSettings,
)
from adapters.kmd_engangsydelser import KmdEngangsydelser, batches, format_antal
from adapters.resources import schema

GOLDEN = Path(__file__).parent / "golden" / "kmd-engangsydelser"
FIXED_ID = "0123456789ABCDEF0123456789ABCDEF"
ADAPTER = KmdEngangsydelser()
PLAIN = VendorSettings(endpoint="http://kmd.invalid/")


def drive(**over: Any) -> Report:
    data: dict[str, Any] = {
        "kind": "drive",
        "municipality": "840",
        "report_id": "R-1001",
        "version": 1,
        "employee": {"cpr": "0101901234", "employment_id": "00012345"},
        "drive_date": "2024-11-27",
        "distance_km": "12.5",
        "wage_code": "0100",
        "approved_by_cpr": "0202801234",
    }
    data.update(over)
    return Report.from_dict(data)


def held(totals: dict[str, str], **extra: Any) -> list[DeliveredPart]:
    return [DeliveredPart("payments", 1, {"totals": totals, **extra})]


def items(plan: Plan) -> list[dict[str, Any]]:
    (message,) = plan.messages
    return list(message.fields["items"])


def render(report: Report, plan: Plan, settings_: VendorSettings = PLAIN) -> dict[str, Any]:
    msg = plan.messages[0]
    msg = Message(msg.part, msg.operation, {**msg.fields, "opdaterings_id": FIXED_ID})
    return json.loads(ADAPTER.render(report, msg, settings_).body)


def test_implements_the_plugin_protocols() -> None:
    assert isinstance(ADAPTER, Adapter) and isinstance(ADAPTER, ReadsBack)
    assert ADAPTER.reads_before_send is True
    assert all(schema(f).is_file() for f in ADAPTER.schema_files)


# -- plan ---------------------------------------------------------------------------------


def test_first_version_posts_the_full_distance() -> None:
    plan = ADAPTER.plan(drive(), [], PLAIN)
    assert items(plan) == [
        {"Startdato": "2024-11-27", "Loenart": "0100", "Loebenummer": 1, "Antal": "12.50"}
    ]
    assert plan.messages[0].fields["totals"] == {"0100": "12.50"}
    assert plan.messages[0].part == "payments" and plan.messages[0].operation == "update"


def test_optional_wage_code_is_a_second_item_with_the_same_km() -> None:
    plan = ADAPTER.plan(drive(wage_code_optional="0200"), [], PLAIN)
    assert [(i["Loenart"], i["Antal"]) for i in items(plan)] == [
        ("0100", "12.50"),
        ("0200", "12.50"),
    ]


def test_short_numeric_wage_code_is_zero_padded_like_os2indberetning() -> None:
    assert items(ADAPTER.plan(drive(wage_code="100"), [], PLAIN))[0]["Loenart"] == "0100"


def test_correction_sends_only_the_difference() -> None:
    plan = ADAPTER.plan(drive(version=2, distance_km="10"), held({"0100": "12.50"}), PLAIN)
    assert [i["Antal"] for i in items(plan)] == ["-2.50"]
    assert plan.messages[0].fields["totals"] == {"0100": "10.00"}


def test_wage_code_no_longer_wanted_goes_to_zero() -> None:
    plan = ADAPTER.plan(drive(version=2, wage_code="0200"), held({"0100": "12.50"}), PLAIN)
    assert [(i["Loenart"], i["Antal"]) for i in items(plan)] == [
        ("0100", "-12.50"),
        ("0200", "12.50"),
    ]
    assert plan.messages[0].fields["totals"] == {"0100": "0.00", "0200": "12.50"}


def test_cancel_withdraws_everything_posted() -> None:
    plan = ADAPTER.plan(
        drive(version=2, cancelled=True), held({"0100": "12.50", "0200": "3"}), PLAIN
    )
    assert [(i["Loenart"], i["Antal"]) for i in items(plan)] == [
        ("0100", "-12.50"),
        ("0200", "-3.00"),
    ]


@pytest.mark.parametrize(
    ("report", "delivered", "expected"),
    [
        (drive(distance_km=0), [], Plan(not_applicable="zero distance")),
        (drive(cancelled=True), [], Plan(not_applicable="cancelled")),
        (drive(version=3), held({"0100": "12.50"}), Plan()),
        (drive(version=2, cancelled=True), held({"0100": "0.00"}), Plan()),
    ],
)
def test_nothing_to_send(report: Report, delivered: list[DeliveredPart], expected: Plan) -> None:
    assert ADAPTER.plan(report, delivered, PLAIN) == expected


def test_moved_to_another_month_withdraws_there_and_posts_here() -> None:
    delivered = held({"0100": "12.50"}, month="2024-10", startdato="2024-10-03")
    plan = ADAPTER.plan(drive(version=2), delivered, PLAIN)
    assert [(i["Startdato"], i["Antal"]) for i in items(plan)] == [
        ("2024-10-03", "-12.50"),
        ("2024-11-27", "12.50"),
    ]
    assert plan.messages[0].fields["totals"] == {"0100": "12.50"}


@pytest.mark.parametrize(
    ("options", "account", "expected"),
    [
        ({}, "1234567890", {"Afv_Omkostningssted": "1234567890"}),
        ({"account_as": "psp_element"}, "1234567890", {"Afv_PSP_Element": "1234567890"}),
        ({"cost_centre": "5555"}, None, {"Afv_Omkostningssted": "5555"}),
        ({"psp_element": "XG-1234-01"}, None, {"Afv_PSP_Element": "XG-1234-01"}),
        ({"loebenummer": {"0100": 7}}, None, {"Loebenummer": 7}),
    ],
)
def test_account_and_loebenummer_from_report_or_tenant(
    options: dict[str, Any], account: str | None, expected: dict[str, Any]
) -> None:
    plan = ADAPTER.plan(drive(account=account), [], VendorSettings(options=options))
    item = items(plan)[0]
    assert {k: item[k] for k in expected} == expected
    assert not ({"Afv_Omkostningssted", "Afv_PSP_Element"} <= item.keys())


def test_config_with_cost_centre_and_psp_element_is_refused() -> None:
    both = VendorSettings(options={"cost_centre": "5555", "psp_element": "XG-1"})
    with pytest.raises(InvalidPayload, match="both cost_centre and psp_element"):
        ADAPTER.plan(drive(), [], both)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.decimals(0, 500, places=2),
            st.sampled_from(["0100", "0200"]),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_sent_differences_always_add_up_to_the_latest_version(
    versions: list[tuple[Decimal, str, bool, bool]],
) -> None:
    ledger: dict[str, Decimal] = {}
    for n, (km, code, optional, cancelled) in enumerate(versions, 1):
        report = drive(
            version=n,
            distance_km=str(km),
            wage_code=code,
            cancelled=cancelled,
            wage_code_optional="0300" if optional else None,
        )
        delivered = held({k: format_antal(v) for k, v in ledger.items()}) if ledger else []
        plan = ADAPTER.plan(report, delivered, PLAIN)
        for item in items(plan) if plan.messages else ():
            ledger[item["Loenart"]] = ledger.get(item["Loenart"], Decimal(0)) + Decimal(
                item["Antal"]
            )
        want = {} if cancelled else {code: km, **({"0300": km} if optional else {})}
        assert {k: v for k, v in ledger.items() if v} == {k: v for k, v in want.items() if v}


# -- render -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "report", "delivered", "options"),
    [
        ("update-first", drive(account="1234567890", wage_code_optional="0200"), [], {}),
        (
            "update-correction",
            drive(version=2, distance_km="7.25"),
            held({"0100": "12.50"}),
            {
                "client_id": "740",
                "sender": "OS2indberetning",
                "validate_only": True,
                "psp_element": "XG-0000012345-00001",
                "loebenummer": 3,
            },
        ),
    ],
)
def test_render_matches_golden(
    name: str, report: Report, delivered: list[DeliveredPart], options: dict[str, Any]
) -> None:
    s = VendorSettings(options=options)
    doc = render(report, ADAPTER.plan(report, delivered, s), s)
    golden = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    assert doc == golden


def test_render_without_an_id_uses_a_fresh_uuid_and_the_update_path() -> None:
    msg = ADAPTER.plan(drive(), [], PLAIN).messages[0]
    one, two = (ADAPTER.render(drive(), msg, PLAIN) for _ in range(2))
    ids = [json.loads(p.body)["Header"]["OpdateringsID"] for p in (one, two)]
    assert ids[0] != ids[1] and all(len(i) == 32 and i == i.upper() for i in ids)
    assert one.path == "lpe/update-onetime-payments" and one.content_type == "application/json"
    assert b"0101901234" not in one.body and b"0202801234" not in one.body  # no CPR ever


def test_render_refuses_what_fails_the_schema() -> None:
    msg = Message(
        "payments",
        "update",
        {
            "items": [
                {"Startdato": "2024-11-27", "Loenart": "AB12", "Loebenummer": 1, "Antal": "1.5"}
            ]
        },
    )
    with pytest.raises(InvalidPayload) as err:
        ADAPTER.render(drive(), msg, PLAIN)
    assert "Loenart" in err.value.message and "Antal" in err.value.message


def test_render_refuses_cost_centre_and_psp_element_on_one_item() -> None:
    msg = Message(
        "payments",
        "update",
        {
            "items": [
                {
                    "Startdato": "2024-11-27",
                    "Loenart": "0100",
                    "Loebenummer": 1,
                    "Antal": "1.50",
                    "Afv_Omkostningssted": "1",
                    "Afv_PSP_Element": "XG-1",
                }
            ]
        },
    )
    with pytest.raises(InvalidPayload, match="code 167"):
        ADAPTER.render(drive(), msg, PLAIN)


def test_batches_split_at_999() -> None:
    assert [len(b) for b in batches(list(range(2500)))] == [999, 999, 502]
    assert batches([]) == [] and batches([1, 2, 3], limit=2) == [[1, 2], [3]]
    with pytest.raises(ValueError):
        batches([1], limit=0)


def test_render_of_2500_items_makes_three_calls_numbered_from_zero() -> None:
    item = {"Startdato": "2024-11-27", "Loenart": "0100", "Loebenummer": 1, "Antal": "1.00"}
    msg = Message("payments", "update", {"items": [item] * 2500, "opdaterings_id": FIXED_ID})
    docs = [json.loads(line) for line in ADAPTER.render(drive(), msg, PLAIN).body.splitlines()]
    assert [len(d["Engangsydelser"]) for d in docs] == [999, 999, 502]
    for doc in docs:
        seqs = [int(i["Sekvensnummer"]) for i in doc["Engangsydelser"]]
        assert seqs == list(range(len(seqs)))
    ids = [d["Header"]["OpdateringsID"] for d in docs]
    assert ids[0] == FIXED_ID and len(set(ids)) == 3


# -- send and read_back against a canned server ---------------------------------------------


class Canned:
    """A fake KMD endpoint answering with whatever the test sets."""

    def __init__(self) -> None:
        self.status, self.body, self.headers = 200, b"{}", {"Content-Type": "application/json"}
        self.requests: list[tuple[str, Any]] = []

        self.queue: list[tuple[int, bytes]] = []  # answered first, one per request

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, json.loads(await request.read())))
        status, body = self.queue.pop(0) if self.queue else (self.status, self.body)
        return web.Response(status=status, body=body, headers=self.headers)

    def answer(self, status: int, doc: Any = None, **headers: str) -> None:
        self.status = status
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.headers = {"Content-Type": "application/json", **headers}


@pytest.fixture
async def kmd(aiohttp_server: Any) -> Any:
    canned = Canned()
    app = web.Application()
    app.router.add_post("/lpe/{op}", canned.handle)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        settings_ = VendorSettings(endpoint=str(server.make_url("/")), read_timeout=5)
        yield canned, Channel(session, settings_)


def _update_answer(status: str, *msgs: tuple[int, str, str]) -> dict[str, Any]:
    return {
        "Header": {
            "Timestamp": "2024-11-28T10:00:00Z",
            "OpdateringsID": FIXED_ID,
            "Status": status,
        },
        "Meddelelse": [
            {"Timestamp": "x", "Kode": k, "Type": t, "Tekst": txt} for k, t, txt in msgs
        ],
    }


def _payload(channel: Channel) -> Any:
    report = drive(wage_code_optional="0200")
    msg = ADAPTER.plan(report, [], channel.settings).messages[0]
    return ADAPTER.render(
        report,
        Message("payments", "update", {**msg.fields, "opdaterings_id": FIXED_ID}),
        channel.settings,
    )


async def test_send_ok_gives_reference_and_warnings(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(200, _update_answer("OK", (300, "W", "Engangsydelse Nr. 001 Bemærk")))
    receipt = await ADAPTER.send(_payload(channel), channel)
    assert receipt.vendor_reference == f"{FIXED_ID}#0,1"
    assert receipt.warning == "Engangsydelse Nr. 001 Bemærk"
    assert canned.requests[0][0] == "/lpe/update-onetime-payments"


@pytest.mark.parametrize(
    ("kode", "error", "words"),
    [
        (138, Transient, "locked"),
        (119, Rejected, "cost centre"),
        (151, Rejected, "PSP element"),
        (167, Rejected, "only one"),
        (999, Rejected, "Engangsydelse Nr. 000 Noget gik galt"),
    ],
)
async def test_send_error_status_is_classified_by_code(
    kmd: Any, kode: int, error: type[Exception], words: str
) -> None:
    canned, channel = kmd
    canned.answer(200, _update_answer("Error", (kode, "E", "Engangsydelse Nr. 000 Noget gik galt")))
    with pytest.raises(error) as err:
        await ADAPTER.send(_payload(channel), channel)
    assert type(err.value) is error and words in str(err.value)


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after", "words"),
    [
        (400, {}, Rejected, None, "HTTP 400"),
        (403, {}, Rejected, None, "check client_id and the certificate"),
        (500, {}, Transient, None, "HTTP 500"),
        (502, {}, Transient, None, "HTTP 502"),
        (503, {"Retry-After": "7"}, Transient, 7.0, "HTTP 503"),
        (429, {"Retry-After": "30"}, Transient, 30.0, "HTTP 429"),
    ],
)
async def test_send_http_errors(
    kmd: Any,
    status: int,
    headers: dict[str, str],
    error: type[Exception],
    retry_after: float | None,
    words: str,
) -> None:
    canned, channel = kmd
    canned.answer(status, {"error": "x"}, **headers)
    with pytest.raises(error) as err:
        await ADAPTER.send(_payload(channel), channel)
    assert words in str(err.value)
    assert getattr(err.value, "retry_after", None) == retry_after


async def test_over_999_items_are_sent_as_several_calls(kmd: Any) -> None:
    canned, channel = kmd
    item = {"Startdato": "2024-11-27", "Loenart": "0100", "Loebenummer": 1, "Antal": "1.00"}
    msg = Message("payments", "update", {"items": [item] * 1000, "opdaterings_id": FIXED_ID})
    payload = ADAPTER.render(drive(), msg, channel.settings)
    canned.answer(200, _update_answer("OK"))
    receipt = await ADAPTER.send(payload, channel)
    first, second = receipt.vendor_reference.split(";")
    assert first.startswith(f"{FIXED_ID}#0,1,2,") and second.endswith("#0")
    assert [len(r["Engangsydelser"]) for _, r in canned.requests] == [999, 1]
    canned.queue = [(200, json.dumps(_update_answer("OK")).encode()), (500, b"{}")]
    with pytest.raises(Transient, match="calls 1-1 were applied"):
        await ADAPTER.send(payload, channel)


async def test_unreadable_answer_to_an_update_is_in_doubt(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(200, b"<html>proxy</html>")
    with pytest.raises(InDoubt):
        await ADAPTER.send(_payload(channel), channel)


def _entry(
    loenart: str,
    antal: float,
    sender: str = "payroll-gateway",
    remark: str = "R-1001",
    startdato: str = "2024-11-27",
) -> dict[str, Any]:
    return {
        "Startdato": startdato,
        "Objekt_id": "1",
        "Loenart": loenart,
        "Loebenummer": 1,
        "Beloeb": 0.0,
        "Antal": antal,
        "Afv_Timeloen": 0,
        "Afv_PSP_Element": "",
        "Indv_Bemaerkning_1": sender,
        "Indv_Bemaerkning_2": remark,
    }


async def test_read_back_sums_our_own_entries_per_loenart(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(
        200,
        {
            "Header": {"Status": 0, "Tekst": "OK"},
            "Engangsydelser": [
                _entry("0100", 12.5),
                _entry("0100", -2.5, startdato="2024-11-30"),
                _entry("0200", 3.1),
                _entry("0100", 99, sender="OS2indberetning"),
                _entry("0100", 99, remark="R-9"),
            ],
        },
    )
    parts = await ADAPTER.read_back(drive(version=2), [], [], channel)
    assert parts == [
        DeliveredPart(
            "payments",
            2,
            {
                "totals": {"0100": "10.00", "0200": "3.10"},
                "month": "2024-11",
                "startdato": "2024-11-27",
            },
        )
    ]
    path, request = canned.requests[0]
    assert path == "/lpe/read-onetime-payments"
    assert request == {
        "Header": {"ClientID": "840"},
        "Medarbejder": {"Medarbejdernummer": "00012345"},
        "VirkningFilter": {
            "FraDatoTid": "2024-11-01T00:00:00Z",
            "TilDatoTid": "2024-11-30T23:59:59Z",
        },
    }


async def test_read_back_not_found_means_nothing_delivered(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(
        200, {"Header": {"Status": 1, "Tekst": "Data ikke fundet."}, "Engangsydelser": None}
    )
    assert await ADAPTER.read_back(drive(drive_date="2024-02-10"), [], [], channel) == []
    assert canned.requests[0][1]["VirkningFilter"]["TilDatoTid"] == "2024-02-29T23:59:59Z"


async def test_read_back_also_reads_the_month_an_earlier_version_used(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(
        200,
        {
            "Header": {"Status": 0, "Tekst": "OK"},
            "Engangsydelser": [_entry("0100", 12.5, startdato="2024-10-03")],
        },
    )
    known = held({"0100": "12.50"}, month="2024-10")
    parts = await ADAPTER.read_back(drive(version=2), known, [], channel)
    months = [r["VirkningFilter"]["FraDatoTid"][:7] for _, r in canned.requests]
    assert months == ["2024-10", "2024-11"]
    # the canned server answers the same for both months: October's entry counts once
    other = parts[0].fields["other_months"]
    assert other == {"2024-10": {"startdato": "2024-10-03", "totals": {"0100": "12.50"}}}


@pytest.mark.parametrize(
    ("status", "doc", "error"),
    [
        (200, {"Header": {"Status": 2, "Tekst": "Ukendt medarbejder"}}, Rejected),
        (403, {"error": "Forbidden"}, Rejected),
        (503, {"error": "busy"}, Transient),
        (200, b"not json", Transient),
    ],
)
async def test_read_back_errors(kmd: Any, status: int, doc: Any, error: type[Exception]) -> None:
    canned, channel = kmd
    canned.answer(status, doc)
    with pytest.raises(error):
        await ADAPTER.read_back(drive(), [], [], channel)


# -- wire forms of OS2indberetning's production client; the report's own posting target -------


def test_startdato_is_sent_at_midnight_utc_and_kun_valider_only_when_validating() -> None:
    report = drive(wage_code_optional="0200")
    doc = render(report, ADAPTER.plan(report, [], PLAIN))
    assert [i["Startdato"] for i in doc["Engangsydelser"]] == ["2024-11-27T00:00:00Z"] * 2
    assert "Kun_Valider" not in doc["Header"]
    validating = VendorSettings(options={"validate_only": True})
    doc = render(report, ADAPTER.plan(report, [], validating), validating)
    assert doc["Header"]["Kun_Valider"] == "1"


def test_a_withdrawal_in_an_earlier_month_is_sent_at_its_read_date() -> None:
    delivered = held({"0100": "12.50"}, month="2024-10", startdato="2024-10-03")
    doc = render(drive(version=2), ADAPTER.plan(drive(version=2), delivered, PLAIN))
    assert [(i["Startdato"], i["Antal"]) for i in doc["Engangsydelser"]] == [
        ("2024-10-03T00:00:00Z", "-12.50"),
        ("2024-11-27T00:00:00Z", "12.50"),
    ]


@pytest.mark.parametrize(
    ("over", "options", "expected"),
    [
        ({"cost_center": "4711"}, {}, {"Afv_Omkostningssted": "4711"}),
        ({"psp_element": "XG-0000012345-01"}, {}, {"Afv_PSP_Element": "XG-0000012345-01"}),
        # the report's own target wins over the tenant's default
        ({"cost_center": "4711"}, {"psp_element": "XG-1"}, {"Afv_Omkostningssted": "4711"}),
        ({"psp_element": "XG-2"}, {"cost_centre": "5555"}, {"Afv_PSP_Element": "XG-2"}),
    ],
)
def test_the_reports_cost_center_or_psp_element_is_sent(
    over: dict[str, Any], options: dict[str, Any], expected: dict[str, str]
) -> None:
    s = VendorSettings(options=options)
    report = drive(**over)
    (item,) = render(report, ADAPTER.plan(report, [], s), s)["Engangsydelser"]
    assert {k: v for k, v in item.items() if k.startswith("Afv_")} == expected


@pytest.mark.parametrize(
    "over",
    [
        {"account": "1234567890", "cost_center": "4711"},
        {"account": "1234567890", "psp_element": "XG-1"},
        {"cost_center": "4711", "psp_element": "XG-1"},
    ],
)
def test_a_report_with_two_posting_targets_is_never_sent(over: dict[str, Any]) -> None:
    with pytest.raises(InvalidPayload, match="more than one of account, cost_center"):
        ADAPTER.plan(drive(**over), [], PLAIN)


async def test_read_back_matches_entries_read_in_the_date_time_form_sent(kmd: Any) -> None:
    canned, channel = kmd
    canned.answer(
        200,
        {
            "Header": {"Status": 0, "Tekst": "OK"},
            "Engangsydelser": [
                _entry("0100", 12.5, startdato="2024-11-27T00:00:00Z"),
                _entry("0100", 1, startdato="2024-12-01T00:00:00Z"),  # another month: not counted
            ],
        },
    )
    (part,) = await ADAPTER.read_back(drive(version=2), [], [], channel)
    assert part.fields == {
        "totals": {"0100": "12.50"},
        "month": "2024-11",
        "startdato": "2024-11-27",
    }
    assert ADAPTER.plan(drive(version=2), [part], PLAIN) == Plan()  # what was sent is held


async def test_a_read_instant_is_taken_as_the_danish_date(kmd: Any) -> None:
    # a client that wrote Danish midnight of 1 December as UTC: that is December, not November
    canned, channel = kmd
    canned.answer(
        200,
        {
            "Header": {"Status": 0, "Tekst": "OK"},
            "Engangsydelser": [
                _entry("0100", 12.5, startdato="2024-11-27T00:00:00Z"),
                _entry(
                    "0100", 1, startdato="2024-11-30T23:00:00Z"
                ),  # 1 December in Denmark: not counted
            ],
        },
    )
    (part,) = await ADAPTER.read_back(drive(version=2), [], [], channel)
    assert part.fields["totals"] == {"0100": "12.50"}
