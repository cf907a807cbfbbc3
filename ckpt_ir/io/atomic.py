"""Atomic, exclusive output directories.  Writing DST takes three steps:

1. **claim**: ``flock`` a lock file ``.NAME.ckpt-ir-lock`` beside DST, sweep what killed runs
   left, and check DST, before any output is written.  A second conversion into DST fails here
   with an error naming DST.  The kernel drops a lock when its holder dies (SIGKILL included), so
   a lock file left by a killed run never blocks: the next run takes it over.  A non-empty DST
   is replaced only with ``--overwrite``, and only when it holds a checkpoint and nothing else
   (:func:`ckpt_ir.frontends.check_replaceable`, which callers pass in).
2. **write** into a hidden sibling ``.NAME.ckpt-ir-tmp-PID`` (removed on any handled error).
3. **publish**: fsync everything, then rename the sibling to DST with a rename that cannot
   replace anything that appeared after the check (``renameat2(RENAME_NOREPLACE)``), or, with
   ``--overwrite``, swap it with the DST that was checked (``RENAME_EXCHANGE``, verified by
   inode) and remove the old one.  So even a writer that ignores the lock is never replaced.

Without ``renameat2`` (not Linux, or a filesystem such as NFS that lacks the flags), a plain
rename is used: it can replace nothing but an empty directory, and an ``--overwrite`` moves the
old DST aside to ``.NAME.ckpt-ir-old-PID`` first; a kill between the two renames is undone by
the next run (it puts the old DST back).  Without ``flock`` support there is no lock; the
publish step still refuses to replace what it did not check, and leftovers are swept only once
their process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator

import attrs

from ckpt_ir.errors import CkptIrError, UsageError, setting

TMP_TAG = ".ckpt-ir-tmp-"
OLD_TAG = ".ckpt-ir-old-"
LOCK_TAG = ".ckpt-ir-lock"
STOP_ENV = "CKPT_IR_TEST_STOP_AT"


def stop_point(name: str) -> None:
    """Test hook: with ``CKPT_IR_TEST_STOP_AT=name`` the process stops itself (SIGSTOP) here, so a
    test can kill it, or let a rival run, at a known step of the publication."""
    if os.environ.get(STOP_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)


def check_destination(dst: str, overwrite: bool, replaceable: Callable[[str], None]) -> None:
    """Refuse a destination that cannot be written, or that is not empty unless ``overwrite``;
    ``replaceable`` then raises unless the directory may be replaced (only a checkpoint may:
    :func:`ckpt_ir.frontends.check_replaceable`)."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UsageError(f"{dst}: exists and is not a directory; choose another destination")
    if os.path.isdir(dst) and os.listdir(dst):
        if not overwrite:
            raise UsageError(
                f"{dst}: destination exists and is not empty; pass {setting('overwrite', True)} to replace it"
            )
        replaceable(dst)  # only a checkpoint, nothing else, is ever deleted
    parent = existing_ancestor(dst)  # missing parents are created when the output is prepared
    if not os.path.isdir(parent):
        raise CkptIrError(
            f"{parent}: not a directory, so the destination cannot be created below it; choose "
            f"another destination"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CkptIrError(f"{parent}: not writable; choose a destination you can write to")


# what to do when writing the output fails, by errno (default: _CHECK_DISK)
_WRITE_ADVICE = {
    errno.ENOSPC: "free space or choose another destination",
    errno.EDQUOT: "free space within your disk quota or choose another destination",
    errno.EFBIG: "the file is larger than this filesystem or your file-size limit (ulimit -f) allows; "
    "choose another destination",
    errno.EROFS: "choose a destination you can write to",
    errno.EACCES: "choose a destination you can write to",
    errno.EPERM: "choose a destination you can write to",
}
_CHECK_DISK = "check the disk, then convert again or choose another destination"


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OSError met while writing ``path`` (part of an output) into a one-line error that
    names the file (the OS's own errors from a write, such as a full disk, name none) and says
    what to do."""
    try:
        yield
    except OSError as e:
        raise CkptIrError(
            f"{e.filename or path}: {e.strerror or e}; {_WRITE_ADVICE.get(e.errno or 0, _CHECK_DISK)}"
        ) from None


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
        how = (
            "is"
            if out == src
            else "is inside"
            if _below(out, src)
            else "contains"
            if _below(src, out)
            else None
        )
        if how:
            raise UsageError(
                f"{dst}: the destination {how} {flag} {path}; writing there would replace the input; "
                f"choose a destination outside it"
            )


def _below(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root and path != root


def check_free_space(dst: str, nbytes: int) -> None:
    parent = existing_ancestor(dst)
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise CkptIrError(
            f"{parent}: not enough free disk space: the output needs {nbytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free space or choose another destination"
        )


def sibling(dst: str, tag: str) -> str:
    parent, base = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{base}{tag}")


def temp_path(dst: str, tag: str | None = None) -> str:
    return sibling(dst, f"{TMP_TAG}{tag or os.getpid()}")


@attrs.define
class Claim:
    """DST reserved for one conversion, from the check to the publication."""

    dst: str  # absolute
    overwrite: bool
    lock_fd: int | None  # None where the filesystem has no locks
    found: tuple[int, int] | None  # (st_dev, st_ino) of the directory at DST when checked; None: none


@contextlib.contextmanager
def claim(dst: str, overwrite: bool, replaceable: Callable[[str], None]) -> Iterator[Claim]:
    """Lock DST for this process, sweep leftovers and check DST; the lock is released (and its
    file removed) when the block ends.  A CkptIrError naming DST if another conversion holds it."""
    dst = os.path.abspath(dst)
    check_destination(
        dst, overwrite, replaceable
    )  # its clear errors first (a read-only parent, a file in the way)
    with writing(os.path.dirname(dst)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)  # missing parents are created
    lock = sibling(dst, LOCK_TAG)
    with writing(lock):
        fd, owner = _lock(lock, dst), os.getpid()
    try:
        _sweep_stale(dst, locked=fd is not None)
        check_destination(dst, overwrite, replaceable)
        yield Claim(dst, overwrite, fd, _identity(dst))
    finally:
        if fd is not None and os.getpid() == owner:  # not in a forked writer
            with contextlib.suppress(FileNotFoundError):
                if _same_file(os.stat(lock), os.fstat(fd)):
                    os.unlink(lock)  # while still holding it: only a holder removes the file
            os.close(fd)


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _lock(path: str, dst: str) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None where the
    filesystem does not support locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CkptIrError(
                f"{dst}: another conversion{f' ({holder})' if holder else ''} is writing this "
                f"destination; wait for it to finish or choose another destination"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and _same_file(current, os.fstat(fd)):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)  # its previous holder removed the file after we opened it: lock the new one


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _sweep_stale(dst: str, locked: bool) -> None:
    """Remove what killed conversions into DST left: temporary directories, and an old DST moved
    aside by a replacement (put back if DST is missing: the kill came between the two renames).
    Holding the lock, every leftover is stale; without locks, those whose process is gone."""
    parent, base = os.path.split(dst)
    for name in sorted(os.listdir(parent)):
        tag = next((t for t in (TMP_TAG, OLD_TAG) if name.startswith(f".{base}{t}")), None)
        if tag is None:
            continue
        owner = name[len(base) + 1 + len(tag) :]
        if not locked and (owner.startswith("dist-") or _alive(owner.split("-")[0])):
            continue  # a torchrun job's directory is its rank 0's to remove
        path = os.path.join(parent, name)
        if tag == OLD_TAG and not os.path.lexists(dst):
            _rename_noreplace(path, dst)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def prepare(claim: Claim, tag: str | None = None) -> str:
    """A fresh temporary sibling of the claimed DST."""
    tmp = temp_path(claim.dst, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


@contextlib.contextmanager
def output_dir(claim: Claim) -> Iterator[str]:
    """Yield a temporary directory; on success it is published as the claimed DST."""
    tmp = temp_path(claim.dst)
    try:  # prepare inside the try: an interrupt between mkdir and yield must not leave tmp behind
        with writing(tmp):  # the files' own errors name them; this names the rest (fsync, rename)
            prepare(claim)
            yield tmp
            publish(tmp, claim)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: str, claim: Claim) -> None:
    """Make everything under ``tmp`` durable, then rename it to DST, replacing nothing but the
    DST found by the check (an empty directory, or with --overwrite the one that was there)."""
    dst = claim.dst
    _fsync_dir(tmp)
    stop_point("publish")
    if claim.found is None:
        _place(tmp, dst)
    elif not claim.overwrite:  # an empty directory, unless something was written into it since
        try:
            os.rmdir(dst)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise _changed(dst) from None
        _place(tmp, dst)
    else:
        old = _replace(tmp, claim)
        stop_point("replaced")
        if old:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_path(os.path.dirname(dst))


def _replace(tmp: str, claim: Claim) -> str | None:
    """Put ``tmp`` at DST in place of the DST that was checked; returns where the old one is now."""
    dst = claim.dst
    try:
        swapped = _renameat2(tmp, dst, RENAME_EXCHANGE)
        if swapped and _identity(tmp) != claim.found:  # not the DST that was checked: give it back
            _renameat2(tmp, dst, RENAME_EXCHANGE)
            raise _changed(dst)
        if swapped:
            return tmp
        old = sibling(dst, f"{OLD_TAG}{os.getpid()}")
        os.rename(dst, old)
    except FileNotFoundError:  # DST is gone: nothing to replace
        _place(tmp, dst)
        return None
    if _identity(old) != claim.found:
        _rename_noreplace(old, dst)
        raise _changed(dst)
    stop_point("aside")
    _place(tmp, dst)
    return old


def _place(tmp: str, dst: str) -> None:
    try:
        _rename_noreplace(tmp, dst)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise _changed(dst) from None


def _changed(dst: str) -> CkptIrError:
    return CkptIrError(
        f"{dst}: the destination appeared or changed while converting (another process wrote it); "
        f"nothing was replaced: check it, then convert again (with --overwrite to replace it)"
    )


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (EEXIST).  Without renameat2 a plain rename:
    for a directory it still fails on anything but an empty directory."""
    if not _renameat2(src, dst, RENAME_NOREPLACE):
        os.rename(src, dst)


RENAME_NOREPLACE, RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """renameat2 with ``flags``; False where the C library, kernel or filesystem lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


# Start the disk writing what has been written every this many bytes: left to the kernel, dirty
# pages wait until memory pressure or the final fsync, so the disk idles while a pass computes and
# then the publish step waits seconds for the flush (measured: 3.7 s of fsync after a 4 GB LoRA
# merge, 0.1 s with this)
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()


class Writeback:
    """Asks the kernel to start writing a file's bytes to disk (without waiting) as each
    ``WRITEBACK_BYTES`` of sequential writes accumulate, so flushing overlaps the rest of the
    conversion.  A hint only: durability still comes from the fsync before publication, and where
    ``sync_file_range`` is missing or refused nothing happens."""

    def __init__(self, threshold: int | None = None) -> None:
        self.threshold = threshold or WRITEBACK_BYTES
        self.fd, self.lo, self.hi = -1, 0, 0

    def wrote(self, fd: int, pos: int, nbytes: int) -> None:
        if fd != self.fd or pos < self.hi:  # another file, or going back: a new run of bytes
            self.fd, self.lo = fd, pos  # (a jump forward, over a zip record header, continues it)
        self.hi = pos + nbytes
        if self.hi - self.lo >= self.threshold:
            if _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(fd, self.lo, self.hi - self.lo, _SYNC_FILE_RANGE_WRITE)  # errors: no hint
            self.lo = self.hi


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
