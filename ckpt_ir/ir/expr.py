"""Lazy tensor expressions.

Every tensor in the IR is an expression over on-disk data.  Each node knows its shape and dtype
without reading anything, so a whole conversion can be planned, verified and printed before the
first byte moves.  The algebra is deliberately small:

    Load      bytes of one tensor (or a row range of it) in a file
    Slice     a range along one dim
    Concat    several expressions along one dim
    Reshape   same elements, new shape (row-major)
    Transpose swap two dims
    Cast      dtype change
    PadRows   grow dim 0 by repeating the last row (Megatron vocab padding) or with zeros
    Add, Scale, Matmul   the arithmetic a LoRA merge needs (computed in fp32 by the caller)
    RowRescale           each row rescaled to a given norm (DoRA's magnitude), in fp32

:func:`simplify` rewrites an expression into an equivalent one that reads fewer bytes (slices are
pushed into loads, adjacent loads merge, no-op casts vanish).  :func:`evaluate` produces a torch
tensor; it is the only place torch is imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import attrs

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir.dtypes import itemsize

Shape = tuple[int, ...]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise VerifyError(msg)


@attrs.frozen
class Expr:
    """Base of all expression nodes."""

    @property
    def shape(self) -> Shape:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def dtype(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def children(self) -> tuple[Expr, ...]:
        return ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def __str__(self) -> str:
        """The printer's form: ``cast(model.safetensors:lm_head.weight[0:64], BF16)  64x8 BF16``."""
        return f"{describe(self)}  {'x'.join(map(str, self.shape)) or 'scalar'} {self.dtype}"


@attrs.frozen
class Load(Expr):
    """A contiguous row-major tensor stored at ``offset`` bytes into ``path``.

    ``key`` is the tensor's name inside the file (for printing and errors).  ``fmt`` says how the
    file is framed (``safetensors`` or ``torch``); the bytes themselves are read the same way.
    ``rows`` restricts the load to a range of dim 0; it is how slices become smaller reads.
    """

    path: str
    key: str
    full_shape: Shape = attrs.field(converter=tuple)
    load_dtype: str
    offset: int
    fmt: str = "safetensors"
    rows: tuple[int, int] | None = None

    def __attrs_post_init__(self) -> None:
        if self.rows is not None:
            a, b = self.rows
            _check(bool(self.full_shape) and 0 <= a <= b <= self.full_shape[0],
                   f"row range {self.rows} outside {self.key} {self.full_shape}")

    @property
    def shape(self) -> Shape:
        if self.rows is None:
            return self.full_shape
        return (self.rows[1] - self.rows[0],) + self.full_shape[1:]

    @property
    def dtype(self) -> str:
        return self.load_dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.full_shape[1:]) * itemsize(self.load_dtype)

    @property
    def byte_range(self) -> tuple[int, int]:
        """Absolute [start, end) byte range in the file that this load reads."""
        a = self.rows[0] if self.rows else 0
        return self.offset + a * self.row_bytes, self.offset + a * self.row_bytes + self.nbytes


@attrs.frozen
class Slice(Expr):
    x: Expr
    dim: int
    start: int
    stop: int

    def __attrs_post_init__(self) -> None:
        _check(0 <= self.dim < len(self.x.shape), f"slice dim {self.dim} out of range for {self.x.shape}")
        _check(0 <= self.start <= self.stop <= self.x.shape[self.dim],
               f"slice [{self.start}:{self.stop}] outside dim {self.dim} of shape {self.x.shape}")

    @property
    def shape(self) -> Shape:
        s = list(self.x.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    @property
    def dtype(self) -> str:
        return self.x.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Concat(Expr):
    xs: tuple[Expr, ...] = attrs.field(converter=tuple)
    dim: int = 0

    def __attrs_post_init__(self) -> None:
        _check(len(self.xs) > 0, "concat of nothing")
        ref = self.xs[0]
        for x in self.xs[1:]:
            _check(x.dtype == ref.dtype, f"concat of mixed dtypes {ref.dtype} and {x.dtype}")
            _check(len(x.shape) == len(ref.shape) and all(
                a == b for d, (a, b) in enumerate(zip(x.shape, ref.shape)) if d != self.dim),
                f"concat on dim {self.dim} of incompatible shapes {ref.shape} and {x.shape}")

    @property
    def shape(self) -> Shape:
        s = list(self.xs[0].shape)
        s[self.dim] = sum(x.shape[self.dim] for x in self.xs)
        return tuple(s)

    @property
    def dtype(self) -> str:
        return self.xs[0].dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return self.xs


@attrs.frozen
class Reshape(Expr):
    x: Expr
    new_shape: Shape = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        _check(math.prod(self.new_shape) == self.x.numel,
               f"reshape {self.x.shape} -> {self.new_shape} changes the element count")

    @property
    def shape(self) -> Shape:
        return self.new_shape

    @property
    def dtype(self) -> str:
        return self.x.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Transpose(Expr):
    x: Expr
    dim0: int
    dim1: int

    @property
    def shape(self) -> Shape:
        s = list(self.x.shape)
        s[self.dim0], s[self.dim1] = s[self.dim1], s[self.dim0]
        return tuple(s)

    @property
    def dtype(self) -> str:
        return self.x.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Cast(Expr):
    x: Expr
    to: str

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return self.to

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class PadRows(Expr):
    """Grow dim 0 to ``rows`` by repeating the last row (Megatron's vocab padding rule), or with
    zeros (``zero=True``: padding of optimizer state, alignment gaps in flat buffers)."""

    x: Expr
    rows: int
    zero: bool = False

    def __attrs_post_init__(self) -> None:
        _check(self.rows >= self.x.shape[0] > 0, f"cannot pad {self.x.shape[0]} rows to {self.rows}")

    @property
    def shape(self) -> Shape:
        return (self.rows,) + self.x.shape[1:]

    @property
    def dtype(self) -> str:
        return self.x.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Add(Expr):
    """``a + b`` computed in fp32 and rounded once to ``a``'s dtype (LoRA merge)."""

    a: Expr
    b: Expr

    def __attrs_post_init__(self) -> None:
        _check(self.a.shape == self.b.shape, f"add of shapes {self.a.shape} and {self.b.shape}")

    @property
    def shape(self) -> Shape:
        return self.a.shape

    @property
    def dtype(self) -> str:
        return self.a.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.a, self.b)


@attrs.frozen
class Matmul(Expr):
    """``a @ b`` in fp32 (the result dtype is F32)."""

    a: Expr
    b: Expr

    def __attrs_post_init__(self) -> None:
        _check(len(self.a.shape) == 2 and len(self.b.shape) == 2 and self.a.shape[1] == self.b.shape[0],
               f"matmul of shapes {self.a.shape} and {self.b.shape}")

    @property
    def shape(self) -> Shape:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.a, self.b)


@attrs.frozen
class Scale(Expr):
    """``x * factor`` in fp32 (the result dtype is F32)."""

    x: Expr
    factor: float

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class RowRescale(Expr):
    """DoRA's merge: each row of the matrix ``x`` [out, in] rescaled to the norm ``magnitude[row]``,
    ``(magnitude / ||x||_row) * x``, in fp32 (the result dtype is F32).  The norm runs over a
    whole row, so ``x`` must hold full rows (its input dim unsplit)."""

    x: Expr
    magnitude: Expr

    def __attrs_post_init__(self) -> None:
        _check(len(self.x.shape) == 2 and self.magnitude.shape == self.x.shape[:1],
               f"row rescale of {self.x.shape} by a magnitude of shape {self.magnitude.shape}")

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x, self.magnitude)


# ---------------------------------------------------------------------------------------------
# traversal


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of ``expr``, parents before children."""
    stack = [expr]
    while stack:
        e = stack.pop()
        yield e
        stack.extend(reversed(e.children))


def loads(expr: Expr) -> list[Load]:
    return [e for e in walk(expr) if isinstance(e, Load)]


def bytes_read(expr: Expr) -> int:
    """Bytes this expression reads from disk (each load counted once per occurrence)."""
    return sum(ld.nbytes for ld in loads(expr))


# ---------------------------------------------------------------------------------------------
# simplifier


def simplify(expr: Expr) -> Expr:
    """Rewrite bottom-up to a fixed point; the result computes the same values."""
    kids = expr.children
    if kids:
        new = tuple(simplify(k) for k in kids)
        if new != kids:
            expr = _rebuild(expr, new)
    while True:
        nxt = _rewrite(expr)
        if nxt is expr:
            return expr
        expr = simplify(nxt)


def _rebuild(e: Expr, kids: tuple[Expr, ...]) -> Expr:
    if isinstance(e, Concat):
        return attrs.evolve(e, xs=kids)
    if isinstance(e, (Add, Matmul)):
        return attrs.evolve(e, a=kids[0], b=kids[1])
    if isinstance(e, RowRescale):
        return attrs.evolve(e, x=kids[0], magnitude=kids[1])
    return attrs.evolve(e, x=kids[0])


def _rewrite(e: Expr) -> Expr:
    """One local rewrite, or ``e`` itself when none applies."""
    if isinstance(e, Cast) and e.to == e.x.dtype:
        return e.x
    if isinstance(e, Reshape):
        if e.new_shape == e.x.shape:
            return e.x
        if isinstance(e.x, Reshape):
            return Reshape(e.x.x, e.new_shape)
    if isinstance(e, Concat):
        return _rewrite_concat(e)
    if isinstance(e, Slice):
        return _rewrite_slice(e)
    return e


def _rewrite_concat(e: Concat) -> Expr:
    if len(e.xs) == 1:
        return e.xs[0]
    flat: list[Expr] = []
    for x in e.xs:
        if isinstance(x, Concat) and x.dim == e.dim:
            flat.extend(x.xs)
        elif x.shape[e.dim] > 0:
            flat.append(x)
    if not flat:
        return e.xs[0]
    merged: list[Expr] = [flat[0]]
    for x in flat[1:]:
        joined = _join(merged[-1], x, e.dim)
        if joined is not None:
            merged[-1] = joined
        else:
            merged.append(x)
    if len(merged) == 1:
        return merged[0]
    if tuple(merged) != e.xs:
        return Concat(tuple(merged), e.dim)
    return e


def _join(a: Expr, b: Expr, dim: int) -> Expr | None:
    """Two adjacent ranges (along ``dim``) of one tensor become one: row ranges of a load, or
    slices of one node."""
    if isinstance(a, Slice) and isinstance(b, Slice) and a.x == b.x and a.dim == b.dim == dim \
            and a.stop == b.start:
        return Slice(a.x, dim, a.start, b.stop)
    if dim != 0 or not (isinstance(a, Load) and isinstance(b, Load)):
        return None
    if (a.path, a.key, a.offset, a.full_shape, a.dtype) != (b.path, b.key, b.offset, b.full_shape, b.dtype):
        return None
    ra = a.rows or (0, a.full_shape[0])
    rb = b.rows or (0, b.full_shape[0])
    if ra[1] != rb[0]:
        return None
    rows = (ra[0], rb[1])
    return attrs.evolve(a, rows=None if rows == (0, a.full_shape[0]) else rows)


def _rewrite_slice(e: Slice) -> Expr:
    x, d, a, b = e.x, e.dim, e.start, e.stop
    if a == 0 and b == x.shape[d]:
        return x
    if isinstance(x, Slice) and x.dim == d:
        return Slice(x.x, d, x.start + a, x.start + b)
    if isinstance(x, Load) and d == 0:
        base = x.rows[0] if x.rows else 0
        return attrs.evolve(x, rows=(base + a, base + b))
    if isinstance(x, Load) and d > 0 and all(n == 1 for n in x.shape[:d]):
        # leading singleton dims: a slice on d is a contiguous row range after a reshape
        inner = math.prod(x.shape[d + 1:])
        flat = Reshape(x, (x.numel // inner, inner) if inner else (x.numel, 1))
        rows = Slice(flat, 0, a, b) if inner else flat
        return Reshape(rows, e.shape)
    if isinstance(x, Reshape) and d == 0 and x.x.shape and x.shape[0]:
        outer = x.numel // x.shape[0]  # elements per dim-0 row of the reshape
        inner = x.x.numel // x.x.shape[0] if x.x.shape[0] else 0  # ... and of its source
        if inner and outer % inner == 0:
            k = outer // inner
            return Reshape(Slice(x.x, 0, a * k, b * k), e.shape)
    if isinstance(x, Concat):
        if x.dim == d:
            parts, pos = [], 0
            for c in x.xs:
                n = c.shape[d]
                lo, hi = max(a, pos), min(b, pos + n)
                if lo < hi:
                    parts.append(Slice(c, d, lo - pos, hi - pos))
                pos += n
            return parts[0] if len(parts) == 1 else Concat(tuple(parts), d)
        return Concat(tuple(Slice(c, d, a, b) for c in x.xs), x.dim)
    if isinstance(x, Cast):
        return Cast(Slice(x.x, d, a, b), x.to)
    if isinstance(x, PadRows):
        n = x.x.shape[0]
        if d == 0 and b <= n:
            return Slice(x.x, 0, a, b)
        if d > 0:
            return PadRows(Slice(x.x, d, a, b), x.rows, x.zero)
    if isinstance(x, Transpose) and d not in (x.dim0, x.dim1):
        return Transpose(Slice(x.x, d, a, b), x.dim0, x.dim1)
    if isinstance(x, Transpose):
        other = x.dim1 if d == x.dim0 else x.dim0
        return Transpose(Slice(x.x, other, a, b), x.dim0, x.dim1)
    return e


# ---------------------------------------------------------------------------------------------
# evaluation


def describe(e: Expr) -> str:
    """Shortest useful description of where a tensor's bytes come from."""
    if isinstance(e, Load):
        rows = f"[{e.rows[0]}:{e.rows[1]}]" if e.rows else ""
        return f"{os.path.basename(e.path)}:{e.key}{rows}"
    if isinstance(e, Slice):
        idx = ["_"] * len(e.x.shape)
        idx[e.dim] = f"{e.start}:{e.stop}"
        return f"{describe(e.x)}[{','.join(idx)}]" if e.dim else f"{describe(e.x)}[{e.start}:{e.stop}]"
    if isinstance(e, Concat):
        return f"cat{e.dim}(" + ", ".join(describe(x) for x in e.xs) + ")"
    if isinstance(e, Reshape):
        return f"reshape({describe(e.x)}, {list(e.new_shape)})"
    if isinstance(e, Transpose):
        return f"transpose({describe(e.x)}, {e.dim0}, {e.dim1})"
    if isinstance(e, Cast):
        return f"cast({describe(e.x)}, {e.to})"
    if isinstance(e, PadRows):
        return f"pad_rows({describe(e.x)}, {e.rows}{', zeros' if e.zero else ''})"
    if isinstance(e, Add):
        return f"add({describe(e.a)}, {describe(e.b)})"
    if isinstance(e, Matmul):
        return f"matmul({describe(e.a)}, {describe(e.b)})"
    if isinstance(e, Scale):
        return f"scale({describe(e.x)}, {e.factor:g})"
    if isinstance(e, RowRescale):
        return f"row_rescale({describe(e.x)}, {describe(e.magnitude)})"
    return type(e).__name__


class Reader:
    """Reads byte ranges from source files.  Opens each file once, read-only, and never maps it,
    so resident memory holds only the tensors being built, not the pages of the sources."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self.bytes_read = 0
        self._scratch: dict[str, bytearray] = {}

    def scratch(self, nbytes: int, slot: str = "out") -> memoryview:
        """A reusable buffer (one per ``slot``) for the tensor being produced.  Reusing it matters:
        touching fresh pages costs more than copying the data (the kernel zeroes every new page)."""
        buf = self._scratch.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._scratch[slot] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def fd(self, path: str) -> int:
        import os

        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, path: str, start: int, buf: memoryview) -> None:
        import os

        from ckpt_ir.errors import FormatError

        fd = self.fd(path)
        want, done = len(buf), 0
        while done < want:
            n = os.preadv(fd, [buf[done:]], start + done)
            if n <= 0:
                raise FormatError(f"{path}: file ends at byte {start + done}, expected {want - done} more "
                                  f"bytes; the file is truncated: re-download or re-save it")
            done += n
        self.bytes_read += want

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def evaluate(expr: Expr, reader: Reader):
    """Compute ``expr`` as a contiguous torch tensor."""
    return to_torch_tensor(evaluate_raw(expr, reader), expr.dtype)


def raw_dtype(dtype: str):
    """The numpy integer type with the item size of ``dtype``: data movement never needs to know
    what the bits mean, so it runs in numpy (fast to import) and torch is loaded only for math."""
    import numpy as np

    return np.dtype(f"<i{itemsize(dtype)}")


def to_torch_tensor(raw, dtype: str):
    import torch

    from ckpt_ir.ir.dtypes import to_torch

    return torch.from_numpy(raw).view(to_torch(dtype))


def from_torch_tensor(t, dtype: str):
    import torch

    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize(dtype)]
    return t.contiguous().view(width).numpy()


def evaluate_raw(expr: Expr, reader: Reader, *, scratch: bool = False):
    """Compute ``expr`` as a contiguous numpy array of raw items (see :func:`raw_dtype`).

    With ``scratch`` the result may live in the reader's reusable buffer: it is valid only until
    the next ``scratch`` evaluation (the streaming writers consume it before asking again)."""
    import numpy as np

    if _fillable(expr):
        if scratch:
            out = np.frombuffer(reader.scratch(expr.nbytes), dtype=raw_dtype(expr.dtype)).reshape(expr.shape)
        else:
            out = np.empty(expr.shape, dtype=raw_dtype(expr.dtype))
        _fill(expr, out, reader)
        return out
    if isinstance(expr, Concat):
        return np.concatenate([evaluate_raw(x, reader) for x in expr.xs], axis=expr.dim)
    if isinstance(expr, Slice):
        x = evaluate_raw(expr.x, reader)
        index = [slice(None)] * x.ndim
        index[expr.dim] = slice(expr.start, expr.stop)
        return np.ascontiguousarray(x[tuple(index)])
    if isinstance(expr, Reshape):
        return evaluate_raw(expr.x, reader).reshape(expr.new_shape)
    if isinstance(expr, Transpose):
        return np.ascontiguousarray(np.swapaxes(evaluate_raw(expr.x, reader), expr.dim0, expr.dim1))
    if isinstance(expr, PadRows):
        x = evaluate_raw(expr.x, reader)
        extra = expr.rows - x.shape[0]
        if not extra:
            return x
        pad = np.zeros((extra,) + x.shape[1:], x.dtype) if expr.zero else np.repeat(x[-1:], extra, axis=0)
        return np.concatenate([x, pad])
    return from_torch_tensor(_evaluate_math(expr, reader), expr.dtype)


def _evaluate_math(expr: Expr, reader: Reader):
    """Nodes whose bits change: casts and LoRA arithmetic (fp32 accumulation), in torch."""
    import torch

    from ckpt_ir.ir.dtypes import to_torch

    if isinstance(expr, Cast):
        return evaluate(expr.x, reader).to(to_torch(expr.to))
    if isinstance(expr, Add):
        a = evaluate(expr.a, reader)
        return (a.to(torch.float32) + evaluate(expr.b, reader).to(torch.float32)).to(a.dtype)
    if isinstance(expr, Matmul):
        return evaluate(expr.a, reader).to(torch.float32) @ evaluate(expr.b, reader).to(torch.float32)
    if isinstance(expr, Scale):
        return evaluate(expr.x, reader).to(torch.float32) * expr.factor
    if isinstance(expr, RowRescale):  # peft's DoRA merge order: norm of the rows, m / norm, times the rows
        x = evaluate(expr.x, reader).to(torch.float32)
        factor = evaluate(expr.magnitude, reader).to(torch.float32) / torch.linalg.norm(x, dim=1)
        return factor.view(-1, 1) * x
    raise TypeError(f"cannot evaluate {type(expr).__name__}")


def _fillable(expr: Expr) -> bool:
    """Loads, concats and slices of loads are read straight into (views of) the output buffer."""
    return isinstance(expr, (Load, Concat)) or isinstance(expr, Slice) and isinstance(expr.x, Load)


def _fill(expr: Expr, out, reader: Reader) -> None:
    """Write ``expr`` into the contiguous raw array ``out`` (same shape)."""
    if isinstance(expr, Load):
        if expr.nbytes:
            start, _ = expr.byte_range
            if out.flags.c_contiguous:
                reader.read_into(expr.path, start, memoryview(out.reshape(-1).view("u1")))
            else:  # a strided destination (concat along dim > 0): read into a staging buffer
                import numpy as np

                stage = reader.scratch(expr.nbytes, "stage")
                reader.read_into(expr.path, start, stage)
                out[...] = np.frombuffer(stage, dtype=out.dtype).reshape(out.shape)
        return
    if isinstance(expr, Slice) and isinstance(expr.x, Load):
        import numpy as np

        whole = np.frombuffer(reader.scratch(expr.x.nbytes, "slice"), dtype=out.dtype).reshape(expr.x.shape)
        _fill(expr.x, whole, reader)
        index = [slice(None)] * whole.ndim
        index[expr.dim] = slice(expr.start, expr.stop)
        out[...] = whole[tuple(index)]
        return
    if isinstance(expr, Concat):
        pos = 0
        index = [slice(None)] * out.ndim
        for x in expr.xs:
            n = x.shape[expr.dim]
            index[expr.dim] = slice(pos, pos + n)
            _fill(x, out[tuple(index)], reader)
            pos += n
        return
    out[...] = evaluate_raw(expr, reader)

