"""What sd-koersel renders, and what the SD simulator answers, checked against SD's own WSDL.

Our schemas in ``schemas/sd/`` are written by us; these tests hold them to the vendor's
file in ``../shared/vendor-reference/sd/`` (skipped when that folder is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from lxml import etree
from referencing import Registry, Resource

from adapters.base import Report, VendorSettings
from adapters.resources import schema, schema_path
from adapters.sd_koersel import SdKoersel
from adapters.soap import body_payload, load_schema, parse_xml, schema_errors
from gateway.simulators import SimulatorOptions
from gateway.simulators.sd import STATE, build_app
from tests.conformance.vendor_schemas import vendor_validator

SD_WSDL = "sd/AnsaettelseKoerselOpret20170501"
TESTS = Path(__file__).resolve().parents[1]
GOLDEN_FILES = sorted((TESTS / "adapters" / "golden" / "sd-koersel").glob("*/*.xml"))
REPORT_FILES = sorted((TESTS / "data" / "reports").glob("drive-*.json"))
SETTINGS = VendorSettings(endpoint="https://sd.example.test/sd", institution="XY")
SD = "urn:oio:sd:snitflader:2017.05.01"


@pytest.fixture(scope="module")
def adapter() -> SdKoersel:
    return SdKoersel()


@pytest.fixture(scope="module")
def our_schema() -> etree.XMLSchema:
    return load_schema(schema_path("sd/sd-20170501.xsd"))


def rendered(adapter: SdKoersel, path: Path) -> list[bytes]:
    report = Report.from_dict(json.loads(path.read_text(encoding="utf-8")))
    plan = adapter.plan(report, [], SETTINGS)
    return [adapter.render(report, m, SETTINGS).body for m in plan.messages]


def test_there_is_something_to_check() -> None:
    assert len(GOLDEN_FILES) >= 6 and len(REPORT_FILES) >= 5


@pytest.mark.parametrize("golden", GOLDEN_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_bodies_fit_the_vendor_schema(golden: Path) -> None:
    assert vendor_validator(SD_WSDL)(golden.read_bytes()) == []


@pytest.mark.parametrize("report", REPORT_FILES, ids=lambda p: p.name)
def test_rendered_sample_reports_fit_the_vendor_schema(adapter: SdKoersel, report: Path) -> None:
    bodies = rendered(adapter, report)
    assert bodies
    for body in bodies:
        assert vendor_validator(SD_WSDL)(body) == []


@pytest.mark.parametrize("report", REPORT_FILES, ids=lambda p: p.name)
def test_sample_reports_are_canonical(report: Path) -> None:
    registry = Registry()
    for name in ("report-common", "report-drive", "report-vacation"):
        contents = json.loads(schema(f"{name}.schema.json").read_text(encoding="utf-8"))
        registry = registry.with_resource(contents["$id"], Resource.from_contents(contents))
    drive = json.loads(schema("report-drive.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(drive, registry=registry)
    assert [e.message for e in validator.iter_errors(json.loads(report.read_text()))] == []


# Mutations of a valid body: our schema and the vendor's must give the same verdict.
MUTATIONS = {
    "as rendered": lambda b: b,
    "three decimals": lambda b: b.replace(b">12.30<", b">12.345<"),
    "account too short": lambda b: b.replace(b">1234567890<", b">12345<"),
    "date with time": lambda b: b.replace(b">2026-02-10<", b">2026-02-10T00:00:00<"),
    "boolean as word": lambda b: b.replace(b">true</ns0:Godkendt", b">yes</ns0:Godkendt"),
    "wrong namespace": lambda b: b.replace(
        b'ns3="urn:oio:sd:snitflader:2012.02.01"', b'ns3="urn:oio:sd:snitflader:2017.05.01"'
    ),
    "missing indicator": lambda b: b.replace(
        b"<ns0:KontrolleretIndikator>true</ns0:KontrolleretIndikator>", b""
    ),
    "swapped order": lambda b: b.replace(
        b"<ns0:GodkendtIndikator>true</ns0:GodkendtIndikator>"
        b"<ns0:KontrolleretIndikator>true</ns0:KontrolleretIndikator>",
        b"<ns0:KontrolleretIndikator>true</ns0:KontrolleretIndikator>"
        b"<ns0:GodkendtIndikator>true</ns0:GodkendtIndikator>",
    ),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_our_schema_agrees_with_the_vendor(
    adapter: SdKoersel, our_schema: etree.XMLSchema, name: str
) -> None:
    report = Report.from_dict(
        {
            **json.loads((TESTS / "data" / "reports" / "drive-minimal.json").read_text()),
            "account": "1234567890",
        }
    )
    (message,) = adapter.plan(report, [], SETTINGS).messages
    original = adapter.render(report, message, SETTINGS).body
    body = MUTATIONS[name](original)
    assert name == "as rendered" or body != original, "the mutation did not apply"
    ours = schema_errors(our_schema, body_payload(parse_xml(body)))
    theirs = vendor_validator(SD_WSDL)(body)
    assert bool(ours) == bool(theirs), (ours, theirs)
    assert bool(theirs) == (name != "as rendered")


async def test_simulator_answers_fit_the_vendor_schema(aiohttp_client, adapter: SdKoersel) -> None:
    client = await aiohttp_client(build_app(SimulatorOptions()))
    (body,) = rendered(adapter, REPORT_FILES[0])
    resp = await client.post("/sd", data=body)
    answer = await resp.read()
    assert resp.status == 200
    assert body_payload(parse_xml(answer)).tag == f"{{{SD}}}AnsaettelseKoerselOpret20170501"
    validate = vendor_validator(SD_WSDL)
    assert validate(answer) == []
    assert [validate(a.body) for a in client.server.app[STATE].accepted] == [[]]
