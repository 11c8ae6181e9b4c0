"""The pipeline benchmark measures the stack as `attnflow up` runs it for a user."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_copying_the_repository_leaves_the_environment_alone() -> None:
    # conftest switches Prefect's API logging off for the tests; the benchmark copies the
    # repository with the same helper, and must not pass that setting on to its stack.
    code = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import benchmarks.pipeline_overhead\n"
        "from tests.repo import copy_repo\n"
        "print(json.dumps(sorted(k for k, v in os.environ.items() if before.get(k) != v)))\n"
    )
    # The child starts without this session's Prefect settings, so a module that sets
    # them on import shows up as a change.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
