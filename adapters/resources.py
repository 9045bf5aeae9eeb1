"""The files under ``schemas/`` (the ``schemas`` package), found through ``importlib.resources``.

The same code finds them in a checkout, an editable install and an installed wheel; no path
is computed from a module's location.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

PACKAGE = "schemas"


def schema(rel: str) -> Traversable:
    """One file under ``schemas/``, named relative to it (``"sd/sd-20170501.xsd"``); it may not exist."""
    found = files(PACKAGE)
    for part in rel.split("/"):
        found = found.joinpath(part)
    return found


def schema_text(rel: str) -> str:
    """The text of one file under ``schemas/`` (JSON Schemas, the OpenAPI document)."""
    return schema(rel).read_text(encoding="utf-8")


def schema_path(rel: str) -> Path:
    """One file under ``schemas/`` as a path on disk, for zeep and lxml.

    They resolve a WSDL's or XSD's relative ``schemaLocation`` imports from the file's
    folder, so a temporary copy of the one file would not do. pip installs a wheel as
    files, so this only fails for a zipped install, which is not supported.
    """
    found = schema(rel)
    if not isinstance(found, Path):
        raise RuntimeError(
            f"schemas/{rel}: the {PACKAGE} package is not installed as files ({found!r})"
        )
    return found
