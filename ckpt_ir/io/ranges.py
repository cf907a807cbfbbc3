"""Zero-copy writing: most conversions only rearrange stored bytes, so a tensor's output is often
just a list of byte ranges of its source files.  Those are copied file-to-file inside the kernel
(``copy_file_range``), never entering this process's memory.

:func:`byte_ranges` finds such a list for an expression (or None when it computes something:
casts, arithmetic, padding, transposes); :func:`copy_ranges` performs the copy.
"""

from __future__ import annotations

import math
import os

from ckpt_ir.ir import expr as E
from ckpt_ir.ir.byte_ranges import Range
from ckpt_ir.ir.dtypes import itemsize

MIN_AVERAGE = 256 << 10  # below this average range length, per-call costs beat copying through memory


def byte_ranges(expr: E.Expr) -> list[Range] | None:
    """The output bytes of ``expr`` as consecutive source byte ranges, or None."""
    out = _ranges(expr)
    if out is None:
        return None
    merged: list[Range] = []
    for path, off, n in out:
        if n == 0:
            continue
        if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == off:
            merged[-1] = (path, merged[-1][1], merged[-1][2] + n)
        else:
            merged.append((path, off, n))
    if merged and expr.nbytes / len(merged) < MIN_AVERAGE:
        return None
    return merged


def _ranges(e: E.Expr) -> list[Range] | None:
    if isinstance(e, E.Load):
        start, end = e.byte_range
        return [(e.path, start, end - start)]
    if isinstance(e, E.Reshape):  # row-major: the same bytes in the same order
        return _ranges(e.x)
    if isinstance(e, E.Concat):
        outer = math.prod(e.shape[: e.dim])
        if outer == 1:
            parts = [_ranges(x) for x in e.xs]
            return None if any(p is None for p in parts) else [r for p in parts for r in p]  # type: ignore[union-attr]
        # concat along an inner dim: row by row, each child contributes one contiguous piece
        rows = [_rows(x, e.dim) for x in e.xs]
        if any(r is None for r in rows):
            return None
        return [r[i] for i in range(outer) for r in rows]  # type: ignore[index]
    if isinstance(e, E.Slice):
        if e.dim > 0 and e.nbytes < MIN_AVERAGE * math.prod(e.shape[: e.dim]):
            return None  # one short range per row, which never merge (a gap follows each): not worth listing
        return _rows(e, e.dim) if e.dim > 0 else None
    return None


def _rows(e: E.Expr, dim: int) -> list[Range] | None:
    """For a Load, or a slice of a Load along ``dim``: one byte range per index of the dims
    before ``dim`` (each covers the rest of that row)."""
    item = itemsize(e.dtype)
    if isinstance(e, E.Load):
        load, lo, hi = e, 0, e.shape[dim]
    elif isinstance(e, E.Slice) and isinstance(e.x, E.Load) and e.dim == dim:
        load, lo, hi = e.x, e.start, e.stop
    else:
        return None
    shape = load.shape
    inner = math.prod(shape[dim + 1 :]) * item
    row = shape[dim] * inner
    start, _ = load.byte_range
    return [
        (load.path, start + r * row + lo * inner, (hi - lo) * inner) for r in range(math.prod(shape[:dim]))
    ]


class Copier:
    """Copies byte ranges into an open output file, reusing source file descriptors."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def copy(self, ranges: list[Range], out_fd: int, out_pos: int) -> int:
        """Copy ``ranges`` to ``out_fd`` at ``out_pos``; returns bytes copied."""
        total = 0
        for path, off, n in ranges:
            src = self.fd(path)
            done = 0
            while done < n:
                k = 0
                if self.kernel_copy:
                    try:
                        k = os.copy_file_range(src, out_fd, n - done, off + done, out_pos + total + done)
                    except OSError:  # e.g. across filesystems on old kernels: copy through memory
                        self.kernel_copy = False
                if not self.kernel_copy:
                    data = os.pread(src, min(n - done, 64 << 20), off + done)
                    k = os.pwrite(out_fd, data, out_pos + total + done) if data else 0
                if k <= 0:
                    from ckpt_ir.errors import FormatError

                    raise FormatError(f"{path}: file ends before byte {off + n}; the file is truncated")
                done += k
            total += n
        return total

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
