"""A copy of this repository as a fresh clone would have it.

Kept apart from `conftest.py`, which sets the test environment when imported (no API
logging, a throwaway Prefect home): a benchmark that copies the repository must not
inherit those settings into the stack it measures.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> Path:
    """A fresh clone's worth of the repository (tracked and new, non-ignored files) in `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest
