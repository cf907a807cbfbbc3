"""Reversible rearrangements, each written once: both directions are derived from one value.

A :class:`Stack` says how one fused tensor is laid out from named parts along one dim: a sequence
of pieces ``(part, start, size)``.  ``fuse`` builds the fused tensor from the parts, ``split``
recovers the parts from the fused tensor; both are lazy expressions and simplify back to the
original loads, so ``split(fuse(x)) == x`` and ``fuse(split(y)) == y`` bit for bit.

Megatron's per-group interleaved QKV, the stacked ``[gate; up]`` fc1, MLA's ``[q_a; kv_a]``, HF
packed tensors (Phi-3 ``qkv_proj`` / ``gate_up_proj``) and the grouped-GEMM expert stack are all
Stacks; a new family's fused or packed form is a new Stack value, not new inverse code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ckpt_ir.ir.spec import ModelSpec

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import expr as E


@attrs.frozen
class Piece:
    part: str
    start: int  # first index in the part, along the stack's dim
    size: int
    # each of the piece's rows ``repeat`` times in a row (dim 0 only): Step-3.5's per-head gate,
    # one row per head, as Megatron's output gate of head_dim rows per head
    repeat: int = 1


def _pieces(v: Iterable[Piece]) -> tuple[Piece, ...]:
    return tuple(v)


@attrs.frozen
class Stack:
    """A fused tensor as the concatenation, along ``dim``, of ``pieces`` of named parts."""

    pieces: tuple[Piece, ...] = attrs.field(converter=_pieces)
    dim: int = 0

    @classmethod
    def of(cls, parts: Iterable[tuple[str, int]], dim: int = 0) -> Stack:
        """Whole parts one after the other: ``[a; b; c]``."""
        return cls(tuple(Piece(p, 0, n) for p, n in parts), dim)

    @classmethod
    def interleaved(cls, groups: int, parts: Iterable[tuple[str, int]], dim: int = 0) -> Stack:
        """``groups`` rounds of each part's next block: ``[a_0; b_0; a_1; b_1; ...]`` (``parts``
        gives each part's block size)."""
        blocks = tuple(parts)
        return cls(tuple(Piece(p, g * n, n) for g in range(groups) for p, n in blocks), dim)

    def sizes(self) -> dict[str, int]:
        """Each part's full size along ``dim``, in order of first appearance."""
        out: dict[str, int] = {}
        for pc in self.pieces:
            out[pc.part] = max(out.get(pc.part, 0), pc.start + pc.size)
        return out

    @property
    def size(self) -> int:
        return sum(pc.size * pc.repeat for pc in self.pieces)

    def fuse(self, parts: Mapping[str, E.Expr]) -> E.Expr:
        for name, n in self.sizes().items():
            if name not in parts:
                raise VerifyError(f"fusing {', '.join(self.sizes())}: part {name!r} is missing")
            if parts[name].shape[self.dim] != n:
                raise VerifyError(
                    f"fusing {', '.join(self.sizes())}: part {name!r} has {parts[name].shape[self.dim]} "
                    f"rows on dim {self.dim}, the rule expects {n}"
                )
        xs = tuple(
            _repeat(E.Slice(parts[pc.part], self.dim, pc.start, pc.start + pc.size), pc) for pc in self.pieces
        )
        return E.simplify(xs[0] if len(xs) == 1 else E.Concat(xs, self.dim))

    def split(self, fused: E.Expr) -> dict[str, E.Expr]:
        if fused.shape[self.dim] != self.size:
            raise VerifyError(
                f"splitting into {', '.join(self.sizes())}: the tensor has {fused.shape[self.dim]} rows "
                f"on dim {self.dim}, the rule expects {self.size}"
            )
        found: dict[str, list[tuple[int, E.Expr]]] = {p: [] for p in self.sizes()}
        pos = 0
        for pc in self.pieces:
            rows = E.Slice(fused, self.dim, pos, pos + pc.size * pc.repeat)
            found[pc.part].append((pc.start, E.Unrepeat(rows, pc.repeat) if pc.repeat > 1 else rows))
            pos += pc.size * pc.repeat
        out = {}
        for part, pieces in found.items():
            pieces.sort(key=lambda sp: sp[0])
            xs = tuple(x for _, x in pieces)
            out[part] = E.simplify(xs[0] if len(xs) == 1 else E.Concat(xs, self.dim))
        return out


def _repeat(x: E.Expr, pc: Piece) -> E.Expr:
    return E.Repeat(x, pc.repeat) if pc.repeat > 1 else x


def qkv_rule(spec: ModelSpec, rows: int = 0, layer: int | None = None) -> Stack:
    """Megatron's per-query-group ``[q heads; k; v]`` interleave, with ``layer``'s sizes (a
    global_attention layer's head size and groups, value heads of ``v_head_dim``); a layer without
    keys or values of its own (kv_shared, Gemma 4's keys-as-values) holds only the parts it has,
    or every part with ``qkv_pads_kv`` (:func:`qkv_padding`).
    With an output gate (Qwen3-Next, Qwen3.5) q holds per head ``[q_h; gate_h]`` rows (HF's q_proj)
    and megatron-core's linear_qkv per group ``[q heads; their gates; k; v]``
    (``Attention.get_query_key_value_tensors``)."""
    if spec.attn_gate:
        d, per = spec.head_dim, spec.heads_per_group
        pieces = []
        for g in range(spec.num_kv_heads):
            heads = range(g * per, (g + 1) * per)
            pieces += [Piece("q", 2 * h * d, d) for h in heads] + [
                Piece("q", (2 * h + 1) * d, d) for h in heads
            ]
            pieces += [Piece("k", g * d, d), Piece("v", g * d, d)]
        return Stack(pieces)
    groups, d = spec.attn_kv_heads(layer), spec.attn_head_dim(layer)
    per = spec.attn_heads(layer) // groups
    if layer is not None and spec.has_block(layer, "head_gate"):
        # block head_gate (Step-3.5's g_proj, one row per head): Megatron-Bridge's layout for
        # megatron-core's attention_output_gate (param_mapping.py merge_qkvg_weights), per group
        # [q heads; each head's gate row repeated head_dim times; k; v]
        return Stack(
            piece
            for g in range(groups)
            for piece in (
                Piece("q", g * per * d, per * d),
                Piece("g", g * per, per, repeat=d),
                Piece("k", g * d, d),
                Piece("v", g * d, d),
            )
        )
    parts = [("q", per * d)]
    if layer is None or spec.qkv_pads_kv or spec.attn_has_k(layer):
        parts.append(("k", d))
    if layer is None or spec.qkv_pads_kv or spec.attn_has_v(layer):
        parts.append(("v", spec.attn_v_dim(layer)))
    return Stack.interleaved(groups, parts)


def qkv_padding(spec: ModelSpec, layer: int) -> dict[str, str | None]:
    """The parts of ``layer``'s fused qkv that it has no tensor of its own for (``qkv_pads_kv``):
    part -> the part it copies, None for zeros.  Megatron-Bridge's Gemma 4 (gemma4_bridge.py
    maybe_modify_loaded_hf_weight, 393-437 at 067f987): zero k and v where the HF layer has neither
    (402-426), v = k where it has no v_proj (428-435)."""
    if not spec.qkv_pads_kv:
        return {}
    pads: dict[str, str | None] = {}
    if not spec.attn_has_k(layer):
        pads["k"] = None
    if not spec.attn_has_v(layer):
        pads["v"] = "k" if spec.attn_has_k(layer) else None
    return pads


def gate_up_rule(spec: ModelSpec, rows: int, layer: int | None = None) -> Stack:
    return Stack.of((("gate", rows // 2), ("up", rows // 2)))


def mla_rule(spec: ModelSpec, rows: int = 0, layer: int | None = None) -> Stack:
    """MLA: Megatron's linear_qkv is [q_a (or q); kv_a], the two down-projections stacked."""
    q_rows = spec.q_lora_rank or spec.mla_q_size
    return Stack.of((("q", q_rows), ("kv_a", spec.kv_lora_rank + spec.qk_rope_dim)))


# Gated-delta-net input projections (Qwen3-Next, Qwen3.5): q / k (a row block per key head), v / z
# (per value head; z is the output gate) and b / a (beta, alpha: one row per value head).
def gdn_in_proj_rule(spec: ModelSpec, rows: int = 0, layer: int | None = None) -> Stack:
    """megatron-core's GatedDeltaNet ``in_proj``: ``[q; k; v; z; b; a]``, each part split over TP
    on its own (rank r: ``[q_r; k_r; v_r; z_r; b_r; a_r]``, the role's ``Split.sizes``)."""
    return Stack.of(zip("qkvzba", spec.gdn_in_proj_parts))


def gdn_qkvz_rule(spec: ModelSpec, rows: int = 0, layer: int | None = None) -> Stack:
    """HF Qwen3-Next's ``in_proj_qkvz`` (MindSpeed-LLM keeps it): per key head g
    ``[q_g; k_g; v_g; z_g]``, v and z taking that key head's value heads."""
    g, v = spec.linear_k_heads, spec.linear_v_size // spec.linear_k_heads
    return Stack.interleaved(g, (("q", spec.linear_k_dim), ("k", spec.linear_k_dim), ("v", v), ("z", v)))


def gdn_ba_rule(spec: ModelSpec, rows: int = 0, layer: int | None = None) -> Stack:
    """HF Qwen3-Next's ``in_proj_ba``: per key head ``[b_g; a_g]`` (one row per value head)."""
    n = spec.linear_v_heads // spec.linear_k_heads
    return Stack.interleaved(spec.linear_k_heads, (("b", n), ("a", n)))
