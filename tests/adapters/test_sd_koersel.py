"""Tests of the sd-koersel adapter: plan, render (golden files) and send against the simulator.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/adapters/test_sd_koersel.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters.base import (
    Channel,
    DeliveredPart,
    InDoubt,
    InvalidPayload,
    Payload,
    Plan,
    Rejected,
    Report,
    Response,
    Transient,
    VendorSettings,
)
from adapters.sd_koersel import SdKoersel, interpret
from adapters.soap import SOAP_ENV, body_payload, parse_xml
from gateway.simulators import SimulatorOptions
from gateway.simulators.sd import STATE, build_app

TESTS = Path(__file__).resolve().parents[1]
REPORTS = TESTS / "data" / "reports"
GOLDEN = Path(__file__).resolve().parent / "golden" / "sd-koersel"
SD = "urn:oio:sd:snitflader:2017.05.01"
K = "urn:oio:sd:snitflader:2012.02.01"
SKAT = "http://rep.oio.dk/skat.dk/motor/class/registreringnummer/xml/schemas/20080401/"
ENDPOINT = "https://sd.example.test/sdws-indberetning/services/AnsaettelseKoerselOpret20170501"
SETTINGS = VendorSettings(endpoint=ENDPOINT, username="SYtest", password="pw", institution="XY")

# case name -> sample report; every case renders with SETTINGS
CASES = {
    "minimal": "drive-minimal.json",
    "full": "drive-full.json",
    "optional-wage-code": "drive-optional-wage-code.json",
    "dst-spring": "drive-dst-spring.json",
    "dst-autumn": "drive-dst-autumn.json",
}


@pytest.fixture(scope="module")
def adapter() -> SdKoersel:
    return SdKoersel()


def load_report(name: str, **changes: object) -> Report:
    data = json.loads((REPORTS / name).read_text(encoding="utf-8"))
    data.update(changes)
    return Report.from_dict(data)


def render_all(adapter: SdKoersel, report: Report, s: VendorSettings = SETTINGS) -> list[Payload]:
    plan = adapter.plan(report, [], s)
    return [adapter.render(report, m, s) for m in plan.messages]


def payload_of(payload: Payload) -> etree._Element:
    return body_payload(parse_xml(payload.body))


def canonical(xml: bytes) -> str:
    # prefixes are zeep's choice and indentation is ours: neither is part of the contract
    tree = etree.ElementTree(parse_xml(xml))
    return etree.canonicalize(tree, strip_text=True, rewrite_prefixes=True)


def standalone(payload: Payload) -> bytes:
    element = etree.fromstring(etree.tostring(payload_of(payload)))
    etree.cleanup_namespaces(element)
    return etree.tostring(element, pretty_print=True, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------
# render: golden files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(adapter: SdKoersel, case: str) -> None:
    payloads = render_all(adapter, load_report(CASES[case]))
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.xml"):
            old.unlink()
        for i, payload in enumerate(payloads, 1):
            (folder / f"{i:04d}.xml").write_bytes(standalone(payload))
    goldens = sorted(folder.glob("*.xml"))
    assert [g.name for g in goldens] == [f"{i:04d}.xml" for i in range(1, len(payloads) + 1)]
    for golden, payload in zip(goldens, payloads, strict=True):
        assert canonical(standalone(payload)) == canonical(golden.read_bytes()), golden


def test_golden_element_order_is_the_vendors(adapter: SdKoersel) -> None:
    (payload,) = render_all(adapter, load_report("drive-full.json"))
    names = [etree.QName(child).localname for child in payload_of(payload)]
    assert names == [
        "InstitutionIdentifikator",
        "BrugerIdentifikator",
        "AnsaettelseIdentifikator",
        "RegistreringTypeIdentifikator",
        "KoerselDato",
        "KilometerMaal",
        "KontoNummerIdentifikator",
        "GodkendtIndikator",
        "KontrolleretIndikator",
        "DokumentationEksternIndikator",
        "Regel60DageIndikator",
        "RegistreringNummerIdentifikator",
        "AarsagTekst",
        "KoertFraTekst",
        "KoertTilTekst",
        "KoertViaTekst",
        "KoertViaTekst",
    ]


def test_namespaces_follow_the_vendor(adapter: SdKoersel) -> None:
    (payload,) = render_all(adapter, load_report("drive-full.json"))
    root = payload_of(payload)
    assert root.tag == f"{{{SD}}}AnsaettelseKoerselOpret"
    namespaces = {etree.QName(c).localname: etree.QName(c).namespace for c in root}
    for name in (
        "RegistreringTypeIdentifikator",
        "KoerselDato",
        "KilometerMaal",
        "Regel60DageIndikator",
        "AarsagTekst",
        "KoertFraTekst",
        "KoertTilTekst",
    ):
        assert namespaces[name] == K, name
    assert namespaces["RegistreringNummerIdentifikator"] == SKAT
    for name in (
        "InstitutionIdentifikator",
        "BrugerIdentifikator",
        "KontoNummerIdentifikator",
        "GodkendtIndikator",
        "KoertViaTekst",
    ):
        assert namespaces[name] == SD, name


# ---------------------------------------------------------------------------------------
# render: field mapping
# ---------------------------------------------------------------------------------------


def texts(payload: Payload) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for child in payload_of(payload):
        found.setdefault(etree.QName(child).localname, []).append(child.text or "")
    return found


def test_minimal_mapping(adapter: SdKoersel) -> None:
    report = load_report("drive-minimal.json")
    (payload,) = render_all(adapter, report)
    t = texts(payload)
    assert t["InstitutionIdentifikator"] == ["XY"]  # from settings: the report has none
    assert t["BrugerIdentifikator"] == ["0202800000"]  # the approver, not the employee
    assert t["AnsaettelseIdentifikator"] == ["00012345"]  # leading zeros kept
    assert t["RegistreringTypeIdentifikator"] == ["1234"]
    assert t["KoerselDato"] == ["2026-02-10"]
    assert t["KilometerMaal"] == ["12.30"]
    assert t["GodkendtIndikator"] == t["KontrolleretIndikator"] == ["true"]
    assert t["DokumentationEksternIndikator"] == ["true"]
    assert t["Regel60DageIndikator"] == ["false"]
    for absent in (
        "KontoNummerIdentifikator",
        "RegistreringNummerIdentifikator",
        "AarsagTekst",
        "KoertFraTekst",
        "KoertTilTekst",
        "KoertViaTekst",
    ):
        assert absent not in t


def test_full_mapping(adapter: SdKoersel) -> None:
    (payload,) = render_all(adapter, load_report("drive-full.json"))
    t = texts(payload)
    assert t["InstitutionIdentifikator"] == ["KX"]  # the employee's overrides the tenant's
    assert t["KontoNummerIdentifikator"] == ["1234567890"]
    assert t["RegistreringNummerIdentifikator"] == ["AB 12 345"]
    assert t["AarsagTekst"] == ["Hjemmebesøg & møde på rådhuset"]
    assert t["KoertFraTekst"] == ["Rådhustorvet 1, 7100 Vejle"]
    assert t["KoertTilTekst"] == ["Skolegade 3, 7100 Vejle"]
    assert t["KoertViaTekst"] == ["Vestergade 10, 7100 Vejle", "Nørregade 2, 7100 Vejle"]
    assert t["Regel60DageIndikator"] == ["true"]
    assert t["KilometerMaal"] == ["47.05"]


def test_optional_wage_code_is_a_second_posting(adapter: SdKoersel) -> None:
    first, second = (
        texts(p) for p in render_all(adapter, load_report(CASES["optional-wage-code"]))
    )
    assert first["RegistreringTypeIdentifikator"] == ["1234"]
    assert second["RegistreringTypeIdentifikator"] == ["9876"]
    assert first["KilometerMaal"] == second["KilometerMaal"] == ["8.00"]
    assert {k: v for k, v in first.items() if k != "RegistreringTypeIdentifikator"} == {
        k: v for k, v in second.items() if k != "RegistreringTypeIdentifikator"
    }


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25", "2026-01-01", "2026-12-31"])
def test_drive_date_is_rendered_as_written(adapter: SdKoersel, day: str) -> None:
    # 2026-03-29 and 2026-10-25 are the DST Sundays: a timestamp conversion moved such dates
    (payload,) = render_all(adapter, load_report("drive-minimal.json", drive_date=day))
    assert texts(payload)["KoerselDato"] == [day]


def test_headers(adapter: SdKoersel) -> None:
    (payload,) = render_all(adapter, load_report("drive-minimal.json"))
    assert payload.content_type == "text/xml; charset=utf-8"
    assert payload.headers == {"SOAPAction": f'"{ENDPOINT}"'}
    assert payload.path == ""


def test_soap_action_defaults_to_the_wsdl(adapter: SdKoersel) -> None:
    s = dataclasses.replace(SETTINGS, endpoint="")
    (payload,) = render_all(adapter, load_report("drive-minimal.json"), s)
    assert payload.headers["SOAPAction"] == (
        '"https://service.sd.dk/sdws-indberetning/services/AnsaettelseKoerselOpret20170501"'
    )


def test_envelope_is_soap_1_1(adapter: SdKoersel) -> None:
    (payload,) = render_all(adapter, load_report("drive-minimal.json"))
    envelope = parse_xml(payload.body)
    assert envelope.tag == f"{{{SOAP_ENV}}}Envelope"
    assert envelope.find(f"{{{SOAP_ENV}}}Header") is None  # Basic auth: no WS-Security


def test_indicators_can_be_turned_off(adapter: SdKoersel) -> None:
    s = dataclasses.replace(
        SETTINGS,
        options={"kontrolleret_indikator": False, "dokumentation_ekstern_indikator": False},
    )
    (payload,) = render_all(adapter, load_report("drive-minimal.json"), s)
    t = texts(payload)
    assert t["KontrolleretIndikator"] == t["DokumentationEksternIndikator"] == ["false"]
    assert t["GodkendtIndikator"] == ["true"]


@settings(max_examples=40, deadline=None)
@given(km=st.decimals(min_value=0, max_value=Decimal("99999.99"), places=2).filter(bool))
def test_any_two_decimal_distance_renders_exactly(km: Decimal) -> None:
    adapter = _shared_adapter()
    (payload,) = render_all(adapter, load_report("drive-minimal.json", distance_km=str(km)))
    (text,) = texts(payload)["KilometerMaal"]
    assert re.fullmatch(r"[0-9]+\.[0-9]{2}", text)
    assert Decimal(text) == km


_ADAPTER: list[SdKoersel] = []


def _shared_adapter() -> SdKoersel:
    # Hypothesis re-runs the body without fixtures: build the zeep client once
    if not _ADAPTER:
        _ADAPTER.append(SdKoersel())
    return _ADAPTER[0]


# ---------------------------------------------------------------------------------------
# render: invalid payloads are never produced
# ---------------------------------------------------------------------------------------


def test_three_decimals_fail_the_schema(adapter: SdKoersel) -> None:
    report = dataclasses.replace(load_report("drive-minimal.json"), distance_km=Decimal("12.345"))
    (message,) = adapter.plan(report, [], SETTINGS).messages
    with pytest.raises(InvalidPayload, match="fractionDigits") as info:
        adapter.render(report, message, SETTINGS)
    assert "0202800000" not in str(info.value) and "0101700000" not in str(info.value)


def test_bad_account_fails_the_schema(adapter: SdKoersel) -> None:
    report = dataclasses.replace(load_report("drive-minimal.json"), account="12345")
    (message,) = adapter.plan(report, [], SETTINGS).messages
    with pytest.raises(InvalidPayload, match="KontoNummerIdentifikator"):
        adapter.render(report, message, SETTINGS)


def test_no_institution_names_the_setting(adapter: SdKoersel) -> None:
    s = dataclasses.replace(SETTINGS, institution=None)
    report = load_report("drive-minimal.json")
    (message,) = adapter.plan(report, [], s).messages
    with pytest.raises(InvalidPayload, match="'institution'"):
        adapter.render(report, message, s)


def test_missing_approver_is_invalid(adapter: SdKoersel) -> None:
    report = dataclasses.replace(load_report("drive-minimal.json"), approved_by_cpr=None)
    (message,) = adapter.plan(report, [], SETTINGS).messages
    with pytest.raises(InvalidPayload, match="approved_by_cpr"):
        adapter.render(report, message, SETTINGS)


# ---------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------


def delivered_from(plan: Plan, version: int = 1) -> list[DeliveredPart]:
    # the store keeps fields as JSON: hand them back in that form
    return [
        DeliveredPart(m.part, version, json.loads(json.dumps(dict(m.fields))), f"ref-{m.part}")
        for m in plan.messages
    ]


def test_plan_one_message_per_wage_code(adapter: SdKoersel) -> None:
    plan = adapter.plan(load_report("drive-optional-wage-code.json"), [], SETTINGS)
    assert [(m.part, m.operation) for m in plan.messages] == [
        ("wage_code", "create"),
        ("wage_code_optional", "create"),
    ]
    first, second = (dict(m.fields) for m in plan.messages)
    assert first["wage_code"] == "1234" and second["wage_code"] == "9876"
    assert first["distance_km"] == second["distance_km"] == "8.00"
    assert first["drive_date"] == "2026-06-15"
    assert json.loads(json.dumps(first)) == first  # JSON-able
    assert "0505900000" not in json.dumps(first)  # no CPR in what the store records


@pytest.mark.parametrize("field", ["cost_center", "psp_element"])
def test_plan_refuses_what_sd_cannot_carry(adapter: SdKoersel, field: str) -> None:
    assert "/" + field in SdKoersel.unsupported_fields
    report = dataclasses.replace(load_report("drive-optional-wage-code.json"), **{field: "4711"})
    with pytest.raises(InvalidPayload, match=f"cannot carry {field}"):
        adapter.plan(report, [], SETTINGS)


def test_plan_skips_what_was_delivered(adapter: SdKoersel) -> None:
    report = load_report("drive-optional-wage-code.json")
    done = delivered_from(adapter.plan(report, [], SETTINGS))
    assert adapter.plan(report, done[:1], SETTINGS).messages[0].part == "wage_code_optional"
    assert adapter.plan(report, done, SETTINGS) == Plan()


def test_plan_new_version_with_other_values_needs_correction(adapter: SdKoersel) -> None:
    v1 = load_report("drive-minimal.json")
    done = delivered_from(adapter.plan(v1, [], SETTINGS))
    v2 = load_report("drive-minimal.json", version=2, distance_km="15")
    plan = adapter.plan(v2, done, SETTINGS)
    assert plan.messages == ()
    assert plan.correction_required is not None
    assert plan.correction_required.startswith("SD Løn has no edit or cancel operation; ")
    assert "distance_km '12.30' -> '15.00'" in plan.correction_required
    assert "ref-wage_code" in plan.correction_required


def test_plan_same_values_in_new_version_sends_nothing(adapter: SdKoersel) -> None:
    done = delivered_from(adapter.plan(load_report("drive-full.json"), [], SETTINGS))
    v2 = load_report("drive-full.json", version=2)
    assert adapter.plan(v2, done, SETTINGS) == Plan()


def test_plan_dropping_a_delivered_wage_code_needs_correction(adapter: SdKoersel) -> None:
    done = delivered_from(adapter.plan(load_report("drive-optional-wage-code.json"), [], SETTINGS))
    v2 = load_report("drive-optional-wage-code.json", version=2, wage_code_optional=None)
    plan = adapter.plan(v2, done, SETTINGS)
    assert plan.correction_required and "wage_code_optional" in plan.correction_required


def test_plan_cancelled_after_delivery_needs_correction(adapter: SdKoersel) -> None:
    done = delivered_from(adapter.plan(load_report("drive-minimal.json"), [], SETTINGS))
    plan = adapter.plan(
        load_report("drive-minimal.json", version=2, cancelled=True), done, SETTINGS
    )
    assert plan.messages == () and plan.not_applicable is None
    assert plan.correction_required and plan.correction_required.startswith(
        "SD Løn has no edit or cancel operation; "
    )


def test_plan_cancelled_before_delivery_is_not_applicable(adapter: SdKoersel) -> None:
    plan = adapter.plan(load_report("drive-minimal.json", cancelled=True), [], SETTINGS)
    assert plan.messages == () and plan.correction_required is None
    assert plan.not_applicable and plan.not_applicable.startswith("cancelled before")


def test_plan_zero_km_is_not_applicable(adapter: SdKoersel) -> None:
    plan = adapter.plan(load_report("drive-minimal.json", distance_km=0), [], SETTINGS)
    assert plan.messages == () and plan.not_applicable and "zero km" in plan.not_applicable


def test_plan_is_pure(adapter: SdKoersel) -> None:
    report = load_report("drive-full.json")
    assert adapter.plan(report, [], SETTINGS) == adapter.plan(report, [], SETTINGS)
    (message,) = adapter.plan(report, [], SETTINGS).messages
    assert adapter.render(report, message, SETTINGS) == adapter.render(report, message, SETTINGS)


# ---------------------------------------------------------------------------------------
# send: against the simulator
# ---------------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def start_sd(aiohttp_server):
    async def start(**options: object):
        opts = SimulatorOptions(**{"username": "SYtest", "password": "pw", **options})
        return await aiohttp_server(build_app(opts))

    return start


def channel_for(server, session: aiohttp.ClientSession, **changes: object) -> Channel:
    endpoint = str(server.make_url("/sdws-indberetning/services/AnsaettelseKoerselOpret20170501"))
    return Channel(session, dataclasses.replace(SETTINGS, endpoint=endpoint, **changes))


async def send_minimal(adapter: SdKoersel, channel: Channel, **changes: object):
    report = load_report("drive-minimal.json", **changes)
    (message,) = adapter.plan(report, [], channel.settings).messages
    return await adapter.send(adapter.render(report, message, channel.settings), channel)


async def test_send_happy_path(adapter: SdKoersel, start_sd, session) -> None:
    server = await start_sd()
    receipt = await send_minimal(adapter, channel_for(server, session))
    (accepted,) = server.app[STATE].accepted
    assert receipt.vendor_reference == accepted.registrering_id
    assert receipt.status == 200 and receipt.warning is None
    assert (accepted.employment_id, accepted.wage_code, str(accepted.km)) == (
        "00012345",
        "1234",
        "12.30",
    )
    assert accepted.date.isoformat() == "2026-02-10"


async def test_send_client_fault_is_rejected_with_text(
    adapter: SdKoersel, start_sd, session
) -> None:
    server = await start_sd(fault="client")
    with pytest.raises(Rejected, match="Simulated client fault") as info:
        await send_minimal(adapter, channel_for(server, session))
    assert info.value.status == 500


async def test_send_unknown_employment_is_rejected(adapter: SdKoersel, start_sd, session) -> None:
    server = await start_sd()
    report = load_report("drive-minimal.json")
    report = dataclasses.replace(
        report, employee=dataclasses.replace(report.employee, employment_id="00000000")
    )
    channel = channel_for(server, session)
    (message,) = adapter.plan(report, [], channel.settings).messages
    with pytest.raises(Rejected, match="EmploymentIdentifier does not exist"):
        await adapter.send(adapter.render(report, message, channel.settings), channel)
    assert server.app[STATE].accepted == []


@pytest.mark.parametrize(
    ("fault", "retry_after", "text"),
    [
        ("server", None, "Server"),
        ("closed", None, "closed"),
        ("unavailable", 120.0, "HTTP 503"),
        ("throttle", 61.0, "HTTP 429"),
    ],
)
async def test_send_transient_faults(
    adapter: SdKoersel, start_sd, session, fault: str, retry_after: float | None, text: str
) -> None:
    server = await start_sd(fault=fault)
    with pytest.raises(Transient, match=text) as info:
        await send_minimal(adapter, channel_for(server, session))
    assert info.value.retry_after == retry_after
    assert server.app[STATE].accepted == []


async def test_send_recovers_after_server_faults(adapter: SdKoersel, start_sd, session) -> None:
    server = await start_sd()
    server.app[STATE].fail_next = 2
    channel = channel_for(server, session)
    for _ in range(2):
        with pytest.raises(Transient):
            await send_minimal(adapter, channel)
    assert (await send_minimal(adapter, channel)).vendor_reference
    assert len(server.app[STATE].accepted) == 1


async def test_send_wrong_password_is_rejected_with_hint(
    adapter: SdKoersel, start_sd, session
) -> None:
    server = await start_sd()
    with pytest.raises(Rejected, match="credentials.*SY") as info:
        await send_minimal(adapter, channel_for(server, session, password="wrong"))
    assert info.value.status == 401


async def test_send_drop_after_apply_is_in_doubt(adapter: SdKoersel, start_sd, session) -> None:
    server = await start_sd(fault="drop-after-apply")
    with pytest.raises(InDoubt):
        await send_minimal(adapter, channel_for(server, session))
    assert len(server.app[STATE].accepted) == 1  # it was applied


async def test_send_read_timeout_is_in_doubt(adapter: SdKoersel, start_sd, session) -> None:
    server = await start_sd(fault="timeout")
    with pytest.raises(InDoubt, match="no answer"):
        await send_minimal(adapter, channel_for(server, session, read_timeout=0.2))


async def test_send_connection_refused_is_transient(
    adapter: SdKoersel, session, unused_tcp_port: int
) -> None:
    s = dataclasses.replace(SETTINGS, endpoint=f"http://127.0.0.1:{unused_tcp_port}/sd")
    with pytest.raises(Transient, match="could not connect"):
        await send_minimal(adapter, Channel(session, s))


# ---------------------------------------------------------------------------------------
# interpret: answers the simulator does not give
# ---------------------------------------------------------------------------------------


def envelope(inner: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body>{inner}</s:Body></s:Envelope>').encode()


def fault_body(code: str, text: str) -> bytes:
    return envelope(
        f"<s:Fault><faultcode>s:{code}</faultcode><faultstring>x</faultstring>"
        f"<detail><string>{text}</string></detail></s:Fault>"
    )


def test_unparseable_200_is_in_doubt() -> None:
    with pytest.raises(InDoubt, match="may have been created"):
        interpret(Response(200, {}, b"<html>ok</html"))


def test_200_with_another_element_is_in_doubt() -> None:
    with pytest.raises(InDoubt):
        interpret(Response(200, {}, envelope(f'<x:Other xmlns:x="{SD}"/>')))


def test_200_without_reference_is_accepted_with_a_warning() -> None:
    body = envelope(
        f'<x:AnsaettelseKoerselOpret20170501 xmlns:x="{SD}" dannetDatoTid="2026-01-01T00:00:00"/>'
    )
    receipt = interpret(Response(200, {}, body))
    assert receipt.vendor_reference is None and receipt.warning


def test_does_not_exist_is_permanent_whatever_the_code() -> None:
    body = fault_body("Server", "The stated EmploymentIdentifier 123 does not exist")
    with pytest.raises(Rejected, match="does not exist"):
        interpret(Response(500, {}, body))


def test_unknown_fault_code_is_rejected_for_an_operator() -> None:
    with pytest.raises(Rejected, match="Weird"):
        interpret(Response(500, {}, fault_body("Weird", "something odd")))


def test_fault_text_is_masked() -> None:
    body = fault_body("Client", "BrugerIdentifikator 0101700000 is not a user")
    with pytest.raises(Rejected) as info:
        interpret(Response(500, {}, body))
    assert "0101700000" not in str(info.value) and "xxxxxx-xxxx" in str(info.value)


def test_closed_text_inside_a_fault_is_transient() -> None:
    with pytest.raises(Transient, match="closed"):
        interpret(Response(500, {}, fault_body("Server", "The webservice has failed")))


def test_bad_gateway_html_is_transient() -> None:
    with pytest.raises(Transient, match="HTTP 502"):
        interpret(Response(502, {}, b"<html>Bad gateway</html>"))


def test_retry_after_in_any_case() -> None:
    with pytest.raises(Transient) as info:
        interpret(Response(503, {"retry-after": "7"}, b""))
    assert info.value.retry_after == 7.0


def test_other_4xx_is_rejected() -> None:
    with pytest.raises(Rejected, match="404"):
        interpret(Response(404, {}, b"not found"))
