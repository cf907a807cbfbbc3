"""pad-vocab / unpad-vocab: Megatron's padded vocabulary (extra rows repeat the last row)."""

from __future__ import annotations

import math

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import VOCAB_ROLES, role_of
from ckpt_ir.passes.manager import UNPADDED, WHOLE, Pass, at_least, option, register_pass


def padded_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return math.ceil(vocab / multiple) * multiple


@register_pass
@attrs.frozen
class PadVocab(Pass):
    name = "pad-vocab"
    summary = "Pad embedding and output-layer rows (copies of the last row) to a padded vocab size"
    requires = (WHOLE, UNPADDED)
    guarantees = "embed/lm_head have layout.padded_vocab rows; spec.vocab_size is the true size"
    optimizer_state = "follow"  # see run_state: padding rows get zero moments

    size: int | None = option(None, help="padded row count", allowed=at_least(1))
    divisible_by: int | None = option(
        None, help="pad to a multiple of divisible-by x tp (Megatron's rule)", allowed=at_least(1)
    )
    tp: int = option(1, help="tensor parallel size used with divisible-by", allowed=at_least(1))

    def __attrs_post_init__(self) -> None:
        if self.size is None and self.divisible_by is None:
            raise UsageError("pass pad-vocab: give option size= or divisible-by=")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return self._pad(ckpt, self._size(ckpt), zero=False)

    def _size(self, ckpt: Checkpoint) -> int:
        size = self.size
        if size is None:
            assert self.divisible_by is not None  # one of them is given (__attrs_post_init__)
            size = padded_size(ckpt.spec.vocab_size, self.divisible_by, self.tp)
        if size < ckpt.spec.vocab_size:
            raise UsageError(f"pad-vocab: size {size} is smaller than the vocabulary {ckpt.spec.vocab_size}")
        return size

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        # master weights pad like the weights; padding rows have no optimizer history: zero moments
        return self._pad(ckpt, self._size(ckpt), zero=state != "param")

    def _pad(self, ckpt: Checkpoint, size: int, zero: bool) -> Checkpoint:
        out = {
            n: (t.map(lambda e: E.simplify(E.PadRows(e, size, zero))) if role_of(n) in VOCAB_ROLES else t)
            for n, t in ckpt.tensors.items()
        }
        padded = size if size != ckpt.spec.vocab_size else None
        return ckpt.with_tensors(out, layout=attrs.evolve(ckpt.layout, padded_vocab=padded))


@register_pass
class UnpadVocab(Pass):
    name = "unpad-vocab"
    summary = "Trim embedding and output-layer rows back to the true vocab size"
    requires = (WHOLE,)
    guarantees = "embed/lm_head have spec.vocab_size rows"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        v = ckpt.spec.vocab_size
        out = {
            n: (t.map(lambda e: E.simplify(E.Slice(e, 0, 0, v))) if role_of(n) in VOCAB_ROLES else t)
            for n, t in ckpt.tensors.items()
        }
        return ckpt.with_tensors(out, layout=attrs.evolve(ckpt.layout, padded_vocab=None))
