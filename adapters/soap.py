"""SOAP 1.1 codec shared by the SOAP adapters: zeep reads the WSDL and parses, lxml validates.

zeep is used as a codec only (no I/O); the private zeep calls it needs are kept here,
behind a few functions, so a zeep upgrade breaks one tested module. Requests on the
delivery hot path are written by :class:`RequestTemplate` (plain lxml in the order and
namespaces zeep read from the WSDL, about 10x faster than zeep's serializer); zeep's own
build stays the reference and the fallback that names what is wrong. Untrusted XML (vendor
replies, simulator requests) is parsed with a parser that loads no DTD, resolves no
entities and touches no network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree
from zeep import Client, Settings
from zeep.exceptions import Fault, TransportError, XMLParseError
from zeep.transports import Transport
from zeep.wsdl.utils import etree_to_string

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"

_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    huge_tree=False,
    load_dtd=False,
    remove_blank_text=False,
)


class UnsafeXML(ValueError):
    """The document is not well-formed or carries a DTD."""


def parse_xml(data: bytes) -> etree._Element:
    """Parse untrusted XML: no DTD, no entities, no network."""
    try:
        root = etree.fromstring(data, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise UnsafeXML(f"not well-formed XML: {exc}") from exc
    if root.getroottree().docinfo.doctype:
        raise UnsafeXML("XML with a DOCTYPE is not accepted")
    return root


def load_schema(path: Path) -> etree.XMLSchema:
    """Load a trusted XSD from the project's ``schemas/`` folder."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.XMLSchema(etree.parse(str(path), parser=parser))


def body_payload(envelope: etree._Element) -> etree._Element:
    """The first element inside ``soapenv:Body``."""
    body = envelope.find(f"{{{SOAP_ENV}}}Body")
    if body is None or len(body) == 0:
        raise UnsafeXML("no SOAP Body payload")
    return body[0]


def schema_errors(schema: etree.XMLSchema, element: etree._Element) -> list[str]:
    """Validation errors of ``element`` (empty when valid)."""
    if schema.validate(element):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]


@dataclass(frozen=True, slots=True)
class SoapFault:
    code: str  # local part, e.g. "Client" or "Server"
    string: str
    detail: str


def find_fault(envelope: etree._Element) -> SoapFault | None:
    """The SOAP 1.1 fault in an envelope, if there is one."""
    fault = envelope.find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    if fault is None:
        return None
    code = (fault.findtext("faultcode") or "").strip()
    detail_el = fault.find("detail")
    detail = (
        "" if detail_el is None else " ".join(t.strip() for t in detail_el.itertext() if t.strip())
    )
    return SoapFault(
        code=code.rpartition(":")[2],
        string=(fault.findtext("faultstring") or "").strip(),
        detail=detail,
    )


@dataclass(slots=True)
class _ReplyShim:
    """The attributes zeep's ``SoapBinding.process_reply`` reads from a response."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    encoding: str | None = "utf-8"


class ZeepCodec:
    """Builds request envelopes and parses replies for one WSDL, without I/O.

    Build it once at start-up (it reads the WSDL from disk); it is stateless per call.
    """

    def __init__(self, wsdl: Path) -> None:
        settings = Settings(
            strict=True,
            xml_huge_tree=False,
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )
        self._client = Client(str(wsdl), settings=settings, transport=Transport(cache=None))
        self._binding = self._client.bind()._binding  # private: see module docstring

    def build(self, operation: str, **values: Any) -> tuple[bytes, dict[str, str]]:
        """The envelope bytes and HTTP headers (SOAPAction, Content-Type)."""
        envelope, headers = self._binding._create(operation, (), values, client=self._client)
        return etree_to_string(envelope), dict(headers)

    def soap_action(self, operation: str) -> str:
        """The SOAPAction header ``build`` gives this operation (quoted, as SOAP 1.1 has it)."""
        action = self._binding.get(operation).soapaction
        return f'"{action}"' if action else '""'

    def body_element(self, operation: str) -> Any:
        """zeep's element for the operation's request body (its name, children and types)."""
        return self._binding.get(operation).input.body

    def parse(self, operation: str, status: int, headers: Mapping[str, str], body: bytes) -> Any:
        """The typed result; raises zeep ``Fault``/``TransportError``/``XMLParseError``."""
        shim = _ReplyShim(status, headers, body)
        return self._binding.process_reply(self._client, self._binding.get(operation), shim)


@dataclass(frozen=True, slots=True)
class _Child:
    tag: str  # Clark notation; unqualified children have no namespace
    text: Callable[[Any], str]  # zeep's conversion for the element's XSD type
    repeats: bool


class RequestTemplate:
    """The request envelope of one operation, written with lxml and checked against an XSD.

    The element names, their order and their namespaces come from the body element zeep
    read from the WSDL, and each value is written by zeep's own conversion for that
    element's XSD type (``xmlvalue``), so the envelope is the one zeep builds (C14N-equal;
    the tests prove it) without zeep's serializer on every message. ``build`` returns
    None for anything it cannot write as zeep would, or that fails the schema: the caller
    then builds with zeep, which says what is wrong (and never sends what fails).
    """

    def __init__(self, codec: ZeepCodec, operation: str, schema: etree.XMLSchema) -> None:
        element = codec.body_element(operation)
        self._tag = element.qname.text
        self._children = {
            name: _Child(child.qname.text, child.type.xmlvalue, child.max_occurs != 1)
            for name, child in element.type.elements
        }
        self._order = {name: i for i, name in enumerate(self._children)}
        self._schema = schema
        self.soap_action = codec.soap_action(operation)

    def build(self, values: Mapping[str, Any]) -> bytes | None:
        """The envelope bytes for these values (zeep's keyword arguments), or None."""
        try:
            names = sorted(values, key=self._order.__getitem__)
        except KeyError:
            return None  # a value the operation does not have: zeep names it
        envelope = etree.Element(_ENVELOPE, nsmap=_SOAP_NSMAP)
        payload = etree.SubElement(etree.SubElement(envelope, _BODY), self._tag)
        try:
            for name in names:
                child, value = self._children[name], values[name]
                items = value if child.repeats and isinstance(value, list) else [value]
                for item in items:
                    etree.SubElement(payload, child.tag).text = child.text(item)
        except (TypeError, ValueError):
            return None  # e.g. a character XML cannot carry: zeep says which
        if not self._schema.validate(payload):
            return None
        return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


_ENVELOPE = f"{{{SOAP_ENV}}}Envelope"
_BODY = f"{{{SOAP_ENV}}}Body"
_SOAP_NSMAP = {"soap-env": SOAP_ENV}


__all__ = [
    "Fault",
    "RequestTemplate",
    "SOAP_ENV",
    "SoapFault",
    "TransportError",
    "UnsafeXML",
    "XMLParseError",
    "ZeepCodec",
    "body_payload",
    "find_fault",
    "load_schema",
    "parse_xml",
    "schema_errors",
]
