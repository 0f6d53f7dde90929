"""The demo's tiny base, shipped with the source: built once, then loaded on every machine.

A real user downloads Vicuna + CLIP + a stage-1 projector rather than pretraining them; the demo does the same
with its tiny stand-in. Pretraining it takes minutes, and another CPU's floating-point path is enough to give
another base (and with it other zero-shot skills and other gains), so the demo loads the committed one by default
and ``road-vlm demo --rebuild-base`` still builds it from scratch.

``manifest.json`` beside the files records how the base was built (the settings, the code version, the library
versions, the machine) and the SHA-256 of every file; the demo checks the files against it before using them.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from road_vlm.outputs import file_sha256

SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "base"
MANIFEST = "manifest.json"


class ShippedBaseError(RuntimeError):
    """The shipped base's files do not match their manifest (missing, extra or changed)."""


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the manifest, by path relative to ``folder``."""
    return {path.relative_to(folder).as_posix(): file_sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def read_manifest(folder: Path = SHIPPED_BASE) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ShippedBaseError(f"{path} not found: the demo's shipped base is incomplete (`road-vlm demo "
                               "--rebuild-base` builds one from scratch)")
    return json.loads(path.read_text())


def verify_shipped_base(folder: Path = SHIPPED_BASE) -> dict[str, Any]:
    """The manifest, once every file under ``folder`` matches it; otherwise ShippedBaseError naming the files."""
    manifest = read_manifest(folder)
    expected, actual = manifest["files"], file_digests(folder)
    problems = [f"missing {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"unexpected {name}" for name in sorted(set(actual) - set(expected))]
    problems += [f"changed {name}" for name in sorted(set(expected) & set(actual)) if expected[name] != actual[name]]
    if problems:
        raise ShippedBaseError(f"{folder}: the files do not match {MANIFEST} ({'; '.join(problems)}); restore them "
                               "with git, or build a base with `road-vlm demo --rebuild-base`")
    return manifest


def _code_version(repo: Path) -> str:
    """``git describe`` of the source tree the base was built with (``-dirty`` when it had local changes)."""
    try:
        return subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def ship_base(built: Path, settings: dict[str, Any], dest: Path = SHIPPED_BASE) -> dict[str, Any]:
    """Copy a base built by ``road-vlm demo --rebuild-base`` to ``dest`` and write its manifest there."""
    import tokenizers
    import torch
    import transformers

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(built, dest)
    manifest = {
        "built_by": "road-vlm demo --rebuild-base --until base, then scripts/ship_demo_base.py",
        "settings": settings,
        "code_version": _code_version(Path(__file__).resolve().parents[2]),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "tokenizers": tokenizers.__version__},
        "machine": {"processor": _processor_name(), "system": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "files": file_digests(dest),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
