"""Output directories that appear complete or not at all: write into ``<name>.partial``, then rename; and the
SHA-256 that manifests of written directories record."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


class OutputExistsError(ValueError):
    """The output directory exists, is not empty, and overwriting was not asked for."""


def fresh_output(output: Path, overwrite: bool) -> Path:
    """A temporary sibling directory to write into; :func:`publish` makes it ``output`` once complete."""
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"{output}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    tmp = output.with_name(output.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, output: Path) -> None:
    """Replace ``output`` by the finished ``tmp``."""
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
