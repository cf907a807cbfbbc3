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
    Offset               a constant added to every element (a zero-centred norm weight's w - 1)
    RowRescale           each row rescaled to a given norm (DoRA's magnitude), in fp32
    Dequantize           block-quantized weights (FP8 + per-block scales, MXFP4) to fp32
    Quantize             FP8 block quantization of a weight: its fp8 values or its scales
    Fill                 one value in every element, read from nowhere (a constant of the
                         architecture that a format does not store: xIELU's beta and eps)

:func:`simplify` rewrites an expression into an equivalent one that reads fewer bytes (slices are
pushed into loads, adjacent loads merge, no-op casts vanish).  :func:`evaluate` produces a torch
tensor; it is the only place torch is imported, for the LoRA arithmetic (data movement and float
casts run in numpy).

A row range of any node is a simplified ``Slice(node, 0, lo, hi)``: the writers evaluate computed
tensors in row blocks this way (``backends.plan.row_blocks``), so a new computing node (a
dequantization, say) streams in bounded memory once ``_rewrite_slice`` says how a row range of
it is computed from row ranges of its inputs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any, cast

import attrs

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir.dtypes import itemsize

Shape = tuple[int, ...]


def _shape(v: Iterable[int]) -> Shape:
    return tuple(v)


def _exprs(v: Iterable[Expr]) -> tuple[Expr, ...]:
    return tuple(v)


def _block(v: Iterable[int]) -> tuple[int, int]:
    a, b = v
    return (a, b)


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

    # cached: planning a 671B model asks the shapes and sizes of millions of nodes, each of
    # which would otherwise be recomputed from its children on every access
    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def __str__(self) -> str:
        """The printer's form: ``cast(model.safetensors:lm_head.weight[0:64], BF16)  64x8 BF16``."""
        return f"{describe(self)}  {'x'.join(map(str, self.shape)) or 'scalar'} {self.dtype}"


@attrs.frozen
class Unary(Expr):
    """An expression of one tensor ``x``, of its dtype unless it says otherwise."""

    x: Expr

    @property
    def dtype(self) -> str:
        return self.x.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Load(Expr):
    """A contiguous row-major tensor stored at ``offset`` bytes into ``path``.

    ``key`` is the tensor's name inside the file (for printing and errors).  ``fmt`` says how the
    file is framed (``safetensors`` or ``torch``); the bytes themselves are read the same way.
    ``rows`` restricts the load to a range of dim 0; it is how slices become smaller reads.
    """

    path: str
    key: str
    full_shape: Shape = attrs.field(converter=_shape)
    load_dtype: str
    offset: int
    fmt: str = "safetensors"
    rows: tuple[int, int] | None = None

    def __attrs_post_init__(self) -> None:
        if self.rows is not None:
            a, b = self.rows
            _check(
                bool(self.full_shape) and 0 <= a <= b <= self.full_shape[0],
                f"row range {self.rows} outside {self.key} {self.full_shape}",
            )

    @functools.cached_property
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
class Slice(Unary):
    dim: int
    start: int
    stop: int

    def __attrs_post_init__(self) -> None:
        _check(0 <= self.dim < len(self.x.shape), f"slice dim {self.dim} out of range for {self.x.shape}")
        _check(
            0 <= self.start <= self.stop <= self.x.shape[self.dim],
            f"slice [{self.start}:{self.stop}] outside dim {self.dim} of shape {self.x.shape}",
        )

    @functools.cached_property
    def shape(self) -> Shape:
        s = list(self.x.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)


@attrs.frozen
class Concat(Expr):
    xs: tuple[Expr, ...] = attrs.field(converter=_exprs)
    dim: int = 0

    def __attrs_post_init__(self) -> None:
        _check(len(self.xs) > 0, "concat of nothing")
        ref = self.xs[0]
        for x in self.xs[1:]:
            _check(x.dtype == ref.dtype, f"concat of mixed dtypes {ref.dtype} and {x.dtype}")
            _check(
                len(x.shape) == len(ref.shape)
                and all(a == b for d, (a, b) in enumerate(zip(x.shape, ref.shape)) if d != self.dim),
                f"concat on dim {self.dim} of incompatible shapes {ref.shape} and {x.shape}",
            )

    @functools.cached_property
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
class Reshape(Unary):
    new_shape: Shape = attrs.field(converter=_shape)

    def __attrs_post_init__(self) -> None:
        _check(
            math.prod(self.new_shape) == self.x.numel,
            f"reshape {self.x.shape} -> {self.new_shape} changes the element count",
        )

    @property
    def shape(self) -> Shape:
        return self.new_shape


@attrs.frozen
class Transpose(Unary):
    dim0: int
    dim1: int

    @functools.cached_property
    def shape(self) -> Shape:
        s = list(self.x.shape)
        s[self.dim0], s[self.dim1] = s[self.dim1], s[self.dim0]
        return tuple(s)


@attrs.frozen
class Cast(Unary):
    to: str

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return self.to


@attrs.frozen
class PadRows(Expr):
    """Grow dim 0 to ``rows`` by repeating the last row (Megatron's vocab padding rule), or with
    zeros (``zero=True``: padding of optimizer state, alignment gaps in flat buffers)."""

    x: Expr
    rows: int
    zero: bool = False

    def __attrs_post_init__(self) -> None:
        _check(self.rows >= self.x.shape[0] > 0, f"cannot pad {self.x.shape[0]} rows to {self.rows}")

    @functools.cached_property
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
        _check(
            len(self.a.shape) == 2 and len(self.b.shape) == 2 and self.a.shape[1] == self.b.shape[0],
            f"matmul of shapes {self.a.shape} and {self.b.shape}",
        )

    @functools.cached_property
    def shape(self) -> Shape:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.a, self.b)


@attrs.frozen
class Scale(Unary):
    """``x * factor`` in fp32 (the result dtype is F32)."""

    factor: float

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return "F32"


@attrs.frozen
class Offset(Unary):
    """``x + value`` computed in fp32 and rounded once to ``x``'s dtype: a norm weight stored
    zero-centred (megatron-core's ``layernorm_zero_centered_gamma`` computes ``1 + w``) is the
    plain weight offset by -1, and back by +1.  Never folded away: ``(w - 1) + 1`` is ``w`` only
    where ``w - 1`` was exact (every ``w`` in [0.5, 2], Sterbenz)."""

    value: float

    @property
    def shape(self) -> Shape:
        return self.x.shape


@attrs.frozen
class Repeat(Unary):
    """Each row (dim 0) of ``x`` ``times`` times in a row, ``repeat_interleave``: a per-head
    scalar gate ``[heads, in]`` as Megatron's output-gate rows ``[heads * head_dim, in]``."""

    times: int

    @property
    def shape(self) -> Shape:
        return (self.x.shape[0] * self.times, *self.x.shape[1:])


@attrs.frozen
class Unrepeat(Unary):
    """The inverse of :class:`Repeat`: the first row of each run of ``times`` rows of ``x``, which
    evaluation checks are all equal (rows that differ have no unrepeated form: an error naming the
    source)."""

    times: int

    def __attrs_post_init__(self) -> None:
        _check(
            self.times > 0 and self.x.shape[0] % self.times == 0,
            f"unrepeat: {self.x.shape[0]} rows are not runs of {self.times}",
        )

    @property
    def shape(self) -> Shape:
        return (self.x.shape[0] // self.times, *self.x.shape[1:])

    def refuse(self, run: int) -> VerifyError:
        """The error for run ``run`` of rows that are not copies of one row."""
        src = loads(self.x)
        where = (
            f"{os.path.join(os.path.basename(os.path.dirname(src[0].path)), os.path.basename(src[0].path))}"
            f":{src[0].key}"
            if src
            else "a computed tensor"
        )
        return VerifyError(
            f"{where}: rows {run * self.times}..{(run + 1) * self.times - 1} of {describe(self.x)} should be "
            f"one row repeated {self.times} times (a per-head gate) but differ, so the gate has no per-head "
            f"form; keep this checkpoint in Megatron-Core, or train with the gate rows tied per head"
        )


@attrs.frozen
class RowRescale(Expr):
    """DoRA's merge: each row of the matrix ``x`` [out, in] rescaled to the norm ``magnitude[row]``,
    ``(magnitude / ||x||_row) * x``, in fp32 (the result dtype is F32).  The norm runs over a
    whole row, so ``x`` must hold full rows (its input dim unsplit)."""

    x: Expr
    magnitude: Expr

    def __attrs_post_init__(self) -> None:
        _check(
            len(self.x.shape) == 2 and self.magnitude.shape == self.x.shape[:1],
            f"row rescale of {self.x.shape} by a magnitude of shape {self.magnitude.shape}",
        )

    @property
    def shape(self) -> Shape:
        return self.x.shape

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x, self.magnitude)


@attrs.frozen
class Dequantize(Expr):
    """A block-quantized weight times its per-block scales, exactly in fp32 (the result dtype is
    F32; a cast to the compute dtype follows, rounding once as transformers does).

    ``scheme`` ``fp8``: ``q`` is float8_e4m3 [..., rows, cols] and ``scale`` holds one inverse scale
    per ``block`` = (b0, b1) tile [..., ceil(rows/b0), ceil(cols/b1)] (fp32, ue8m0 ``F8_E8M0`` or
    raw e8m0 bytes ``U8``); edge tiles may be partial.  ``mxfp4``: ``q`` holds two e2m1 values per
    byte [..., groups, 16] and ``scale`` one e8m0 exponent byte per group of 32 [..., groups]; the
    result is [..., groups * 32].  ``int4`` (compressed-tensors' pack-quantized, Kimi-K2.5's
    experts): ``q`` is int32 [rows, cols / 8], eight offset-binary nibbles each (element ``8j + k``
    in bits ``4k .. 4k+3`` of word ``j``, value ``nibble - 8``), and ``scale`` one scale per
    ``block`` = (1, group) of a row [rows, cols / group]; the result is [rows, cols]."""

    q: Expr
    scale: Expr
    block: tuple[int, int] = attrs.field(converter=_block)
    scheme: str = "fp8"

    def __attrs_post_init__(self) -> None:
        qs, ss = self.q.shape, self.scale.shape
        if self.scheme == "mxfp4":
            _check(
                len(qs) >= 2 and qs[-1] == 16 and ss == qs[:-1],
                f"mxfp4 blocks of shape {qs} need scales of shape {qs[:-1]}, got {ss}",
            )
        elif self.scheme == "int4":
            g = self.block[1]
            grid = (qs[0], qs[1] * 8 // g) if len(qs) == 2 and qs[1] * 8 % g == 0 else None
            _check(
                self.block[0] == 1 and self.q.dtype == "I32" and grid == ss,
                f"int4 weight packed as {self.q.dtype} {qs} in groups of {g} needs int32 words and scales "
                f"{grid}, got {ss}",
            )
        else:
            _check(self.scheme == "fp8", f"unknown quantization scheme {self.scheme!r}")
            want = qs[:-2] + tuple(-(-n // b) for n, b in zip(qs[-2:], self.block)) if len(qs) >= 2 else None
            _check(
                want == ss,
                f"fp8 weight of shape {qs} in {list(self.block)} blocks needs scales {want}, got {ss}",
            )

    @property
    def shape(self) -> Shape:
        qs = self.q.shape
        if self.scheme == "int4":
            return (qs[0], qs[1] * 8)
        return qs[:-2] + (qs[-2] * 32,) if self.scheme == "mxfp4" else qs

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.q, self.scale)

    def rows(self, a: int, b: int) -> Dequantize:
        """Rows [a, b) of dim 0 of the weight and their scales; for a 2-D fp8 weight [a, b) must
        start and end on block boundaries (or at the last row)."""
        if self.scheme == "fp8" and len(self.shape) == 2:
            b0 = self.block[0]
            sa, sb = a // b0, -(-b // b0)
        else:
            sa, sb = a, b
        return Dequantize(Slice(self.q, 0, a, b), Slice(self.scale, 0, sa, sb), self.block, self.scheme)


@attrs.frozen
class Quantize(Expr):
    """FP8 block quantization of the 2-D weight ``x`` as transformers' ``Fp8Quantize`` computes it
    (per ``block`` tile: inverse scale absmax / 448, ue8m0 rounds it up to a power of two; values
    divided by it, clamped, rounded to float8_e4m3fn).  ``part`` ``weight`` is the F8_E4M3 values
    (``x``'s shape), ``scale`` the inverse scales (one per tile, F32 or F8_E8M0 for ue8m0); edge
    tiles may be partial."""

    x: Expr
    block: tuple[int, int] = attrs.field(converter=_block)
    scale_fmt: str = "float"
    part: str = "weight"

    def __attrs_post_init__(self) -> None:
        _check(len(self.x.shape) == 2, f"fp8 quantization of a tensor of shape {self.x.shape} (needs 2-D)")
        _check(self.scale_fmt in ("float", "ue8m0"), f"unknown fp8 scale format {self.scale_fmt!r}")

    @property
    def shape(self) -> Shape:
        if self.part == "weight":
            return self.x.shape
        return tuple(-(-n // b) for n, b in zip(self.x.shape, self.block))

    @property
    def dtype(self) -> str:
        if self.part == "weight":
            return "F8_E4M3"
        return "F8_E8M0" if self.scale_fmt == "ue8m0" else "F32"

    @property
    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@attrs.frozen
class Fill(Expr):
    """A tensor of ``fill_shape`` holding ``value`` in every element, in ``fill_dtype`` (the value
    rounded once, as ``torch.tensor(value, dtype=...)`` rounds it).  It reads nothing: the
    tensors a format leaves out because the architecture fixes their value (xIELU's ``beta`` and
    ``eps``, which Megatron keeps as Python floats) come back as one."""

    fill_shape: Shape = attrs.field(converter=_shape)
    fill_dtype: str
    value: float

    @property
    def shape(self) -> Shape:
        return self.fill_shape

    @property
    def dtype(self) -> str:
        return self.fill_dtype

    def torch_tensor(self, device: Any = None):
        import torch

        from ckpt_ir.ir.dtypes import to_torch

        one = torch.tensor(self.value, dtype=to_torch(self.fill_dtype), device=device)
        return one.expand(self.fill_shape).contiguous()


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


def simplify_node(e: Expr) -> Expr:
    """:func:`simplify` of a node whose children are already simplified (a slice or concatenation
    of simplified expressions, say): the same result without walking the children again."""
    nxt = _rewrite(e)
    return e if nxt is e else simplify(nxt)


def _rebuild(e: Expr, kids: tuple[Expr, ...]) -> Expr:
    # direct constructor calls: attrs.evolve is several times slower, and planning a 671B model
    # rebuilds hundreds of thousands of nodes
    if isinstance(e, Concat):
        return Concat(kids, e.dim)
    if isinstance(e, (Add, Matmul, RowRescale)):
        return type(e)(kids[0], kids[1])
    if isinstance(e, Dequantize):
        return Dequantize(kids[0], kids[1], e.block, e.scheme)
    # every other node kind keeps its one child in x, its first field
    return cast(Any, type(e))(kids[0], *(getattr(e, f.name) for f in attrs.fields(type(e))[1:]))


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
    if isinstance(e, Transpose):
        return _rewrite_transpose(e)
    if isinstance(e, Unrepeat) and isinstance(e.x, Repeat) and e.x.times == e.times:
        return e.x.x
    return e


def _rewrite_transpose(e: Transpose) -> Expr:
    """A swap undone by the same swap vanishes; a swap of a concatenation along one of the swapped
    dims is the concatenation of the swapped parts along the other (so an HF tensor stored
    [in, out], split into parts and fused again, folds back to its load)."""
    dims = {e.dim0, e.dim1}
    if isinstance(e.x, Transpose) and {e.x.dim0, e.x.dim1} == dims:
        return e.x.x
    if isinstance(e.x, Concat) and e.x.dim in dims:
        other = e.dim1 if e.x.dim == e.dim0 else e.dim0
        return Concat(tuple(Transpose(x, e.dim0, e.dim1) for x in e.x.xs), other)
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
    if (
        isinstance(a, Slice)
        and isinstance(b, Slice)
        and a.x == b.x
        and a.dim == b.dim == dim
        and a.stop == b.start
    ):
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
    if isinstance(x, Fill):
        return Fill(e.shape, x.fill_dtype, x.value)
    if isinstance(x, Slice) and x.dim == d:
        return Slice(x.x, d, x.start + a, x.start + b)
    if isinstance(x, Slice) and d == 0:  # rows first: a row range of a column slice reads only those rows
        return Slice(Slice(x.x, 0, a, b), x.dim, x.start, x.stop)
    if isinstance(x, Load) and d == 0:
        base = x.rows[0] if x.rows else 0
        return Load(x.path, x.key, x.full_shape, x.load_dtype, x.offset, x.fmt, (base + a, base + b))
    if isinstance(x, Load) and d > 0 and all(n == 1 for n in x.shape[:d]):
        # leading singleton dims: a slice on d is a contiguous row range after a reshape
        inner = math.prod(x.shape[d + 1 :])
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
        if d == 0 and a < n:  # straddles the end: the rows kept, padded (the last row is still x's)
            return PadRows(Slice(x.x, 0, a, n), b - a, x.zero)
        if d == 0 and not x.zero:  # padding only: copies of the last row
            return PadRows(Slice(x.x, 0, n - 1, n), b - a)
        if d > 0:
            return PadRows(Slice(x.x, d, a, b), x.rows, x.zero)
    # arithmetic is elementwise in the rows of its result (a matmul's rows are those of its left
    # operand, each computed alone: BLAS sums a row's products in the same order whatever the row
    # count; columns are not sliced, a narrower matrix may take another kernel)
    if isinstance(x, Scale):
        return Scale(Slice(x.x, d, a, b), x.factor)
    if isinstance(x, Offset):
        return Offset(Slice(x.x, d, a, b), x.value)
    if isinstance(x, Add):
        return Add(Slice(x.a, d, a, b), Slice(x.b, d, a, b))
    if isinstance(x, Matmul) and d == 0:
        return Matmul(Slice(x.a, 0, a, b), x.b)
    if isinstance(x, Dequantize) and d == 0:
        # whole scale blocks: a row range of a 2-D fp8 weight widens to block boundaries
        step = x.block[0] if x.scheme == "fp8" and len(x.shape) == 2 else 1
        lo, hi = a // step * step, min(-(-b // step) * step, x.shape[0])
        if (lo, hi) != (0, x.shape[0]):
            return Slice(x.rows(lo, hi), 0, a - lo, b - lo)
    if isinstance(x, Quantize) and d == 0:  # whole tiles again: a row of scales covers block[0] rows
        b0, n = x.block[0], x.x.shape[0]
        if x.part == "scale":
            return attrs.evolve(x, x=Slice(x.x, 0, a * b0, min(b * b0, n)))
        lo, hi = a // b0 * b0, min(-(-b // b0) * b0, n)
        if (lo, hi) != (0, n):
            return Slice(attrs.evolve(x, x=Slice(x.x, 0, lo, hi)), 0, a - lo, b - lo)
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
    if isinstance(e, Offset):
        return f"offset({describe(e.x)}, {e.value:+g})"
    if isinstance(e, RowRescale):
        return f"row_rescale({describe(e.x)}, {describe(e.magnitude)})"
    if isinstance(e, Quantize):
        return f"quantize_fp8_{e.part}({describe(e.x)}, block={list(e.block)}, {e.scale_fmt})"
    if isinstance(e, Dequantize):
        return f"dequantize_{e.scheme}({describe(e.q)}, {describe(e.scale)}, block={list(e.block)})"
    if isinstance(e, Fill):
        return f"fill({e.value!r})"
    if isinstance(e, (Repeat, Unrepeat)):
        return f"{type(e).__name__.lower()}({describe(e.x)}, {e.times})"
    return type(e).__name__


@attrs.define
class Overflow:
    """What narrowing casts turned from finite values into infinities: how many elements, and
    the largest |x| among them."""

    count: int = 0
    max_abs: float = 0.0

    def add(self, count: int, max_abs: float) -> None:
        if count:
            self.count += count
            self.max_abs = max(self.max_abs, max_abs)


class Reader:
    """Reads byte ranges from source files.  Opens each file once, read-only, and never maps it,
    so resident memory holds only the tensors being built, not the pages of the sources.
    ``overflow`` adds up the casts' overflows of what it evaluates (the writer resets it per tensor)."""

    def __init__(self) -> None:
        from ckpt_ir.ir.byte_ranges import RangeSet

        self._fds: dict[str, int] = {}
        self.ranges_read = RangeSet()  # every source byte read (by read_into, or copied and noted)
        self._scratch: dict[str, bytearray] = {}
        self._held: tuple[Load, Any] | None = None  # see held()
        self.overflow = Overflow()

    @property
    def bytes_read(self) -> int:
        """Source bytes read, each byte once however often it was read (the page cache serves
        repeats: a tensor replicated in many rank files, a LoRA factor every row block uses)."""
        return self.ranges_read.nbytes

    def scratch(self, nbytes: int, slot: str = "out") -> memoryview:
        """A reusable buffer (one per ``slot``) for the tensor being produced.  Reusing it matters:
        touching fresh pages costs more than copying the data (the kernel zeroes every new page)."""
        buf = self._scratch.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._scratch[slot] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def held(self, load: Load, dtype: Any) -> Any:
        """``load``'s values (a numpy array of ``dtype``), read once for consecutive slices of it
        along a dim other than the rows: a weight stored [in, out] and cut into per-head column
        ranges (GPT-2's c_attn) is then read once per output tensor, not once per head."""
        import numpy as np

        if self._held is None or self._held[0] != load:
            whole = np.frombuffer(self.scratch(load.nbytes, "slice"), dtype=dtype).reshape(load.shape)
            _fill(load, whole, self)
            self._held = (load, whole)
        return self._held[1]

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
                raise FormatError(
                    f"{path}: file ends at byte {start + done}, expected {want - done} more "
                    f"bytes; the file is truncated: re-download or re-save it"
                )
            done += n
        self.ranges_read.add(path, start, want)

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


def reads(expr: Expr) -> Iterator[tuple[str, int, int]]:
    """The (path, offset, length) byte ranges :func:`evaluate_raw` reads to compute ``expr``:
    every load whole (a load sliced along an inner dim too), except rows of zero padding alone."""
    if isinstance(expr, Load):
        if expr.nbytes:
            start, end = expr.byte_range
            yield expr.path, start, end - start
    elif not _zero_padding_only(expr):
        for x in expr.children:
            yield from reads(x)


def _zero_padding_only(expr: Expr) -> bool:
    """Rows of zero vocabulary padding and nothing else: evaluated without reading."""
    return (
        isinstance(expr, Slice)
        and expr.dim == 0
        and isinstance(expr.x, PadRows)
        and expr.x.zero
        and expr.start >= expr.x.x.shape[0]
    )


def evaluate_raw(expr: Expr, reader: Reader, *, scratch: str | None = None):
    """Compute ``expr`` as a contiguous numpy array of raw items (see :func:`raw_dtype`).

    With ``scratch`` (a slot name) the result may live in the reader's reusable buffer of that
    slot: it is valid only until the next evaluation into that slot (the streaming writers consume
    it before asking again)."""
    import numpy as np

    def result():
        if scratch:
            return np.frombuffer(reader.scratch(expr.nbytes, scratch), dtype=raw_dtype(expr.dtype)).reshape(
                expr.shape
            )
        return np.empty(expr.shape, dtype=raw_dtype(expr.dtype))

    if _fillable(expr):
        out = result()
        _fill(expr, out, reader)
        return out
    if isinstance(expr, Concat):
        return np.concatenate([evaluate_raw(x, reader) for x in expr.xs], axis=expr.dim)
    if _zero_padding_only(expr):  # nothing to read
        return np.zeros(expr.shape, dtype=raw_dtype(expr.dtype))
    if isinstance(expr, Fill):  # nothing to read either
        return from_torch_tensor(expr.torch_tensor(), expr.dtype)
    if isinstance(expr, Slice):
        x = evaluate_raw(expr.x, reader)
        index = [slice(None)] * x.ndim
        index[expr.dim] = slice(expr.start, expr.stop)
        return np.ascontiguousarray(x[tuple(index)])
    if isinstance(expr, Reshape):
        return evaluate_raw(expr.x, reader).reshape(expr.new_shape)
    if isinstance(expr, Transpose):
        return np.ascontiguousarray(np.swapaxes(evaluate_raw(expr.x, reader), expr.dim0, expr.dim1))
    if isinstance(expr, Repeat):
        return np.repeat(evaluate_raw(expr.x, reader), expr.times, axis=0)
    if isinstance(expr, Unrepeat):
        x = evaluate_raw(expr.x, reader)
        runs = x.reshape(expr.shape[0], expr.times, -1)
        same = (runs == runs[:, :1]).all(axis=(1, 2))
        if not same.all():
            raise expr.refuse(int(np.argmin(same)))
        return np.ascontiguousarray(runs[:, 0].reshape(expr.shape))
    if isinstance(expr, PadRows):
        x = evaluate_raw(expr.x, reader)
        extra = expr.rows - x.shape[0]
        if not extra:
            return x
        pad = np.zeros((extra,) + x.shape[1:], x.dtype) if expr.zero else np.repeat(x[-1:], extra, axis=0)
        return np.concatenate([x, pad])
    from ckpt_ir.ir import casts

    out = result()
    if (
        isinstance(expr, Cast) and casts.supported(expr.x.dtype, expr.to) and MATH_DEVICE is None
    ):  # numpy casts
        # the input in a reused buffer too: one per slot name without its trailing digit (the
        # writers alternate "block0" and "block1" results but evaluate one block at a time)
        inputs = scratch and scratch.rstrip("0123456789") + "-input"
        reader.overflow.add(
            *casts.cast(evaluate_raw(expr.x, reader, scratch=inputs), expr.x.dtype, expr.to, out)
        )
    elif (merge := numpy_merge(expr)) is not None:
        _merge_by_tiles(*merge, reader, out)
    else:
        _evaluate_math(expr, reader, to_torch_tensor(out, expr.dtype))
    return out


MATH_DEVICE: Any = None  # torch device for casts and LoRA arithmetic (None: the CPU); see set_math_device


def set_math_device(device: Any) -> None:
    """Run the arithmetic nodes (casts, LoRA math) on ``device`` (a torch device from
    :func:`ckpt_ir.device.resolve_device`); results come back to host memory to be written.
    Writer processes forked later inherit the setting."""
    global MATH_DEVICE
    MATH_DEVICE = None if device is None or device.type == "cpu" else device


def needs_torch(expr: Expr) -> bool:
    """Whether evaluating ``expr`` runs torch (LoRA arithmetic without MKL, DoRA, quantization,
    casts numpy cannot do)."""
    from ckpt_ir.ir import casts

    if (merge := numpy_merge(expr)) is not None:
        return any(needs_torch(x) for x in merge[:3])
    if isinstance(expr, (Add, Matmul, Scale, Offset, RowRescale, Dequantize, Quantize, Fill)) or (
        isinstance(expr, Cast) and (MATH_DEVICE is not None or not casts.supported(expr.x.dtype, expr.to))
    ):
        return True
    return any(needs_torch(x) for x in expr.children)


def numpy_merge(expr: Expr) -> tuple[Expr, Expr, Expr, float | None] | None:
    """(W, B, A, factor) when ``expr`` is a LoRA merge ``W + factor * B @ A`` computed without
    torch: fp32 products from torch's own MKL (:mod:`ckpt_ir.ir.sgemm`), scale, add and rounding
    in numpy, the same IEEE operations in the same order, so the same bits; else None."""
    from ckpt_ir.ir import casts, sgemm

    if not isinstance(expr, Add) or MATH_DEVICE is not None or (product := _product(expr.b)) is None:
        return None
    b, a, factor = product
    if (
        all(x.dtype in casts.FLOATS for x in (expr.a, b, a))
        and min(expr.shape) >= 2  # torch computes a 1 x 1 product as a dot product: another sum
        and sgemm.available()
    ):
        return expr.a, b, a, factor
    return None


def start_torch() -> None:
    """Import torch and start its thread pool from this (the main) thread.  Started first from a
    helper thread, OpenMP made the LoRA merge 30 times slower on two busy cores (measured: 24 s
    instead of 0.8 s for 180 MB); call this before computing on a helper thread."""
    import torch

    torch.ones(1 << 16).add_(1)  # large enough for a parallel region


def _evaluate_math(expr: Expr, reader: Reader, out) -> None:
    """Nodes whose bits change, computed into the torch tensor ``out``: casts and LoRA arithmetic
    (fp32 throughout, rounded once when stored into ``out``).  In-place steps keep the temporaries
    to one fp32 copy of the result: evaluation is by row blocks of bounded size, but a block's
    temporaries count too."""
    import torch

    if MATH_DEVICE is not None:
        out.copy_(_evaluate_on_device(expr, reader).cpu())
        return
    if isinstance(expr, Cast):
        x = evaluate(expr.x, reader)
        out.copy_(x)
        _note_overflow(expr, x, out, reader)
    elif isinstance(expr, Add) and (product := _product(expr.b)) is not None:
        _merge_by_tiles_torch(expr.a, *product, reader, out)
    elif isinstance(expr, Add):
        acc = _fp32_scratch(expr.b, reader, "acc")
        acc.add_(_fp32_scratch(expr.a, reader, "addend"))  # a + b: IEEE addition commutes bit for bit
        out.copy_(acc)
    elif isinstance(expr, Matmul):
        torch.mm(_fp32(expr.a, reader), _fp32(expr.b, reader), out=out)
    elif isinstance(expr, Scale):
        torch.mul(_fp32(expr.x, reader), expr.factor, out=out)
    elif isinstance(expr, Offset):
        out.copy_(_fp32(expr.x, reader).add_(expr.value))
    elif isinstance(expr, RowRescale):  # peft's DoRA merge order: norm of the rows, m / norm, times the rows
        x = _fp32(expr.x, reader)
        torch.mul((_fp32(expr.magnitude, reader) / torch.linalg.norm(x, dim=1)).view(-1, 1), x, out=out)
    elif isinstance(expr, Dequantize):
        _dequantize(expr, evaluate(expr.q, reader), evaluate(expr.scale, reader), out)
    elif isinstance(expr, Quantize) and expr.part == "scale":  # a few scale rows per step: bounded memory
        b0, n = expr.block[0], expr.x.shape[0]
        step = max(1, QUANTIZE_ELEMENTS // max(1, b0 * expr.x.shape[1]))
        for r in range(0, expr.shape[0], step):
            rows = attrs.evolve(expr, x=simplify(Slice(expr.x, 0, r * b0, min((r + step) * b0, n))))
            _quantize(rows, _fp32(rows.x, reader), out[r : r + step])
    elif isinstance(expr, Quantize):
        _quantize(expr, _fp32(expr.x, reader), out)
    else:
        raise TypeError(f"cannot evaluate {type(expr).__name__}")


def _note_overflow(cast: Cast, x, y, reader: Reader | Overflow) -> None:
    """Record in ``reader`` (or an :class:`Overflow` tally) the elements the cast ``x`` -> ``y``
    (torch tensors) turned from finite into infinite; numpy's casts count their own."""
    import torch

    from ckpt_ir.ir.dtypes import narrows

    if narrows(cast.x.dtype, cast.to):
        overflow = torch.isfinite(x) & ~torch.isfinite(y)
        count = int(overflow.sum())
        tally = reader.overflow if isinstance(reader, Reader) else reader
        tally.add(count, float(x[overflow].abs().max()) if count else 0.0)


# the nodes whose bits change: evaluated by arithmetic, not by moving bytes
MATH_NODES = (Cast, Add, Matmul, Scale, Offset, RowRescale, Dequantize, Quantize)


def _evaluate_on_device(expr: Expr, reader: Reader):
    """``expr``'s arithmetic on :data:`MATH_DEVICE` (``--device``): the same fp32 operations, one
    block at a time; the operands travel to the device and the result comes back."""

    def operand(x: Expr):
        if isinstance(x, MATH_NODES):
            return _evaluate_on_device(x, reader)
        return evaluate(x, reader).to(MATH_DEVICE)

    return _torch_math(expr, operand, reader, MATH_DEVICE)


def _torch_math(expr: Expr, operand, overflow: Reader | Overflow, device):
    """The arithmetic node ``expr`` computed by torch on ``device`` from its operands'
    tensors (``operand(child)``, on that device): fp32 throughout, rounded once."""
    import torch

    from ckpt_ir.ir.dtypes import to_torch

    if isinstance(expr, Cast):
        x = operand(expr.x)
        y = x.to(to_torch(expr.to))
        _note_overflow(expr, x, y, overflow)
        return y
    if isinstance(expr, Add):
        a = operand(expr.a)
        return (a.to(torch.float32) + operand(expr.b).to(torch.float32)).to(a.dtype)
    if isinstance(expr, Matmul):
        return operand(expr.a).to(torch.float32) @ operand(expr.b).to(torch.float32)
    if isinstance(expr, Scale):
        return operand(expr.x).to(torch.float32) * expr.factor
    if isinstance(expr, Offset):
        x = operand(expr.x)
        return (x.to(torch.float32) + expr.value).to(x.dtype)
    if isinstance(expr, RowRescale):  # peft's DoRA merge order: norm of the rows, m / norm, times the rows
        x = operand(expr.x).to(torch.float32)
        factor = operand(expr.magnitude).to(torch.float32) / torch.linalg.norm(x, dim=1)
        return factor.view(-1, 1) * x
    if isinstance(expr, Dequantize):
        out = torch.empty(expr.shape, dtype=torch.float32, device=device)
        _dequantize(expr, operand(expr.q), operand(expr.scale), out)
        return out
    if isinstance(expr, Quantize):
        out = torch.empty(expr.shape, dtype=to_torch(expr.dtype), device=device)
        _quantize(expr, operand(expr.x).to(torch.float32), out)
        return out
    raise TypeError(f"cannot evaluate {type(expr).__name__}")


def evaluate_tensor(expr: Expr, leaf, overflow: Overflow | None = None):
    """``expr`` computed by torch where its leaves are (a GPU, or the CPU), for expressions over
    tensors in memory rather than files: ``leaf(load)`` gives the tensor of a :class:`Load`
    (its ``full_shape``; ``rows`` is applied here).  A view of one leaf (its rows, a slice, a
    transpose) is returned as that view; other data movement is written piece by piece into one
    new tensor of the leaves' dtype (no temporaries besides it, as :func:`evaluate_raw` fills its
    output); arithmetic is :data:`MATH_DEVICE`'s (fp32, rounded once) on the leaves' device,
    casts' overflows counted in ``overflow``."""
    import torch

    from ckpt_ir.ir.dtypes import to_torch

    if not any(isinstance(x, Load) for x in walk(expr)):  # a Fill, or data movement of one
        return evaluate(expr, Reader())
    if isinstance(expr, MATH_NODES):
        first = leaf(next(x for x in walk(expr) if isinstance(x, Load)))
        return _torch_math(
            expr, lambda x: evaluate_tensor(x, leaf, overflow), overflow or Overflow(), first.device
        )
    view = _leaf_view(expr, leaf)
    if view is not None:
        return view
    first = leaf(next(x for x in walk(expr) if isinstance(x, Load)))
    math = any(isinstance(x, MATH_NODES) for x in walk(expr))
    out = torch.empty(expr.shape, dtype=to_torch(expr.dtype) if math else first.dtype, device=first.device)
    _fill_tensor(expr, out, leaf, overflow)
    return out


def _leaf_view(expr: Expr, leaf):
    """``expr`` as a view of its one leaf's tensor, or None when it is no such view."""
    if isinstance(expr, Load):
        t = leaf(expr)
        return t if expr.rows is None else t[expr.rows[0] : expr.rows[1]]
    if not isinstance(expr, (Slice, Transpose, Reshape)):
        return None
    x = _leaf_view(expr.x, leaf)
    if x is None:
        return None
    if isinstance(expr, Slice):
        return x.narrow(expr.dim, expr.start, expr.stop - expr.start)
    if isinstance(expr, Transpose):
        return x.transpose(expr.dim0, expr.dim1)
    try:
        return x.view(expr.new_shape)
    except RuntimeError:  # strides no view can express: a copy
        return None


def _fill_tensor(expr: Expr, out, leaf, overflow: Overflow | None) -> None:
    """Write ``expr`` into the tensor ``out`` (its shape; a view of a larger tensor)."""
    view = _leaf_view(expr, leaf)
    if view is not None:
        out.copy_(view)
    elif isinstance(expr, Concat):
        pos = 0
        for x in expr.xs:
            n = x.shape[expr.dim]
            _fill_tensor(x, out.narrow(expr.dim, pos, n), leaf, overflow)
            pos += n
    elif isinstance(expr, Transpose):
        _fill_tensor(expr.x, out.transpose(expr.dim0, expr.dim1), leaf, overflow)
    elif isinstance(expr, Reshape) and out.is_contiguous():
        _fill_tensor(expr.x, out.view(expr.x.shape), leaf, overflow)
    elif isinstance(expr, PadRows):
        n = expr.x.shape[0]
        _fill_tensor(expr.x, out[:n], leaf, overflow)
        if expr.zero:
            out[n:].zero_()
        else:
            out[n:].copy_(out[n - 1 : n].expand(expr.rows - n, *out.shape[1:]))
    elif isinstance(expr, Repeat):
        x = evaluate_tensor(expr.x, leaf, overflow)
        out.copy_(x.repeat_interleave(expr.times, dim=0))
    elif isinstance(expr, Unrepeat):
        import torch

        runs = evaluate_tensor(expr.x, leaf, overflow).contiguous().reshape(expr.shape[0], expr.times, -1)
        bits = runs.view(torch.uint8)  # bit for bit, as the file path compares raw items
        same = (bits == bits[:, :1]).flatten(1).all(dim=1)
        if not bool(same.all()):
            raise expr.refuse(int(same.int().argmin()))
        out.copy_(runs[:, 0].reshape(expr.shape))
    else:  # arithmetic, or a reshape into strided memory: computed, then copied
        out.copy_(evaluate_tensor(expr, leaf, overflow))


# the 16 values of an e2m1 nibble (MXFP4), by bit pattern
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _scales_fp32(scale):
    """Per-block scales as fp32: fp32 as stored, ue8m0 (float8_e8m0fnu) exactly, raw e8m0 bytes
    as ``2 ** (byte - 127)`` (transformers' reading of uint8 scales)."""
    import torch

    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127.0)
    return scale.to(torch.float32)


QUANTIZE_ELEMENTS = 1 << 22  # weight elements quantized per step when computing only the scales


def _quantize(expr: Quantize, x, out) -> None:
    """transformers' Fp8Quantize on the fp32 weight ``x``, step for step (so the bytes agree), on
    the weight zero-padded to whole tiles (padding changes no tile's absmax), cropped back."""
    import torch

    rows, cols = x.shape
    b0, b1 = expr.block
    pr, pc = -rows % b0, -cols % b1
    tiles = torch.nn.functional.pad(x, (0, pc, 0, pr)).reshape((rows + pr) // b0, b0, (cols + pc) // b1, b1)
    f8 = torch.finfo(torch.float8_e4m3fn)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    ones = torch.ones_like(max_abs)
    scales = torch.where(max_abs > 0, f8.max / torch.where(max_abs > 0, max_abs, ones), ones)
    inv = (1.0 / scales).to(torch.float32)
    if expr.scale_fmt == "ue8m0":  # a power of two; the forward scale is its exact reciprocal
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        inv = inv.to(torch.float8_e8m0fnu)
        scales = 1.0 / inv.to(torch.float32)
    if expr.part == "scale":
        out.copy_(inv)
        return
    q = torch.clamp(tiles * scales.unsqueeze(-1).unsqueeze(-3), min=f8.min, max=f8.max).to(
        torch.float8_e4m3fn
    )
    out.copy_(q.reshape(rows + pr, cols + pc)[:rows, :cols])


def _dequantize(expr: Dequantize, q, scale, out) -> None:
    """``out`` (fp32, ``expr``'s shape) = the quantized values times their block's scale, the
    product rounded once in fp32 (transformers' Fp8Dequantize and MXFP4 conversion)."""
    import torch

    s = _scales_fp32(scale)
    if expr.scheme == "int4":  # Megatron-Bridge's dequantize_int4: (nibble - 8) * scale in fp32
        rows, cols = expr.shape
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
        words = out.view(rows, cols // 8, 8)
        words.copy_((q.view(torch.int32).unsqueeze(-1) >> shifts) & 0xF)
        words.sub_(8.0)
        out.view(rows, s.shape[1], -1).mul_(s.unsqueeze(-1))
        return
    if expr.scheme == "mxfp4":
        lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=q.device)
        u8 = q.view(torch.uint8)
        pairs = out.view(*u8.shape, 2)
        pairs[..., 0] = lut[(u8 & 0x0F).long()]
        pairs[..., 1] = lut[(u8 >> 4).long()]
        out.view(*u8.shape[:-1], 32).mul_(s.unsqueeze(-1))
        return
    rows, cols = expr.shape[-2:]
    b0, b1 = expr.block
    # scales repeated over rows only, broadcast over each tile's columns through a view of ``out``:
    # no temporary of the weight's size besides ``out`` itself
    s = s.repeat_interleave(b0, dim=-2)[..., :rows, :]
    out.copy_(q)
    full = cols // b1
    out[..., : full * b1].unflatten(-1, (full, b1)).mul_(s[..., :full, None])
    if cols % b1:
        out[..., full * b1 :].mul_(s[..., full:])


# rows of a matmul computed by one BLAS call: the whole product's rows come out bit for bit the
# same when the calls start at multiples of this and the last one takes the remainder (a lone
# call on 1-3 rows takes another kernel; measured with MKL, tests/test_blockwise.py checks it)
MATMUL_ROWS = 64


def matmul_tiles(rows: int, step: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of ``step`` rows (a multiple of MATMUL_ROWS), the last one taking the
    remainder (``step`` to ``2 * step - 1`` rows)."""
    starts = list(range(0, rows - step + 1, step)) or [0]
    return list(zip(starts, starts[1:] + [rows]))


def _product(e: Expr) -> tuple[Expr, Expr, float | None] | None:
    """(B, A, factor) when ``e`` is ``B @ A`` or ``(B @ A) * factor``, else None."""
    factor: float | None = None
    if isinstance(e, Scale):
        factor = e.factor
        e = e.x
    return (e.a, e.b, factor) if isinstance(e, Matmul) else None


def _merge_by_tiles(w: Expr, b: Expr, a: Expr, factor: float | None, reader: Reader, out) -> None:
    """``out = W + factor * (B @ A)`` (a LoRA merge; ``out`` holds raw items of W's dtype) a tile
    of MATMUL_ROWS rows at a time, in numpy and MKL: the tile's fp32 temporaries stay in the CPU's
    cache.  The operations and their order are :func:`_merge_by_tiles_torch`'s (torch's scalar
    product rounds the factor to fp32 first, as here)."""
    import numpy as np

    from ckpt_ir.ir import casts, sgemm

    rows, cols = w.shape[0], math.prod(w.shape[1:])
    weight = evaluate_raw(w, reader, scratch="addend-raw").reshape(-1)
    # the factors in fp32 (a numpy cast, or the loaded bytes when they are fp32 already)
    bf, af = (
        evaluate_raw(simplify(Cast(x, "F32")), reader, scratch=slot).view(np.float32)
        for x, slot in ((b, "lora-b"), (a, "lora-a"))
    )
    tile = 2 * MATMUL_ROWS * cols
    acc_buf, w32_buf = (
        np.frombuffer(reader.scratch(tile * 4, slot), np.float32) for slot in ("acc", "addend")
    )
    bits_buf = np.frombuffer(reader.scratch(tile * 4, "rounding"), np.uint32)
    result = out.reshape(-1)
    scale = None if factor is None else np.float32(factor)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are values here, as in torch
        for lo, hi in matmul_tiles(rows, MATMUL_ROWS):
            n, at = (hi - lo) * cols, slice(lo * cols, hi * cols)
            acc = acc_buf[:n]
            sgemm.matmul(bf[lo:hi], af, acc.reshape(hi - lo, cols))
            if scale is not None:
                np.multiply(acc, scale, out=acc)
            # W + delta with W first: where both are NaN the first operand's NaN comes out, as the
            # weight's does in torch's add (the sum itself commutes bit for bit)
            if w.dtype == "F32":
                np.add(weight[at].view(np.float32), acc, out=result[at].view(np.float32))
            else:
                casts.to_f32(weight[at], w.dtype, w32_buf[:n])
                np.add(w32_buf[:n], acc, out=acc)
                casts.from_f32(acc.view(np.uint32), w.dtype, result[at], scratch=bits_buf[:n])


def _merge_by_tiles_torch(w: Expr, b: Expr, a: Expr, factor: float | None, reader: Reader, out) -> None:
    """:func:`_merge_by_tiles` in torch (where MKL's ``sgemm_`` is not at hand, or on --device).
    Same operations, in the same order, as whole tensors."""
    import numpy as np
    import torch

    weight = to_torch_tensor(evaluate_raw(w, reader, scratch="addend-raw"), w.dtype)
    bf, af = _fp32(b, reader), _fp32(a, reader)
    cols = math.prod(w.shape[1:])
    tile = 2 * MATMUL_ROWS * cols
    acc_buf, w32_buf = (
        to_torch_tensor(np.frombuffer(reader.scratch(tile * 4, slot), dtype=np.int32), "F32")
        for slot in ("acc", "addend")
    )
    for lo, hi in matmul_tiles(w.shape[0], MATMUL_ROWS):
        acc, w32 = (
            acc_buf[: (hi - lo) * cols].view(hi - lo, -1),
            w32_buf[: (hi - lo) * cols].view(hi - lo, -1),
        )
        torch.mm(bf[lo:hi], af, out=acc)
        if factor is not None:
            acc.mul_(factor)
        acc.add_(w32.copy_(weight[lo:hi].reshape(hi - lo, -1)))  # a + b: IEEE addition commutes bit for bit
        out[lo:hi].view(hi - lo, -1).copy_(acc)


def _fp32_scratch(expr: Expr, reader: Reader, slot: str):
    """``expr`` as fp32 in the reader's buffer ``slot`` (fresh pages cost more than the math:
    the LoRA merge reuses its buffers block after block)."""
    import numpy as np
    import torch

    if isinstance(expr, Scale):
        return _fp32_scratch(expr.x, reader, slot).mul_(expr.factor)
    buf = to_torch_tensor(np.frombuffer(reader.scratch(expr.numel * 4, slot), dtype=np.int32), "F32")
    buf = buf.view(expr.shape)
    if isinstance(expr, Matmul):
        return torch.mm(_fp32(expr.a, reader), _fp32(expr.b, reader), out=buf)
    return buf.copy_(to_torch_tensor(evaluate_raw(expr, reader, scratch=slot + "-raw"), expr.dtype))


def _fp32(expr: Expr, reader: Reader):
    """``expr`` evaluated as an fp32 tensor this caller owns (it may update it in place)."""
    import torch

    return evaluate(expr, reader).to(torch.float32)


def _fillable(expr: Expr) -> bool:
    """Loads, concats, slices of loads and swaps of those are read straight into (views of) the
    output buffer."""
    if isinstance(expr, Transpose):
        return isinstance(expr.x, Load) or isinstance(expr.x, Slice) and isinstance(expr.x.x, Load)
    return isinstance(expr, (Load, Concat)) or isinstance(expr, Slice) and isinstance(expr.x, Load)


def _held_slice(expr: Slice, dtype: Any, reader: Reader) -> Any:
    """A view of a slice of a load, whose values the reader holds (see :meth:`Reader.held`)."""
    assert isinstance(expr.x, Load)
    whole = reader.held(expr.x, dtype)
    index = [slice(None)] * whole.ndim
    index[expr.dim] = slice(expr.start, expr.stop)
    return whole[tuple(index)]


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
        out[...] = _held_slice(expr, out.dtype, reader)
        return
    if isinstance(expr, Transpose) and _fillable(expr):
        # a weight stored [in, out] (GPT-2): swapped while copied into the destination
        src = expr.x
        held = (
            reader.held(src, out.dtype)
            if isinstance(src, Load)
            else _held_slice(cast(Slice, src), out.dtype, reader)
        )
        out[...] = held.swapaxes(expr.dim0, expr.dim1)
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
