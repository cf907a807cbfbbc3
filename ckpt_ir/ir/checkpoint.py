"""The Checkpoint container: a ModelSpec, a Layout and an ordered map of tensor nodes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.dtypes import itemsize
from ckpt_ir.ir.expr import describe
from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import Split
from ckpt_ir.ir.spec import ModelSpec


def _exprs(v: Iterable[E.Expr]) -> tuple[E.Expr, ...]:
    return tuple(v)


@attrs.frozen
class TensorNode:
    """One logical tensor.

    ``shape`` is the full (unsharded) shape.  ``shards`` holds one expression when the tensor is
    whole, or one per tensor-parallel rank when it is split by ``split`` (each shard's shape is the
    full shape cut along ``split.dim``).
    """

    name: str
    shards: tuple[E.Expr, ...] = attrs.field(converter=_exprs)
    split: Split | None = None

    def __attrs_post_init__(self) -> None:
        if not self.shards:
            raise VerifyError(f"{self.name}: tensor has no expression")
        if len(self.shards) > 1 and self.split is None:
            raise VerifyError(f"{self.name}: {len(self.shards)} shards but no split rule")
        first = self.shards[0]
        for s in self.shards[1:]:
            if s.shape != first.shape or s.dtype != first.dtype:
                raise VerifyError(
                    f"{self.name}: shards disagree ({first.shape} {first.dtype} vs {s.shape} {s.dtype})"
                )

    @classmethod
    def whole(cls, name: str, expr: E.Expr) -> TensorNode:
        return cls(name, (expr,), None)

    @property
    def tp(self) -> int:
        return len(self.shards)

    @property
    def expr(self) -> E.Expr:
        """The expression of a whole (unsharded) tensor."""
        if len(self.shards) != 1:
            raise VerifyError(
                f"{self.name}: tensor is split over {len(self.shards)} ranks; run `gather` first"
            )
        return self.shards[0]

    @property
    def shard_shape(self) -> tuple[int, ...]:
        return self.shards[0].shape

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.shards[0].shape)
        if self.split is not None and len(self.shards) > 1:
            s[self.split.dim] *= len(self.shards)
        return tuple(s)

    @property
    def dtype(self) -> str:
        return self.shards[0].dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def map(self, fn) -> TensorNode:
        """Apply ``fn`` to every shard expression."""
        return attrs.evolve(self, shards=tuple(fn(s) for s in self.shards))


@attrs.frozen(repr=False)
class Checkpoint:
    """What a frontend lifts, passes transform and a backend lowers.

    ``dropped`` records source tensors that are deliberately not carried (name -> reason), so
    coverage accounting can prove nothing else was lost.  ``hf_config`` is the raw HF config
    when one is known (carried through and updated on export); ``aux_files`` are side files
    (tokenizer, generation and processor configs, chat templates, remote code) copied next to HF
    output, or into a Megatron output's ``hf/`` folder, under their names there
    (``io.side_files.side_file_name``: ``additional_chat_templates/<name>.jinja`` for a named chat
    template).

    ``states`` holds optimizer state as named tensor sets (``param``: fp32 master weights,
    ``exp_avg``, ``exp_avg_sq``), each keyed and split exactly like ``tensors``; passes carry them
    along with the weights (see ``Pass.optimizer_state``).  ``meta["optimizer"]`` keeps what the
    optimizer needs besides them (param groups, data-parallel setup); ``meta["training"]`` what a
    resumed run needs with or without them (the source's full args, LR scheduler, FLOP counter,
    per-rank RNG state and the rank grid it belongs to); ``meta["notes"]`` choices recorded in
    the output (``ckpt-ir-notes.txt``).
    """

    spec: ModelSpec
    layout: Layout
    tensors: dict[str, TensorNode]
    dropped: dict[str, str] = attrs.field(factory=dict)
    hf_config: dict[str, Any] | None = None
    aux_files: tuple[str, ...] = ()
    source: str = ""
    meta: dict[str, Any] = attrs.field(factory=dict)
    states: dict[str, dict[str, TensorNode]] = attrs.field(factory=dict)

    def __str__(self) -> str:
        """The text dump: spec and layout lines, then one aligned line per tensor."""
        return to_text(self)

    def __repr__(self) -> str:
        return (
            f"<Checkpoint {self.spec.family} {self.layout.describe()}: {len(self.tensors)} tensors, "
            f"{self.nbytes} bytes"
            + (f", optimizer state {', '.join(self.states)}" if self.states else "")
            + ">"
        )

    def with_tensors(self, tensors: dict[str, TensorNode], **changes: Any) -> Checkpoint:
        return attrs.evolve(self, tensors=tensors, **changes)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def sources(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.tensors.values():
            for s in t.shards:
                for ld in E.loads(s):
                    seen.setdefault(ld.path, None)
        return list(seen)


def shard_expr(expr: E.Expr, split: Split, tp: int) -> list[E.Expr]:
    """Cut a whole tensor into TP shards by ``split`` (rank r takes its part of every block)."""
    n = expr.shape[split.dim]
    sizes = split.part_sizes(n)
    if sum(sizes) != n or any(size % tp for size in sizes) or (not split.sizes and n % split.blocks):
        what = f"parts {'+'.join(map(str, sizes))}" if split.sizes else f"{split.blocks} blocks"
        raise VerifyError(f"dim {split.dim} of size {n} does not split into {what} x {tp} ranks")
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    out = []
    expr = E.simplify(expr)  # once, not once per piece
    for r in range(tp):
        pieces = [
            E.simplify_node(
                E.Slice(expr, split.dim, start + r * (size // tp), start + (r + 1) * (size // tp))
            )
            for start, size in zip(starts, sizes)
        ]
        out.append(pieces[0] if len(pieces) == 1 else E.simplify_node(E.Concat(tuple(pieces), split.dim)))
    return out


def gather_exprs(shards: tuple[E.Expr, ...], split: Split) -> E.Expr:
    """Inverse of :func:`shard_expr`: the whole tensor from its TP shards."""
    tp = len(shards)
    if split.sizes:
        local = [size // tp for size in split.sizes]
    else:
        local = [shards[0].shape[split.dim] // split.blocks] * split.blocks
    starts = [sum(local[:b]) for b in range(len(local))]
    pieces = [E.Slice(s, split.dim, start, start + n) for start, n in zip(starts, local) for s in shards]
    # order: block-major, then rank
    return E.simplify(E.Concat(tuple(pieces), split.dim)) if tp * len(local) > 1 else shards[0]


def add_mtp_copies(spec, tensors: dict[str, TensorNode]) -> None:
    """MTP layers share the main embedding / output layer in Megatron: give each its canonical
    copies (an HF target writes them as the released checkpoints do)."""
    for k in range(spec.mtp_layers):
        for own, main in (("mtp.embed.weight", "embed.weight"), ("mtp.head.weight", "lm_head.weight")):
            name = f"layers.{spec.num_layers + k}.{own}"
            if name not in tensors and main in tensors:
                tensors[name] = attrs.evolve(tensors[main], name=name)


def _shown(value: Any) -> str:
    """A spec field in a dump: a stack's spec (a dict) as ``(k=v ...)`` of its own sizes."""
    if not isinstance(value, dict):
        return str(value)
    return "(" + " ".join(f"{k}={v}" for k, v in value.items() if k not in ("family", "stack", "dtype")) + ")"


def to_text(ckpt: Checkpoint) -> str:
    """The text dump of ``ckpt``: spec and layout lines, then one aligned line per tensor (its
    shape, dtype, placement and shortest source description), then what was dropped."""
    # unset optional features (MoE, MLA, MTP, LoRA fields at 0 / None / False) are left out
    shown = {
        k: v
        for k, v in ckpt.spec.summary().items()
        if k != "family" and v not in (0, None, False, ()) or k in ("qkv_bias", "tied_embeddings")
    }
    if "layer_blocks" in shown:
        shown["layer_blocks"] = layer_blocks_text(ckpt.spec.layer_blocks)
    lines = [
        f"// source: {ckpt.source}",
        f"// spec: {ckpt.spec.family} " + " ".join(f"{k}={_shown(v)}" for k, v in shown.items()),
        f"// layout: {ckpt.layout.describe()}",
        f"// tensors: {len(ckpt.tensors)}  bytes: {ckpt.nbytes}",
    ]
    if ckpt.states:
        lines.append(f"// optimizer state: {', '.join(ckpt.states)} (rows named <state>:<tensor>)")
    rows = []
    named = [("", ckpt.tensors)] + [(f"{k}:", v) for k, v in ckpt.states.items()]
    for prefix, tensors in named:
        for name, t in tensors.items():
            place = "whole" if t.split is None or t.tp == 1 else f"tp{t.tp}:{t.split.describe()}"
            src = describe(t.shards[0]) + (f"  (+{t.tp - 1} shards)" if t.tp > 1 else "")
            rows.append((prefix + name, "x".join(map(str, t.shape)) or "scalar", t.dtype, place, src))
    if rows:
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}  {r[4]}")
    for key, why in ckpt.dropped.items():
        lines.append(f"// dropped {key}: {why}")
    return "\n".join(lines) + "\n"


def layer_blocks_text(layer_blocks: tuple[tuple[str, ...], ...]) -> str:
    """Each layer's blocks, ``+``-joined, runs of equal layers counted: ``mamba,moe,attention,mlp``,
    ``(gdn+mlp)x3,attention+mlp``."""
    runs: list[list] = []
    for blocks in layer_blocks:
        if runs and runs[-1][0] == blocks:
            runs[-1][1] += 1
        else:
            runs.append([blocks, 1])
    parts = []
    for blocks, n in runs:
        text = "+".join(blocks)
        parts.append(text if n == 1 else f"({text})x{n}" if len(blocks) > 1 else f"{text}x{n}")
    return ",".join(parts)
