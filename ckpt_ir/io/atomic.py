"""Atomic output directories: write into a hidden sibling, rename into place when complete.

A conversion that fails, is interrupted (Ctrl-C) or killed (SIGKILL) never leaves a directory at
the destination: only a hidden ``.NAME.ckpt-ir-tmp-PID`` sibling, removed on any handled error and
swept by the next run once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from ckpt_ir.errors import CkptIrError, UsageError

TMP_TAG = ".ckpt-ir-tmp-"


def check_destination(dst: str, overwrite: bool) -> None:
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UsageError(f"{dst}: exists and is not a directory; choose another destination")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise UsageError(f"{dst}: destination exists and is not empty; pass --overwrite to replace it")
    parent = existing_ancestor(dst)  # missing parents are created when the output is prepared
    if not os.path.isdir(parent):
        raise CkptIrError(f"{parent}: not a directory, so the destination cannot be created below it; choose "
                          f"another destination")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CkptIrError(f"{parent}: not writable; choose a destination you can write to")


def existing_ancestor(path: str) -> str:
    """The nearest parent of ``path`` that exists (a directory, or a file in the way)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def check_apart(dst: str, sources: dict[str, str | None]) -> None:
    """Refuse a destination that is one of the inputs (``{flag: path}``, e.g. SRC, --hf-config),
    lies inside one, or contains one: replacing it would delete or change the input."""
    out = os.path.realpath(dst)
    for flag, path in sources.items():
        if not path:
            continue
        src = os.path.realpath(path)
        if os.path.isfile(src):  # a single weight file: its directory is the input
            src = os.path.dirname(src)
        how = "is" if out == src else "is inside" if _below(out, src) else "contains" if _below(src, out) else None
        if how:
            raise UsageError(f"{dst}: the destination {how} {flag} {path}; writing there would replace the input; "
                             f"choose a destination outside it")


def _below(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root and path != root


def check_free_space(dst: str, nbytes: int) -> None:
    parent = existing_ancestor(dst)
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise CkptIrError(f"{parent}: not enough free disk space: the output needs {nbytes / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB are free; free space or choose another destination")


def _sweep_stale(parent: str, base: str) -> None:
    prefix = f".{base}{TMP_TAG}"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        tag = name[len(prefix):]
        if tag.startswith("dist-"):
            continue  # a torchrun job's directory: its rank 0 owns it
        try:
            pid = int(tag.split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:
            pass


def temp_path(dst: str, tag: str | None = None) -> str:
    parent, base = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{base}{TMP_TAG}{tag or os.getpid()}")


def prepare(dst: str, overwrite: bool, tag: str | None = None) -> str:
    """Check the destination and create a fresh temporary sibling for it."""
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    parent, base = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    _sweep_stale(parent, base)
    tmp = temp_path(dst, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, dst: str) -> None:
    """Make everything under ``tmp`` durable, then rename it to ``dst`` (replacing a previous one)."""
    dst = os.path.abspath(dst)
    _fsync_dir(tmp)
    if os.path.isdir(dst):
        old = tmp + "-old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    _fsync_path(os.path.dirname(dst))


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory; on success it becomes ``dst`` (replacing it if ``overwrite``)."""
    tmp = temp_path(dst)
    try:  # prepare inside the try: an interrupt between mkdir and yield must not leave tmp behind
        prepare(dst, overwrite)
        yield tmp
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: str) -> None:
    """fsync every file and directory below ``path`` (data first, then the directory entries)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        for d in dirs:
            _fsync_path(os.path.join(root, d))
    _fsync_path(path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
