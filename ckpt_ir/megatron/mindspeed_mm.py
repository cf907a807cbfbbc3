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

from ckpt_ir.errors import FormatError, UsageError, VerifyError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import Layout, vision_slots
from ckpt_ir.ir.names import NameTable, split_layer
from ckpt_ir.ir.roles import expected_shape, split_rule
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron import keys as M

if TYPE_CHECKING:
    from ckpt_ir.families import MegatronTower

TEXT = "text_decoder."
IMAGE = "image_encoder."
_TEXT_LAYER = re.compile(r"^" + re.escape(TEXT + M.LAYERS) + r"(\d+)\.")


def tower_names(spec: ModelSpec) -> MegatronTower:
    """The family's MindSpeed-MM names of its vision tower (``Tower.mindspeed``)."""
    from ckpt_ir.families import by_name

    names = by_name(spec.family).towers[0].mindspeed
    if names is None:
        raise UsageError(
            f"{setting('mm_keys', 'mindspeed')}: MindSpeed-MM has no Megatron layout of {spec.family}'s vision "
            f"tower; use {setting('mm_keys', 'bridge')}"
        )
    return names


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
    names_of = tower_names(spec)
    table, other = layer_table(vision, names_of), NameTable(names_of.keys)
    packs = {c: (k, parts) for k, parts in names_of.packed for c in parts}
    out: dict[tuple[int, int], list[tuple[str, tuple[str, ...], Stack | None]]] = defaultdict(list)
    for name in names:
        layer, rest = split_layer(name[len("vision.") :])
        if layer is not None and rest in packs:  # [a; b; c], each part split over TP by its role
            below, parts = packs[rest]
            if rest == parts[0]:
                stage, chunk, local = slots[layer]
                canon = tuple(f"vision.layers.{layer}.{p}" for p in parts)
                rows = [(c, ckpt.tensors[c].shards[0].shape[0]) for c in canon]
                out[(stage, chunk)].append((f"{names_of.layers}{local}.{below}", canon, Stack.of(rows)))
            continue
        if layer is not None:
            stage, chunk, local = slots[layer]
            key, place = table.from_canonical(f"layers.{local}.{rest}"), (stage, chunk)
        else:
            key = other.from_canonical(name)
            place = first if name.startswith(names_of.first) else last
        if key is None:
            raise VerifyError(
                f"{name}: MindSpeed-MM's layout has no key for this vision tensor; use "
                f"{setting('mm_keys', 'bridge')} (the tower in its HF form)"
            )
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
    names_of = tower_names(spec)
    table, other, pattern = layer_table(vision, names_of), NameTable(names_of.keys), _layer_pattern(names_of)
    packs = dict(names_of.packed)
    pieces: dict[str, dict[int, tuple[str, E.Expr]]] = defaultdict(dict)
    unknown: list[str] = []
    for key, places in found.items():
        for t, p, chunk, label, x in places:
            m = pattern.match(key)
            if m is not None and m.group(2) in packs:  # [a_r; b_r; c_r] on TP rank r
                g = layer_of.get((p, chunk, int(m.group(1))))
                if g is None:
                    raise FormatError(
                        f"{where}: {label} holds {key}, but the layer counts put no vision layer {m.group(1)} "
                        f"on stage {p} chunk {chunk}; the rank files do not belong together"
                    )
                for part_name, part in _unpack(key, x, packs[m.group(2)], g, spec, layout, label).items():
                    pieces[part_name][t] = (label, part)
                continue
            if m is None:
                name = other.to_canonical(key)
            else:
                canon = table.to_canonical(key)
                g = layer_of.get((p, chunk, int(m.group(1))))
                if canon is not None and g is None:
                    raise FormatError(
                        f"{where}: {label} holds {key}, but the layer counts put no vision layer {m.group(1)} "
                        f"on stage {p} chunk {chunk}; the rank files do not belong together"
                    )
                name = None if canon is None else f"vision.layers.{g}.{split_layer(canon)[1]}"
            if name is None:
                unknown.append(key)
                break
            pieces[name][t] = (label, x)
    tensors: dict[str, TensorNode] = {}
    copies: dict[str, list[tuple[str, E.Expr]]] = {}
    for name, shards in pieces.items():
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


def _unpack(
    key: str, x: E.Expr, parts: tuple[str, ...], layer: int, spec: ModelSpec, layout: Layout, label: str
) -> dict[str, E.Expr]:
    """A packed key's parts on one TP rank: each part's rows there (its role's shape, divided by the
    tower's TP size where the role is split)."""
    names = [f"vision.layers.{layer}.{p}" for p in parts]
    rows = []
    for name in names:
        shape = expected_shape(spec, layout, name)
        if shape is None:
            raise FormatError(
                f"{label}: {key} packs {name}, which this model does not have; check the HF config"
            )
        rows.append((name, shape[0] // (layout.vision_tp if split_rule(name, spec) else 1)))
    rule = Stack.of(rows)
    if x.shape[0] != rule.size:
        raise FormatError(
            f"{label}: {key} has {x.shape[0]} rows, but its parts take {rule.size} on a TP rank "
            f"({' + '.join(str(n) for _, n in rows)}); the rank files do not match the HF config"
        )
    return rule.split(x)


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
