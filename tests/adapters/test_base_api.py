"""``adapters.base`` is the plug-in API: its exports are pinned here, so that a change to them is
a decision (and a CHANGELOG entry), never an accident. Also the HTTP status mapping that every
adapter shares (``classify_status``)."""

from __future__ import annotations

import importlib

import pytest

import adapters.base
from adapters.base import (
    InDoubt,
    Rejected,
    Response,
    Transient,
    classify_status,
)
from adapters.registry import protocol_members

EXPORTS = [
    "BUSY_STATUSES",
    "POSTING_TARGETS",
    "Adapter",
    "Channel",
    "DeliveredPart",
    "DeliveryError",
    "Employee",
    "FileAdapter",
    "InDoubt",
    "InvalidPayload",
    "Kind",
    "Message",
    "MessageAdapter",
    "Payload",
    "Plan",
    "ReadsBack",
    "Receipt",
    "Rejected",
    "Report",
    "Response",
    "Route",
    "Transient",
    "VendorSettings",
    "classify_status",
    "mask_cpr",
    "payroll_date",
    "post",
    "retry_after_seconds",
]


def test_the_plugin_api_exports_exactly_these_names() -> None:
    assert adapters.base.__all__ == EXPORTS


@pytest.mark.parametrize("name", EXPORTS)
def test_every_exported_name_is_importable(name: str) -> None:
    module = importlib.import_module("adapters.base")
    assert getattr(module, name) is not None


def test_every_protocol_member_is_declared_on_the_kinds() -> None:
    shared = {
        "name",
        "kinds",
        "schema_files",
        "required_fields",
        "unsupported_fields",
        "field_formats",
        "opening_hours",
        "file_based",
        "reads_back",
        "reads_before_send",
        "plan",
        "render",
    }
    for protocol, own in (
        (adapters.base.MessageAdapter, {"send"}),
        (adapters.base.FileAdapter, {"render_file", "check_settings"}),
    ):
        members = set(protocol_members(protocol))
        assert members == shared | own, protocol


def _resp(status: int, body: bytes = b"", **headers: str) -> Response:
    return Response(status, headers, body)


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after", "words"),
    [
        (429, {"retry-after": "30"}, Transient, 30.0, "V answered HTTP 429: busy or unavailable"),
        (503, {"Retry-After": "7"}, Transient, 7.0, "V answered HTTP 503: busy or unavailable"),
        (503, {}, Transient, None, "busy"),
        (500, {}, Transient, None, "V answered HTTP 500: boom"),
        (502, {}, Transient, None, "V answered HTTP 502"),
        (400, {}, Rejected, None, "V answered HTTP 400: boom"),
        (401, {}, Rejected, None, "V answered HTTP 401: it refused the credentials; fix it"),
        (403, {}, Rejected, None, "V answered HTTP 403: it refused access; fix it"),
        (404, {}, Rejected, None, "V answered HTTP 404: it has no such resource; fix it"),
        (302, {}, Rejected, None, "V answered HTTP 302"),
    ],
)
def test_status_codes_map_to_the_error_the_dispatcher_acts_on(
    status: int,
    headers: dict[str, str],
    error: type[Exception],
    retry_after: float | None,
    words: str,
) -> None:
    found = classify_status(_resp(status, b"boom", **headers), "V", hint="fix it")
    assert type(found) is error and words in str(found) and found.status == status
    if isinstance(found, Transient):
        assert found.retry_after == retry_after


@pytest.mark.parametrize("status", [200, 201, 204])
def test_a_success_is_left_to_the_adapter(status: int) -> None:
    assert classify_status(_resp(status), "V") is None


def test_body_rules_win_over_the_status_but_not_over_busy() -> None:
    def fault(resp: Response) -> InDoubt:
        return InDoubt("the body says so", status=resp.status)

    assert str(classify_status(_resp(500), "V", body_rules=fault)) == "the body says so"
    assert str(classify_status(_resp(200), "V", body_rules=fault)) == "the body says so"
    assert isinstance(classify_status(_resp(503), "V", body_rules=fault), Transient)


def test_a_cpr_number_in_the_answer_is_masked() -> None:
    found = classify_status(_resp(400, b"unknown employee 0101901234"), "V")
    assert "0101901234" not in str(found) and "xxxxxx-xxxx" in str(found)
