"""Validators for KMD payloads built from KMD's own WSDLs in ``../shared/vendor-reference/kmd``.

The lead uses :func:`kmd_vendor_validator` to check bodies the simulator captured; each
call skips the calling test when the vendor reference is absent.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.conformance.vendor_schemas import vendor_validator

SET_WSDL = "kmd/SetAbsenceAttendance_OS_SI"
READ_WSDL = "kmd/GetAbsenceAttendanceByPeriod_OS_SI"


def kmd_vendor_validator() -> Callable[[bytes], list[str]]:
    """Errors of a SetAbsenceAttendance envelope's Body payload (or a bare payload) against
    the inline ``xsd:schema`` of KMD's SetAbsenceAttendance_OS_SI.wsdl."""
    return vendor_validator(SET_WSDL)


def kmd_read_vendor_validator() -> Callable[[bytes], list[str]]:
    """The same for GetAbsenceAttendanceByPeriod requests and responses."""
    return vendor_validator(READ_WSDL)
