"""Dataset registry: cache, then mirror (checksums verified), then download."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from pipelines import datasets
from pipelines.datasets import REGISTRY, resolve_dataset, sha256_file
from pipelines.errors import ChecksumMismatch, DatasetUnavailable


def _fake_mirror(root: Path, name: str, files: dict[str, bytes], lie: bool = False) -> Path:
    (root / name).mkdir(parents=True)
    lines = []
    for fname, content in files.items():
        (root / name / fname).write_bytes(content)
        digest = hashlib.sha256(content + (b"x" if lie else b"")).hexdigest()
        lines.append(f"{digest}  {name}/{fname}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DatasetUnavailable, match=r"unknown dataset 'nope'.*ml-latest-small"):
        resolve_dataset("nope")


@pytest.mark.parametrize("name", ["../etc", "/etc/passwd", "ml-latest-small/../../x"])
def test_names_that_escape_are_unknown(name):
    with pytest.raises(DatasetUnavailable, match="unknown dataset"):
        resolve_dataset(name)


def test_mirror_is_used_and_verified(mirror, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(mirror))
    folder = resolve_dataset("ml-latest-small")
    assert folder == mirror / "ml-latest-small"


def test_mirror_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    games = REGISTRY["games"]
    fake = _fake_mirror(tmp_path / "m", "games", {"games.txt": b"1 1\n1 2\n"}, lie=True)
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(fake))
    with pytest.raises(ChecksumMismatch, match=r"games.txt does not match .*SHA256SUMS"):
        resolve_dataset(games.name)


def test_mirror_file_missing_from_sums_is_refused(tmp_path, monkeypatch):
    fake = _fake_mirror(tmp_path / "m", "games", {"games.txt": b"1 1\n"})
    (fake / "SHA256SUMS").write_text("")
    monkeypatch.setenv("ATTNFLOW_DATA_MIRROR", str(fake))
    with pytest.raises(ChecksumMismatch, match="not listed"):
        resolve_dataset("games")


def _serve_zip(tmp_path: Path, monkeypatch, corrupt: bool = False) -> str:
    """Register a file:// 'official archive' for ml-latest-small and return its digest."""
    archive = tmp_path / "ml.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n")
        zf.writestr("ml-latest-small/movies.csv", "movieId,title,genres\n1,A,Drama\n")
        zf.writestr("ml-latest-small/tags.csv", "userId,movieId,tag,timestamp\n")
    digest = sha256_file(archive)
    spec = dataclasses.replace(
        REGISTRY["ml-latest-small"], url=archive.as_uri(), sha256="0" * 64 if corrupt else digest
    )
    monkeypatch.setitem(REGISTRY, "ml-latest-small", spec)
    monkeypatch.delenv("ATTNFLOW_DATA_MIRROR", raising=False)
    return digest


def test_download_verifies_unpacks_and_then_serves_from_cache(tmp_path, monkeypatch):
    _serve_zip(tmp_path, monkeypatch)
    folder = resolve_dataset("ml-latest-small")
    assert folder.parent.parent == datasets.cache_root()
    assert (folder / "ratings.csv").read_text().startswith("userId")
    # Second call: the cache, even with the "network" gone.
    (tmp_path / "ml.zip").unlink()
    assert resolve_dataset("ml-latest-small") == folder


def test_tampered_cache_is_not_trusted(tmp_path, monkeypatch):
    _serve_zip(tmp_path, monkeypatch)
    folder = resolve_dataset("ml-latest-small")
    (folder / "ratings.csv").write_text("tampered\n")
    # The cache is ignored and the archive fetched again.
    again = resolve_dataset("ml-latest-small")
    assert (again / "ratings.csv").read_text().startswith("userId")


def test_download_with_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    _serve_zip(tmp_path, monkeypatch, corrupt=True)
    with pytest.raises(ChecksumMismatch, match="registry expects"):
        resolve_dataset("ml-latest-small")
    assert not (datasets.cache_root() / "datasets" / "ml-latest-small").exists()


def test_offline_without_mirror_says_what_to_set(monkeypatch):
    spec = dataclasses.replace(REGISTRY["games"], url="http://127.0.0.1:9/Video.txt")
    monkeypatch.setitem(REGISTRY, "games", spec)
    monkeypatch.delenv("ATTNFLOW_DATA_MIRROR", raising=False)
    with pytest.raises(DatasetUnavailable, match="set ATTNFLOW_DATA_MIRROR") as err:
        resolve_dataset("games", timeout=2)
    assert "\n" not in str(err.value)


def test_mirror_only_dataset_without_mirror_says_so(monkeypatch):
    monkeypatch.delenv("ATTNFLOW_DATA_MIRROR", raising=False)
    with pytest.raises(DatasetUnavailable, match=r"no official download.*ATTNFLOW_DATA_MIRROR"):
        resolve_dataset("yoochoose-100k")
