"""A short schemathesis pass over every operation (the long one is ``make fuzz``): no 5xx,
no response that breaks the document, negative data rejected, positive data accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("schemathesis", reason="schemathesis is a test extra: make install")

from tests.fuzz import fuzz  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_fuzz_short(tmp_path: Path) -> None:
    counts = fuzz(tmp_path, max_examples=8)
    assert sum(counts.values()) > 100
