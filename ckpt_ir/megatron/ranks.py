"""Which keys a Megatron rank file holds: for every (pipeline stage, virtual chunk) of a layout, its
state-dict keys in writing order and the canonical tensor(s) behind each, with the EP rank that owns
an expert's.  The torch backend writes rank files from it and the torch_dist frontend uses it to
order a dp_reshardable optimizer's flat buffers as the run registered its parameters."""

from __future__ import annotations

from collections import defaultdict

import attrs

from ckpt_ir.errors import LayoutError, VerifyError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.blocks import is_hybrid
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, gather_exprs, shard_expr
from ckpt_ir.ir.layout import expert_owner, layer_slots, text_ends
from ckpt_ir.ir.names import Split, expert_of, role_of, split_layer
from ckpt_ir.ir.rules import Stack, mla_rule
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron import multimodal


@attrs.frozen
class Part:
    """A key holding one part of a fused canonical tensor: with megatron-core's MLA modules
    (``--mla-keys mcore``) each down-projection is part ``name`` (``q`` / ``kv_a``) of the IR's
    ``attn.qkv_a`` by ``rule``, split over TP by ``split`` (None: whole on every rank)."""

    name: str
    rule: Stack
    split: Split | None


@attrs.frozen
class Entry:
    """One key of a rank file: its tensor(s) and, for experts, the owning EP rank."""

    key: str
    canon: tuple[str, ...]  # one canonical tensor, or a grouped-GEMM weight's local experts in order
    ep: int | None = None
    grouped: str | None = None  # "weight1" / "weight2"
    part: Part | None = None
    # a key packing several canonical tensors by this rule (keyed by their names): a vision tower
    # kept in its HF form (Megatron-Bridge's Qwen2.5-VL: attn.qkv = [q; k; v]), whole on every rank
    pack: Stack | None = None
    # a tensor (or pack) split over TP in the IR written whole on every rank (MindSpeed-MM's
    # GLM-4.1V tower attention: plain nn.Linear; MegatronTower.whole)
    whole: bool = False


def entry_expr(tensors: dict[str, TensorNode], entry: Entry, rank: int, tp: int) -> E.Expr:
    """What ``entry`` holds on TP rank ``rank`` of ``tp`` (a TP shard where its tensor is split)."""
    if entry.part is not None:  # a part of a tensor whole on every rank
        part = entry.part.rule.split(tensors[entry.canon[0]].shards[0])[entry.part.name]
        return shard_expr(part, entry.part.split, tp)[rank] if entry.part.split and tp > 1 else part
    nodes = [tensors[c] for c in entry.canon]
    if entry.whole:
        exprs = [gather_exprs(t.shards, t.split) if t.split is not None else t.shards[0] for t in nodes]
    else:
        exprs = [t.shards[rank] if t.tp > 1 else t.shards[0] for t in nodes]
    if entry.pack is not None:
        return entry.pack.fuse(dict(zip(entry.canon, exprs)))
    return M.group_experts(entry.grouped, exprs) if entry.grouped else exprs[0]


def rank_content(
    ckpt: Checkpoint, mtp_names: M.MtpNames = M.MTP_MINDSPEED
) -> tuple[dict[tuple[int, int], list[Entry]], dict]:
    """The keys of every (stage, chunk) of the Megatron layout ``ckpt.layout``, in writing order,
    and where each model layer sits; multi-token prediction named by ``mtp_names``."""
    spec, layout = ckpt.spec, ckpt.layout
    slots = layer_slots(spec, layout)
    where = {s.real: s for s in slots if s.real is not None}
    mcore_mla = spec.mla and layout.mla_keys == "mcore"
    table = M.spec_layer_table(layout.norm_names, spec, layout.mla_keys)
    order = M.role_order(spec, layout.mla_keys)
    # megatron-core's MLA: a key per down-projection, each a part of the IR's attn.qkv_a
    parts = (
        {
            "layers.{i}." + c: Part(
                p, mla_rule(spec), M.mcore_split(f"layers.0.{c}", layout.norm_names, spec)
            )
            for p, c in M.mla_down_parts(spec).items()
        }
        if mcore_mla
        else {}
    )
    for role, part in parts.items():
        rows = part.rule.sizes()[part.name]
        if part.split is not None and rows % layout.tp:
            key = table.from_canonical(role.format(i=0))
            raise LayoutError(
                f"layout: megatron-core's local layer spec splits MLA's {key} ({rows} rows) over TP, and "
                f"{rows} rows do not split over tensor parallel size {layout.tp}; choose another TP or "
                f"{setting('norm_names', 'te')} (Transformer Engine's spec keeps it whole)"
            )
    content: dict[tuple[int, int], list[Entry]] = defaultdict(list)
    by_layer: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in ckpt.tensors:
        layer, rest = split_layer(name)
        if layer is not None:
            for role in parts if parts and rest == "attn.qkv_a.weight" else (role_of(name),):
                by_layer[layer][role].append(name)
    first, last = text_ends(spec, layout)
    if "embed.weight" in ckpt.tensors:
        content[first].append(Entry("embedding.word_embeddings.weight", ("embed.weight",)))
    content[first].extend(Entry(key, (canon,)) for key, canon in M.PRE_LAYERS[1:] if canon in ckpt.tensors)
    known = (
        set(order)
        | {f"layers.{{i}}.{c}" for _, c in (*M.MTP_KEYS, *M.MTP_HC_HEAD)}
        | {r[: -len(".weight")] + f".lora_{w}.weight" for r in order for w in "ab"}
        | {"layers.{i}.mtp.embed.weight", "layers.{i}.mtp.head.weight"}
    )
    fixed = M.fixed_roles()
    mtp_entries: list[Entry] = []
    for layer in sorted(by_layer):
        roles = by_layer[layer]
        unknown = set(roles) - known - set(fixed)  # fixed values: not stored (M.fixed_checks)
        if unknown:
            raise VerifyError(f"layer {layer}: no Megatron name for {sorted(unknown)}")
        mtp = layer >= spec.num_layers
        local = layer - spec.num_layers if mtp else where[layer].local
        entries = mtp_entries if mtp else content[(where[layer].stage, where[layer].chunk)]
        start = len(entries)
        expert_roles = [r for r in order if "{e}" in r]
        experts = {e for r in expert_roles for n in roles.get(r, ()) if (e := expert_of(n)) is not None}
        expert_entries: list[Entry] = []  # expert by expert, each expert's roles in table order
        for expert in sorted(experts):
            for role in expert_roles:
                canon = role.format(i=layer, e=expert)
                if canon in ckpt.tensors:
                    expert_entries.extend(_entries(ckpt, role, canon, local, table, layer))
        # the experts come last, but in a layer made of sublayers where the table has them
        inline = bool(spec.sublayers(layer)) and bool(expert_roles)
        for role in order:
            if "{e}" not in role:
                for canon in roles.get(role, ()):
                    entries.extend(_entries(ckpt, role, canon, local, table, layer, parts.get(role)))
            elif inline and role == expert_roles[0]:
                entries.extend(expert_entries)
        if not inline:
            entries.extend(expert_entries)
        if layout.grouped_gemm and spec.is_moe_layer(layer):
            _group_experts(ckpt, entries, local)
        if mtp:  # mtp.layers.k: enorm, hnorm, eh_proj, (embedding), its transformer layer, final norm
            prefix = mtp_names.layer.format(k=local)
            body = [
                attrs.evolve(e, key=prefix + e.key[len(f"decoder.layers.{local}.") :])
                for e in entries[start:]
            ]
            head = [Entry(m.format(k=local), (f"layers.{layer}.{c}",)) for m, c in M.MTP_HEAD]
            if layout.pp > 1 and not mtp_names.megatron_order:
                head.append(Entry(M.EMBEDDING, (f"layers.{layer}.mtp.embed.weight",)))
            tail = [Entry(mtp_names.norm.format(k=local), (f"layers.{layer}.mtp.norm.weight",))]
            tail += [  # DeepSeek-V4: the MTP layer's hyper-connection head
                Entry(m.format(k=local), (f"layers.{layer}.{c}",))
                for m, c in M.MTP_HC_HEAD
                if f"layers.{layer}.{c}" in ckpt.tensors
            ]
            entries[start:] = head + body + tail
    if mtp_entries and not mtp_names.megatron_order:  # MindSpeed-LLM: after the stage's embedding
        at = 1 if content[last] and content[last][0].key == M.EMBEDDING else 0
        content[last][at:at] = mtp_entries
    final_norm = (
        mtp_names.final_norm
        if spec.mtp_layers or spec.hc_mult  # MindSpeed-LLM's deepseek4: with or without MTP
        else M.HYBRID_FINAL_NORM
        if is_hybrid(spec)
        else "decoder.final_layernorm.weight"
    )
    content[last].append(Entry(final_norm, ("final_norm.weight",)))
    if "final_norm.bias" in ckpt.tensors:
        content[last].append(Entry(final_norm[: -len("weight")] + "bias", ("final_norm.bias",)))
    if mtp_entries and mtp_names.megatron_order:  # GPTModel: embedding, decoder, mtp, output_layer
        if layout.pp > 1:  # the last stage builds its own embedding for MTP
            content[last].insert(0, Entry(M.EMBEDDING, (f"layers.{spec.num_layers}.mtp.embed.weight",)))
        content[last].extend(mtp_entries)
    if "lm_head.weight" in ckpt.tensors:
        content[last].append(Entry("output_layer.weight", ("lm_head.weight",)))
    if "lm_head.bias" in ckpt.tensors:
        content[last].append(Entry("output_layer.bias", ("lm_head.bias",)))
    elif spec.tied_embeddings and layout.pp > 1:
        # Megatron keeps a copy of the tied embedding on the last stage when PP > 1
        content[last].append(Entry("output_layer.weight", ("embed.weight",)))
    content[last].extend(Entry(key, (canon,)) for key, canon in M.HC_HEAD if canon in ckpt.tensors)
    if spec.vision is not None:  # a vision-language model: its modules' prefixes, the tower's keys
        prefix = multimodal.TEXT_PREFIX[layout.mm_keys]
        for entries in list(content.values()):
            entries[:] = [attrs.evolve(e, key=prefix + e.key) for e in entries]
        for place, keys in multimodal.tower_keys(ckpt).items():
            content[place][:0] = [
                Entry(
                    key,
                    canon,
                    pack=pack,
                    part=Part(canon[0], *split) if split else None,
                    whole=multimodal.written_whole(ckpt, key),
                )
                for key, canon, pack in keys
                for split in [multimodal.bridge_split(ckpt, key, canon)]
            ]
    return content, where


def _entries(
    ckpt: Checkpoint, role: str, canon: str, local: int, names, layer: int, part: Part | None = None
) -> list[Entry]:
    expert = expert_of(canon)
    ep = None
    fill = {"i": str(local)}
    if expert is not None:
        ep, j = expert_owner(ckpt.spec, ckpt.layout, expert)
        fill["e"] = str(j)
    key = names.from_canonical(role.format(**fill))
    lay = ckpt.layout
    if ckpt.spec.is_moe_layer(layer) and role in ("layers.{i}.mlp_norm.weight", "layers.{i}.mlp_norm.bias"):
        # MoE: no fused pre-MLP norm (the family's key where it has one: Gemma 4's MoE model)
        local_names = (
            M.spec_layer_table("local", ckpt.spec, lay.mla_keys) if M.key_variant(ckpt.spec) else None
        )
        key = (local_names or M.layer_table("local")).from_canonical(role.format(**fill))
    if role == "layers.{i}.attn_norm.weight" and lay.norm_names != "local" and lay.gdn_keys == "mcore":
        if ckpt.spec.has_block(layer, "gdn"):  # megatron-core's GatedDeltaNet fuses it into in_proj
            key = f"decoder.layers.{local}.{M.GDN_TE_NORM}"
    out = [Entry(key, (canon,), ep, part=part)]
    naming = M.LORA_NAMINGS[lay.lora_keys]
    for which in ("a", "b"):  # LoRA adapters right after their base weight
        lora = canon[: -len(".weight")] + f".lora_{which}.weight"
        if lora in ckpt.tensors:
            out.append(
                Entry(
                    M.lora_key(key, which, lay.lora_keys),
                    (lora,),
                    ep,
                    part=_lora_part(ckpt, lora, ep, naming),
                )
            )
    return out


def _lora_part(ckpt: Checkpoint, lora: str, ep: int | None, naming: M.LoraNaming) -> Part | None:
    """How a naming that splits over TP a LoRA factor the IR keeps whole (Megatron-Bridge's,
    ``LoraNaming.whole_dim``) writes it: the whole factor as one part, split on that dim."""
    dim = naming.whole_dim
    n = ckpt.layout.tp if ep is None else ckpt.layout.expert_tp
    if dim is None or n == 1 or ckpt.tensors[lora].split is not None:
        return None
    return Part(lora, Stack.of([(lora, ckpt.tensors[lora].shape[dim])], dim), Split(dim))


def _group_experts(ckpt: Checkpoint, entries: list[Entry], local: int) -> None:
    """Replace this layer's per-expert entries by one weight1/weight2 pair per EP rank."""
    per_ep: dict[tuple[int, str], list[str]] = defaultdict(list)
    first = None
    kept = []
    for e in entries:
        if e.ep is None or f"decoder.layers.{local}.mlp.experts.local_experts." not in e.key:
            kept.append(e)
            continue
        if first is None:
            first = len(kept)
        if e.key.endswith(".bias"):
            raise VerifyError(
                f"{e.key}: the grouped-GEMM expert format (weight1/weight2) has no expert biases; "
                f"convert without {setting('grouped_gemm')} (per-expert local_experts keys)"
            )
        kind = "weight1" if e.key.endswith("linear_fc1.weight") else "weight2"
        if ".lora_" in e.key:
            raise VerifyError("grouped GEMM output with unmerged expert LoRA is not supported; merge first")
        per_ep[(e.ep, kind)].extend(e.canon)
    grouped = [
        Entry(f"decoder.layers.{local}.mlp.experts.{kind}", tuple(canons), ep, kind)
        for (ep, kind), canons in sorted(per_ep.items())
    ]
    if first is not None:
        kept[first:first] = grouped
    entries[:] = kept
