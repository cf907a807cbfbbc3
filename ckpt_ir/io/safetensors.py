"""safetensors framing: a strict header reader and a streaming writer.

We parse the header ourselves (8-byte little-endian length, JSON, then raw data) rather than use
the safetensors package so that (a) every tensor becomes a lazy :class:`~ckpt_ir.ir.expr.Load` of a
byte range, read later without mapping the file, and (b) a corrupt file gets an error naming the
file and the tensor, before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

from ckpt_ir.errors import FormatError
from ckpt_ir.ir.dtypes import ITEMSIZE
from ckpt_ir.ir.expr import Load

MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


def read_header(path: str) -> tuple[dict[str, Load], dict[str, str]]:
    """Tensors of one file as lazy loads (in file order), and the ``__metadata__`` dict."""
    require_regular_file(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: only {size} bytes, too short for a safetensors header; the file "
                    f"is truncated or not safetensors"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{path}: header claims {n} bytes but the file has {size}; the file is "
                    f"corrupt or truncated: re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: __metadata__ is not an object; the file is corrupt")
    data_start = 8 + n
    out: dict[str, Load] = {}
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (
                dtype in ITEMSIZE
                and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(a, int)
                and isinstance(b, int)
                and 0 <= a <= b
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise FormatError(
                f"{path}: tensor {key!r} has a malformed header entry {info!r}; the file is corrupt"
            )
        if b - a != math.prod(shape) * ITEMSIZE[dtype]:
            raise FormatError(
                f"{path}: tensor {key!r} spans {b - a} bytes but {dtype}{list(shape)} needs "
                f"{math.prod(shape) * ITEMSIZE[dtype]}; the file is corrupt"
            )
        if data_start + b > size:
            raise FormatError(
                f"{path}: tensor {key!r} ends at byte {data_start + b} but the file has {size}; "
                f"the file is truncated: re-download it"
            )
        spans.append((a, b, key))
        out[key] = Load(path, key, shape, dtype, data_start + a, "safetensors")
    spans.sort()
    for (_a0, b0, k0), (a1, _b1, k1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise FormatError(f"{path}: tensors {k0!r} and {k1!r} overlap; the file is corrupt")
    ordered = dict(sorted(out.items(), key=lambda kv: kv[1].offset))
    return ordered, {str(k): str(v) for k, v in meta.items()}


def require_regular_file(path: str) -> None:
    """Refuse FIFOs, devices and the like before opening them (opening a FIFO would block)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if not stat.S_ISREG(mode):
        raise FormatError(f"{path}: not a regular file; point ckpt-ir at the checkpoint's real files")


def header_bytes(
    entries: Iterable[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None
) -> bytes:
    """The 8-byte length + JSON header for tensors laid out back to back in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write(
    path: str,
    entries: list[tuple[str, tuple[int, ...], str]],
    emit: Callable[[str, int, int], int],
    metadata: dict[str, str] | None = None,
) -> int:
    """Stream a safetensors file: the header from metadata, then each tensor, written by
    ``emit(name, fd, offset)`` at its planned offset (returning the bytes it wrote).
    Returns the file's size.  Durability comes from atomic_dir, which fsyncs before renaming."""
    create(path, entries, metadata)
    return write_part(path, entries, 0, len(entries), emit, metadata)


def create(
    path: str, entries: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None
) -> None:
    """Create the file with its header and full length, for parts to be written concurrently."""
    head = header_bytes(entries, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_at(fd, head, 0)
        os.ftruncate(fd, len(head) + sum(math.prod(s) * ITEMSIZE[d] for _, s, d in entries))
    finally:
        os.close(fd)


def write_part(
    path: str,
    entries: list[tuple[str, tuple[int, ...], str]],
    lo: int,
    hi: int,
    emit: Callable[[str, int, int], int],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors ``entries[lo:hi]`` at their planned offsets in a file made by :func:`create`."""
    pos = len(header_bytes(entries, metadata)) + sum(math.prod(s) * ITEMSIZE[d] for _, s, d in entries[:lo])
    fd = os.open(path, os.O_WRONLY)
    try:
        for name, shape, dtype in entries[lo:hi]:
            want = math.prod(shape) * ITEMSIZE[dtype]
            n = emit(name, fd, pos)
            if n != want:
                raise FormatError(f"{path}: tensor {name} produced {n} bytes, planned {want}")
            pos += n
    finally:
        os.close(fd)
    return pos


# pwrite in 1 MiB pieces: one call of tens of MB dirties all its pages before the kernel's
# dirty-page throttling gets a say, and measured 30-40% slower end to end (bench/, 2 GB mcore -> HF)
WRITE_CHUNK = 1 << 20


def write_at(fd: int, buf, pos: int) -> int:
    """pwrite all of ``buf`` at ``pos``; returns its length."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_CHUNK], pos + done)
    return done
