"""The layout's rules: dependencies point one way, nothing happens at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_PIPELINES = {"prefect", "bentoml", "flows", "services", "attnflow"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").rglob("*.py")), ids=lambda p: p.name)
def test_pipelines_import_neither_prefect_nor_bentoml_nor_upper_layers(path):
    assert not (_imports(path) & FORBIDDEN_IN_PIPELINES)


def test_services_do_not_import_flows():
    # Flows may start and stop services (the rollout flow does); services never run flows.
    for path in (REPO / "services").rglob("*.py"):
        assert "flows" not in _imports(path), path


def test_importing_pipelines_does_no_work_and_loads_no_heavy_library():
    code = (
        "import sys, pipelines.config, pipelines.events, pipelines.split, pipelines.datasets;"
        "heavy = {'great_expectations', 'torch', 'prefect', 'bentoml', 'mlflow'};"
        "heavy &= set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
