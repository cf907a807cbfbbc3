"""Output plans: every file a backend will write, described before any byte is read."""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.ir import expr as E

NOTES_FILE = "ckpt-ir-notes.txt"  # written beside the output when the user chose something on purpose


@attrs.frozen
class OutputFile:
    """One file of the output.

    ``kind`` is ``safetensors`` (``tensors`` in order), ``torch`` (``obj`` with
    :class:`~ckpt_ir.io.torchzip.Tensor` placeholders whose keys index ``tensors``), ``text``, or
    ``copy`` (of ``source``).
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
        import os

        return os.path.getsize(self.source)

    @property
    def largest(self) -> int:
        return max((e.nbytes for _, e in self.tensors), default=0)


@attrs.frozen
class Plan:
    """``checks``: (name, other name, expr, other expr) pairs that must hold equal values for the
    output to be lossless (e.g. a tensor stored once because the format shares it); the executor
    verifies them before writing anything."""

    files: tuple[OutputFile, ...]
    dropped: dict[str, str] = attrs.field(factory=dict)
    checks: tuple[tuple[str, str, E.Expr, E.Expr], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def bytes_to_read(self) -> int:
        return sum(E.bytes_read(e) for f in self.files for _, e in f.tensors)

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes one writer holds: the tensor being built, plus the staging buffer
        for its largest input, plus the temporaries of any arithmetic (casts, LoRA math)."""
        peak = 0
        for f in self.files:
            for _, e in f.tensors:
                peak = max(peak, tensor_memory(e))
        return peak

    def largest_tensor(self) -> tuple[str, int]:
        return max(((name, tensor_memory(e)) for f in self.files for name, e in f.tensors),
                   key=lambda x: x[1], default=("", 0))


def tensor_memory(e: E.Expr) -> int:
    if isinstance(e, E.Concat) and e.dim == 0:  # written part by part (see TensorWriter)
        return max(tensor_memory(x) for x in e.xs)
    inputs = [n for n in E.walk(e) if n is not e]
    staging = max((n.nbytes for n in inputs if isinstance(n, E.Load)), default=0)
    temporaries = sum(n.nbytes for n in inputs if not isinstance(n, (E.Load, E.Concat, E.Slice)))
    return e.nbytes + staging + temporaries
