"""Canonical tensor names and their tensor-parallel split rules.

A canonical name is format-neutral: ``layers.3.attn.q.weight``.  Formats map onto it through name
tables (see :class:`NameTable`); the inverse direction is derived from the same table, never
written twice.

Each canonical *role* (the name with the layer number replaced by ``{i}``) has a row in the role
table (:mod:`ckpt_ir.ir.roles`); its split rule (:class:`Split`) says how tensor parallelism cuts
it: along which dim, and in how many equal blocks each rank takes its part from (fused gate/up is
two blocks: rank r holds ``[gate_r; up_r]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import attrs


@attrs.frozen
class Split:
    """Tensor-parallel rule: cut ``dim`` into TP parts, taking each rank's part from every one of
    ``blocks`` equal blocks (1 = a plain contiguous split), or, with ``sizes``, from every one of
    consecutive parts of those sizes (a Mamba mixer's ``in_proj`` = [z; x; B; C; dt]: rank r
    holds [z_r; x_r; B_r; C_r; dt_r]).  A role whose parts depend on the model carries the rule
    without sizes; :func:`ckpt_ir.ir.roles.split_rule` fills them in for a ModelSpec."""

    dim: int
    blocks: int = 1
    sizes: tuple[int, ...] = ()

    def part_sizes(self, n: int) -> tuple[int, ...]:
        """The sizes of the parts of a dim of size ``n`` (``blocks`` equal ones unless ``sizes``)."""
        if self.sizes:
            return self.sizes
        return (n // self.blocks,) * self.blocks

    def describe(self) -> str:
        kind = "column" if self.dim == 0 else "row"
        if self.sizes:
            return f"{kind}[{'+'.join(map(str, self.sizes))}]"
        return kind if self.blocks == 1 else f"{kind}x{self.blocks}"


COLUMN = Split(0)
ROW = Split(1)
COLUMN_BLOCKS2 = Split(0, 2)

# tensors with one row per vocabulary entry (padded and trimmed together); DeepSeek's MTP layers
# carry their own copies of the embedding and output layer
VOCAB_ROLES = frozenset(
    {"embed.weight", "lm_head.weight", "layers.{i}.mtp.embed.weight", "layers.{i}.mtp.head.weight"}
)
LORA_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".lora_magnitude.weight")
SAVED = ".lora_saved."


def is_lora(name: str) -> bool:
    """Part of an adapter: a LoRA factor, a DoRA magnitude, or a saved tensor replacing a base one."""
    return name.endswith(LORA_SUFFIXES) or SAVED in name


def is_lora_factor(name: str) -> bool:
    return name.endswith((".lora_a.weight", ".lora_b.weight"))


def lora_target(name: str) -> str:
    """The base tensor an adapter tensor changes: ``layers.0.attn.qkv.lora_a.weight`` ->
    ``layers.0.attn.qkv.weight``; ``lm_head.lora_saved.weight`` -> ``lm_head.weight``."""
    if SAVED in name:
        module, _, leaf = name.rpartition(SAVED)
        return f"{module}.{leaf}"
    for suffix in LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    raise ValueError(name)


def saved_name(name: str) -> str:
    """``lm_head.weight`` -> ``lm_head.lora_saved.weight`` (the adapter's copy replacing it)."""
    module, _, leaf = name.rpartition(".")
    return f"{module}{SAVED}{leaf}"


NORM_SUFFIX = "norm.weight"

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def split_layer(name: str) -> tuple[int | None, str]:
    """``layers.3.attn.q.weight`` -> (3, ``attn.q.weight``); non-layer names -> (None, name)."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


SUB = "sub"  # a sublayer's canonical prefix below its layer: layers.N.sub<k>. (ckpt_ir.ir.blocks)
_SUB = re.compile(rf"^{SUB}(\d+)\.(.*)$")


def split_sub(rest: str) -> tuple[int | None, str]:
    """``sub1.attn.q_a.weight`` -> (1, ``attn.q_a.weight``): a name below its layer split into the
    sublayer it lies in (None: the layer itself) and the ordinary role name there."""
    m = _SUB.match(rest)
    return (int(m.group(1)), m.group(2)) if m else (None, rest)


# the stacks of a multi-module model besides the language model, each its own canonical
# namespace: a vision tower's tensors are ``vision.<name>`` with ``<name>`` as a model of its own
# names it (``vision.layers.N.attn.q.weight``, ``vision.patch_embed.weight``); the language
# model's are today's names, unprefixed.  split_layer sees a stack's tensors as no layer's.
STACKS = ("vision",)
_STACK = re.compile(r"^(" + "|".join(STACKS) + r")\.(.*)$")


def split_stack(name: str) -> tuple[str | None, str]:
    """``vision.layers.3.attn.q.weight`` -> (``vision``, ``layers.3.attn.q.weight``); the language
    model's names -> (None, name)."""
    m = _STACK.match(name)
    return (m.group(1), m.group(2)) if m else (None, name)


def role_of(name: str) -> str:
    stack, inner = split_stack(name)
    if stack is not None:
        return f"{stack}.{role_of(inner)}"
    layer, rest = split_layer(name)
    if layer is None:
        return name
    return "layers.{i}." + _EXPERT.sub(".experts.{e}.", rest)


def expert_of(name: str) -> int | None:
    """``layers.3.mlp.experts.5.up.weight`` -> 5; None for non-expert tensors."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    return _EXPERT.search(name) is not None


def layer_name(layer: int, rest: str) -> str:
    return f"layers.{layer}.{rest}"


def is_norm(name: str) -> bool:
    return name.endswith(NORM_SUFFIX)


class NameTable:
    """A bidirectional map between one format's tensor names and canonical names.

    Built from ``(format_template, canonical_template)`` pairs whose placeholders are ``{i}``
    (layer) and ``{e}`` (expert).  Lookup in either direction uses the same pairs.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)
        self._fwd = [(template_pattern(f), c) for f, c in self.pairs]
        self._inv = [(template_pattern(c), f) for f, c in self.pairs]

    def to_canonical(self, name: str, accept: Callable[[str], bool] | None = None) -> str | None:
        """The canonical name of ``name``.  A format name several pairs map (Nemotron-H's one
        ``norm`` per layer is the input norm of whichever block the layer holds) takes the first
        canonical name ``accept`` accepts (the first match when none is, or without ``accept``)."""
        if accept is None:
            return _lookup(self._fwd, name)
        first = None
        for pat, target in self._fwd:
            m = pat.match(name)
            if m:
                canon = target.format(**m.groupdict())
                if accept(canon):
                    return canon
                first = first or canon
        return first

    def from_canonical(self, name: str) -> str | None:
        return _lookup(self._inv, name)


def template_pattern(template: str) -> re.Pattern[str]:
    out = re.escape(template)
    for ph in ("i", "e"):
        out = out.replace(re.escape("{" + ph + "}"), f"(?P<{ph}>\\d+)")
    return re.compile("^" + out + "$")


def _lookup(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pat, target in table:
        m = pat.match(name)
        if m:
            return target.format(**m.groupdict())
    return None
