"""A restricted unpickler for torch / Megatron checkpoint pickles.

Only an allow-list of harmless globals is resolved.  Megatron, Transformer-Engine and MindSpeed
classes (they appear in Megatron's ``args``: enums, config dataclasses) become inert
:class:`Stub` objects that record their state and run nothing.  Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``...) is refused with a :class:`FormatError` naming the file.

Pickles of every protocol are read: Python 2 / protocol 0-2 module names (``__builtin__``,
``copy_reg``...) are mapped exactly as the standard library's :mod:`_compat_pickle` tables map
them, and only then checked against the allow-list.  Besides containers, the allow-list holds the
inert value types real ``args`` contain (sets, slices, complex numbers, bytes, ``io.BytesIO``,
``types.SimpleNamespace``, pure paths, ``torch.dtype``, ``torch.device``); constructing any of
them runs no user code.

Tensors are not materialised: ``torch._utils._rebuild_tensor_v2`` resolves to a function that
returns a :class:`TensorRef` (storage key, offset, shape, stride, dtype), so a checkpoint's
structure can be read without reading, or even importing, its data.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import enum
import io
import pathlib
import pickle
import signal
import types
from typing import IO, Any

import attrs

from ckpt_ir.errors import FormatError

STUB_PREFIXES = ("megatron.", "transformer_engine.", "mindspeed", "apex.", "modelopt.")

# storage class names -> IR dtype
STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}
TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float": "F32",
    "half": "F16",
    "double": "F64",
    "long": "I64",
    "int": "I32",
}


@attrs.frozen
class StorageRef:
    key: str
    dtype: str
    numel: int


@attrs.frozen
class TensorRef:
    """A tensor inside a torch zip checkpoint, not yet read."""

    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype


@attrs.frozen
class TorchDtype:
    """A ``torch.<dtype>`` object found in a pickle (e.g. ``args.params_dtype``)."""

    name: str

    @property
    def ir(self) -> str:
        return TORCH_DTYPES[self.name]


@attrs.frozen
class TorchDevice:
    """A ``torch.device`` found in a pickle; written back as one."""

    type: str
    index: int | None = None


def _torch_device(kind: Any, index: Any = None) -> TorchDevice:
    if isinstance(kind, TorchDevice):
        return kind
    text = str(kind)
    if ":" in text and index is None:
        text, _, idx = text.partition(":")
        index = int(idx)
    return TorchDevice(text, None if index is None else int(index))


class Stub:
    """Inert stand-in for a Megatron/TE class: keeps constructor args and state, does nothing.

    ckpt-ir's own writer puts a stub back exactly as it was pickled (the same class global, its
    arguments and state), so carried ``args`` keep Megatron's enums and config objects."""

    _module = _name = _qualname = "Stub"
    args: tuple = ()
    kwargs: dict = {}
    built = False  # True: made by calling the class (REDUCE); False: by __new__ (NEWOBJ) or getattr
    member: str | None = None  # an enum member pickled as getattr(cls, name) (Python 3.12+)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.built = True

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self._qualname} stub {self.member or self.args!r}>"

    def __reduce__(self):  # stubs never get written back as their original class by pickle
        return (str, (repr(self),))


_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    cls = _stub_classes.get(qual)
    if cls is None:
        cls = type(name, (Stub,), {"_module": module, "_name": name, "_qualname": qual})
        _stub_classes[qual] = cls
    return cls


def _rebuild_tensor(storage: StorageRef, offset: int, size: Any, stride: Any, *_rest: Any) -> TensorRef:
    return TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    return text.encode(encoding)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


def _plain_dict(*_factory: Any) -> dict:
    """``collections.defaultdict(dict)`` (MindSpeed-LLM's state dicts) loads as a plain dict: its
    default factory is never called, so it cannot matter."""
    return {}


def _bytes(data: Any = b"", *encoding: Any) -> bytes:
    """``bytes()`` / ``bytes(text, 'latin1')`` as protocol 0-2 write them; ``bytes(N)`` (N zero
    bytes: a memory bomb) is refused."""
    if isinstance(data, int):
        raise ValueError("bytes(<int>) is not a pickled value")
    return bytes(data, *encoding) if encoding else bytes(data)


def _bytearray(data: Any = b"", *encoding: Any) -> bytearray:
    return bytearray(_bytes(data, *encoding))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (how protocols 0 and 1 pickle plain objects such as
    ``argparse.Namespace``), limited to classes the allow-list already produced: it allocates
    ``cls`` and, for a builtin base such as ``dict``, fills it from ``state``."""
    if not (
        isinstance(cls, type)
        and isinstance(base, type)
        and issubclass(cls, base)
        and (base is object or base in _INERT_TYPES)
    ):
        raise ValueError(f"copyreg._reconstructor({cls!r}, {base!r}) is not a plain object")
    if base is object:
        return object.__new__(cls)
    # base is a builtin container (dict, list, ...) taking state; mypy only sees object's signatures
    obj = base.__new__(cls, state)  # type: ignore[call-arg]
    base.__init__(obj, state)  # type: ignore[call-arg]
    return obj


def _getattr(obj: Any, name: Any) -> Any:
    """``getattr(EnumClass, 'member')``: how Python 3.12+ pickles enum members.  Only members of
    allow-listed enums and of stub classes (a stub naming the member) are looked up; anything
    else is refused."""
    if (
        isinstance(obj, type)
        and issubclass(obj, enum.Enum)
        and isinstance(name, str)
        and name in obj.__members__
    ):
        return obj[name]
    if (
        isinstance(obj, type)
        and issubclass(obj, Stub)
        and isinstance(name, str)
        and name.isidentifier()
        and not name.startswith("_")
    ):
        member = object.__new__(obj)
        member.member = name
        return member
    raise ValueError(f"getattr({obj!r}, {name!r}) is not an enum member")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    ("_io", "BytesIO"): io.BytesIO,
    ("io", "BytesIO"): io.BytesIO,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "range"): range,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "object"): object,  # only ever the base argument of copyreg._reconstructor
    ("builtins", "getattr"): _getattr,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("signal", "Signals"): signal.Signals,  # Megatron-LM's args.exit_signal
    ("torch", "device"): _torch_device,
    # paths load as pure paths: same value and type name, no file-system access
    **{
        (mod, cls): pure
        for mod in ("pathlib", "pathlib._local")
        for cls, pure in (
            ("PosixPath", pathlib.PurePosixPath),
            ("PurePosixPath", pathlib.PurePosixPath),
            ("WindowsPath", pathlib.PureWindowsPath),
            ("PureWindowsPath", pathlib.PureWindowsPath),
        )
    },
}
# builtin types copyreg._reconstructor may use as a base (protocol 0/1 subclasses of them)
_INERT_TYPES = (dict, list, set, frozenset, tuple, str, int, float, complex)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy arrays appear in Megatron's rng_state (np.random.get_state()); rebuilding one only
    allocates an array of an allow-listed type, as torch's weights_only loader also permits."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array-rebuild function
    scalar = np.float64(0).__reduce__()[0]
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    for name in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType", "BoolDType", "UInt8DType"):
        if hasattr(np.dtypes, name):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return out


def compat_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global as protocol 0-2 pickles spell it, mapped as the standard
    library's unpickler maps it (``__builtin__.set`` -> ``builtins.set``).  No Python 3 module has
    a Python 2 name, so mapping regardless of the protocol changes nothing else."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes | IO[bytes], source: str) -> None:
        super().__init__(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = compat_name(module, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("numpy"):
            allowed = _numpy_globals()
            if (module, name) in allowed:
                return allowed[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return ("storage-class", STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TorchDtype(name)
        if module.startswith(STUB_PREFIXES) or module == "__main__" and name in ("Namespace",):
            return _stub_class(module, name)
        if module == "enum" and name == "Enum":
            return _stub_class(module, name)
        raise FormatError(
            f"{self.source}: refusing to unpickle {module}.{name} (it could run code); "
            f"only tensors, plain containers and Megatron config objects are loaded"
        )

    def persistent_load(self, pid: Any) -> Any:
        # the location ("cpu", "cuda:N", "npu:N", ...) is where the saving process held the storage;
        # its bytes are read from the file, so checkpoints saved from any device read anywhere
        try:  # the zip format's id; the legacy format adds view metadata (always None since torch 1.0)
            kind, storage_type, key, _location, numel, *view = pid
            assert view in ([], [None])
        except (TypeError, ValueError, AssertionError):
            raise FormatError(f"{self.source}: unexpected persistent id {pid!r} in pickle") from None
        if kind != "storage":
            raise FormatError(f"{self.source}: unexpected persistent id kind {kind!r} in pickle")
        if isinstance(storage_type, tuple) and storage_type[0] == "storage-class":
            dtype = storage_type[1]
        elif isinstance(storage_type, TorchDtype):
            dtype = storage_type.ir
        else:
            raise FormatError(f"{self.source}: unknown storage type {storage_type!r} in pickle")
        return StorageRef(str(key), dtype, int(numel))


def loads(data: bytes | IO[bytes], source: str) -> Any:
    """Unpickle ``data`` (bytes, or a binary file positioned at a pickle, left just after it) with
    the allow-list; errors name ``source``."""
    try:
        return RestrictedUnpickler(data, source).load()
    except FormatError:
        raise
    except Exception as e:  # any malformed pickle
        raise FormatError(
            f"{source}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupt or not a checkpoint"
        ) from None
