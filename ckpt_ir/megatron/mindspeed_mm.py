"""MindSpeed-MM's Megatron layout of a vision-language model (its ``checkpoint/`` package's
``hf_to_mm``, e.g. ``Qwen2_5_VLConverter``): the language model under ``text_decoder.`` (a GPTModel's
keys with local norm names), the vision tower under ``image_encoder.`` in its family's names
(``Tower.mindspeed``, a :class:`~ckpt_ir.families.MegatronTower`), e.g. Qwen2.5-VL's:

    image_encoder.encoder.patch_embed.proj.weight          first stage holding vision layers
    image_encoder.encoder.blocks.layers.<n>.<layer key>     each stage's vision layers, from 0
    image_encoder.projector.{layernorm,encoder.linear_fc1,encoder.linear_fc2}.*   last such stage

a vision layer's keys as a GPTModel layer's (``input_layernorm``, ``self_attention.linear_qkv``
with one group per head: ``[q_h; k_h; v_h]``, ``linear_proj``, ``pre_mlp_layernorm``,
``mlp.linear_fc1`` = ``[gate; up]``, ``mlp.linear_fc2``), split over TP like them.  Each module has
its own layer count per pipeline stage (and virtual chunk): ``Layout.num_layer_list`` and
``Layout.vision_layer_list``, flattened chunk after chunk as MindSpeed-MM's nested lists are.

Files: ``release/mp_rank_TT[_PPP]/model_optim_rng.pt`` = ``{"model": ..., "checkpoint_version":
3.0}`` (``model0``, ``model1``, ... with virtual chunks) and ``latest_checkpointed_iteration.txt``
= ``release``; no ``args``, so reading them back takes the HF config; the layer counts are read
off the keys.  See docs/reference/vision-language-models.md section 3.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ckpt_ir.errors import FormatError, LayoutError, UsageError, VerifyError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, shard_expr
from ckpt_ir.ir.layout import MINDSPEED_MM_KEYS, Layout, vision_slots
from ckpt_ir.ir.names import NameTable, is_lora_factor, lora_target, split_layer
from ckpt_ir.ir.roles import expected_shape, split_rule
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron import keys as M

if TYPE_CHECKING:
    from ckpt_ir.families import MegatronTower

TEXT = "text_decoder."
IMAGE = "image_encoder."
# MindSpeed-MM's canonical layout (its converters' enable_canonical_hf_struct): the language model's
# q / k / v and gate / up apart (Layout.fused_qkv / fused_gate_up False), the tower's names
# Tower.mindspeed_canonical
CANONICAL = "mindspeed-canonical"
# a language-model key only the canonical layout has (converters/qwen2vl.py:101): the rank files
# say which layout they hold
_CANONICAL_TEXT = re.compile(r"^" + re.escape(TEXT + M.LAYERS) + r"\d+\.self_attention\.q_proj\.weight$")
_TEXT_LAYER = re.compile(r"^" + re.escape(TEXT + M.LAYERS) + r"(\d+)\.")


def tower_names(spec: ModelSpec, mm_keys: str = "mindspeed") -> MegatronTower:
    """The family's MindSpeed-MM names of its vision tower in naming ``mm_keys``
    (``Tower.mindspeed``; ``Tower.mindspeed_canonical`` for MindSpeed-MM's canonical layout)."""
    from ckpt_ir.families import by_name

    tower = by_name(spec.family).towers[0]
    names = tower.mindspeed_canonical if mm_keys == CANONICAL else tower.mindspeed
    if names is None:
        other = "mindspeed" if mm_keys == CANONICAL and tower.mindspeed is not None else "bridge"
        raise UsageError(
            f"{setting('mm_keys', mm_keys)}: MindSpeed-MM has no {'canonical ' if mm_keys == CANONICAL else ''}"
            f"Megatron layout of {spec.family}'s vision tower; use {setting('mm_keys', other)}"
        )
    return names


def megatron_tower(spec: ModelSpec, mm_keys: str) -> MegatronTower | None:
    """The family's Megatron-form names of its vision tower in naming ``mm_keys``: MindSpeed-MM's
    (``Tower.mindspeed`` / ``Tower.mindspeed_canonical``; a family without them is a UsageError),
    Megatron-Bridge's where it keeps the tower in Megatron's modules (``Tower.bridge``), else None
    (Bridge's HF-form tower)."""
    if spec.vision is None:
        return None
    if mm_keys in MINDSPEED_MM_KEYS:
        return tower_names(spec, mm_keys)
    from ckpt_ir.families import by_name

    return by_name(spec.family).towers[0].bridge


def fuses_tower(spec: ModelSpec, mm_keys: str) -> bool:
    """Whether the tower's Megatron-form names in naming ``mm_keys`` hold its q / k / v and gate /
    up in Megatron's fused modules (fuse-vision: per head, [gate; up]); a tower whose names pack
    them in keys of their own (``MegatronTower.packed``: GLM-4.1V's ``self_attention.qkv``,
    InternVL's ``linear_qkv`` = [q; k; v]) keeps them apart in the IR."""
    names = megatron_tower(spec, mm_keys)
    return names is not None and not names.packed


def _names(spec: ModelSpec, layout: Layout) -> MegatronTower:
    names = megatron_tower(spec, layout.mm_keys)
    assert names is not None, "a tower in its HF form has no Megatron-form names"
    return names


def _listed(vision: ModelSpec, names: MegatronTower) -> tuple[tuple[int, ...], NameTable]:
    """The layers ``names.listed`` keys belong to, in list order, and those keys as a table of
    (key with the place {i} in the list, canonical name below ``layers.{i}.``)."""
    if not names.listed:
        return (), NameTable(())
    layers = tuple(getattr(vision, names.listed_by))
    return layers, NameTable((k.replace("{j}", "{i}"), "layers.{i}." + c) for k, c in names.listed)


def check_bridge_stages(spec: ModelSpec, layout: Layout) -> None:
    """Megatron-Bridge adds DeepStack merger J's output after language-model layer J of the first
    stage and asserts that stage has them all (modelling_qwen3_vl/model.py:403-409): refuse a
    layout whose first stage holds fewer language-model layers than there are such mergers."""
    from ckpt_ir.ir.layout import layer_slots

    names = megatron_tower(spec, layout.mm_keys) if spec.vision is not None else None
    if names is None or not names.listed or layout.mm_keys != "bridge":
        return
    need = len(getattr(spec.vision, names.listed_by))
    first = sum(1 for s in layer_slots(spec, layout) if s.real is not None and (s.stage, s.chunk) == (0, 0))
    if first < need:
        raise LayoutError(
            f"layout: Megatron-Bridge adds the {need} DeepStack merger outputs after the first {need} "
            f"language-model layers, all on pipeline stage 0, which holds {first}; give the first stage at "
            f"least {need} layers ({setting('num_layer_list')})"
        )


def layer_table(vision: ModelSpec, names: MegatronTower) -> NameTable:
    """A vision layer's keys below ``names.layers``: the tower's own rows, then a GPTModel layer's."""
    table = M.layer_table(names.norm_names, gated=vision.gated_mlp)
    own = tuple(("{i}." + k, "layers.{i}." + c) for k, c in names.layer_keys)
    return NameTable(
        (names.layers + m, c) for m, c in own + tuple((m[len(M.LAYERS) :], c) for m, c in table.pairs)
    )


def _layer_pattern(names: MegatronTower) -> re.Pattern[str]:
    return re.compile(r"^" + re.escape(names.layers) + r"(\d+)\.(.+)$")


def _ends(counts: Iterable[int], pp: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (stage, chunk) of the first and the last place with layers."""
    filled = [f for f, n in enumerate(counts) if n] or [0]
    (c0, s0), (c1, s1) = divmod(filled[0], pp), divmod(filled[-1], pp)
    return (s0, c0), (s1, c1)


def vision_keys(
    ckpt: Checkpoint, names: list[str]
) -> dict[tuple[int, int], list[tuple[str, tuple[str, ...], Stack | None]]]:
    """(stage, chunk) -> the vision tower's keys there: its layers where the vision layer list puts
    them (numbered from 0 on each), the patch embedding on the first place with vision layers, the
    projector on the last."""
    spec, layout = ckpt.spec, ckpt.layout
    vision = spec.vision
    assert vision is not None
    slots = vision_slots(spec, layout)
    first, last = _ends(layout.vision_layer_list or (vision.num_layers,), layout.pp)
    names_of = _names(spec, layout)
    table, other = layer_table(vision, names_of), NameTable(names_of.keys)
    listed_layers, listed = _listed(vision, names_of)
    pack_of = {p: (key, parts) for key, parts in names_of.packed for p in parts}
    out: dict[tuple[int, int], list[tuple[str, tuple[str, ...], Stack | None]]] = defaultdict(list)
    for name in names:
        layer, rest = split_layer(name[len("vision.") :])
        if layer is not None and rest in pack_of:  # one key holding several tensors, [a; b; ...]
            below, parts = pack_of[rest]
            if rest == parts[0]:
                stage, chunk, local = slots[layer]
                canon = tuple(f"vision.layers.{layer}.{p}" for p in parts)
                # whole on every TP rank, or rank r holding its part of each, [a_r; b_r; ...] (a part
                # whose role is not split over TP whole in each)
                whole = below in names_of.whole
                rows = [
                    (c, ckpt.tensors[c].shape[0] if whole else ckpt.tensors[c].shards[0].shape[0])
                    for c in canon
                ]
                out[(stage, chunk)].append((f"{names_of.layers}{local}.{below}", canon, Stack.of(rows)))
            continue
        if layer is not None and is_lora_factor(name):  # LoRA beside its module's weight key
            stage, chunk, local = slots[layer]
            target = table.from_canonical(
                f"layers.{local}.{split_layer(lora_target(name)[len('vision.') :])[1]}"
            )
            which = "a" if name.endswith(".lora_a.weight") else "b"
            key, place = None if target is None else M.lora_key(target, which), (stage, chunk)
        elif layer is not None:
            stage, chunk, local = slots[layer]
            key, place = table.from_canonical(f"layers.{local}.{rest}"), (stage, chunk)
            if key is None and layer in listed_layers:
                key = listed.from_canonical(f"layers.{listed_layers.index(layer)}.{rest}")
        else:
            key = other.from_canonical(name)
            place = first if name.startswith(names_of.first) else last
        if key is None:
            hint = (
                f"; use {setting('mm_keys', 'bridge')} (the tower in its HF form)"
                if layout.mm_keys in MINDSPEED_MM_KEYS
                else ""
            )
            naming = "MindSpeed-MM's" if layout.mm_keys in MINDSPEED_MM_KEYS else "Megatron-Bridge's"
            raise VerifyError(f"{name}: {naming} layout has no key for this vision tensor{hint}")
        out[place].append((key, (name,), None))
    return out


def lift_vision(
    found: dict[str, list[tuple[int, int, int, str, E.Expr]]],
    spec: ModelSpec,
    layout: Layout,
    where: str,
    dropped: dict[str, str],
) -> tuple[dict[str, TensorNode], dict[str, list[tuple[str, E.Expr]]], list[str]]:
    """The vision tower's canonical tensors from its keys (key -> [(TP rank, stage, chunk, rank
    directory, expression)]): TP shards joined by their roles' rules where the tower is split,
    copies of whole tensors returned for comparison, and the keys no table knows."""
    vision = spec.vision
    assert vision is not None
    layer_of = {(s, c, local): g for g, (s, c, local) in enumerate(vision_slots(spec, layout))}
    names_of = _names(spec, layout)
    table, other, pattern = layer_table(vision, names_of), NameTable(names_of.keys), _layer_pattern(names_of)
    listed_layers, listed = _listed(vision, names_of)
    packed = dict(names_of.packed)
    pieces: dict[str, dict[int, tuple[str, E.Expr]]] = defaultdict(dict)
    packs: dict[str, tuple[tuple[str, ...], bool]] = {}  # key -> (its canonical tensors, held whole)
    unknown: list[str] = []
    for key, places in found.items():
        for t, p, chunk, label, x in places:
            m = pattern.match(key)
            if m is None:
                name = other.to_canonical(key)
                canon = listed.to_canonical(key) if name is None else None
                if canon is not None:
                    j, rest = split_layer(canon)
                    if j is None or j >= len(listed_layers):
                        raise FormatError(
                            f"{where}: {label} holds {key}, past the {len(listed_layers)} layer(s) the config "
                            f"lists ({names_of.listed_by}); the rank files do not match the HF config"
                        )
                    name = f"vision.layers.{listed_layers[j]}.{rest}"
            else:
                below = m.group(2)
                canon = "layers.{i}." + packed[below][0] if below in packed else _vision_canonical(table, key)
                g = layer_of.get((p, chunk, int(m.group(1))))
                if canon is not None and g is None:
                    raise FormatError(
                        f"{where}: {label} holds {key}, but the layer counts put no vision layer {m.group(1)} "
                        f"on stage {p} chunk {chunk}; the rank files do not belong together"
                    )
                name = None if canon is None else f"vision.layers.{g}.{split_layer(canon)[1]}"
                if name is not None and below in packed:
                    name = f"{key}@{g}"  # unpacked below, once its TP ranks are all read
                    packs[name] = (
                        tuple(f"vision.layers.{g}.{c}" for c in packed[below]),
                        below in names_of.whole,
                    )
                elif name is not None and below in names_of.whole:
                    packs[name] = ((name,), True)
            if name is None:
                unknown.append(key)
                break
            pieces[name][t] = (label, x)
    tensors: dict[str, TensorNode] = {}
    copies: dict[str, list[tuple[str, E.Expr]]] = {}
    for name, shards in pieces.items():
        if name in packs:
            tensors.update(_unpacked(name, shards, *packs[name], spec, layout, where, copies, dropped))
            continue
        rule, n = split_rule(name, spec), layout.vision_tp
        if rule is None or n == 1:
            tensors[name] = TensorNode.whole(name, shards[min(shards)][1])
            if len(shards) > 1:
                copies[name] = [shards[t] for t in sorted(shards)]
                dropped[f"{name}@tp{','.join(str(t) for t in sorted(shards)[1:])}"] = (
                    "replica of TP rank 0 (replicated tensor)"
                )
            continue
        if sorted(shards) != list(range(n)):
            raise FormatError(
                f"{where}: {name} is missing on TP rank(s) {sorted(set(range(n)) - set(shards))}"
            )
        tensors[name] = TensorNode(name, tuple(shards[r][1] for r in range(n)), rule)
    return tensors, copies, unknown


def _vision_canonical(table: NameTable, key: str) -> str | None:
    """The canonical name (``layers.N.*``) of a vision layer's key; LoRA factors
    (``X.lora_A.default.weight``, as MindSpeed's LoRA names them) and a LoRA-wrapped base weight
    (``X.base_layer.weight``) beside the module ``X``'s weight."""
    if key.endswith(".base_layer.weight"):
        return table.to_canonical(key[: -len(".base_layer.weight")] + ".weight")
    lora = M.lora_parts(key)
    if lora is None or lora[2] != "mindspeed":
        return table.to_canonical(key)
    canon = table.to_canonical(lora[0] + ".weight")
    return None if canon is None else canon[: -len(".weight")] + M.CANONICAL_LORA[lora[1]]


def _unpacked(
    name: str,
    shards: dict[int, tuple[str, E.Expr]],
    canon: tuple[str, ...],
    whole: bool,
    spec: ModelSpec,
    layout: Layout,
    where: str,
    copies: dict[str, list[tuple[str, E.Expr]]],
    dropped: dict[str, str],
) -> dict[str, TensorNode]:
    """The canonical tensors of a key packing ``canon`` along dim 0 (``MegatronTower.packed``), or
    of a key held ``whole`` on every TP rank though its tensor is split over the tower's TP
    (``MegatronTower.whole``), from its TP ranks' tensors: a whole key's copies kept for comparison,
    its tensors cut over TP as their roles say; a split pack's ranks each hold their part of every
    tensor."""
    n = layout.vision_tp
    rows = [expected_shape(spec, layout, c) for c in canon]
    if whole or n == 1:
        kept = shards[min(shards)][1]
        if len(shards) > 1:
            copies[name] = [shards[t] for t in sorted(shards)]
            dropped[f"{name}@tp{','.join(str(t) for t in sorted(shards)[1:])}"] = (
                "replica of TP rank 0 (held whole on every rank)"
            )
        parts = Stack.of((c, r[0]) for c, r in zip(canon, rows) if r is not None).split(kept)
        out = {}
        for c in canon:
            rule = split_rule(c, spec)
            out[c] = (
                TensorNode(c, tuple(shard_expr(parts[c], rule, n)), rule)
                if rule is not None and n > 1
                else TensorNode.whole(c, parts[c])
            )
        return out
    if sorted(shards) != list(range(n)):
        raise FormatError(f"{where}: {name} is missing on TP rank(s) {sorted(set(range(n)) - set(shards))}")
    local = Stack.of(
        (c, r[0] // (n if split_rule(c, spec) else 1)) for c, r in zip(canon, rows) if r is not None
    )
    for t in range(n):
        label, x = shards[t]
        if x.shape[0] != local.size:
            raise FormatError(
                f"{label}: {name.partition('@')[0]} has {x.shape[0]} rows, but its parts take {local.size} on "
                f"a TP rank ({' + '.join(str(pc.size) for pc in local.pieces)}); the rank files do not match "
                f"the HF config"
            )
    by_rank = [local.split(shards[t][1]) for t in range(n)]
    out = {}
    for c in canon:
        rule = split_rule(c, spec)
        out[c] = (
            TensorNode(c, tuple(p[c] for p in by_rank), rule) if rule else TensorNode.whole(c, by_rank[0][c])
        )
    return out


def naming_of(keys: Iterable[str]) -> str:
    """MindSpeed-MM's naming of rank files holding ``keys``: its canonical layout where the language
    model's q / k / v are keys of their own, else its default one."""
    return CANONICAL if any(_CANONICAL_TEXT.match(k) for k in keys) else "mindspeed"


def is_whole(spec: ModelSpec, key: str, mm_keys: str = "mindspeed") -> bool:
    """Whether the family's MindSpeed-MM layout ``mm_keys`` holds tower key ``key`` whole on every
    TP rank though its canonical tensors are split over the tower's TP (``MegatronTower.whole``)."""
    names_of = tower_names(spec, mm_keys)
    m = _layer_pattern(names_of).match(key)
    return m is not None and m.group(2) in names_of.whole


def scan_counts(
    chunks_keys: Mapping[tuple[int, int], Iterable[str]], pp: int, spec: ModelSpec
) -> tuple[list[int], list[int]]:
    """The language model's and the vision tower's layer counts per place (flattened chunk after
    chunk), read off the keys of TP rank 0's rank files: (stage, chunk) -> keys."""
    pattern = _layer_pattern(tower_names(spec))
    chunks = 1 + max(c for _, c in chunks_keys)
    text, vision = [0] * (pp * chunks), [0] * (pp * chunks)
    for (stage, chunk), keys in chunks_keys.items():
        t_layers, v_layers = set(), set()
        for key in keys:
            if m := _TEXT_LAYER.match(key):
                t_layers.add(int(m.group(1)))
            elif m := pattern.match(key):
                v_layers.add(int(m.group(1)))
        text[chunk * pp + stage], vision[chunk * pp + stage] = len(t_layers), len(v_layers)
    return text, vision
