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
import enum
import io
import math
import os
import pathlib
import struct
import types
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from ckpt_ir.errors import FormatError
from ckpt_ir.io.safe_pickle import StorageRef, Stub, TensorRef, TorchDevice, TorchDtype, loads
from ckpt_ir.ir.dtypes import ITEMSIZE
from ckpt_ir.ir.expr import Expr, Load

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

ALIGN = 64
CRC_INLINE = 256 << 10  # records up to this size are checksummed inline, larger ones on a helper thread


# CRC-32 of every storage record of the zips read, by (absolute path, data offset, size): a record
# copied whole into an output zip keeps its checksum instead of being read back to compute it
RECORD_CRCS: dict[tuple[str, int, int], int] = {}


def record_crc(path: str, offset: int, size: int) -> int | None:
    """The stored CRC-32 of the source record that is exactly these bytes, if one is."""
    return RECORD_CRCS.get((os.path.abspath(path), offset, size))


class TorchZip:
    """An opened torch zip checkpoint: its unpickled object and the file offset of each storage."""

    offsets: dict[str, tuple[int, int]]

    def __init__(self, path: str) -> None:
        self.path = path
        from ckpt_ir.io.safetensors import require_regular_file

        require_regular_file(path)
        if not zipfile.is_zipfile(path):
            self.obj, self.offsets = _read_legacy(path)
            return
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise FormatError(f"{path}: not a readable torch checkpoint ({e}); it may be truncated") from None
        with zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
            if not pkl:
                raise FormatError(f"{path}: zip has no data.pkl; not a torch checkpoint")
            prefix = pkl[0].filename[: -len("data.pkl")]
            self.offsets = {}
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                for info in infos:
                    if not info.filename.startswith(prefix + "data/"):
                        continue
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise FormatError(
                            f"{path}: record {info.filename} is compressed; not a torch checkpoint"
                        )
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise FormatError(
                            f"{path}: zip record {info.filename} is damaged; the file is corrupt"
                        )
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + name_len + extra_len
                    if start + info.file_size > size:
                        raise FormatError(
                            f"{path}: record {info.filename} runs past the end of the file; "
                            f"the file is truncated"
                        )
                    self.offsets[info.filename[len(prefix) + 5 :]] = (start, info.file_size)
                    RECORD_CRCS[(os.path.abspath(path), start, info.file_size)] = info.CRC
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
            raise FormatError(
                f"{self.path}: storage of tensor {key} is {nbytes} bytes, expected "
                f"{ref.storage.numel * item}; the file is corrupt"
            )
        numel = math.prod(ref.shape)
        expected = _contiguous(ref.shape)
        if numel and any(st != ex for st, ex, n in zip(ref.stride, expected, ref.shape) if n > 1):
            return self._permuted_expr(ref, key, start)
        if ref.offset + numel > ref.storage.numel:
            raise FormatError(f"{self.path}: tensor {key} reaches past its storage; the file is corrupt")
        return Load(self.path, key, ref.shape, ref.dtype, start + ref.offset * item, "torch")

    def _permuted_expr(self, ref: TensorRef, key: str, start: int):
        """A view whose dims are in another order than its storage's (``w.T`` saved as it is, as
        MindSpeed-MM's converter saves Qwen3-VL-MoE's experts, vlm_model/operator.py:582-611): the
        view with its dims sorted by stride (a row-major box, :meth:`_box_expr`) swapped back."""
        from ckpt_ir.ir.expr import Transpose

        strides = [st for st, n in zip(ref.stride, ref.shape) if n > 1]
        if strides == sorted(strides, reverse=True):
            return self._box_expr(ref, key, start)  # the dims in storage order: a box or an error
        # dims by stride, largest first (a dim of one element last: it has no place in storage)
        order = sorted(
            range(len(ref.shape)), key=lambda d: ref.stride[d] if ref.shape[d] > 1 else -1, reverse=True
        )
        stored = attrs.evolve(
            ref, shape=tuple(ref.shape[d] for d in order), stride=tuple(ref.stride[d] for d in order)
        )
        expr = self._box_expr(stored, key, start)
        where = list(order)  # where[k]: the view's dim held at stored position k
        for k in range(len(where)):  # swap the view's dims back into place, one at a time
            j = where.index(k)
            if j != k:
                expr = Transpose(expr, k, j)
                where[k], where[j] = where[j], where[k]
        return expr

    def _box_expr(self, ref: TensorRef, key: str, start: int):
        """A view that is a box of a larger row-major tensor in its storage (``torch.chunk`` over a
        later dim saves the whole tensor and a strided view, as MindSpeed-LLM's converters do for
        row-parallel weights): that tensor's rows loaded, the box sliced out of the other dims."""
        from ckpt_ir.ir.expr import Reshape, Slice

        dims = [i for i, n in enumerate(ref.shape) if n > 1]
        sizes, strides = [ref.shape[i] for i in dims], [ref.stride[i] for i in dims]
        if strides[-1] != 1:  # e.g. one column: a box whose innermost dim has one element
            sizes, strides = [*sizes, 1], [*strides, 1]
        outer = [strides[k - 1] // strides[k] if strides[k] else 0 for k in range(1, len(sizes))]
        box = (
            strides[-1] == 1
            and all(strides[k - 1] == outer[k - 1] * strides[k] for k in range(1, len(sizes)))
            and all(p >= n for p, n in zip(outer, sizes[1:]))
        )
        starts = [(ref.offset // strides[k]) % outer[k - 1] for k in range(1, len(sizes))] if box else []
        first = ref.offset // strides[0] if box else 0
        if not box or any(a + n > p for a, n, p in zip(starts, sizes[1:], outer)):
            raise FormatError(
                f"{self.path}: tensor {key} is stored as a non-contiguous view (stride {ref.stride}) "
                f"that is not a block of a row-major tensor; re-save it with .contiguous()"
            )
        if (first + sizes[0]) * strides[0] > ref.storage.numel:
            raise FormatError(f"{self.path}: tensor {key} reaches past its storage; the file is corrupt")
        expr: Expr = Load(
            self.path,
            key,
            (sizes[0], *outer),
            ref.dtype,
            start + first * strides[0] * ITEMSIZE[ref.dtype],
            "torch",
        )
        for k, (a, n) in enumerate(zip(starts, sizes[1:]), start=1):
            if n != outer[k - 1]:
                expr = Slice(expr, k, a, a + n)
        return expr if expr.shape == tuple(ref.shape) else Reshape(expr, ref.shape)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


def _read_legacy(path: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The pre-zip ``torch.save`` format (``_use_new_zipfile_serialization=False``): five pickles
    in a row (magic number, protocol version, system info, the object, its storage keys), then
    each storage in key order as an 8-byte little-endian element count and its raw bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            magic = loads(f, path)
        except FormatError:
            magic = None
        if magic != LEGACY_MAGIC:
            raise FormatError(
                f"{path}: not a torch checkpoint (neither a zip archive nor the legacy torch.save "
                f"format); it may be truncated or corrupt"
            )
        loads(f, path)  # protocol version
        info = loads(f, path)
        if not isinstance(info, dict) or not info.get("little_endian", True):
            raise FormatError(f"{path}: legacy torch checkpoint written on a big-endian machine; re-save it")
        obj = loads(f, path)
        keys = loads(f, path)
        if not isinstance(keys, list):
            raise FormatError(f"{path}: legacy torch checkpoint has no storage key list; the file is corrupt")
        refs: dict[str, StorageRef] = {}
        for _, ref in _tensor_refs(obj):
            refs.setdefault(ref.storage.key, ref.storage)
        offsets: dict[str, tuple[int, int]] = {}
        pos = f.tell()
        for key in keys:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: storage {key} runs past the end of the file; the file is truncated"
                )
            numel = struct.unpack("<q", head)[0]
            storage = refs.get(str(key))
            nbytes = numel * (ITEMSIZE[storage.dtype] if storage is not None else 1)
            if numel < 0 or pos + 8 + nbytes > size:
                raise FormatError(
                    f"{path}: storage {key} runs past the end of the file; the file is truncated"
                )
            offsets[str(key)] = (pos + 8, nbytes)
            pos += 8 + nbytes
    return obj, offsets


def _tensor_refs(obj: Any, prefix: str = ""):
    """(path, TensorRef) for every tensor anywhere in ``obj`` (dicts, lists, tuples, namespaces)."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_refs(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_refs(v, f"{prefix}.{i}")


def with_exprs(obj: Any, z: TorchZip, prefix: str) -> Any:
    """``obj`` with every tensor reference replaced by its lazy expression (to carry small training
    state, e.g. RNG states, into another file)."""
    if isinstance(obj, TensorRef):
        return z.load_expr(obj, prefix)
    if isinstance(obj, dict):
        return {k: with_exprs(v, z, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(with_exprs(v, z, f"{prefix}.{i}") for i, v in enumerate(obj))
    return obj


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


class Call:
    """An object to pickle as ``module.name(*args)`` (REDUCE), or, with ``state``, as
    ``module.name.__new__`` then ``__setstate__(state)``/``__dict__`` (NEWOBJ + BUILD), as pickle
    does for plain classes: lets objects of classes from torch be written without importing it."""

    __slots__ = ("module", "name", "args", "state")

    def __init__(self, module: str, name: str, args: tuple = (), state: Any = None) -> None:
        self.module, self.name, self.args, self.state = module, name, args, state


_STORAGE_NAMES = {
    "F64": "DoubleStorage",
    "F32": "FloatStorage",
    "F16": "HalfStorage",
    "BF16": "BFloat16Storage",
    "I64": "LongStorage",
    "I32": "IntStorage",
    "I16": "ShortStorage",
    "I8": "CharStorage",
    "U8": "ByteStorage",
    "BOOL": "BoolStorage",
}


def _pickle(obj: Any, tensors: list[Tensor]) -> bytes:
    """Pickle (protocol 2) a checkpoint object the way ``torch.save`` lays it out, without
    importing torch: tensors become ``torch._utils._rebuild_tensor_v2`` calls on persistent
    storage references.  Only the value types a checkpoint needs are supported."""
    out = bytearray(b"\x80\x02")

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def call(module: str, name: str, call_args: tuple, state: Any = None) -> None:
        glob(module, name)
        save(call_args)
        out.extend(b"R")
        if state is not None:
            save(state)
            out.extend(b"b")

    def save(v: Any) -> None:
        if isinstance(v, enum.Enum):  # an allow-listed enum (signal.Signals), by value as pickle does
            call(type(v).__module__, type(v).__qualname__, (v.value,))
        elif v is None:
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
        elif type(v).__module__ == "numpy":  # rng_state's arrays: numpy's own pickle, inlined
            import pickle

            out.extend(pickle.dumps(v, protocol=2)[2:-1])  # without PROTO and STOP; we keep no memo
        elif isinstance(v, Call):
            glob(v.module, v.name)
            save(tuple(v.args))
            if v.state is None:
                out.extend(b"R")
            else:
                out.extend(b"\x81")
                save(v.state)
                out.extend(b"b")
        elif isinstance(v, io.BytesIO):  # Transformer Engine < 2's _extra_state, as pickle writes it
            glob("_io", "BytesIO")
            out.extend(b")\x81")
            save((v.getvalue(), v.tell(), None))
            out.extend(b"b")
        elif isinstance(v, TorchDtype):
            glob("torch", v.name)
        elif type(v).__name__ == "dtype" and str(v).startswith("torch."):  # a real torch.dtype
            glob("torch", str(v)[len("torch.") :])
        elif isinstance(v, TorchDevice):
            call("torch", "device", (v.type,) if v.index is None else (v.type, v.index))
        elif isinstance(v, (set, frozenset)):
            call("builtins", type(v).__name__, (sorted(v, key=repr),))
        elif isinstance(v, slice):
            call("builtins", "slice", (v.start, v.stop, v.step))
        elif isinstance(v, range):
            call("builtins", "range", (v.start, v.stop, v.step))
        elif isinstance(v, complex):
            call("builtins", "complex", (v.real, v.imag))
        elif isinstance(v, bytearray):
            call("builtins", "bytearray", (bytes(v),))
        elif isinstance(v, io.BytesIO):
            call("_io", "BytesIO", (v.getvalue(),))
        elif isinstance(v, types.SimpleNamespace):
            call("types", "SimpleNamespace", (), dict(vars(v)))
        elif isinstance(v, pathlib.PurePath):  # loaded as pure paths; real args hold concrete ones
            call(
                "pathlib", "PosixPath" if isinstance(v, pathlib.PurePosixPath) else "PureWindowsPath", v.parts
            )
        elif isinstance(v, Stub):  # a Megatron enum / config object, as the source pickled it
            if v.member is not None:
                call("builtins", "getattr", (_StubClass(v), v.member))
                return
            glob(v._module, v._name)
            save(tuple(v.args))
            out.extend(b"R" if v.built else b"\x81")
            if hasattr(v, "state"):
                save(v.state)
                out.extend(b"b")
        elif isinstance(v, _StubClass):
            glob(v.stub._module, v.stub._name)
        else:
            raise TypeError(f"cannot write {type(v).__name__} into a checkpoint")

    save(obj)
    out.extend(b".")
    return bytes(out)


_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    slice,
    range,
    io.BytesIO,
    pathlib.PurePath,
    enum.Enum,
    TorchDtype,
    TorchDevice,
    Tensor,
)


def writable(obj: Any, leaf: Callable[[Any], bool] = lambda _: False) -> bool:
    """Whether :func:`write` can write ``obj`` (``leaf`` accepts more leaf values, e.g. expressions
    that become :class:`Tensor` placeholders)."""
    if isinstance(obj, dict):
        return all(writable(k, leaf) and writable(v, leaf) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return all(writable(v, leaf) for v in obj)
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
        return writable(vars(obj), leaf)
    if isinstance(obj, Stub):
        return writable(obj.args, leaf) and writable(getattr(obj, "state", None), leaf)
    return (
        isinstance(obj, _LEAVES)
        or type(obj).__module__ == "numpy"
        or leaf(obj)
        or type(obj).__name__ == "dtype"
        and str(obj).startswith("torch.")
    )


class _StubClass:
    """The class of a stub (for ``getattr(cls, member)``)."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub


def write(
    path: str,
    obj: Any,
    emit: Callable[[Tensor, int, int], int],
    known_crc: Callable[[Tensor], int | None] = lambda t: None,
) -> int:
    """Write ``obj`` (dicts/lists/scalars/Namespace with :class:`Tensor` placeholders) as a torch zip
    checkpoint.  Each tensor's bytes are written by ``emit(tensor, fd, offset)``, which returns the
    bytes it wrote; their CRC-32 is ``known_crc(tensor)`` (a source record copied whole) or
    computed from the written file.  Returns bytes of tensor data."""
    tensors: list[Tensor] = []
    data_pkl = _pickle(obj, tensors)
    archive = "archive"
    z = _ZipWriter(path)
    written = 0
    try:
        z.add(f"{archive}/data.pkl", data_pkl)
        z.add(f"{archive}/.format_version", b"1")
        z.add(f"{archive}/.storage_alignment", str(ALIGN).encode())
        z.add(f"{archive}/byteorder", b"little")
        for i, t in enumerate(tensors):
            written += z.add_stream(
                f"{archive}/data/{i}", t.nbytes, lambda fd, pos, t=t: emit(t, fd, pos), t.key, known_crc(t)
            )
        z.add(f"{archive}/version", b"3\n")
        z.add(f"{archive}/.data/serialization_id", b"0" * 40)
        z.finish()
    finally:
        z.close()
    return written  # made durable by atomic_dir, which fsyncs every file before the rename


class _ZipWriter:
    """A minimal stored (uncompressed) zip writer with 64-byte aligned record data, ZIP64 where
    sizes or offsets need it, and positional writes so data can be copied in by the kernel."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.records: list[tuple[bytes, int, int, Any]] = []  # name, header offset, size, crc (or its future)
        self._crc_pool: ThreadPoolExecutor | None = None

    def _write(self, data: bytes) -> None:
        from ckpt_ir.io.safetensors import write_at

        self.pos += write_at(self.fd, data, self.pos)

    def _header(self, name: bytes, size: int, crc: int) -> bytes:
        zip64 = size >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        base = 30 + len(name) + len(extra) + 4  # + the padding record's own 4 bytes
        pad = (-(self.pos + base)) % ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
        small = 0xFFFFFFFF if zip64 else size
        return (
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                45 if zip64 else 20,
                0,
                0,
                0,
                0x21,
                crc,
                small,
                small,
                len(name),
                len(extra),
            )
            + name
            + extra
        )

    def add(self, name: str, data: bytes) -> None:
        import zlib

        raw = name.encode()
        crc = zlib.crc32(data)
        self.records.append((raw, self.pos, len(data), crc))
        self._write(self._header(raw, len(data), crc))
        self._write(data)

    def add_stream(self, name: str, size: int, emit, key: str, known: int | None = None) -> int:
        import zlib

        raw = name.encode()
        header_at = self.pos
        header = self._header(raw, size, 0)
        self._write(header)
        n = emit(self.fd, self.pos)
        if n != size:
            raise FormatError(f"{self.path}: tensor {key} produced {n} bytes, planned {size}")
        # checksum the written bytes from the page cache on a helper thread (zlib releases the
        # GIL), overlapping the next record's write; finish() waits for it.  Small records (an
        # MoE's norms and routers, thousands of them) inline: handing each to the thread and
        # back costs more than its checksum
        crc: Any
        if known is not None:
            crc = known
        elif size <= CRC_INLINE:
            crc = zlib.crc32(os.pread(self.fd, size, self.pos))
        else:
            if self._crc_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="crc32")
            crc = self._crc_pool.submit(_crc_of, self.fd, self.pos, size)
        if isinstance(crc, int):  # known now: into the local header written before the data
            os.pwrite(self.fd, struct.pack("<I", crc), header_at + 14)
        self.pos += size
        self.records.append((raw, header_at, size, crc))
        return size

    def _resolve_crcs(self) -> None:
        """Wait for pending checksums and patch them into the local headers."""
        for i, (raw, header_at, size, crc) in enumerate(self.records):
            if not isinstance(crc, int):
                crc = crc.result()
                os.pwrite(self.fd, struct.pack("<I", crc), header_at + 14)
                self.records[i] = (raw, header_at, size, crc)

    def finish(self) -> None:
        self._resolve_crcs()
        cd_start = self.pos
        for name, offset, size, crc in self.records:
            big = size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
            extra = struct.pack("<HHQQQ", 1, 24, size, size, offset) if big else b""
            small_size = 0xFFFFFFFF if big else size
            small_off = 0xFFFFFFFF if big else offset
            self._write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    45,
                    45 if big else 20,
                    0,
                    0,
                    0,
                    0x21,
                    crc,
                    small_size,
                    small_size,
                    len(name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    small_off,
                )
                + name
                + extra
            )
        cd_size, count = self.pos - cd_start, len(self.records)
        if cd_start >= 0xFFFFFFFF or count >= 0xFFFF:
            eocd64 = self.pos
            self._write(
                struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start)
            )
            self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_start, 0))

    def close(self) -> None:
        if self._crc_pool is not None:
            self._crc_pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)


def _crc_of(fd: int, start: int, size: int) -> int:
    """CRC-32 of bytes already written (read back through a shared mapping of the page cache)."""
    import mmap
    import zlib

    if size == 0:
        return 0
    page = mmap.ALLOCATIONGRANULARITY
    crc, pos, chunk = 0, start, 4 << 20  # mapped pages count as resident: map a little at a time
    while pos < start + size:
        n = min(chunk, start + size - pos)
        lo = pos - pos % page  # mappings start on a page boundary
        with mmap.mmap(fd, pos + n - lo, offset=lo, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                crc = zlib.crc32(view[pos - lo :], crc)
            finally:
                view.release()
        pos += n
    return crc
