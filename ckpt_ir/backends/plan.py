"""Output plans: every file a backend will write, described before any byte is read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from ckpt_ir.ir import expr as E


@attrs.frozen
class OutputFile:
    """One file of the output.

    ``kind`` is ``safetensors`` (``tensors`` in order), ``torch`` (``obj`` with
    :class:`~ckpt_ir.io.torchzip.Tensor` placeholders whose keys index ``tensors``), ``text``,
    ``copy`` (of ``source``), ``dcp-metadata`` (torch_dist's ``.metadata``, from the data files
    written before it) or ``integrity`` (Megatron's ``integrity.json`` of the files written before
    it in its directory).
    """

    path: str
    kind: str
    tensors: tuple[tuple[str, E.Expr], ...] = ()
    obj: Any = None
    text: str = ""
    source: str = ""
    metadata: dict[str, str] | None = None
    part: tuple[int, int] | None = None  # safetensors only: write just tensors [lo, hi) of a pre-created file

    @property
    def nbytes(self) -> int:
        if self.kind in ("safetensors", "torch"):
            lo, hi = self.part or (0, len(self.tensors))
            return sum(e.nbytes for _, e in self.tensors[lo:hi])
        if self.kind == "text":
            return len(self.text.encode())
        if self.kind in ("dcp-metadata", "integrity"):
            return 0  # a few hundred bytes per entry, known once the files they describe are written
        import os

        return os.path.getsize(self.source)

    @property
    def largest(self) -> int:
        return max((e.nbytes for _, e in self.tensors), default=0)

    def __repr__(self) -> str:
        part = f" part {self.part[0]}:{self.part[1]}" if self.part else ""
        return (
            f"<OutputFile {self.path} ({self.kind}{part}): {len(self.tensors)} tensors, {self.nbytes} bytes>"
        )


@attrs.frozen
class Plan:
    """Every file of an output, planned from metadata before any byte is read (``--dry-run``
    prints it): ``files`` (:class:`OutputFile`, each tensor with the expression of its bytes),
    ``dropped`` (source tensors not carried, name -> reason), ``checks``: (name, other name,
    expr, other expr) pairs that must hold equal values for the output to be lossless (e.g. a
    tensor stored once because the format shares it); the executor verifies them before writing
    anything."""

    files: tuple[OutputFile, ...]
    dropped: dict[str, str] = attrs.field(factory=dict)
    checks: tuple[tuple[str, str, E.Expr, E.Expr], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def __repr__(self) -> str:
        return (
            f"<Plan {len(self.files)} files, {self.nbytes} bytes to write"
            + (f", {len(self.dropped)} dropped" if self.dropped else "")
            + (f", {len(self.checks)} checks" if self.checks else "")
            + ">"
        )

    def peak_memory(self, block_bytes: int | None = None) -> int:
        """Estimated peak bytes of tensor data one writer holds (see :func:`tensor_memory`)."""
        return self.largest_tensor(block_bytes)[1]

    def largest_tensor(self, block_bytes: int | None = None) -> tuple[str, int]:
        """The tensor that needs the most memory to write, and that memory."""
        block = block_bytes or BLOCK_BYTES
        known: dict[tuple, int] = {}  # tensors of one form (every layer's, every rank's) cost the same

        def memory(e: E.Expr) -> int:
            key = form(e)
            if key not in known:
                known[key] = tensor_memory(e, block)
            return known[key]

        return max(
            ((name, memory(e)) for f in self.files for name, e in f.tensors),
            key=lambda x: x[1],
            default=("", 0),
        )


def form(e: E.Expr, base: dict[str, tuple[int, int]] | None = None) -> tuple:
    """``e`` with its files and tensor names abstracted away: file paths numbered in order of
    appearance, offsets relative to the first load's in the same file.  Whatever
    :func:`tensor_memory` computes (shapes, dtypes, which byte ranges are adjacent in one file)
    is a function of this form: a LoRA merge of every layer's q_proj has one form, although its
    weight and its factors lie at other distances from each other in each layer.  ``base``, when
    given, receives each file's number and first offset (path -> (number, offset))."""
    base = {} if base is None else base

    def walk(n: E.Expr) -> tuple:
        if isinstance(n, E.Load):
            at, first = base.setdefault(n.path, (len(base), n.offset))
            return ("load", at, n.offset - first, n.full_shape, n.load_dtype, n.rows)
        out: list = [type(n).__name__]
        for field in attrs.fields(type(n)):
            v = getattr(n, field.name)
            if isinstance(v, E.Expr):
                out.append(walk(v))
            elif isinstance(v, tuple) and v and isinstance(v[0], E.Expr):
                out.append(tuple(walk(x) for x in v))
            else:
                out.append(v)
        return tuple(out)

    return walk(e)


# Computed tensors are evaluated and written in row blocks that each need about this much memory
# (their result, inputs and temporaries): large enough that per-block costs vanish, small enough
# that memory does not depend on any tensor's size.  --max-memory lowers it, down to MIN_BLOCK_BYTES.
BLOCK_BYTES = 32 << 20
MIN_BLOCK_BYTES = 1 << 20


def source_reads(e: E.Expr, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, int, int]]:
    """The (path, offset, length) source byte ranges a writer reads to write ``e``, as
    :class:`~ckpt_ir.backends.execute.TensorWriter` writes it: the ranges it copies in the kernel,
    part by part for a row-wise concatenation, else what evaluating each row block reads."""
    from ckpt_ir.io.ranges import byte_ranges

    ranges = byte_ranges(e)
    if ranges is not None:
        yield from ranges
    elif isinstance(e, E.Concat) and e.dim == 0:
        for x in e.xs:
            yield from source_reads(x, block_bytes)
    else:
        blocks = row_blocks(e, block_bytes)
        for block in blocks:
            copied = byte_ranges(block) if len(blocks) > 1 else None
            yield from E.reads(block) if copied is None else copied


class SourceReads:
    """:func:`source_reads` of many tensors, worked out once per :func:`form` (every rank file's
    copy of a norm, every expert's slice) and moved to each tensor's own files and offsets."""

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.known: dict[tuple, tuple[list[tuple[str, int, int]], dict[str, tuple[int, int]]]] = {}

    def __call__(self, e: E.Expr) -> list[tuple[str, int, int]]:
        if isinstance(e, E.Load):  # most tensors: their stored bytes, copied or read whole
            return list(E.reads(e))
        base: dict[str, tuple[int, int]] = {}
        key = form(e, base)
        if key not in self.known:
            self.known[key] = (list(source_reads(e, self.block_bytes)), base)
            return self.known[key][0]
        ranges, first = self.known[key]
        here = {number: (path, offset) for path, (number, offset) in base.items()}
        out = []
        for path, offset, length in ranges:
            number, start = first[path]
            own, own_start = here[number]
            out.append((own, offset - start + own_start, length))
        return out


def tensor_memory(e: E.Expr, block_bytes: int = BLOCK_BYTES) -> int:
    """Peak bytes a writer holds to write ``e``: nothing for byte ranges copied in the kernel, the
    largest part of a row-wise concatenation, else the largest row block's working memory plus the
    previous block's result (written while the next one is computed)."""
    from ckpt_ir.io.ranges import byte_ranges

    if byte_ranges(e) is not None:
        return 0
    if isinstance(e, E.Concat) and e.dim == 0:  # written part by part (see TensorWriter)
        return max(tensor_memory(x, block_bytes) for x in e.xs)
    parts = row_blocks(e, block_bytes)
    if len(parts) == 1:
        return working_memory(e)
    evaluated = [working_memory(p) for p in parts if byte_ranges(p) is None]  # the others: kernel copies
    return max(evaluated, default=0) + max(p.nbytes for p in parts)


def working_memory(e: E.Expr) -> int:
    """An upper bound on the bytes evaluating ``e`` whole holds: its result, every intermediate
    node's value, and the fp32 copies the arithmetic makes of narrower operands."""
    total = e.nbytes
    for n in E.walk(e):
        if n is not e and not isinstance(n, E.Reshape):  # a reshape is a view
            total += n.nbytes
        if isinstance(n, (E.Add, E.Matmul, E.Scale, E.Offset)):
            total += sum(k.numel * 4 for k in n.children if k.dtype != "F32")
        if isinstance(n, E.Quantize):  # fp32 temporaries: the weight, padded, its |x|, its scaled values
            total += n.x.numel * 4 * 4
        if isinstance(n, E.Cast):  # rounding's integer temporaries (ir/casts.py, a chunk at a time)
            total += min(n.numel, 1 << 18) * 8
    return total


def row_blocks(e: E.Expr, block_bytes: int) -> tuple[E.Expr, ...]:
    """``e`` as consecutive row ranges (simplified slices of dim 0) that each need about
    ``block_bytes`` to evaluate, or ``(e,)`` when it is small or row ranges do not help.

    Any expression whose row ranges simplify into the same computation on row ranges of its
    inputs streams this way: loads, casts, padding, concatenations, the LoRA arithmetic, and a
    new computing node once ``expr._rewrite_slice`` knows how a row range of it is computed.
    Where the slice cannot be pushed down (a transpose of the rows, say) each block would need
    the whole input: the tensor is then evaluated whole, and the plan's memory says so."""
    ranges = row_ranges(e, block_bytes)
    if len(ranges) < 2:
        return (e,)
    need = working_memory(e)
    whole = E.simplify(e)  # once, not once per block
    parts = tuple(E.simplify_node(E.Slice(whole, 0, lo, hi)) for lo, hi in ranges)
    rereads = sum(E.bytes_read(p) for p in parts) - E.bytes_read(e)
    if max(working_memory(p) for p in parts) >= need or rereads > E.bytes_read(e) + len(parts) * (1 << 20):
        return (e,)
    return parts


def row_ranges(e: E.Expr, block_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) row ranges of ``e`` whose evaluation needs about ``block_bytes`` each
    (one range for a small tensor or a scalar).

    With a matmul inside, ranges follow ``expr.matmul_tiles``: BLAS then computes each block's
    rows with the same kernels, hence the same sums, as in the whole product."""
    rows = e.shape[0] if e.shape else 0
    need = working_memory(e)
    if need <= block_bytes or rows < 2:
        return [(0, rows)]
    step = max(1, block_bytes * rows // need)
    if any(isinstance(n, E.Matmul) for n in E.walk(e)):
        return E.matmul_tiles(rows, max(E.MATMUL_ROWS, step - step % E.MATMUL_ROWS))
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
