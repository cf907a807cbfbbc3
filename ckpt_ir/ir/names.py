"""Canonical tensor names and their tensor-parallel split rules.

A canonical name is format-neutral: ``layers.3.attn.q.weight``.  Formats map onto it through name
tables (see :class:`NameTable`); the inverse direction is derived from the same table, never
written twice.

Each canonical *role* (the name with the layer number replaced by ``{i}``) has a split rule that
says how tensor parallelism cuts it: along which dim, and in how many equal blocks each rank takes
its part from (fused gate/up is two blocks: rank r holds ``[gate_r; up_r]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs


@attrs.frozen
class Split:
    """Tensor-parallel rule: cut ``dim`` into TP parts, taking each rank's part from every one of
    ``blocks`` equal blocks (1 = a plain contiguous split)."""

    dim: int
    blocks: int = 1

    def describe(self) -> str:
        kind = "column" if self.dim == 0 else "row"
        return kind if self.blocks == 1 else f"{kind}x{self.blocks}"


COLUMN = Split(0)
ROW = Split(1)
COLUMN_BLOCKS2 = Split(0, 2)

# role -> split rule (None = replicated on every TP rank)
ROLES: dict[str, Split | None] = {
    "embed.weight": COLUMN,
    "lm_head.weight": COLUMN,
    "final_norm.weight": None,
    "layers.{i}.attn_norm.weight": None,
    "layers.{i}.attn.q.weight": COLUMN,
    "layers.{i}.attn.k.weight": COLUMN,
    "layers.{i}.attn.v.weight": COLUMN,
    "layers.{i}.attn.q.bias": COLUMN,
    "layers.{i}.attn.k.bias": COLUMN,
    "layers.{i}.attn.v.bias": COLUMN,
    "layers.{i}.attn.qkv.weight": COLUMN,
    "layers.{i}.attn.qkv.bias": COLUMN,
    "layers.{i}.attn.o.weight": ROW,
    "layers.{i}.attn.q_norm.weight": None,
    "layers.{i}.attn.k_norm.weight": None,
    "layers.{i}.post_attn_norm.weight": None,
    "layers.{i}.mlp_norm.weight": None,
    "layers.{i}.mlp.gate.weight": COLUMN,
    "layers.{i}.mlp.up.weight": COLUMN,
    "layers.{i}.mlp.gate_up.weight": COLUMN_BLOCKS2,
    "layers.{i}.mlp.down.weight": ROW,
    "layers.{i}.post_mlp_norm.weight": None,
    # mixture of experts: router (and its score-correction bias), routed experts, shared experts.
    # Expert tensors follow the dense MLP rules; with expert TP = 1 the shard pass leaves them whole.
    "layers.{i}.mlp.router.weight": None,
    "layers.{i}.mlp.router.bias": None,
    "layers.{i}.mlp.experts.{e}.gate.weight": COLUMN,
    "layers.{i}.mlp.experts.{e}.up.weight": COLUMN,
    "layers.{i}.mlp.experts.{e}.gate_up.weight": COLUMN_BLOCKS2,
    "layers.{i}.mlp.experts.{e}.down.weight": ROW,
    "layers.{i}.mlp.shared.gate.weight": COLUMN,
    "layers.{i}.mlp.shared.up.weight": COLUMN,
    "layers.{i}.mlp.shared.gate_up.weight": COLUMN_BLOCKS2,
    "layers.{i}.mlp.shared.down.weight": ROW,
    "layers.{i}.mlp.shared_gate.weight": None,
    # multi-latent attention (DeepSeek): low-rank q and kv projections; Megatron fuses the two
    # down-projections into one replicated linear_qkv ("qkv_a") and splits the up-projections
    "layers.{i}.attn.q_a.weight": None,
    "layers.{i}.attn.q_a_norm.weight": None,
    "layers.{i}.attn.q_b.weight": COLUMN,
    "layers.{i}.attn.kv_a.weight": None,
    "layers.{i}.attn.kv_a_norm.weight": None,
    "layers.{i}.attn.kv_b.weight": COLUMN,
    "layers.{i}.attn.qkv_a.weight": None,
    # multi-token prediction: layers numbered after the main ones carry these besides a full
    # transformer layer; embed and head are the main model's (shared in Megatron)
    "layers.{i}.mtp.enorm.weight": None,
    "layers.{i}.mtp.hnorm.weight": None,
    "layers.{i}.mtp.eh_proj.weight": COLUMN,
    "layers.{i}.mtp.norm.weight": None,
    "layers.{i}.mtp.embed.weight": COLUMN,
    "layers.{i}.mtp.head.weight": COLUMN,
}

# LoRA adapters attach to linear layers: ``<target>.lora_a.weight`` [r, in] and
# ``<target>.lora_b.weight`` [out, r], and for DoRA ``<target>.lora_magnitude.weight`` [out].
# A column-parallel target keeps A whole and splits B and the magnitude like the weight; a
# row-parallel target splits A like the weight (dim 1) and keeps B and the magnitude whole.
# The rank may differ per target (peft's rank_pattern): it is read from the tensors.
LINEAR_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down",
                  "mlp.experts.{e}.gate", "mlp.experts.{e}.up", "mlp.experts.{e}.gate_up", "mlp.experts.{e}.down",
                  "mlp.shared.gate", "mlp.shared.up", "mlp.shared.gate_up", "mlp.shared.down")
for _t in LINEAR_TARGETS:
    _rule = ROLES[f"layers.{{i}}.{_t}.weight"]
    assert _rule is not None
    ROLES[f"layers.{{i}}.{_t}.lora_a.weight"] = None if _rule.dim == 0 else ROW
    ROLES[f"layers.{{i}}.{_t}.lora_b.weight"] = _rule if _rule.dim == 0 else None
    ROLES[f"layers.{{i}}.{_t}.lora_magnitude.weight"] = _rule if _rule.dim == 0 else None
# A full tensor saved with the adapter (peft's modules_to_save) replaces its base tensor
# ``<module>.<leaf>`` as ``<module>.lora_saved.<leaf>``, split like it.
for _role, _rule in list(ROLES.items()):
    if ".lora_" not in _role:
        _module, _, _leaf = _role.rpartition(".")
        ROLES[f"{_module}.lora_saved.{_leaf}"] = _rule

VOCAB_ROLES = frozenset({"embed.weight", "lm_head.weight"})
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


def role_of(name: str) -> str:
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


def split_rule(name: str) -> Split | None:
    role = role_of(name)
    if role not in ROLES:
        raise KeyError(f"no tensor-parallel rule for {name!r} (role {role!r})")
    return ROLES[role]


def is_norm(name: str) -> bool:
    return name.endswith(NORM_SUFFIX)


class NameTable:
    """A bidirectional map between one format's tensor names and canonical names.

    Built from ``(format_template, canonical_template)`` pairs whose placeholders are ``{i}``
    (layer) and ``{e}`` (expert).  Lookup in either direction uses the same pairs.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)
        self._fwd = [(_compile(f), c) for f, c in self.pairs]
        self._inv = [(_compile(c), f) for f, c in self.pairs]

    def to_canonical(self, name: str) -> str | None:
        return _lookup(self._fwd, name)

    def from_canonical(self, name: str) -> str | None:
        return _lookup(self._inv, name)


def _compile(template: str) -> re.Pattern[str]:
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
