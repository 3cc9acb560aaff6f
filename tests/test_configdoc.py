"""docs/configuration.md is generated from the schema and must not drift from it."""

from __future__ import annotations

from capray import configdoc


def test_committed_reference_matches_the_schema() -> None:
    expected = configdoc.render()
    committed = configdoc.DOC.read_text() if configdoc.DOC.is_file() else ""
    assert committed == expected, f"docs/configuration.md is out of date: run `{configdoc.COMMAND}` and commit it"
