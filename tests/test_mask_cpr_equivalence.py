"""``mask_cpr`` (look-behind-free scan, left boundary checked in Python) masks exactly what
the original look-behind regex masked: the original is kept here as the reference."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import MASKED_CPR, mask_cpr

_REFERENCE_RE = re.compile(r"(?<!\d)(\d{6})[- ]?(\d{4})(?!\d)")


def _reference_match(m: re.Match[str]) -> str:
    day, month = int(m.group(1)[:2]), int(m.group(1)[2:4])
    if (1 <= day <= 31 or 61 <= day <= 91) and 1 <= month <= 12:
        return MASKED_CPR
    return m.group(0)


def reference_mask_cpr(text: str, cprs: tuple[str, ...] = ()) -> str:
    """The masking as it was before the look-behind was dropped."""
    for cpr in cprs:
        if cpr and len(cpr) == 10:
            for written in (cpr, f"{cpr[:6]}-{cpr[6:]}", f"{cpr[:6]} {cpr[6:]}"):
                text = text.replace(written, MASKED_CPR)
    return _REFERENCE_RE.sub(_reference_match, text)


# ASCII digits weighted up; Arabic-Indic, fullwidth and Devanagari digits (``\d`` matches
# them, and so must the boundary check); superscript two (a digit to str.isdigit but not
# to ``\d``); the two separators; letters and markup.
_CHARS = st.sampled_from(list("0123456789" * 4 + "--  " + "٠٣٩０５७²x<>/.:\n"))
_PLAUSIBLE = st.builds(
    lambda d, m, rest: f"{d:02d}{m:02d}{rest}",
    st.sampled_from([1, 9, 10, 29, 31, 32, 61, 75, 91, 92, 0]),
    st.integers(0, 13),
    st.from_regex(r"[0-9]{2}[- ]?[0-9]{4}", fullmatch=True),
)
_CHUNK = st.one_of(st.text(_CHARS, max_size=12), _PLAUSIBLE)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_CHUNK, max_size=10).map("".join))
def test_equals_the_reference_on_digit_rich_text(text: str) -> None:
    assert mask_cpr(text) == reference_mask_cpr(text)


@settings(max_examples=500, deadline=None)
@given(st.lists(_CHUNK, max_size=8).map("".join), st.lists(_PLAUSIBLE, max_size=2))
def test_equals_the_reference_with_known_cprs(text: str, known: list[str]) -> None:
    cprs = tuple(k.replace("-", "").replace(" ", "") for k in known)
    assert mask_cpr(text, cprs) == reference_mask_cpr(text, cprs)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("0101901234", MASKED_CPR),
        ("x010190-1234y", f"x{MASKED_CPR}y"),
        ("010190 1234", MASKED_CPR),
        ("12010190-1234", "12010190-1234"),  # a run of eight before the separator
        ("0101901234 5", f"{MASKED_CPR} 5"),
        ("99010190-1234", "99010190-1234"),
        ("991231-0101901234", f"991231-{MASKED_CPR}"),  # rejected run, then a CPR
        ("1234567-010190-1234", f"1234567-{MASKED_CPR}"),
        ("٠١٠١٩٠١٢٣٤", MASKED_CPR),  # Arabic-Indic digits are masked as before
        ("٣0101901234", "٣0101901234"),  # a non-ASCII digit before: one longer run
        ("²0101901234", f"²{MASKED_CPR}"),  # superscript two is not a decimal digit
        ("3201901234", "3201901234"),  # day 32: not a date
    ],
)
def test_table(text: str, masked: str) -> None:
    assert mask_cpr(text) == masked == reference_mask_cpr(text)
