"""The configuration reference (docs/configuration.md), generated from the schema in capray/schema.py.

Every key, its type, its default and the comment above it in the schema, so the reference cannot
drift from the code: `python -m capray.configdoc` rewrites the file, and tests/test_configdoc.py
fails when the committed file differs from what this module produces.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

from capray import schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMAND = "python -m capray.configdoc"


def _field_comments(cls: type) -> dict[str, str]:
    """The `#` comment lines directly above each field of a dataclass, joined; a field with none
    that directly follows a commented one shares its comment (`min_actors`/`max_actors`)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    previous = ""
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+): ", stripped)
        previous = (" ".join(pending) or previous) if match else ""
        if match and previous:
            comments[match.group(1)] = previous
        pending = []
    return comments


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[str]:
    comments = _field_comments(cls)
    rows = []
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is not MISSING and is_dataclass(f.default_factory()):
            continue
        key = f"{prefix}{f.name}"
        meaning = comments.get(f.name, "")
        if key in schema.CHOICES and not all(c in meaning for c in schema.CHOICES[key]):
            meaning = f"{meaning} One of: {', '.join(schema.CHOICES[key])}.".strip()
        rows.append(f"| `{key}` | {_cell(str(f.type))} | {_show(_default(f))} | {_cell(meaning)} |")
    return rows


def render() -> str:
    """The reference as Markdown."""
    header = "| key | type | default | meaning |\n|---|---|---|---|"
    out = [
        "# Configuration reference",
        "",
        f"Generated from `capray/schema.py` by `{COMMAND}`; do not edit by hand.",
        "Keys are set in a YAML file (`configs/*.yaml`, sections as below) or on the command line",
        "as dotted overrides (`capray train configs/demo.yaml train.epochs=3`); unknown keys are errors.",
        "",
        "## Top level",
        "",
        header,
        *_rows(schema.Config, ""),
    ]
    for f in fields(schema.Config):
        if f.default is MISSING and f.default_factory is not MISSING and is_dataclass(section := f.default_factory()):
            doc = (type(section).__doc__ or "").strip()
            out += ["", f"## `{f.name}`", "", doc, "", header, *_rows(type(section), f"{f.name}.")]
    return "\n".join(out) + "\n"


def main() -> int:
    """Write docs/configuration.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
