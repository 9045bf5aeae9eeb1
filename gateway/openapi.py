"""The OpenAPI document as served: ``schemas/openapi.json``, self-contained.

The report schemas are inlined from ``schemas/report-*.schema.json`` in the flat form the
validator uses (``validation.REPORT_SCHEMAS``), and every operation answers its errors as
problem+json. ``python -m gateway.openapi`` rewrites the file; a test fails when it drifts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .validation import REPORT_SCHEMAS

PATH = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"
NAMES = {"drive": "DriveReport", "vacation": "VacationReport"}
PROBLEM = {"$ref": "#/components/responses/Problem"}


def build(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the report schemas inlined and a problem+json answer for any 4xx."""
    schemas = doc["components"]["schemas"]
    for kind, name in NAMES.items():
        schemas[name] = REPORT_SCHEMAS[kind]
    schemas["Report"] = {"oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in NAMES.values()]}
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation["responses"].setdefault("4XX", PROBLEM)
    return doc


def main() -> int:
    doc = build(json.loads(PATH.read_text(encoding="utf-8")))
    PATH.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
