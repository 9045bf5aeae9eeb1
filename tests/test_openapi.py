"""The OpenAPI document as served: self-contained, typed, in sync with schemas/."""

from __future__ import annotations

import json
from typing import Any

from gateway import openapi
from gateway.store import Status
from gateway.validation import REPORT_SCHEMAS
from tests.conftest import Gateway


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for token in ref[2:].split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


async def test_served_document_is_the_file_and_self_contained(gateway: Gateway) -> None:
    served = await (await gateway.client.get("/openapi.json")).json()
    assert served == json.loads(openapi.PATH.read_text(encoding="utf-8"))
    refs = _refs(served)
    assert refs
    for ref in refs:
        _resolve(served, ref)


def test_inlined_report_schemas_are_the_files() -> None:
    doc = json.loads(openapi.PATH.read_text(encoding="utf-8"))
    for kind, name in openapi.NAMES.items():
        assert doc["components"]["schemas"][name] == REPORT_SCHEMAS[kind], (
            "run: python -m gateway.openapi"
        )
    assert openapi.build(json.loads(json.dumps(doc))) == doc, "run: python -m gateway.openapi"


def test_every_operation_answers_errors_as_problems() -> None:
    doc = json.loads(openapi.PATH.read_text(encoding="utf-8"))
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "4XX" in responses, (method, path)
            for status, response in responses.items():
                response = _resolve(doc, response["$ref"]) if "$ref" in response else response
                if status.startswith("4"):
                    assert "application/problem+json" in response["content"], (method, path, status)
                elif path not in ("/readyz",):
                    assert "content" in response, (method, path, status)


def test_status_query_is_the_delivery_states() -> None:
    doc = json.loads(openapi.PATH.read_text(encoding="utf-8"))
    [status] = [
        p for p in doc["paths"]["/v1/ops/deliveries"]["get"]["parameters"] if p["name"] == "status"
    ]
    assert status["schema"]["enum"] == [str(s) for s in Status]


async def test_unknown_status_is_400(gateway: Gateway) -> None:
    resp = await gateway.client.get(
        "/v1/ops/deliveries",
        params={"status": "stuck"},
        headers={"Authorization": "Bearer ops-test-token"},
    )
    assert resp.status == 400 and resp.content_type == "application/problem+json"


def test_adapter_filters_are_the_registered_adapters() -> None:
    """A schema-valid adapter is never 400 (the fuzzer holds the API to its document)."""
    from adapters.registry import load_adapters

    doc = json.loads(openapi.PATH.read_text(encoding="utf-8"))
    [adapter] = [
        p for p in doc["paths"]["/v1/ops/deliveries"]["get"]["parameters"] if p["name"] == "adapter"
    ]
    action = doc["paths"]["/v1/ops/deliveries/{action}"]["post"]["requestBody"]["content"]
    in_body = action["application/json"]["schema"]["properties"]["filter"]["properties"]["adapter"]
    assert adapter["schema"]["enum"] == in_body["enum"] == sorted(load_adapters())


def test_every_ops_answer_has_a_schema() -> None:
    doc = json.loads(openapi.PATH.read_text(encoding="utf-8"))
    for path, operations in doc["paths"].items():
        if not path.startswith("/v1/ops/"):
            continue
        for method, operation in operations.items():
            schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert schema != {"type": "object"} and ("$ref" in schema or "properties" in schema), (
                method,
                path,
            )
