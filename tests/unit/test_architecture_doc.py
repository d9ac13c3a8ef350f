"""docs/architecture.md documents every Lua script, as generated from the scripts' headers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from redflow.storage import script_docs
from redflow.storage.codes import Code
from redflow.storage.scripts import SCRIPT_NAMES, load_scripts

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
FIX = "run `.venv/bin/python -m redflow.storage.script_docs --write`"


def test_generated_section_is_current() -> None:
    section = script_docs.generated_section(DOC.read_text(encoding="utf-8"))
    assert section == script_docs.render(), f"docs/architecture.md is stale: {FIX}"


def test_every_script_and_code_is_documented() -> None:
    section = script_docs.generated_section(DOC.read_text(encoding="utf-8"))
    headings = re.findall(r"^#### `(\w+)`$", section, re.MULTILINE)
    assert headings == list(SCRIPT_NAMES)
    for code in Code:
        assert f"| `{code.name}` | {int(code)} |" in section


def test_headers_match_the_loader() -> None:
    scripts = load_scripts()
    for header in script_docs.script_headers():
        assert header.description, f"{header.name}.lua has no description"
        assert header.outcomes, f"{header.name}.lua has no RETURNS"
        assert len(header.keys) == len(scripts[header.name].key_names)


def test_check_mode_reports_a_stale_document(tmp_path: Path) -> None:
    doc = tmp_path / "architecture.md"
    doc.write_text(f"# x\n\n{script_docs.BEGIN}\nold\n{script_docs.END}\n\nafter\n", encoding="utf-8")
    assert script_docs.main(["--check", "--doc", str(doc)]) == 1
    assert script_docs.main(["--write", "--doc", str(doc)]) == 0
    assert script_docs.main(["--check", "--doc", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# x\n\n") and text.endswith(f"{script_docs.END}\n\nafter\n")


def test_header_parsing_edge_cases() -> None:
    source = (
        "-- demo: does a thing. With\n"
        "-- ARGV[2] = 1 it does more (still description).\n"
        "-- KEYS[1] runs\n"
        "-- KEYS[2] owned        owned:<worker id>\n"
        "-- KEYS[3..] queues    ready, sched, bell\n"
        "-- ARGV[1] run id\n"
        "-- ARGV[2] queues: one per line,\n"
        "--         continued here\n"
        "-- RETURNS {C.OK, status} | {C.CREATED|C.EXISTING, id ('a'|'b')}\n"
        "--       | {C.STALE} (token lost)\n"
        "--!include common\n"
    )
    h = script_docs.parse_header("demo", source)
    assert h.description == "Does a thing. With ARGV[2] = 1 it does more (still description)."
    assert [(k.index, k.name, k.note) for k in h.keys] == [
        ("1", "runs", ""), ("2", "owned", "owned:<worker id>"), ("3..", "queues", "ready, sched, bell")]
    assert [a.note for a in h.args] == ["run id", "queues: one per line, continued here"]
    assert [(o.codes, o.fields, o.note) for o in h.outcomes] == [
        ((Code.OK,), "status", ""), ((Code.CREATED, Code.EXISTING), "id ('a'|'b')", ""),
        ((Code.STALE,), "", "token lost")]
    assert h.includes == ("common",)
    with pytest.raises(ValueError, match=r"C\.NOPE"):
        script_docs.parse_header("demo", "-- demo: x\n-- KEYS[1] runs\n-- RETURNS {C.NOPE}\n")
