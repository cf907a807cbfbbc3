"""pad-vocab / unpad-vocab: Megatron's padded vocabulary.  The rows beyond the vocabulary are part
of a Megatron checkpoint (trained like any row): they are kept whenever the padded size allows,
and new ones copy the vocabulary's last row, as Megatron-LM's checkpoint tools pad."""

from __future__ import annotations

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.layout import padded_size
from ckpt_ir.ir.names import VOCAB_ROLES, role_of
from ckpt_ir.passes.manager import WHOLE, Pass, at_least, option, register_pass


def padding_rows(ckpt: Checkpoint) -> int:
    """The embedding / output-layer rows of ``ckpt`` (its padded size, else the vocabulary)."""
    return ckpt.layout.padded_vocab or ckpt.spec.vocab_size


@register_pass
@attrs.frozen
class PadVocab(Pass):
    name = "pad-vocab"
    summary = "Give the embedding and output layer a padded vocab size of rows (Megatron's padding)"
    description = (
        "Padding rows the checkpoint has are kept up to the new size (a smaller size drops only "
        "padding rows, recorded as dropped); new rows copy the vocabulary's last row (row "
        "vocab_size - 1) in weights and master weights, and are zero in Adam moments."
    )
    requires = (WHOLE,)
    guarantees = "embed/lm_head have layout.padded_vocab rows; spec.vocab_size is the true size"
    optimizer_state = "follow"  # see run_state: new padding rows get zero moments

    size: int | None = option(None, help="padded row count", allowed=at_least(1))
    divisible_by: int | None = option(
        None, help="pad to a multiple of divisible-by x tp (Megatron's rule)", allowed=at_least(1)
    )
    tp: int = option(1, help="tensor parallel size used with divisible-by", allowed=at_least(1))

    def __attrs_post_init__(self) -> None:
        if self.size is None and self.divisible_by is None:
            raise UsageError("pass pad-vocab: give option size= or divisible-by=")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        size, rows = self._size(ckpt), padding_rows(ckpt)
        out = self._pad(ckpt, size, zero=False)
        names = [n for n in ckpt.tensors if role_of(n) in VOCAB_ROLES]
        dropped, meta = dict(ckpt.dropped), ckpt.meta
        if size < rows:
            why = f"vocabulary padding rows beyond the padded size {size}"
            dropped.update({f"{n}[{size}:{rows}]": why for n in names})
        elif size > rows > ckpt.spec.vocab_size:  # trained padding rows kept, new ones beside them
            note = (
                f"vocabulary padding grown from {rows} to {size} rows: rows {rows}-{size - 1} of "
                f"{', '.join(names)} are new (copies of row {ckpt.spec.vocab_size - 1}, the vocabulary's "
                f"last), rows {ckpt.spec.vocab_size}-{rows - 1} are the source's own"
            )
            meta = {**meta, "notes": [*meta.get("notes", ()), note]}
        return attrs.evolve(out, dropped=dropped, meta=meta)

    def _size(self, ckpt: Checkpoint) -> int:
        size = self.size
        if size is None:
            assert self.divisible_by is not None  # one of them is given (__attrs_post_init__)
            size = padded_size(ckpt.spec.vocab_size, self.divisible_by, self.tp)
        if size < ckpt.spec.vocab_size:
            raise UsageError(
                f"pad-vocab: size {size} is smaller than the vocabulary {ckpt.spec.vocab_size}; only "
                f"padding rows may go"
            )
        return size

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        # master weights pad like the weights; new padding rows have no optimizer history: zero moments
        return self._pad(ckpt, self._size(ckpt), zero=state != "param")

    def _pad(self, ckpt: Checkpoint, size: int, zero: bool) -> Checkpoint:
        vocab = ckpt.spec.vocab_size

        def resize(e: E.Expr) -> E.Expr:
            rows = e.shape[0]
            if size <= rows:
                return e if size == rows else E.simplify(E.Slice(e, 0, 0, size))
            if rows == vocab:
                return E.simplify(E.PadRows(e, size, zero))
            # after the source's own padding rows: copies of the vocabulary's last row (or zeros)
            new = E.Slice(
                E.PadRows(E.Slice(e, 0, vocab - 1, vocab), size - rows + 1, zero), 0, 1, size - rows + 1
            )
            return E.simplify(E.Concat((e, new), 0))

        out = {n: (t.map(resize) if role_of(n) in VOCAB_ROLES else t) for n, t in ckpt.tensors.items()}
        padded = size if size != vocab else None
        return ckpt.with_tensors(out, layout=attrs.evolve(ckpt.layout, padded_vocab=padded))


@register_pass
class UnpadVocab(Pass):
    name = "unpad-vocab"
    summary = "Trim embedding and output-layer rows back to the true vocab size"
    description = (
        "The padding rows are recorded as dropped (an HF checkpoint holds the vocabulary's rows only)."
    )
    requires = (WHOLE,)
    guarantees = "embed/lm_head have spec.vocab_size rows"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        v, rows = ckpt.spec.vocab_size, padding_rows(ckpt)
        out = {
            n: (t.map(lambda e: E.simplify(E.Slice(e, 0, 0, v))) if role_of(n) in VOCAB_ROLES else t)
            for n, t in ckpt.tensors.items()
        }
        why = (
            f"vocabulary padding rows of Megatron's padded vocabulary ({rows} rows for {v} tokens); the "
            f"unpadded layout (HF) holds the vocabulary's rows only"
        )
        dropped = {f"{n}[{v}:{rows}]": why for n in out if rows > v and role_of(n) in VOCAB_ROLES}
        return ckpt.with_tensors(
            out, layout=attrs.evolve(ckpt.layout, padded_vocab=None), dropped={**ckpt.dropped, **dropped}
        )
