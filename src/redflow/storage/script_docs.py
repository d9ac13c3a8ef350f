"""The script reference of docs/architecture.md, generated from the headers of the Lua scripts.

Every ``lua/<name>.lua`` opens with a comment header: a description, then ``-- KEYS[i] name  note``,
``-- ARGV[i] meaning`` and ``-- RETURNS ...`` lines (an indented comment line continues the entry
above it). This module renders, for every script of :data:`SCRIPT_NAMES`, its description, a table of
its KEYS and of its ARGV, and its outcomes (the codes of :class:`Code` with the fields that follow
them), plus the return codes and the helpers of ``lua/lib/``. The result lives in
docs/architecture.md between ``<!-- BEGIN GENERATED: scripts -->`` and ``<!-- END GENERATED: scripts -->``::

    python -m redflow.storage.script_docs            # print the generated section
    python -m redflow.storage.script_docs --write    # rewrite it in docs/architecture.md
    python -m redflow.storage.script_docs --check    # exit 1 when docs/architecture.md is stale

A header that names a return code :class:`Code` does not have, or whose KEYS disagree with what the
loader (:func:`load_scripts`) reads from it, raises instead of rendering.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .codes import Code
from .scripts import SCRIPT_NAMES, load_scripts

BEGIN = "<!-- BEGIN GENERATED: scripts -->"
END = "<!-- END GENERATED: scripts -->"
LIBS = ("transitions", "common", "runs")  # lua/lib/<name>.lua, in the order rendered

_ENTRY = re.compile(r"^(KEYS|ARGV)\[([^\]]+)\]\s*(.*)$")
_RETURNS = re.compile(r"^RETURNS\b\s*(.*)$")
_INCLUDE = re.compile(r"^--!include (\w+)\s*$", re.MULTILINE)
_CODE = re.compile(r"\bC\.([A-Z_]+)\b")
_FUNCTION = re.compile(r"^local function (\w+)\(([^)]*)\)")
_CODE_LINE = re.compile(r"^\s+([A-Z_]+) = (\d+)\s*(?:#\s*(.*))?$", re.MULTILINE)
_SIMPLE_LABEL = re.compile(r"^\w+( \w+)?$")
_KEY_PATTERN = re.compile(r"^(?:[\w.]|:|<[^>]*>)*:(?:[\w.]|:|<[^>]*>)*")  # owned:<worker id>, tb:<wf>:<key>


@dataclass(frozen=True, slots=True)
class Entry:
    index: str  # as written: "3", "18..", "6..5+n"
    name: str  # KEYS only: the key's name; '' for ARGV
    note: str


@dataclass(frozen=True, slots=True)
class Outcome:
    codes: tuple[Code, ...]
    fields: str  # what follows the code in the reply
    note: str


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    description: str
    keys: tuple[Entry, ...]
    args: tuple[Entry, ...]
    returns: str
    outcomes: tuple[Outcome, ...]
    includes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Helper:
    name: str
    params: str
    comment: str


def _read(path: str) -> str:
    return (resources.files("redflow.storage") / "lua" / path).read_text(encoding="utf-8")


def _comment_block(source: str) -> list[str]:
    """The opening comment lines of a script, without their ``--`` (``--!include`` ends the block)."""
    out: list[str] = []
    for line in source.splitlines():
        if not line.startswith("--") or line.startswith("--!"):
            break
        out.append(line[3:] if line.startswith("-- ") else line[2:])
    return out


def _split_key(text: str) -> tuple[str, str]:
    """(name, note) of a KEYS entry: ``owned        owned:<worker id>`` -> (owned, owned:<worker id>).

    The name is the label before a run of two spaces when it is one or two words; otherwise the
    first word (the name the loader gives the key) and the whole text as the note."""
    text = text.strip()
    parts = re.split(r" {2,}", text, maxsplit=1)
    if _SIMPLE_LABEL.match(parts[0]):
        return parts[0], parts[1] if len(parts) > 1 else ""
    return _first_word(text), text


def _first_word(text: str) -> str:
    m = re.match(r"\w+", text)
    return m.group(0) if m else ""


def _split_alternatives(text: str) -> list[str]:
    """Splits a RETURNS text on the ``|`` that separate outcomes (not those inside braces or parens)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{(":
            depth += 1
        elif ch in "})":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return [alt for alt in out if alt]


def _code(name: str, where: str) -> Code:
    try:
        return Code[name]
    except KeyError:
        raise ValueError(f"{where}: RETURNS names C.{name}, which redflow.storage.codes.Code does not define") from None


def _outcome(alt: str, where: str) -> Outcome:
    for name in _CODE.findall(alt):
        _code(name, where)
    if alt.startswith("{"):
        close = _matching(alt, 0)
        inner, note = alt[1:close], alt[close + 1 :].strip()
        head, _, fields = inner.partition(",")
    else:  # a bare code: RETURNS C.OK
        head, _, note = alt.partition(" ")
        fields = ""
    codes = tuple(_code(n, where) for n in _CODE.findall(head))
    if not codes:
        raise ValueError(f"{where}: the RETURNS outcome {alt!r} names no return code")
    if note.startswith("(") and _matching(note, 0) == len(note) - 1:
        note = note[1:-1]
    return Outcome(codes, fields.strip(), note)


def _matching(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "{(":
            depth += 1
        elif text[i] in "})":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in {text!r}")


def parse_header(name: str, source: str) -> Header:
    """The header of script ``name``. The description runs up to the first ``KEYS[`` line (so a
    description line that starts with ``ARGV[5] = 1`` stays description); entries and RETURNS follow."""
    lines = _comment_block(source)
    first_entry = next((i for i, line in enumerate(lines) if line.startswith("KEYS[")), None)
    if first_entry is None:
        first_entry = next((i for i, line in enumerate(lines) if _ENTRY.match(line) or _RETURNS.match(line)),
                           len(lines))
    description = " ".join(line.strip() for line in lines[:first_entry] if line.strip())
    prefix = f"{name}: "
    if description.startswith(prefix):
        description = description[len(prefix) :]
        description = description[:1].upper() + description[1:]
    # (kind, index, text) for each entry; continuation lines (indented) extend the entry above.
    items: list[list[str]] = []
    for line in lines[first_entry:]:
        if not line.strip():
            continue
        entry, ret = _ENTRY.match(line), _RETURNS.match(line)
        if entry:
            items.append([entry.group(1), entry.group(2), entry.group(3).strip()])
        elif ret:
            items.append(["RETURNS", "", ret.group(1).strip()])
        elif items and line[:1].isspace():
            items[-1][2] = (items[-1][2] + " " + line.strip()).strip()
        else:
            raise ValueError(f"{name}.lua: header line {line!r} is neither an entry nor a continuation")
    keys: list[Entry] = []
    args: list[Entry] = []
    returns_text: list[str] = []
    for kind, index, text in items:
        if kind == "KEYS":
            key, note = _split_key(text)
            keys.append(Entry(index, key, note))
        elif kind == "ARGV":
            args.append(Entry(index, "", text))
        else:
            returns_text.append(text)
    if len(returns_text) != 1:
        raise ValueError(f"{name}.lua: the header needs exactly one RETURNS entry, found {len(returns_text)}")
    returns = returns_text[0]
    outcomes = tuple(_outcome(alt, f"{name}.lua") for alt in _split_alternatives(returns))
    return Header(name, description, tuple(keys), tuple(args), returns, outcomes,
                  tuple(_INCLUDE.findall(source)))


def script_headers() -> list[Header]:
    """Every script's header, in :data:`SCRIPT_NAMES` order, checked against the loader's key names."""
    scripts = load_scripts()
    out = []
    for name in SCRIPT_NAMES:
        header = parse_header(name, _read(f"{name}.lua"))
        loader_names = scripts[name].key_names
        ours = tuple(_first_word(k.name) for k in header.keys)
        if ours != loader_names:
            raise ValueError(f"{name}.lua: header keys {ours} differ from the loader's {loader_names}")
        out.append(header)
    return out


def parse_helpers(source: str) -> tuple[str, list[Helper]]:
    """(the file's opening comment, every ``local function`` with the comment lines right above it)."""
    lines = source.splitlines()
    intro = " ".join(line.strip() for line in _comment_block(source) if line.strip())
    helpers = []
    for i, line in enumerate(lines):
        m = _FUNCTION.match(line)
        if not m:
            continue
        comment: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].startswith("--") and not lines[j].startswith("--!"):
            comment.insert(0, lines[j][2:].strip())
            j -= 1
        if j < 0:  # the comment above is the file's opening comment, not this function's
            comment = []
        helpers.append(Helper(m.group(1), m.group(2).strip(), " ".join(c for c in comment if c)))
    return intro, helpers


def code_meanings() -> dict[Code, str]:
    """The comment after each member of :class:`Code` in codes.py ('' where there is none)."""
    source = (resources.files("redflow.storage") / "codes.py").read_text(encoding="utf-8")
    found = {m.group(1): (m.group(3) or "").strip() for m in _CODE_LINE.finditer(source)}
    return {code: found.get(code.name, "") for code in Code}


# --- Markdown ---------------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Text safe in a Markdown table cell: ``|`` escaped, ``<`` escaped outside code spans."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _key_note(note: str) -> str:
    """A key's note, its leading key pattern (``q:<queue>:ready``) as code."""
    m = _KEY_PATTERN.match(note)
    if not m:
        return _md(note)
    return f"`{m.group(0)}`" + _md(note[m.end() :])


def _codes(codes: Sequence[Code]) -> str:
    return " / ".join(f"`{c.name}`" for c in codes)


def render_script(h: Header) -> list[str]:
    out = [f"#### `{h.name}`", "", _md(h.description), ""]
    if h.includes:
        out += ["Includes " + ", ".join(f"`lib/{lib}.lua`" for lib in h.includes) + ".", ""]
    out += ["| KEYS | name | note |", "|---|---|---|"]
    out += [f"| {k.index} | `{k.name}` | {_key_note(k.note)} |" for k in h.keys]
    out += ["", "| ARGV | meaning |", "|---|---|"]
    out += [f"| {a.index} | {_md(a.note)} |" for a in h.args]
    out += ["", "| returns | then | when / note |", "|---|---|---|"]
    out += [f"| {_codes(o.codes)} | {_md(o.fields)} | {_md(o.note)} |" for o in h.outcomes]
    return [*out, ""]


def render_helpers(lib: str) -> list[str]:
    intro, helpers = parse_helpers(_read(f"lib/{lib}.lua"))
    out = [f"#### `lib/{lib}.lua`", ""]
    if intro:
        out += [_md(intro), ""]
    for helper in helpers:
        line = f"- `{helper.name}({helper.params})`"
        out.append(f"{line}: {_md(helper.comment)}" if helper.comment else line)
    return [*out, ""]


def render() -> str:
    """The generated section (what goes between the markers), ending in a newline."""
    headers = script_headers()
    meanings = code_meanings()
    returned_by: dict[Code, list[str]] = {code: [] for code in Code}
    for h in headers:
        for code in dict.fromkeys(c for o in h.outcomes for c in o.codes):
            returned_by[code].append(h.name)
    out = [
        "<!-- Generated from the script headers by `python -m redflow.storage.script_docs --write`;"
        " edit the headers, not this section. -->",
        "",
        "### Return codes",
        "",
        "Defined once in `redflow/storage/codes.py`; the loader prepends them to every script as the Lua "
        "table `C`.",
        "",
        "| code | value | meaning | returned by |",
        "|---|---:|---|---|",
    ]
    for code in Code:
        users = ", ".join(f"`{n}`" for n in returned_by[code]) or "-"
        out.append(f"| `{code.name}` | {int(code)} | {_md(meanings[code]) or '-'} | {users} |")
    out += ["", "### Script reference", ""]
    for h in headers:
        out += render_script(h)
    out += ["### Shared helpers", "",
            "Inlined by the loader where a script says `--!include <name>`.", ""]
    for lib in LIBS:
        out += render_helpers(lib)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def _bounds(doc: str) -> tuple[int, int]:
    if doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise ValueError(f"the document needs exactly one {BEGIN!r} and one {END!r}")
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    if end < start:
        raise ValueError(f"{END!r} comes before {BEGIN!r}")
    return start, end


def generated_section(doc: str) -> str:
    """What ``doc`` holds between the markers (without the newline right after BEGIN)."""
    start, end = _bounds(doc)
    return doc[start:end].removeprefix("\n")


def replace_section(doc: str, body: str) -> str:
    start, end = _bounds(doc)
    return doc[:start] + "\n" + body + doc[end:]


def default_doc() -> Path:
    """docs/architecture.md of the source tree this module sits in, else of the current directory."""
    in_tree = Path(__file__).resolve().parents[3] / "docs" / "architecture.md"
    return in_tree if in_tree.exists() else Path("docs") / "architecture.md"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m redflow.storage.script_docs", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated section of the document")
    mode.add_argument("--check", action="store_true", help="exit 1 when the generated section is stale")
    parser.add_argument("--doc", type=Path, help="the document (default: docs/architecture.md)")
    args = parser.parse_args(argv)
    body = render()
    if not (args.write or args.check):
        sys.stdout.write(body)
        return 0
    path: Path = args.doc or default_doc()
    doc = path.read_text(encoding="utf-8")
    if args.check:
        if generated_section(doc) != body:
            print(f"{path}: the generated script reference is stale; run "
                  "`python -m redflow.storage.script_docs --write`", file=sys.stderr)
            return 1
        return 0
    updated = replace_section(doc, body)
    if updated != doc:
        path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
