"""torch.distributed.checkpoint (DCP) directories, read lazily and without torch.distributed.

A DCP directory (Megatron's ``torch_dist`` backend writes one per iteration) holds:

* ``.metadata``: a pickle of DCP's ``Metadata``: for every key either a tensor (global size,
  dtype, and the chunks (offsets, sizes) that tile it) or a bytes object, plus ``storage_data``,
  which says where each chunk's bytes are: (file, byte offset, length);
* ``__R_K.distcp``: data files.  Each tensor chunk's bytes are a complete ``torch.save`` zip of the
  chunk (``<archive>/data/0`` holds the raw little-endian tensor bytes).

:func:`read_metadata` unpickles ``.metadata`` through an allow-list of inert stand-ins for DCP's
metadata classes (Megatron's ``MCoreMetadata`` subclass included); any other global is refused.
:class:`ChunkResolver` finds the byte offset of a chunk's raw data inside its ``.distcp`` file by
parsing only the zip records of that chunk's blob, so a tensor becomes a lazy ``Load``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import attrs

from ckpt_ir.errors import FormatError
from ckpt_ir.io.safe_pickle import TORCH_DTYPES, TensorRef, TorchDtype
from ckpt_ir.io.safe_pickle import loads as safe_loads
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.dtypes import ITEMSIZE

METADATA_FILE = ".metadata"


# ---------------------------------------------------------------------------------------------
# inert stand-ins for the classes a DCP ``.metadata`` pickle names


class _Record:
    """Stand-in for a DCP dataclass: keeps whatever state the pickle sets, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if not isinstance(state, dict):
            raise ValueError(f"unexpected state {type(state).__name__} for {type(self).__name__}")
        for k, v in state.items():
            if isinstance(k, str):
                self.__dict__[k] = v


class _Metadata(_Record):
    pass


class _TensorStorageMetadata(_Record):
    pass


class _BytesStorageMetadata(_Record):
    pass


class _ChunkStorageMetadata(_Record):
    pass


class _MetadataIndex(_Record):
    pass


class _StorageInfo(_Record):
    pass


class _TensorProperties(_Record):
    def __setstate__(self, state: Any) -> None:
        # torch pickles it as (dtype, layout, requires_grad, memory_format, pin_memory)
        if isinstance(state, tuple) and state and not isinstance(state[0], dict) and state[0] is not None:
            self.__dict__["dtype"] = state[0]
            return
        super().__setstate__(state)


class _Inert(_Record):
    """Save plans, write items, storage metadata, enums: recorded, never used."""


def _layout(name: Any) -> str:
    return str(name)


def _size(values: Any = ()) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _path(*parts: Any) -> str:
    return os.path.join(*(str(p) for p in parts)) if parts else ""


def _ordered_dict(*args: Any) -> dict:
    return dict(*args)


_CKPT = "torch.distributed.checkpoint"
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"
_ALLOWED: dict[tuple[str, str], Any] = {
    (f"{_CKPT}.metadata", "Metadata"): _Metadata,
    (f"{_CKPT}.metadata", "TensorStorageMetadata"): _TensorStorageMetadata,
    (f"{_CKPT}.metadata", "BytesStorageMetadata"): _BytesStorageMetadata,
    (f"{_CKPT}.metadata", "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (f"{_CKPT}.metadata", "MetadataIndex"): _MetadataIndex,
    (f"{_CKPT}.metadata", "TensorProperties"): _TensorProperties,
    (f"{_CKPT}.metadata", "StorageMeta"): _Inert,
    (f"{_CKPT}.metadata", "_MEM_FORMAT_ENCODING"): _Inert,
    (f"{_CKPT}.filesystem", "_StorageInfo"): _StorageInfo,
    (f"{_CKPT}.planner", "SavePlan"): _Inert,
    (f"{_CKPT}.planner", "WriteItem"): _Inert,
    (f"{_CKPT}.planner", "WriteItemType"): _Inert,
    (f"{_CKPT}.planner", "TensorWriteData"): _Inert,
    (_MCORE, "MCoreMetadata"): _Metadata,
    (_MCORE, "MCoreSavePlan"): _Inert,
    ("torch.serialization", "_get_layout"): _layout,
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): _ordered_dict,
    ("pathlib", "PosixPath"): _path,  # StorageMeta.checkpoint_id of a plain DCP save
    ("pathlib", "PurePosixPath"): _path,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "set"): set,
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in TORCH_DTYPES:
            return TorchDtype(name)
        raise FormatError(
            f"{self.source}: refusing to unpickle {module}.{name} (it could run code); only "
            f"torch.distributed.checkpoint metadata is loaded"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(f"{self.source}: unexpected persistent reference in checkpoint metadata")


# ---------------------------------------------------------------------------------------------
# the parsed metadata


@attrs.frozen
class Chunk:
    """One stored piece of a tensor: ``offsets``/``sizes`` in the global tensor, and where its
    ``torch.save`` blob lies (``file`` relative to the checkpoint directory)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@attrs.frozen
class DcpTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@attrs.frozen
class DcpMetadata:
    """``tensors``: key -> tensor; ``objects``: keys of bytes entries (Megatron's ShardedObjects,
    Transformer-Engine ``_extra_state``); ``mcore_data``: Megatron's extra metadata, if any."""

    path: str
    tensors: dict[str, DcpTensor]
    objects: tuple[str, ...]
    mcore_data: Any = None
    # bytes entry -> (data file relative to the checkpoint directory, byte offset, length)
    object_storage: dict[str, tuple[str, int, int]] = attrs.field(factory=dict)


def read_metadata(ckpt_dir: str) -> DcpMetadata:
    """Parse ``ckpt_dir/.metadata`` (restricted unpickling; no code from the file runs)."""
    path = os.path.join(ckpt_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FormatError(
            f"{ckpt_dir}: no {METADATA_FILE} file; the torch_dist checkpoint is incomplete "
            f"(the save did not finish?)"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        md = _MetadataUnpickler(data, path).load()
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(
            f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupt or not DCP metadata"
        ) from None
    if not isinstance(md, _Metadata):
        raise FormatError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    sdm = md.__dict__.get("state_dict_metadata")
    storage = md.__dict__.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise FormatError(f"{path}: metadata lacks state_dict_metadata / storage_data; the file is corrupt")
    where: dict[tuple[Any, tuple[int, ...] | None], _StorageInfo] = {}  # fqn as stored: looked up by str keys
    for index, info in storage.items():
        if not isinstance(index, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise FormatError(f"{path}: malformed storage_data entry; the file is corrupt")
        off = index.__dict__.get("offset")
        where[(index.__dict__.get("fqn"), None if off is None else tuple(off))] = info
    tensors: dict[str, DcpTensor] = {}
    objects: list[str] = []
    object_storage: dict[str, tuple[str, int, int]] = {}
    for key, entry in sdm.items():
        if not isinstance(key, str):
            raise FormatError(f"{path}: non-string key {key!r} in metadata; the file is corrupt")
        if isinstance(entry, _BytesStorageMetadata):
            objects.append(key)
            info = where.get((key, None))
            i = info.__dict__ if info is not None else {}
            rel, off, length = i.get("relative_path"), i.get("offset"), i.get("length")
            if (
                isinstance(rel, str)
                and isinstance(off, int)
                and isinstance(length, int)
                and not os.path.isabs(rel)
                and ".." not in rel.split("/")
                and off >= 0
                and length >= 0
                and not i.get("transform_descriptors")
            ):
                object_storage[key] = (rel, off, length)
            continue
        if not isinstance(entry, _TensorStorageMetadata):
            raise FormatError(
                f"{path}: entry {key} is a {type(entry).__name__}; expected tensor or bytes metadata"
            )
        tensors[key] = _tensor(path, key, entry, where)
    return DcpMetadata(ckpt_dir, tensors, tuple(objects), md.__dict__.get("mcore_data"), object_storage)


def read_object(md: DcpMetadata, key: str) -> Any:
    """A bytes entry Megatron saved (a ShardedObject: ``torch.save([value])``), unpickled through the
    allow-list; only plain values (no tensors) are accepted."""
    where = md.object_storage.get(key)
    path = os.path.join(md.path, where[0]) if where else md.path
    if where is None or not os.path.isfile(path):
        raise FormatError(
            f"{md.path}: entry {key} has no readable storage location; the checkpoint is incomplete"
        )
    rel, off, length = where
    with open(path, "rb") as f:
        if off + length > os.fstat(f.fileno()).st_size:
            raise FormatError(f"{path}: entry {key} runs past the end of the file; the file is truncated")
        f.seek(off)
        blob = f.read(length)
    obj: Any = io.BytesIO(blob)
    for _ in range(2):  # Megatron's torch.save([value]), possibly inside DCP's own torch.save of the BytesIO
        if not isinstance(obj, io.BytesIO):
            break
        try:
            with zipfile.ZipFile(obj) as zf:
                pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")]
                if not pkl:
                    raise FormatError(f"{path}: entry {key} is not a torch.save blob (no data.pkl)")
                obj = safe_loads(zf.read(pkl[0]), f"{path} ({key})")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FormatError(
                f"{path}: entry {key} is not a readable torch.save blob ({e}); the file is corrupt"
            ) from None
    if _has_tensor(obj):
        raise FormatError(
            f"{path}: entry {key} holds tensors; ckpt-ir reads only plain values from sharded objects"
        )
    return obj


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, TensorRef):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


def _tensor(path: str, key: str, entry: _TensorStorageMetadata, where: dict) -> DcpTensor:
    d = entry.__dict__
    props = d.get("properties")
    dtype = props.__dict__.get("dtype") if isinstance(props, _TensorProperties) else None
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"{path}: tensor {key} has no dtype in the metadata; the file is corrupt")
    shape = d.get("size")
    if not isinstance(shape, tuple) or any(not isinstance(n, int) or n < 0 for n in shape):
        raise FormatError(f"{path}: tensor {key} has a malformed size {shape!r}")
    chunks = []
    for c in d.get("chunks") or ():
        if not isinstance(c, _ChunkStorageMetadata):
            raise FormatError(f"{path}: tensor {key} has a malformed chunk entry")
        offsets, sizes = tuple(c.__dict__.get("offsets") or ()), tuple(c.__dict__.get("sizes") or ())
        if (
            len(offsets) != len(shape)
            or len(sizes) != len(shape)
            or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, shape))
        ):
            raise FormatError(
                f"{path}: tensor {key} {list(shape)} has a chunk at {list(offsets)} of size "
                f"{list(sizes)} outside it; the metadata is corrupt"
            )
        if 0 in sizes:  # a rank's empty shard (FSDP2 over more ranks than rows): no data
            continue
        info = where.get((key, offsets))
        if info is None:
            raise FormatError(
                f"{path}: chunk {list(offsets)} of tensor {key} has no storage entry; the metadata is corrupt"
            )
        i = info.__dict__
        if i.get("transform_descriptors"):
            raise FormatError(
                f"{path}: chunk {list(offsets)} of tensor {key} is stored transformed "
                f"({i['transform_descriptors']}, e.g. compressed); ckpt-ir reads plain chunks only"
            )
        rel, off, length = i.get("relative_path"), i.get("offset"), i.get("length")
        if (
            not isinstance(rel, str)
            or not isinstance(off, int)
            or not isinstance(length, int)
            or os.path.isabs(rel)
            or ".." in rel.split("/")
            or off < 0
            or length < 0
        ):
            raise FormatError(
                f"{path}: chunk {list(offsets)} of tensor {key} has a malformed storage location"
            )
        chunks.append(Chunk(offsets, sizes, rel, off, length))
    return DcpTensor(key, dtype.ir, shape, tuple(chunks))


# ---------------------------------------------------------------------------------------------
# chunk blobs


class _Window:
    """A read-only, seekable view of ``length`` bytes at ``start`` of an open file (one chunk's
    ``torch.save`` blob), for :mod:`zipfile`."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


class ChunkResolver:
    """Finds where the raw bytes of DCP chunks are (one open file per ``.distcp``)."""

    def __init__(self, ckpt_dir: str) -> None:
        self.dir = ckpt_dir
        self._files: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}

    def _open(self, rel: str) -> tuple[Any, int]:
        f = self._files.get(rel)
        if f is None:
            path = os.path.join(self.dir, rel)
            if not os.path.isfile(path):
                raise FormatError(
                    f"{path}: data file named by {METADATA_FILE} is missing; the checkpoint is incomplete"
                )
            f = self._files[rel] = open(path, "rb")
            self._sizes[rel] = os.fstat(f.fileno()).st_size
        return f, self._sizes[rel]

    def data_offset(self, key: str, dtype: str, chunk: Chunk) -> int:
        """Absolute byte offset, in ``chunk.file``, of the chunk's raw (row-major) data."""
        path = os.path.join(self.dir, chunk.file)
        f, size = self._open(chunk.file)
        what = f"chunk {list(chunk.offsets)} of tensor {key}"
        if chunk.offset + chunk.length > size:
            raise FormatError(
                f"{path}: {what} needs bytes {chunk.offset}..{chunk.offset + chunk.length} but the "
                f"file has {size}; the file is truncated: re-copy or re-save the checkpoint"
            )
        try:
            zf = zipfile.ZipFile(_Window(f, chunk.offset, chunk.length))  # type: ignore[arg-type]
            with zf:
                infos = zf.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
                if not pkl:
                    raise FormatError(
                        f"{path}: {what} at byte {chunk.offset} is not a torch.save blob (no data.pkl)"
                    )
                prefix = pkl[0].filename[: -len("data.pkl")]
                ref = safe_loads(zf.read(pkl[0]), f"{path} ({what})")
        except (zipfile.BadZipFile, OSError, EOFError, struct.error) as e:
            raise FormatError(
                f"{path}: {what} at byte {chunk.offset} is not a readable torch.save blob ({e}); "
                f"the file is corrupt or truncated"
            ) from None
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{path}: {what} holds a {type(ref).__name__}, not a tensor")
        if ref.dtype != dtype or ref.shape != chunk.sizes:
            raise FormatError(
                f"{path}: {what} is stored as {ref.dtype} {list(ref.shape)} but the metadata says "
                f"{dtype} {list(chunk.sizes)}; the checkpoint is inconsistent"
            )
        numel = math.prod(ref.shape)
        if numel > 1 and any(
            st != ex for st, ex, n in zip(ref.stride, _contiguous(ref.shape), ref.shape) if n > 1
        ):
            raise FormatError(f"{path}: {what} is stored as a non-contiguous view (stride {ref.stride})")
        record = [i for i in infos if i.filename == f"{prefix}data/{ref.storage.key}"]
        if not record:
            raise FormatError(f"{path}: {what} refers to a missing storage record; the file is corrupt")
        info = record[0]
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"{path}: {what} is compressed; not a torch.save blob")
        item = ITEMSIZE[dtype]
        if (ref.offset + numel) * item > info.file_size or ref.storage.numel * item > info.file_size:
            raise FormatError(
                f"{path}: {what} needs {(ref.offset + numel) * item} bytes but its storage holds "
                f"{info.file_size}; the file is corrupt"
            )
        f.seek(chunk.offset + info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise FormatError(f"{path}: {what}: damaged zip record header; the file is corrupt")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > chunk.length:
            raise FormatError(f"{path}: {what}: its data runs past the end of the blob; the file is corrupt")
        return chunk.offset + start + ref.offset * item

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ChunkResolver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


# ---------------------------------------------------------------------------------------------
# tensors as lazy expressions over their chunks


class Assembler:
    """Expressions for (parts of) stored tensors, assembled lazily from their chunks (``where``
    names the checkpoint in errors)."""

    def __init__(self, where: str, resolver: ChunkResolver) -> None:
        self.where, self.resolver = where, resolver
        self._offsets: dict[tuple[str, tuple[int, ...]], int] = {}

    def __call__(self, t: DcpTensor, index: tuple[int, ...] = ()) -> E.Expr:
        """``t[index]``: the sub-tensor at ``index`` of the leading axes (a stacked layer /
        expert); reads only the bytes of that sub-tensor."""
        k = len(index)
        shape = t.shape[k:]
        if math.prod(t.shape) == 0:
            raise FormatError(f"{self.where}: tensor {t.key} is empty {list(t.shape)}")
        pieces = []
        seen = set()
        for c in t.chunks:
            if c.offsets in seen:
                continue
            if all(c.offsets[d] <= index[d] < c.offsets[d] + c.sizes[d] for d in range(k)):
                seen.add(c.offsets)
                lin = 0
                for d in range(k):
                    lin = lin * c.sizes[d] + index[d] - c.offsets[d]
                pieces.append((c.offsets[k:], c.sizes[k:], c, lin * math.prod(c.sizes[k:])))
        return self._tile(t, (0,) * len(shape), shape, pieces)

    def _load(self, t: DcpTensor, sizes: tuple[int, ...], chunk, element_offset: int) -> E.Load:
        at = (t.key, chunk.offsets)
        base = self._offsets.get(at)
        if base is None:
            base = self._offsets[at] = self.resolver.data_offset(t.key, t.dtype, chunk)
        path = os.path.join(self.resolver.dir, chunk.file)
        return E.Load(path, t.key, sizes, t.dtype, base + element_offset * ITEMSIZE[t.dtype], "torch")

    def _tile(self, t: DcpTensor, lo: tuple[int, ...], sizes: tuple[int, ...], pieces: list) -> E.Expr:
        """The box [lo, lo+sizes) from chunk pieces that must tile it exactly (split recursively
        along a dim where no piece straddles a boundary)."""
        if not pieces:
            raise FormatError(
                f"{self.where}: tensor {t.key} has no chunk covering offset {list(lo)}; the checkpoint "
                f"is incomplete"
            )
        if len(pieces) == 1:
            off, sz, chunk, elem = pieces[0]
            if off == lo and sz == sizes:
                return self._load(t, sz, chunk, elem)
        for d in range(len(sizes)):
            cuts = sorted(
                {lo[d], lo[d] + sizes[d]} | {p[0][d] for p in pieces} | {p[0][d] + p[1][d] for p in pieces}
            )
            if len(cuts) < 3 or any(p[0][d] < c < p[0][d] + p[1][d] for p in pieces for c in cuts):
                continue
            parts = []
            for a, b in zip(cuts, cuts[1:]):
                sub = [p for p in pieces if a <= p[0][d] and p[0][d] + p[1][d] <= b]
                sub_lo = lo[:d] + (a,) + lo[d + 1 :]
                sub_sizes = sizes[:d] + (b - a,) + sizes[d + 1 :]
                parts.append(self._tile(t, sub_lo, sub_sizes, sub))
            return E.Concat(tuple(parts), d)
        raise FormatError(
            f"{self.where}: the chunks of tensor {t.key} overlap or do not tile it around offset "
            f"{list(lo)}; the metadata is corrupt"
        )
