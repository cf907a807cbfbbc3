"""torch's zip checkpoint format (``torch.save`` since 1.6), read lazily and written in a stream.

A ``.pt`` file is an uncompressed zip: ``<archive>/data.pkl`` (the pickled object, tensors as
persistent references to storages), ``<archive>/data/<key>`` (raw bytes of each storage, 64-byte
aligned) and a few small records.  Reading parses only the zip directory and the pickle (through
:mod:`ckpt_ir.io.safe_pickle`), turning every tensor into a lazy load of its byte range.  Writing
emits the pickle first and then each storage's bytes as they are produced, so a rank file is never
held in memory; ``torch.load`` (including ``mmap=True``) reads the result.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import zipfile
from collections.abc import Callable
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.io.safe_pickle import TensorRef, TorchDtype, loads
from ckpt_ir.ir.dtypes import ITEMSIZE
from ckpt_ir.ir.expr import Load

ALIGN = 64


class TorchZip:
    """An opened torch zip checkpoint: its unpickled object and the file offset of each storage."""

    def __init__(self, path: str) -> None:
        self.path = path
        from ckpt_ir.io.safetensors import require_regular_file

        require_regular_file(path)
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise FormatError(f"{path}: not a readable torch checkpoint ({e}); it may be truncated or a legacy "
                              f"non-zip torch.save file: re-save it with a current torch") from None
        with zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
            if not pkl:
                raise FormatError(f"{path}: zip has no data.pkl; not a torch checkpoint")
            prefix = pkl[0].filename[: -len("data.pkl")]
            self.offsets: dict[str, tuple[int, int]] = {}
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                for info in infos:
                    if not info.filename.startswith(prefix + "data/"):
                        continue
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise FormatError(f"{path}: record {info.filename} is compressed; not a torch checkpoint")
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise FormatError(f"{path}: zip record {info.filename} is damaged; the file is corrupt")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + name_len + extra_len
                    if start + info.file_size > size:
                        raise FormatError(f"{path}: record {info.filename} runs past the end of the file; "
                                          f"the file is truncated")
                    self.offsets[info.filename[len(prefix) + 5:]] = (start, info.file_size)
            try:
                data = zf.read(pkl[0])
            except (zipfile.BadZipFile, OSError) as e:
                raise FormatError(f"{path}: cannot read data.pkl ({e}); the file is corrupt") from None
        self.obj = loads(data, path)

    def load_expr(self, ref: TensorRef, key: str):
        """A lazy expression for ``ref`` (which must be a row-major view of its storage)."""
        where = self.offsets.get(ref.storage.key)
        if where is None:
            raise FormatError(f"{self.path}: tensor {key} refers to missing storage record {ref.storage.key}")
        start, nbytes = where
        item = ITEMSIZE[ref.dtype]
        if ref.storage.numel * item > nbytes:
            raise FormatError(f"{self.path}: storage of tensor {key} is {nbytes} bytes, expected "
                              f"{ref.storage.numel * item}; the file is corrupt")
        numel = math.prod(ref.shape)
        expected = _contiguous(ref.shape)
        if numel and any(st != ex for st, ex, n in zip(ref.stride, expected, ref.shape) if n > 1):
            raise FormatError(f"{self.path}: tensor {key} is stored as a non-contiguous view "
                              f"(stride {ref.stride}); re-save it with .contiguous()")
        if ref.offset + numel > ref.storage.numel:
            raise FormatError(f"{self.path}: tensor {key} reaches past its storage; the file is corrupt")
        return Load(self.path, key, ref.shape, ref.dtype, start + ref.offset * item, "torch")


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def iter_tensors(obj: Any, prefix: str = ""):
    """(dotted path, TensorRef) for every tensor in a nested dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}{k}.")
    elif isinstance(obj, TensorRef):
        yield prefix[:-1], obj


# ---------------------------------------------------------------------------------------------
# writing


class Tensor:
    """Placeholder for a tensor in an object to be written: its bytes come later from a producer."""

    __slots__ = ("key", "dtype", "shape")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


_STORAGE_NAMES = {
    "F64": "DoubleStorage", "F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage",
    "I64": "LongStorage", "I32": "IntStorage", "I16": "ShortStorage", "I8": "CharStorage",
    "U8": "ByteStorage", "BOOL": "BoolStorage",
}


def _pickle(obj: Any, tensors: list[Tensor]) -> bytes:
    """Pickle (protocol 2) a checkpoint object the way ``torch.save`` lays it out, without
    importing torch: tensors become ``torch._utils._rebuild_tensor_v2`` calls on persistent
    storage references.  Only the value types a checkpoint needs are supported."""
    out = bytearray(b"\x80\x02")

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def save(v: Any) -> None:
        if v is None:
            out.extend(b"N")
        elif v is True or v is False:
            out.extend(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            if -(2**31) <= v < 2**31:
                out.extend(b"J" + struct.pack("<i", v))
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(v, float):
            out.extend(b"G" + struct.pack(">d", v))
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(v, bytes):
            glob("_codecs", "encode")
            save(v.decode("latin1"))
            save("latin1")
            out.extend(b"\x86R")
        elif isinstance(v, tuple):
            out.extend(b"(")
            for x in v:
                save(x)
            out.extend(b"t")
        elif isinstance(v, list):
            out.extend(b"](")
            for x in v:
                save(x)
            out.extend(b"e")
        elif isinstance(v, dict):
            out.extend(b"}(")
            for k, x in v.items():
                save(k)
                save(x)
            out.extend(b"u")
        elif isinstance(v, argparse.Namespace):
            glob("argparse", "Namespace")
            out.extend(b")\x81")
            save(dict(vars(v)))
            out.extend(b"b")
        elif isinstance(v, Tensor):
            index = len(tensors)
            tensors.append(v)
            glob("torch._utils", "_rebuild_tensor_v2")
            out.extend(b"(")
            out.extend(b"(")
            save("storage")
            glob("torch", _STORAGE_NAMES[v.dtype])
            save(str(index))
            save("cpu")
            save(math.prod(v.shape))
            out.extend(b"tQ")
            save(0)
            save(tuple(v.shape))
            save(_contiguous(v.shape))
            save(False)
            glob("collections", "OrderedDict")
            out.extend(b")R")
            out.extend(b"tR")
        elif isinstance(v, TorchDtype):
            glob("torch", v.name)
        elif type(v).__name__ == "dtype" and str(v).startswith("torch."):  # a real torch.dtype
            glob("torch", str(v)[len("torch."):])
        else:
            raise TypeError(f"cannot write {type(v).__name__} into a checkpoint")

    save(obj)
    out.extend(b".")
    return bytes(out)


def write(path: str, obj: Any, produce: Callable[[Tensor], memoryview]) -> int:
    """Write ``obj`` (dicts/lists/scalars/Namespace with :class:`Tensor` placeholders) as a torch zip
    checkpoint, streaming each tensor's bytes from ``produce``.  Returns bytes of tensor data."""
    from ckpt_ir.io.safetensors import write_all

    tensors: list[Tensor] = []
    data_pkl = _pickle(obj, tensors)
    archive = "archive"
    written = 0
    with open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _put(zf, f"{archive}/data.pkl", data_pkl)
            _put(zf, f"{archive}/.format_version", b"1")
            _put(zf, f"{archive}/.storage_alignment", str(ALIGN).encode())
            _put(zf, f"{archive}/byteorder", b"little")
            for i, t in enumerate(tensors):
                buf = produce(t)
                if len(memoryview(buf).cast("B")) != t.nbytes:
                    raise FormatError(f"{path}: tensor {t.key} produced {len(buf)} bytes, planned {t.nbytes}")
                with _open_aligned(zf, f"{archive}/data/{i}", t.nbytes) as w:
                    written += write_all(w, buf)
            _put(zf, f"{archive}/version", b"3\n")
            _put(zf, f"{archive}/.data/serialization_id", b"0" * 40)
    return written  # made durable by atomic_dir, which fsyncs every file before the rename


def _put(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    with _open_aligned(zf, name, len(data)) as w:
        w.write(data)


def _open_aligned(zf: zipfile.ZipFile, name: str, size: int):
    """Open a stored record whose data starts on a 64-byte boundary (torch mmap-loads rely on it)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    start = zf.fp.tell()  # type: ignore[union-attr]
    # local header: 30 fixed bytes + name + extra (+ 20 bytes of zip64 sizes that zipfile appends)
    base = 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(start + base + 4)) % ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return zf.open(info, "w", force_zip64=zip64)
