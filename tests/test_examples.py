"""The examples stay true to the code: each one runs to completion (on CPU via the interpreter)."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path):
    """The example script executes without error."""
    runpy.run_path(str(path), run_name="__main__")
