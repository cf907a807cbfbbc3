"""A vision-language model's Megatron rank files: the language model's keys (a GPTModel's, as for
a text model) under its module's prefix, and the vision tower's keys, in one of two namings
(``Layout.mm_keys``):

* ``bridge``, Megatron-Bridge's (``Qwen25VLModel``, ``models/qwen_vl/modeling_qwen25_vl.py``: the
  language model is ``language_model``, a GPTModel with Transformer Engine's norm names; the tower
  is transformers' own module ``visual``, replicated on every TP rank of the first pipeline stage,
  under its HF names: ``qwen25_vl_bridge.py``'s ``ReplicatedMapping("visual.**", "visual.**")``);
* ``mindspeed``, MindSpeed-MM's (``text_decoder.*``, ``image_encoder.*``), see
  :mod:`ckpt_ir.megatron.mindspeed_mm`.

The tower sits on pipeline stage 0 (Megatron-Bridge builds it where ``pre_process`` is true).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ckpt_ir.errors import FormatError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, gather_exprs
from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import Split, split_stack
from ckpt_ir.ir.roles import split_rule
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec

if TYPE_CHECKING:
    from ckpt_ir.families import Family

# each naming's prefix of the language model's keys
TEXT_PREFIX = {"bridge": "language_model.", "mindspeed": "text_decoder."}
VISION_PREFIX = {"mindspeed": "image_encoder."}  # bridge: the family's HF names (visual.*)


def tower_keys(ckpt: Checkpoint) -> dict[tuple[int, int], list[tuple[str, tuple[str, ...], Stack | None]]]:
    """Where the vision tower's keys go: (stage, chunk) -> [(key, the canonical tensors it holds,
    the rule packing several, else None)], each list to go before the language model's keys."""
    names = [n for n in ckpt.tensors if split_stack(n)[0] == "vision"]
    if ckpt.layout.mm_keys == "bridge":
        from ckpt_ir.families import by_name

        family = by_name(ckpt.spec.family)
        own = {c: k for tower in family.towers for k, c in tower.bridge_keys}
        keys = family.hf_form(ckpt.spec, [n for n in names if n not in own])
        keys = [(bridge_key(family, hf, to_bridge=True), canon, rule) for hf, canon, rule in keys]
        return {(0, 0): keys + [(own[n], (n,), None) for n in names if n in own]}
    from ckpt_ir.megatron import mindspeed_mm

    return mindspeed_mm.vision_keys(ckpt, names)


def bridge_key(family: Family, key: str, to_bridge: bool) -> str:
    """A tower's HF name as Megatron-Bridge's files key it (``to_bridge``), or back: its prefix
    replaced where the tower says (``Tower.bridge_prefix``: GLM-4.5V's ``model.visual.*`` is
    ``visual.*``), else the same."""
    for tower in family.towers:
        if tower.bridge_prefix is not None:
            old, new = tower.bridge_prefix if to_bridge else tower.bridge_prefix[::-1]
            if key.startswith(old):
                return new + key[len(old) :]
    return key


def bridge_split(ckpt: Checkpoint, key: str, canon: tuple[str, ...]) -> tuple[Stack, Split] | None:
    """How a tower key of Megatron-Bridge's own modules (``Tower.bridge_keys``) is split over the
    language model's TP (Gemma 3's projector, a ColumnParallelLinear): (a rule taking the whole
    tensor as one part, the role's split), None for a key whole on every rank."""
    from ckpt_ir.families import by_name

    if ckpt.layout.mm_keys != "bridge" or ckpt.layout.tp == 1:
        return None
    own = {k for tower in by_name(ckpt.spec.family).towers for k, _ in tower.bridge_keys}
    split = split_rule(canon[0], ckpt.spec) if key in own else None
    if split is None:
        return None
    return Stack.of([(canon[0], ckpt.tensors[canon[0]].shape[split.dim])], split.dim), split


def written_whole(ckpt: Checkpoint, key: str) -> bool:
    """Whether tower key ``key`` is written whole on every TP rank though the IR splits its tensors
    (MindSpeed-MM's GLM-4.1V attention, ``MegatronTower.whole``)."""
    if ckpt.layout.mm_keys != "mindspeed" or ckpt.layout.vision_tp == 1:
        return False
    from ckpt_ir.megatron import mindspeed_mm

    return mindspeed_mm.is_whole(ckpt.spec, key)


def module_of(key: str, mm_keys: str | None) -> tuple[str, str, str]:
    """(``text`` or ``vision``, the key below its module's prefix, the naming it shows) of a key of
    a vision-language model's rank file (``mm_keys``: the naming expected, None: either)."""
    for naming, prefix in TEXT_PREFIX.items():
        if key.startswith(prefix) and mm_keys in (None, naming):
            return "text", key[len(prefix) :], naming
    for naming, prefix in VISION_PREFIX.items():
        if key.startswith(prefix) and mm_keys in (None, naming):
            return "vision", key, naming
    return "vision", key, mm_keys or "bridge"


def check_naming(seen: set[str], where: str) -> str:
    """The one naming the keys of a rank directory showed."""
    if len(seen) > 1:
        raise FormatError(
            f"{where}: keys of both Megatron-Bridge's (language_model.*) and MindSpeed-MM's "
            f"(text_decoder.*) namings; the checkpoint mixes two layouts"
        )
    return next(iter(seen), "bridge")


def read_layout(layout: Layout, naming: str) -> Layout:
    """The layout of a vision-language model read in ``naming`` (Megatron-Bridge's: the tower whole
    and unfused on stage 0)."""
    return attrs.evolve(layout, mm_keys=naming)


def lift_tower(
    found: dict[str, list[tuple[int, int, int, str, E.Expr]]],
    spec: ModelSpec,
    layout: Layout,
    where: str,
    dropped: dict[str, str],
) -> tuple[dict[str, TensorNode], dict[str, list[tuple[str, E.Expr]]], list[str]]:
    """The vision tower's canonical tensors from its keys (key -> [(TP rank, stage, chunk, rank
    directory, expression)]), the copies of replicated ones to compare (key -> [(rank directory,
    expression)], the kept one first) and the keys no table knows.  In Megatron-Bridge's naming
    the tower is its family's HF form, on stage 0, whole on every TP rank."""
    if layout.mm_keys == "mindspeed":
        from ckpt_ir.megatron import mindspeed_mm

        return mindspeed_mm.lift_vision(found, spec, layout, where, dropped)
    from ckpt_ir.families import by_name

    family = by_name(spec.family)
    own = {k: c for tower in family.towers for k, c in tower.bridge_keys}
    raw: dict[str, E.Expr] = {}
    copies: dict[str, list[tuple[str, E.Expr]]] = {}
    ours: dict[str, E.Expr] = {}
    for key, places in found.items():
        places = sorted(places, key=lambda f: f[:3])
        off = next((f for f in places if f[1:3] != (0, 0)), None)
        if off is not None:
            raise FormatError(
                f"{where}: {key} is in {off[3]} (pipeline stage {off[1]}, chunk {off[2]}); Megatron-Bridge keeps "
                f"the vision tower on the first stage only, so the rank files do not belong together"
            )
        rule = split_rule(own[key], spec) if key in own else None
        if rule is not None and layout.tp > 1:
            ours[own[key]] = _joined(key, places, rule, layout.tp, where)
            continue
        (ours if key in own else raw)[own.get(key) or bridge_key(family, key, to_bridge=False)] = places[0][4]
        if len(places) > 1:
            copies[key] = [(f[3], f[4]) for f in places]
            dropped[f"{key} (TP ranks {', '.join(str(f[0]) for f in places[1:])})"] = (
                "replica of TP rank 0 (Megatron-Bridge replicates the vision tower)"
            )
    exprs, unknown = family.from_hf_form(spec, raw)
    unknown = [bridge_key(family, k, to_bridge=True) for k in unknown]
    exprs.update(ours)
    return {n: TensorNode.whole(n, x) for n, x in exprs.items()}, copies, unknown


def _joined(key: str, places: list, split: Split, tp: int, where: str) -> E.Expr:
    """The whole tensor of a key Megatron-Bridge splits over the language model's TP (Gemma 3's
    projector): one shard per TP rank of stage 0, joined by the split's rule."""
    ranks = [f[0] for f in places]
    if ranks != list(range(tp)):
        raise FormatError(
            f"{where}: {key} is on TP ranks {ranks} of stage 0, but Megatron-Bridge splits it over all "
            f"{tp}; the rank files do not belong together"
        )
    return gather_exprs(tuple(f[4] for f in places), split)
