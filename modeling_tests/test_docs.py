"""The docs cannot drift from the code:

- docs/reliability.md and docs/compatibility.md claim only what a test shows: every row of their tables whose last
  column is "test(s)" names at least one test, and every test it names exists (`file.py::function`, or
  `::function` after a file named earlier in the same cell, or a whole test file);
- every message docs/troubleshooting.md quotes (the `code` in a "message" column) occurs verbatim in a string of
  the package's source;
- docs/index.md links every file in docs/."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "modeling_tests")
DOCS = os.path.join(ROOT, "docs")
PACKAGE = os.path.join(ROOT, "qwen2_moe_hf")


def _functions(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _tables(path):
    """(header cells, [(line number, cells) of each body row]) of every markdown table in the file."""
    with open(path) as f:
        lines = f.read().splitlines()
    tables, header, rows = [], None, None
    for number, line in enumerate(lines, start=1):
        if not line.startswith("|"):
            header = rows = None
        elif rows is None and header is not None and set(line) <= set("|-: "):
            rows = []
            tables.append((header, rows))
        elif rows is None:
            header = _cells(line)
        else:
            rows.append((number, _cells(line)))
    return tables


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _test_rows(path):
    """(line number, last cell) of every body row of the tables whose last column is "test" or "tests"."""
    for header, rows in _tables(path):
        if header[-1] in ("test", "tests"):
            for number, cells in rows:
                yield number, cells[-1]


@pytest.mark.parametrize("doc, at_least", [("reliability.md", 40), ("compatibility.md", 25)])
def test_every_row_names_a_test_that_exists(doc, at_least):
    rows = list(_test_rows(os.path.join(DOCS, doc)))
    assert len(rows) > at_least
    for line, cell in rows:
        refs = re.findall(r"`?((?:[\w]+\.py)?::[\w]+|[\w]+\.py)`?", cell)
        assert refs, f"{doc}:{line}: names no test ({cell!r})"
        current = None
        for ref in refs:
            name, _, function = ref.partition("::")
            current = name or current
            assert current, f"{doc}:{line}: {ref} follows no file"
            path = os.path.join(TESTS, current)
            assert os.path.isfile(path), f"{doc}:{line}: {current} does not exist"
            if function:
                assert function in _functions(path), f"{doc}:{line}: {current}::{function} does not exist"


def _code_spans(cell):
    """The contents of the `code` spans of a markdown cell (``a `b` c`` included)."""
    spans = []
    for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", cell):
        text = match.group(2)
        spans.append(text[1:-1] if len(text) > 2 and text[0] == text[-1] == " " else text)
    return spans


def _source_strings():
    """Every string literal in the package's Python source other than docstrings. An f-string's literal parts are
    separate strings (the placeholders between them vary); implicitly concatenated literals are one."""
    strings = []
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            docstrings = {id(node.value) for node in ast.walk(tree)
                          if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
            strings += [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                        and isinstance(node.value, str) and id(node) not in docstrings]
    return strings


def test_every_troubleshooting_message_occurs_in_the_source():
    strings = _source_strings()
    quoted = []
    for header, rows in _tables(os.path.join(DOCS, "troubleshooting.md")):
        if header[0] != "message":
            continue  # messages of other libraries
        for line, cells in rows:
            spans = _code_spans(cells[0])
            assert spans, f"troubleshooting.md:{line}: quotes no message ({cells[0]!r})"
            quoted += [(line, span) for span in spans]
    assert len(quoted) > 60
    missing = [f"troubleshooting.md:{line}: {span!r}" for line, span in quoted
               if not any(span in string for string in strings)]
    assert not missing, "quoted messages that no string of qwen2_moe_hf/ contains:\n" + "\n".join(missing)


def test_every_doc_is_linked_from_the_index():
    with open(os.path.join(DOCS, "index.md")) as f:
        links = {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", f.read())}
    docs = {name for name in os.listdir(DOCS) if name.endswith(".md") and name != "index.md"}
    assert not docs - links, f"docs/index.md links none of {sorted(docs - links)}"
