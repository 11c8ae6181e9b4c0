"""`bentoml build` packages the model service as a Bento from bentofile.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_bentoml_build_packages_the_model_service(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "."],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bentos = list((tmp_path / "bentos" / "attnflow").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento = yaml.safe_load(bentos[0].read_text())
    assert bento["service"] == "services.model_service:ModelService"
    src = bentos[0].parent / "src"
    # the service and every domain module it imports travel with it; the model does not
    assert (src / "services" / "model_service.py").exists()
    for module in ("inference", "model", "feedback", "privacy", "config"):
        assert (src / "pipelines" / f"{module}.py").exists(), module
    assert not list(src.rglob("*.safetensors"))
