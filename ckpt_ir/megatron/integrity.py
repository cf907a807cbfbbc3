"""Megatron-Core's checkpoint integrity manifest (``--verify-integrity``, 0.18+, ``torch_dist``
only; ``megatron/core/dist_checkpointing/validation.py``).

After a save, rank 0 hashes every regular file directly inside the iteration directory (not
sub-directories such as ``tokenizer/``, not the manifest itself) and writes, in name order::

    iter_N/integrity.json   json.dump({"algorithm": "sha256", "files": {name: hex digest}}, indent=2)

A load with ``verify_integrity`` re-hashes each listed file and fails on a missing file or a
different digest; files the manifest does not list are not checked.  Files are read in 1 MiB
chunks, never whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from ckpt_ir.errors import FormatError

MANIFEST = "integrity.json"
ALGORITHM = "sha256"
CHUNK = 1 << 20


def file_digest(path: str) -> str:
    """The SHA-256 hex digest of the file at ``path``, read a chunk at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digests(paths: list[str]) -> list[str]:
    """Digests of ``paths``, files hashed side by side (hashlib releases the GIL on large updates)."""
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(file_digest, paths))


def manifest_text(iteration_dir: str) -> str:
    """The ``integrity.json`` Megatron-Core writes for the files now in ``iteration_dir``."""
    names = sorted(
        e.name for e in os.scandir(iteration_dir) if e.is_file(follow_symlinks=False) and e.name != MANIFEST
    )
    digests = _digests([os.path.join(iteration_dir, n) for n in names])
    return json.dumps({"algorithm": ALGORITHM, "files": dict(zip(names, digests))}, indent=2)


def write_manifest(iteration_dir: str) -> None:
    """Write ``integrity.json`` into ``iteration_dir``, once every other file of it is written."""
    text = manifest_text(iteration_dir)
    with open(os.path.join(iteration_dir, MANIFEST), "w") as f:
        f.write(text)


def verify(iteration_dir: str) -> None:
    """Check the files of ``iteration_dir`` against its ``integrity.json``, when it has one: a
    listed file that is missing or whose SHA-256 differs is a one-line error naming it."""
    path = os.path.join(iteration_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(
            f"{path}: cannot read the integrity manifest ({e}); the checkpoint is corrupt"
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise FormatError(f"{path}: not Megatron-Core's integrity manifest (no 'files' map of digests)")
    algorithm = manifest.get("algorithm", ALGORITHM)
    if algorithm != ALGORITHM:
        raise FormatError(
            f"{path}: hash algorithm {algorithm!r}; Megatron-Core writes and checks only {ALGORITHM!r}"
        )
    names = sorted(files)
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise FormatError(f"{path}: lists {name!r}, which is not a file of the iteration directory")
        if not os.path.isfile(os.path.join(iteration_dir, name)):
            raise FormatError(
                f"{os.path.join(iteration_dir, name)}: listed in {MANIFEST} but missing; the checkpoint is incomplete"
            )
    for name, got in zip(names, _digests([os.path.join(iteration_dir, n) for n in names])):
        if got != files[name]:
            raise FormatError(
                f"{os.path.join(iteration_dir, name)}: SHA-256 {got[:16]}... differs from the "
                f"{files[name][:16]}... recorded in {MANIFEST}; the file changed or is corrupt since it was saved"
            )
