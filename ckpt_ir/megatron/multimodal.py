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

from ckpt_ir.errors import FormatError, UsageError, VerifyError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, gather_exprs
from ckpt_ir.ir.layout import MINDSPEED_MM_KEYS, Layout
from ckpt_ir.ir.names import Split, is_lora, is_lora_factor, lora_target, split_stack, template_pattern
from ckpt_ir.ir.roles import split_rule
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron import keys as M

if TYPE_CHECKING:
    from ckpt_ir.families import Family, MegatronTower

# each naming's prefix of the language model's keys
TEXT_PREFIX = {
    "bridge": "language_model.",
    "mindspeed": "text_decoder.",
    "mindspeed-canonical": "text_decoder.",
}
# bridge: the family's HF names (visual.*)
VISION_PREFIX = {"mindspeed": "image_encoder.", "mindspeed-canonical": "image_encoder."}
# each naming's modules of a multi-latent-attention language model (Layout.mla_keys), where the
# naming fixes them: Megatron-Bridge's language model is a megatron-core GPTModel
# (kimi_vl/modeling_kimi_k25_vl.py:230, provide_language_model) with megatron-core's MLA modules,
# its keys those of Bridge's DeepSeek mappings re-prefixed (kimi_k25_vl_bridge.py:242-254;
# deepseek/common.py:38, 55: linear_kv_down_proj, linear_q_down_proj)
TEXT_MLA_KEYS = {"bridge": "mcore"}


def tower_keys(ckpt: Checkpoint) -> dict[tuple[int, int], list[tuple[str, tuple[str, ...], Stack | None]]]:
    """Where the vision tower's keys go: (stage, chunk) -> [(key, the canonical tensors it holds,
    the rule packing several, else None)], each list to go before the language model's keys."""
    from ckpt_ir.megatron import mindspeed_mm

    names = [n for n in ckpt.tensors if split_stack(n)[0] == "vision"]
    if mindspeed_mm.megatron_tower(ckpt.spec, ckpt.layout.mm_keys) is None:
        from ckpt_ir.families import by_name

        family = by_name(ckpt.spec.family)
        own = {c: k for tower in family.towers for k, c in tower.bridge_keys}
        base = [n for n in names if n not in own and not is_lora(n)]
        keys = []
        for hf, canon, pack in family.hf_form(ckpt.spec, base):
            key = bridge_key(family, hf, to_bridge=True)
            keys.append((key, canon, pack))
            keys += _bridge_lora(ckpt, key, canon, pack)
        held = {c for _, canon, _ in keys for c in canon}
        left = [n for n in names if is_lora(n) and (not is_lora_factor(n) or lora_target(n) not in held)]
        if left:
            raise VerifyError(
                f"{left[0]}: Megatron-Bridge's layout keeps this tower module in transformers' form, "
                f"with LoRA on its linear weights only; merge the adapter first (--to hf or lora-merge)"
            )
        return {(0, 0): keys + [(own[n], (n,), None) for n in names if n in own]}
    mindspeed_mm.check_bridge_stages(ckpt.spec, ckpt.layout)
    return mindspeed_mm.vision_keys(ckpt, names)


def _bridge_lora(
    ckpt: Checkpoint, key: str, canon: tuple[str, ...], pack: Stack | None
) -> list[tuple[str, tuple[str, ...], Stack | None]]:
    """The LoRA keys of tower weight ``key`` in Megatron-Bridge's layout (the HF module, whole on
    every TP rank): ``X.lora_A.default.weight`` / ``X.lora_B.default.weight`` beside ``X.weight``, as
    Megatron LoRA checkpoints name them, or in the naming ``Layout.lora_keys`` picks
    (ckpt_ir.megatron.keys.LORA_NAMINGS; whole either way).  A packed module (the
    tower's ``qkv``) has one A, which its parts must share, and B packed like its weight."""
    if not key.endswith(".weight"):
        return []
    stems = [c[: -len(".weight")] for c in canon]
    a = [s + ".lora_a.weight" for s in stems]
    if not all(n in ckpt.tensors for n in a):
        if any(n in ckpt.tensors for n in a):
            raise VerifyError(
                f"{key}: LoRA on some of {', '.join(canon)} only; one module has one LoRA: merge the "
                f"adapter first (--to hf or lora-merge)"
            )
        return []
    if any(ckpt.tensors[n].expr != ckpt.tensors[a[0]].expr for n in a[1:]):
        raise VerifyError(
            f"{key}: {', '.join(a)} differ, but one module has one LoRA A; merge the adapter first "
            f"(--to hf or lora-merge)"
        )
    b = tuple(s + ".lora_b.weight" for s in stems)
    b_pack = None
    if pack is not None:
        b_pack = Stack(
            tuple(attrs.evolve(pc, part=pc.part[: -len(".weight")] + ".lora_b.weight") for pc in pack.pieces),
            pack.dim,
        )
    naming = ckpt.layout.lora_keys
    return [(M.lora_key(key, "a", naming), (a[0],), None), (M.lora_key(key, "b", naming), b, b_pack)]


def tower_global(
    ckpt: Checkpoint, nodes: dict[str, TensorNode]
) -> tuple[list[tuple[str, E.Expr]], list[str]]:
    """The vision tower of a whole (TP 1, PP 1) model as Megatron-Bridge's ``torch_dist`` save holds
    it: (global key, whole tensor) from ``nodes`` (the weights, or an optimizer state in their
    names), and the keys of the ``_extra_state`` objects beside them.

    Megatron-Bridge's VLM (``Qwen25VLModel``, ``Gemma3VLModel``) is a MegatronModule without a
    ``sharded_state_dict`` of its own, so megatron-core's default (``transformer/module.py:58-103``)
    recurses into its children: the language model (a GPTModel: its own keys under
    ``language_model.``) and transformers' tower module, which has no ``sharded_state_dict`` and so
    gets ``sharded_state_dict_default`` (``transformer/utils.py:209-252``): its plain ``state_dict``
    (persistent tensors only, under their HF names) made into replicated ShardedTensors by
    ``make_sharded_tensors_for_checkpoint`` (``transformer/utils.py:75-148``) with no TP axis and no
    PP offset (the tower lives on stage 0 alone), i.e. each key is ``<module>.<HF name>`` with the
    tensor's own shape as its global shape, and no ``_extra_state`` (torch modules save none).
    Megatron-Bridge's own modules in the tower (``Tower.bridge_keys``: Gemma 3's projector, a
    ColumnParallelLinear whose ``sharded_state_dict`` splits weight and bias on axis 0 with the
    whole ``[T, E]`` as global shape, ``tensor_parallel/layers.py:1060-1070``, and a Transformer
    Engine norm) each save an ``_extra_state`` object too (``ColumnParallelLinear.get_extra_state``,
    ``tensor_parallel/layers.py:1075-1077``; Transformer Engine's ``BasicOperation.get_extra_state``),
    one shard of shape (1,) at offset (0,) (``transformer/utils.py:178-193``): ``<key>/shard_0_1``."""
    if ckpt.layout.mm_keys != "bridge":
        raise UsageError(
            f"{setting('ckpt_format', 'torch_dist')}: MindSpeed-MM's layout ({setting('mm_keys', 'mindspeed')}) has "
            f"no torch_dist form; use {setting('mm_keys', 'bridge')}"
        )
    from ckpt_ir.families import by_name
    from ckpt_ir.megatron import mindspeed_mm

    own = {k for tower in by_name(ckpt.spec.family).towers for k, _ in tower.bridge_keys}
    stored: list[tuple[str, E.Expr]] = []
    objects: list[str] = []
    for key, canon, pack in tower_keys(ckpt)[(0, 0)]:
        missing = [c for c in canon if c not in nodes]
        if missing:
            raise VerifyError(f"{key}: no tensor {missing[0]} in this tensor set; the set is incomplete")
        exprs = {c: nodes[c].expr for c in canon}
        stored.append((key, E.simplify(pack.fuse(exprs) if pack is not None else exprs[canon[0]])))
        if key in own and key.endswith(".weight"):
            objects.append(f"{key[: -len('weight')]}_extra_state/shard_0_1")
    names = mindspeed_mm.megatron_tower(ckpt.spec, "bridge")
    if names is not None:  # Megatron-Bridge's tower in Megatron's modules (Qwen3-VL's vision_model.*)
        return megatron_form_global(names, stored)
    return stored, objects


def tower_stacks(names: MegatronTower) -> tuple[str, ...]:
    """The key prefixes below which a Megatron-form tower's torch_dist keys are stacked on a leading
    axis: its layers (``vision_model.decoder.layers.``) and each list of ``listed`` modules
    (``vision_model.decoder.deepstack_merger_list.``)."""
    return (names.layers, *dict.fromkeys(k.split("{j}", 1)[0] for k, _ in names.listed))


def megatron_form_global(
    names: MegatronTower, keys: list[tuple[str, E.Expr]]
) -> tuple[list[tuple[str, E.Expr]], list[str]]:
    """A Megatron-form tower (``Tower.bridge``) of a whole model as Megatron-Bridge's torch_dist
    save holds it, from its torch-format keys at TP 1 (``keys``): (global key, tensor) and the
    ``_extra_state`` objects' keys.

    Megatron-Bridge's ``Qwen3VLVisionTransformerBlock.sharded_state_dict``
    (``qwen_vl/modelling_qwen3_vl/transformer_block.py:393-465``) saves a homogeneous block's layers
    under ``<prefix>layers.`` with the sharded offset ``(0, layer, L)`` (431-441) and the DeepStack
    mergers under ``<prefix>deepstack_merger_list.`` with ``(0, j, J)`` (443-456): each tensor is
    one global tensor with a leading axis of all layers (mergers), i.e. ``[L, ...]``; its
    ``_extra_state`` objects ``<module>._extra_state/shard_<i>_<L>`` (megatron-core
    ``transformer/utils.py:151-191``, shape ``(L,)`` at ``(i,)``).  The modules beside the block
    (patch embedding, positions: torch modules; the patch merger: a MegatronModule of TE modules)
    go through megatron-core's ``sharded_state_dict_default`` (``transformer/utils.py:209-252``)
    with no offset: their own shapes, objects ``/shard_0_1``.  A block whose layers differ in keys
    or shapes keeps each layer under its number, objects ``/shard_0_1`` (transformer_block.py:
    433-435).  The TP axes (``TELayerNormColumnParallelLinear`` / ``TEColumnParallelLinear`` dim 0
    with bias, ``TERowParallelLinear`` dim 1, norms and a row-parallel bias replicated: megatron-core
    ``extensions/transformer_engine.py:909-920, 1016-1027, 1116-1127``) decide how ranks cut a
    tensor on save, not the global tensor, which is written whole."""
    stacks = tower_stacks(names)
    groups: dict[str, dict[int, list[tuple[str, E.Expr]]]] = {p: {} for p in stacks}
    order: list[tuple[str, str]] = []  # (stack prefix, key) or ("", key): first appearances
    for key, x in keys:
        prefix = next((p for p in stacks if key.startswith(p)), None)
        head, _, rest = key[len(prefix) :].partition(".") if prefix is not None else ("", "", "")
        if prefix is None or not head.isdigit():
            order.append(("", key))
            continue
        group = groups[prefix]
        if not group:
            order.append((prefix, ""))
        group.setdefault(int(head), []).append((rest, x))

    def objects_of(key: str, shards: str) -> list[str]:
        module = key.rsplit(".", 1)[0]
        return (
            [f"{module}._extra_state/{shards}"]
            if module.rsplit(".", 1)[-1] in names.extra_state and key.endswith(".weight")
            else []
        )

    stored: list[tuple[str, E.Expr]] = []
    objects: list[str] = []
    plain = dict(keys)
    for prefix, key in order:
        if not prefix:
            stored.append((key, plain[key]))
            objects += objects_of(key, "shard_0_1")
            continue
        group = groups[prefix]
        n = len(group)
        layers = [group[i] for i in range(n)] if sorted(group) == list(range(n)) else None
        alike = layers is not None and all(
            [(k, x.shape) for k, x in entries] == [(k, x.shape) for k, x in layers[0]] for entries in layers
        )
        if layers is None or not alike:  # each under its number
            for i in sorted(group):
                for rest, x in group[i]:
                    stored.append((f"{prefix}{i}.{rest}", x))
                    objects += objects_of(f"{prefix}{i}.{rest}", "shard_0_1")
            continue
        for k, (rest, _) in enumerate(layers[0]):
            parts = [entries[k][1] for entries in layers]
            stored.append(
                (prefix + rest, E.simplify(E.Concat(tuple(E.Reshape(p, (1, *p.shape)) for p in parts), 0)))
            )
            for i in range(n):
                objects += objects_of(prefix + rest, f"shard_{i}_{n}")
    return stored, objects


def unstacked(
    names: MegatronTower | None, key: str, shape: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    """The torch-format keys (numbered per layer) that torch_dist key ``key`` of shape ``shape``
    holds, each with its index on the leading axis: a key stacked below one of
    :func:`tower_stacks` (:func:`megatron_form_global`) holds one per entry of that axis; any other
    key itself (``()``)."""
    if names is not None:
        for prefix in tower_stacks(names):
            if key.startswith(prefix) and not key[len(prefix) :].split(".", 1)[0].isdigit():
                rest = key[len(prefix) :]
                if not shape:
                    raise FormatError(
                        f"{key}: a stacked tower tensor with no leading layer axis; the metadata is corrupt"
                    )
                return [(f"{prefix}{i}.{rest}", (i,)) for i in range(shape[0])]
    return [(key, ())]


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
    if ckpt.layout.mm_keys not in MINDSPEED_MM_KEYS or ckpt.layout.vision_tp == 1:
        return False
    from ckpt_ir.megatron import mindspeed_mm

    return mindspeed_mm.is_whole(ckpt.spec, key, ckpt.layout.mm_keys)


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


def read_layout(layout: Layout, naming: str, spec: ModelSpec) -> Layout:
    """The layout of a vision-language model read in ``naming`` (Megatron-Bridge's: the tower on
    stage 0, whole and unfused in its HF form, or in Megatron's modules split over the language
    model's TP where the family's ``Tower.bridge`` names them)."""
    from ckpt_ir.megatron import mindspeed_mm

    if naming == "bridge" and mindspeed_mm.megatron_tower(spec, naming) is not None:
        return attrs.evolve(layout, mm_keys=naming, vision_tp=layout.tp, vision_fused=True)
    if naming == "mindspeed" and layout.mm_keys in MINDSPEED_MM_KEYS:
        return layout  # which of MindSpeed-MM's namings, its keys said (mindspeed_mm.naming_of)
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
    from ckpt_ir.megatron import mindspeed_mm

    if mindspeed_mm.megatron_tower(spec, layout.mm_keys) is not None:
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
    lora = {k: raw.pop(k) for k in [k for k in raw if M.lora_parts(k)]}
    for k in [k for k in raw if k.endswith(".base_layer.weight")]:  # a LoRA-wrapped module's weight
        raw[k[: -len(".base_layer.weight")] + ".weight"] = raw.pop(k)
    exprs, unknown = family.from_hf_form(spec, raw)
    exprs.update(_lift_bridge_lora(family, spec, lora, unknown))
    unknown = [bridge_key(family, k, to_bridge=True) for k in unknown]
    exprs.update(ours)
    return {n: TensorNode.whole(n, x) for n, x in exprs.items()}, copies, unknown


def _lift_bridge_lora(
    family, spec: ModelSpec, lora: dict[str, E.Expr], unknown: list[str]
) -> dict[str, E.Expr]:
    """The canonical LoRA factors of tower keys ``X.lora_A.default.weight`` / ``lora_B`` (the
    inverse of :func:`_bridge_lora`), or as Megatron-Bridge's own LoRA names them,
    ``X.adapter.linear_in.weight`` / ``linear_out`` (an nn.Linear wrapped by LinearAdapter, whole
    on every rank: peft/lora.py:178-187, lora_layers.py:437-438): a packed module's A shared by its parts, its B unpacked like
    its weight; keys of no module the family knows go to ``unknown``."""
    out: dict[str, E.Expr] = {}
    for key, x in lora.items():
        factor = M.lora_parts(key)
        assert factor is not None
        which = M.CANONICAL_LORA[factor[1]]
        weight = factor[0] + ".weight"
        canon = family.names.to_canonical(weight)
        if canon is not None:
            out[canon[: -len(".weight")] + which] = x
            continue
        hit = next(((p, g) for p in family.packed if (g := template_pattern(p.hf).match(weight))), None)
        if hit is None:
            unknown.append(key)
            continue
        p, g = hit
        parts = {t: t.format(**g.groupdict())[: -len(".weight")] + which for t in p.parts}
        if which == ".lora_a.weight":
            out.update((n, x) for n in parts.values())
        else:
            out.update((parts[t], e) for t, e in p.rule(spec).split(x).items())
    return out


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
