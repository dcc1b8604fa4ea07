"""The documents' promises point at tests that exist: every pytest node id named in
docs/RELIABILITY.md's fault matrix is a test function in that file (a renamed test must not
leave a row pointing at nothing)."""

from __future__ import annotations

import ast
import re

from event_pipeline import settings

TESTS = settings.REPO_ROOT / "tests"
NODE_ID = re.compile(r"`((?:dags/|dbt/)?test_\w+\.py)::(\w+)(\[[^\]`]*\])?`")


def _test_functions(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_named_in_the_fault_matrix_exists():
    text = (settings.REPO_ROOT / "docs" / "RELIABILITY.md").read_text()
    named = NODE_ID.findall(text)
    assert len(named) > 50  # the matrix is there and the pattern reads it
    missing = [
        f"{file}::{function}"
        for file, function, _ in named
        if not (TESTS / file).exists() or function not in _test_functions(TESTS / file)
    ]
    assert missing == []
