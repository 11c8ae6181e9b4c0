"""The dataset registry and where a dataset's files come from.

`resolve_dataset(name)` returns a folder with the dataset's files, looking in order:

1. the local cache (`ATTNFLOW_CACHE`, default ``~/.cache/attnflow``), files verified;
2. the mirror (`ATTNFLOW_DATA_MIRROR`), every file verified against its `SHA256SUMS`;
3. the official archive, downloaded, verified against the registry's SHA-256 and
   unpacked into the cache.

Offline with neither a cache nor a mirror, one line says what to set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ChecksumMismatch, DatasetUnavailable

log = logging.getLogger(__name__)

MIRROR_ENV = "ATTNFLOW_DATA_MIRROR"
CACHE_ENV = "ATTNFLOW_CACHE"
VERIFIED_MARKER = ".attnflow-verified"


@dataclass(frozen=True)
class DatasetSpec:
    """One public dataset: where it comes from and how to read it."""

    name: str
    reader: str  # a key of pipelines.readers.READERS
    files: tuple[str, ...]  # file names inside the dataset folder
    url: str | None  # the official download; None where no official archive holds it
    sha256: str | None  # of the downloaded file, as published / pinned
    archive: str = "zip"  # "zip" or "file" (the download is the data file itself)
    archive_prefix: str = ""  # folder inside the zip that holds `files`
    order_only: bool = False  # timestamps carry order only (no real time)
    source: str = ""
    licence: str = ""


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ml-latest-small",
            reader="movielens",
            files=("ratings.csv", "movies.csv", "tags.csv"),
            url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
            # as published in TensorFlow Datasets' url_checksums/movielens.txt
            sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
            archive="zip",
            archive_prefix="ml-latest-small",
            source="GroupLens MovieLens latest-small",
            licence="GroupLens terms: research use; no commercial use without permission",
        ),
        DatasetSpec(
            name="games",
            reader="sasrec",
            files=("games.txt",),
            # the SASRec authors' preprocessed Amazon Video Games sequences
            url="https://raw.githubusercontent.com/kang205/SASRec/master/data/Video.txt",
            sha256="b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651",
            archive="file",
            order_only=True,
            source="SASRec (Kang & McAuley, ICDM 2018), Amazon Video Games",
            licence="Amazon review data (McAuley et al.), research use",
        ),
        DatasetSpec(
            name="yoochoose-100k",
            reader="session_clicks",
            files=("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"),
            # A 100k-click slice of the RecSys Challenge 2015 log. The official archive
            # (yoochoose-data.7z) holds the full 33M-click log, not this slice, so the
            # slice is read from a cache or mirror only.
            url=None,
            sha256=None,
            source="RecSys Challenge 2015 (YOOCHOOSE), 100k-click slice",
            licence="challenge terms, research use",
        ),
    )
}

# Datasets that do not come from files (see pipelines.readers).
BUILTIN = ("synthetic", "eventlog")


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`; a clear error listing the known names otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        known = ", ".join([*REGISTRY, *BUILTIN])
        raise DatasetUnavailable(f"unknown dataset {name!r}; known datasets: {known}")
    return spec


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """The download cache (`ATTNFLOW_CACHE`, default ``~/.cache/attnflow``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnflow").expanduser()


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse a `sha256sum`-format file into {relative path: hex digest}."""
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        sums[name.strip().lstrip("*").removeprefix("./")] = digest.lower()
    return sums


def _from_cache(spec: DatasetSpec, root: Path) -> Path | None:
    folder = root / "datasets" / spec.name
    marker = folder / VERIFIED_MARKER
    if not marker.exists() or not all((folder / f).exists() for f in spec.files):
        return None
    recorded = read_sha256sums(marker)
    for f in spec.files:
        if recorded.get(f) != sha256_file(folder / f):
            log.warning(
                "cached %s/%s changed since it was verified; ignoring the cache", spec.name, f
            )
            return None
    return folder


def _from_mirror(spec: DatasetSpec, mirror: Path) -> Path | None:
    folder = mirror / spec.name
    if not all((folder / f).exists() for f in spec.files):
        return None
    sums_file = mirror / "SHA256SUMS"
    if not sums_file.exists():
        raise ChecksumMismatch(f"mirror {mirror} has no SHA256SUMS; cannot verify {spec.name}")
    sums = read_sha256sums(sums_file)
    for f in spec.files:
        rel = f"{spec.name}/{f}"
        if rel not in sums:
            raise ChecksumMismatch(f"mirror file {folder / f} is not listed in {sums_file}")
        actual = sha256_file(folder / f)
        if actual != sums[rel]:
            raise ChecksumMismatch(
                f"mirror file {folder / f} does not match {sums_file}: "
                f"sha256 {actual[:12]}... expected {sums[rel][:12]}..."
            )
    return folder


class UnsafeArchive(DatasetUnavailable):
    """An archive with a member that would land outside its folder when unpacked."""


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why unpacking this member could write outside the target folder, or None if safe.

    Absolute names, drive letters and `..` climb out (zip slip); a symlink member
    would let a later member write through it.
    """
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def unpack_zip(archive: Path, prefix: str, files: tuple[str, ...], dest: Path) -> None:
    """Copy `prefix/<file>` for each of `files` out of `archive` into `dest`.

    Every member is checked before anything is written: an archive holding even one
    member that could escape (`unsafe_member`) is refused whole, since it was not
    made by the dataset's publisher. Each file is then written under its registry
    name, never under the name the archive gives it.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetUnavailable(f"{archive.name}: not a zip archive ({exc})") from None
    with zf:
        for info in zf.infolist():
            why = unsafe_member(info)
            if why is not None:
                raise UnsafeArchive(
                    f"{archive.name}: member {info.filename!r} is {why}; refusing to unpack"
                )
        for f in files:
            member = f"{prefix}/{f}" if prefix else f
            try:
                src = zf.open(member)
            except KeyError:
                raise DatasetUnavailable(f"{archive.name}: no member {member!r}") from None
            with src, open(dest / f, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _download(spec: DatasetSpec, root: Path, timeout: float) -> Path:
    assert spec.url and spec.sha256
    folder = root / "datasets" / spec.name
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp_str:
        tmp = Path(tmp_str)
        download = tmp / "download"
        log.info("downloading %s from %s", spec.name, spec.url)
        with urllib.request.urlopen(spec.url, timeout=timeout) as resp, open(download, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        actual = sha256_file(download)
        if actual != spec.sha256:
            raise ChecksumMismatch(
                f"download of {spec.name} from {spec.url} has sha256 {actual[:12]}..., "
                f"the registry expects {spec.sha256[:12]}..."
            )
        staged = tmp / "staged"
        staged.mkdir()
        if spec.archive == "zip":
            unpack_zip(download, spec.archive_prefix, spec.files, staged)
        else:
            shutil.copyfile(download, staged / spec.files[0])
        lines = [f"{sha256_file(staged / f)}  {f}" for f in spec.files]
        (staged / VERIFIED_MARKER).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, folder)
    return folder


def resolve_dataset(name: str, timeout: float = 60.0) -> Path:
    """A verified local folder holding the files of dataset `name` (cache, mirror, download)."""
    spec = get_spec(name)
    root = cache_root()
    cached = _from_cache(spec, root)
    if cached is not None:
        log.info("dataset %s: cache %s", name, cached)
        return cached
    mirror_env = os.environ.get(MIRROR_ENV)
    if mirror_env:
        mirrored = _from_mirror(spec, Path(mirror_env).expanduser())
        if mirrored is not None:
            log.info("dataset %s: mirror %s (checksums verified)", name, mirrored)
            return mirrored
    hint = f"set {MIRROR_ENV} to a folder holding {name}/ and SHA256SUMS"
    if spec.url is None:
        where = f"mirror {mirror_env}" if mirror_env else f"{MIRROR_ENV} is not set"
        raise DatasetUnavailable(
            f"dataset {name!r} has no official download; not in the cache and {where}: {hint}"
        )
    try:
        return _download(spec, root, timeout)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetUnavailable(
            f"dataset {name!r} is not cached or mirrored and its download failed ({reason}): {hint}"
        ) from None
