"""Imports go one way: training <- listener <- the CLI's callers; nothing ships imports the tests.

`training/` is the bottom layer (documents, models, checkpoints, the shared names in
`training/defaults.py`) and never imports `listener/`; `listener/` drives training through child
processes and may import it; `mongotune/` (the Python API) and `bench/` may import both, and nothing
below imports them; no package imports `tests/`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"training": {"listener", "mongotune", "bench", "tests"}, "listener": {"mongotune", "bench", "tests"},
             "mongotune": {"bench", "tests"}, "bench": {"tests"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    broken = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
              for path in (ROOT / package).rglob("*.py")}
    assert not {name: found for name, found in broken.items() if found}


def test_the_rule_catches_a_wrong_import(tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def f():\n    from listener.embedded import free_port\n")
    assert imported_packages(wrong) & FORBIDDEN["training"] == {"listener"}
