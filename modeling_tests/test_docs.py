"""docs/reliability.md claims only what a test shows: every row of its tables names at least one test, and every
test it names exists (`file.py::function`, or `::function` after a file named earlier in the same cell, or a whole
test file)."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "modeling_tests")


def _functions(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _rows(path):
    """(line number, last cell) of every body row of every markdown table (the rows after a |---| line)."""
    with open(path) as f:
        lines = f.read().splitlines()
    in_body = False
    for number, line in enumerate(lines, start=1):
        if not line.startswith("|"):
            in_body = False
        elif set(line) <= set("|-: "):
            in_body = True
        elif in_body:
            yield number, [cell.strip() for cell in line.strip().strip("|").split("|")][-1]


def test_every_reliability_row_names_a_test_that_exists():
    doc = os.path.join(ROOT, "docs", "reliability.md")
    rows = list(_rows(doc))
    assert len(rows) > 40
    for line, cell in rows:
        refs = re.findall(r"`?((?:[\w]+\.py)?::[\w]+|[\w]+\.py)`?", cell)
        assert refs, f"reliability.md:{line}: names no test ({cell!r})"
        current = None
        for ref in refs:
            name, _, function = ref.partition("::")
            current = name or current
            assert current, f"reliability.md:{line}: {ref} follows no file"
            path = os.path.join(TESTS, current)
            assert os.path.isfile(path), f"reliability.md:{line}: {current} does not exist"
            if function:
                assert function in _functions(path), f"reliability.md:{line}: {current}::{function} does not exist"
