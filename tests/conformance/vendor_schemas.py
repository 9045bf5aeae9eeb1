"""Validators built from the vendors' own WSDLs in ``../shared/vendor-reference/``.

The vendor WSDLs carry several inline ``xsd:schema``s that refer to each other without
``xsd:import``; this module writes each one to a temporary file with the imports added and
builds one lxml schema per WSDL, so tests can check our payloads against the vendor's truth.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from adapters.soap import SOAP_ENV, parse_xml

VENDOR_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "vendor-reference"
XSD = "http://www.w3.org/2001/XMLSchema"
_DRIVER_NS = "urn:payroll-gateway:tests:vendor-driver"


def vendor_wsdl(name: str) -> Path:
    """The vendor WSDL ``name`` (e.g. ``"sd/AnsaettelseKoerselOpret20170501"``), or skip."""
    path = VENDOR_DIR / (name if name.endswith(".wsdl") else name + ".wsdl")
    if not path.is_file():
        pytest.skip(f"vendor reference {path} is absent (../shared/vendor-reference not laid out)")
    return path


def vendor_validator(name: str) -> Callable[[bytes], list[str]]:
    """A function giving the vendor-schema errors of a SOAP envelope or a bare payload.

    Skips the calling test when the vendor reference is absent; built once per name.
    """
    return _validator(vendor_wsdl(name).resolve())


@functools.cache
def _validator(wsdl: Path) -> Callable[[bytes], list[str]]:
    schema = _schema_from_wsdl(wsdl)

    def errors(data: bytes) -> list[str]:
        root = parse_xml(data)
        if root.tag == f"{{{SOAP_ENV}}}Envelope":
            body = root.find(f"{{{SOAP_ENV}}}Body")
            if body is None or len(body) == 0:
                return ["no SOAP Body payload"]
            root = body[0]
        if schema.validate(root):
            return []
        return [f"line {e.line}: {e.message}" for e in schema.error_log]

    return errors


def _schema_from_wsdl(wsdl: Path) -> etree.XMLSchema:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    inline = etree.parse(str(wsdl), parser=parser).getroot().iter(f"{{{XSD}}}schema")
    schemas = {el.get("targetNamespace", ""): el for el in inline}
    with tempfile.TemporaryDirectory(prefix="vendor-xsd-") as tmp:
        files = {ns: Path(tmp) / f"schema{i}.xsd" for i, ns in enumerate(schemas)}
        for ns, el in schemas.items():
            _standalone(el, {o: f for o, f in files.items() if o != ns}).write(str(files[ns]))
        driver = Path(tmp) / "driver.xsd"
        _driver(files).write(str(driver))
        # the schema is compiled now, so the temporary files may go
        return etree.XMLSchema(etree.parse(str(driver), parser=parser))


def _standalone(schema: etree._Element, imports: dict[str, Path]) -> etree._ElementTree:
    """An inline schema as its own document, importing every other inline schema.

    Serialising a subelement copies the namespace declarations in scope from its
    ancestors; moving nodes would not (lxml drops declarations it thinks redundant, but
    type references are QNames in attribute text that it cannot see).
    """
    root = etree.fromstring(etree.tostring(schema))
    for ns, path in imports.items():
        imp = etree.Element(f"{{{XSD}}}import", schemaLocation=path.name)
        if ns:
            imp.set("namespace", ns)
        root.insert(0, imp)
    return etree.ElementTree(root)


def _driver(files: dict[str, Path]) -> etree._ElementTree:
    root = etree.Element(f"{{{XSD}}}schema", targetNamespace=_DRIVER_NS, nsmap={"xs": XSD})
    for ns, path in files.items():
        etree.SubElement(root, f"{{{XSD}}}import", namespace=ns, schemaLocation=path.name)
    return etree.ElementTree(root)
