"""Layout: how the tensors of a checkpoint are arranged (format, parallel sizes, fusion, naming).

Tensor parallelism shards individual tensors (see :mod:`ckpt_ir.ir.names` for which dim).
Pipeline placement (PP, a per-stage layer list, VPP chunks, no-op layers) never changes a tensor:
it only decides which rank file and which local layer number a layer's tensors are written under,
and :func:`layer_slots` computes that from the Layout alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from ckpt_ir.errors import LayoutError, setting
from ckpt_ir.ir.blocks import is_hybrid
from ckpt_ir.ir.spec import ModelSpec

FORMATS = ("hf", "mcore")
NORM_NAMES = ("local", "te", "te-input")
# whose Megatron modules multi-latent attention (and its MTP layers) are written with: MindSpeed-LLM's
# (one fused linear_qkv for the two down-projections) or megatron-core's own (Megatron-LM's)
MLA_KEYS = ("mindspeed", "mcore")
# whose Megatron modules gated-delta-net models (Qwen3-Next, Qwen3.5) are written with: MindSpeed-LLM's
# qwen3-next "mix" (HF's packed in_proj_qkvz / in_proj_ba, unfused gated q_proj / k_proj / v_proj,
# whole tensors: TP 1 only) or megatron-core's own (GatedDeltaNet in_proj, gated linear_qkv, any TP)
GDN_KEYS = ("mindspeed", "mcore")
# whose names (and TP splits) unmerged Megatron LoRA factors take: MindSpeed-LLM's
# (X.lora_A.default.weight) or Megatron-Bridge's (X.adapter.linear_in.weight);
# ckpt_ir.megatron.keys.LORA_NAMINGS
LORA_KEYS = ("mindspeed", "bridge")


def has_gdn(spec: ModelSpec) -> bool:
    """Whether any layer holds a gated-delta-net mixer."""
    return any(spec.has_block(i, "gdn") for i in range(spec.num_layers))


def has_gdn_modules(spec: ModelSpec) -> bool:
    """Whether the model has gated-delta-net mixers or gated attention: the modules whose Megatron
    form ``Layout.gdn_keys`` chooses (MindSpeed-LLM's qwen3-next layout or megatron-core's)."""
    return has_gdn(spec) or spec.attn_gate


# a multi-module model's Megatron names: Megatron-Bridge's (language_model.*, the vision tower as
# its bridge keeps it) or MindSpeed-MM's (text_decoder.*, image_encoder.*), in its default modules
# or its "canonical" ones (enable_canonical_hf_struct: the language model's q / k / v and gate / up
# apart, the tower's qkv kept [q; k; v] and its gate / up apart; Layout.fused_qkv / fused_gate_up
# False, the tower's names Tower.mindspeed_canonical)
MM_KEYS = ("bridge", "mindspeed", "mindspeed-canonical")
MINDSPEED_MM_KEYS = ("mindspeed", "mindspeed-canonical")  # MindSpeed-MM's two namings


def _layer_counts(counts: Iterable[int] | None) -> tuple[int, ...] | None:
    return None if counts is None else tuple(counts)


@attrs.frozen(kw_only=True)
class Layout:
    """``format`` names where the tensors were lifted from (hf or mcore); what is written is the
    target's business, checked against the rest of the layout."""

    format: str = attrs.field(validator=attrs.validators.in_(FORMATS))
    tp: int = 1
    pp: int = 1
    vpp_layers: int | None = None  # layers per virtual pipeline stage (Megatron's Lv)
    num_layer_list: tuple[int, ...] | None = attrs.field(default=None, converter=_layer_counts)
    noop_layers: tuple[int, ...] = attrs.field(default=(), converter=lambda v: tuple(sorted(v)))
    padded_vocab: int | None = None  # rows of embedding / output layer when padded
    fused_qkv: bool = False
    fused_gate_up: bool = False
    norm_names: str = attrs.field(default="local", validator=attrs.validators.in_(NORM_NAMES))
    mla_keys: str = attrs.field(default="mindspeed", validator=attrs.validators.in_(MLA_KEYS))
    gdn_keys: str = attrs.field(default="mindspeed", validator=attrs.validators.in_(GDN_KEYS))
    lora_keys: str = attrs.field(default="mindspeed", validator=attrs.validators.in_(LORA_KEYS))
    ep: int = 1  # expert parallel size: expert e lives on EP rank e // (E / ep)
    etp: int | None = None  # expert tensor parallel size: None = tp (experts split like dense MLPs), or 1
    grouped_gemm: bool = False  # experts stored as Megatron's grouped-GEMM weight1/weight2
    # a vision-language model's vision stack (ModelSpec.vision): its TP size (1: whole on every TP
    # rank, as Megatron-Bridge keeps Qwen2.5-VL's tower), whether its qkv and gate/up are fused
    # (Megatron's modules: MindSpeed-MM), its layers per pipeline stage (None: all on stage 0);
    # and whose Megatron names the model's modules take (MM_KEYS)
    vision_tp: int = 1
    vision_fused: bool = False
    vision_layer_list: tuple[int, ...] | None = attrs.field(default=None, converter=_layer_counts)
    mm_keys: str = attrs.field(default="bridge", validator=attrs.validators.in_(MM_KEYS))

    def __attrs_post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"layout: {name} must be >= 1, got {getattr(self, name)}")
        if self.vpp_layers is not None and self.vpp_layers < 1:
            raise LayoutError(f"layout: {setting('vpp_layers')} must be >= 1, got {self.vpp_layers}")
        if self.vpp_layers is not None and self.num_layer_list is not None:
            raise LayoutError(
                f"layout: a virtual pipeline ({setting('vpp_layers')}) and {setting('num_layer_list')} "
                f"cannot be combined"
            )
        if self.num_layer_list is not None and self.noop_layers:
            raise LayoutError(
                f"layout: {setting('noop_layers')} and {setting('num_layer_list')} cannot be combined "
                f"(Megatron rejects it)"
            )
        # MindSpeed-MM's per-module lists: a count per stage of each virtual chunk, stages with none
        mm = self.mm_keys in MINDSPEED_MM_KEYS
        if self.num_layer_list is not None:
            if len(self.num_layer_list) != self.pp and not (mm and len(self.num_layer_list) % self.pp == 0):
                raise LayoutError(
                    f"layout: {setting('num_layer_list')} has {len(self.num_layer_list)} entries but "
                    f"pipeline parallel size is {self.pp}; give one layer count per stage"
                )
            if any(n < (0 if mm else 1) for n in self.num_layer_list):
                raise LayoutError(
                    f"layout: {setting('num_layer_list', self.num_layer_list)} has a stage with no layers"
                )
        if self.vpp_layers is not None and self.pp < 2:
            raise LayoutError(
                f"layout: a virtual pipeline ({setting('vpp_layers')}) needs pipeline parallel size >= 2"
            )
        if self.ep < 1:
            raise LayoutError(f"layout: expert parallel size must be >= 1, got {self.ep}")
        if self.etp is not None and self.etp not in (1, self.tp):
            raise LayoutError(
                f"layout: expert tensor parallel size must be 1 or the TP size {self.tp}, got {self.etp}"
            )
        if self.mla_keys == "mcore" and self.norm_names == "te-input":
            raise LayoutError(
                f"layout: {setting('norm_names', 'te-input')} (MindSpeed-LLM's input norm fused into "
                f"linear_qkv) has no place in megatron-core's MLA modules ({setting('mla_keys', 'mcore')}); "
                f"use {setting('norm_names', 'local')} or {setting('norm_names', 'te')}"
            )
        if any(i < 0 for i in self.noop_layers) or len(set(self.noop_layers)) != len(self.noop_layers):
            raise LayoutError(
                f"layout: {setting('noop_layers', self.noop_layers)} must be distinct non-negative indices"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def for_stack(self, stack: str | None) -> Layout:
        """The layout of one stack's tensors (None: the language model's, this layout): a vision
        tower is never padded, has no experts, and has its own TP size and fusion."""
        if stack is None:
            return self
        return Layout(
            format=self.format,
            tp=self.vision_tp,
            fused_qkv=self.vision_fused,
            fused_gate_up=self.vision_fused,
            norm_names=self.norm_names,
        )

    @property
    def kind(self) -> str:
        """The format whose layout this is: ``hf`` (whole, unfused, unpadded tensors, no no-op
        layers, as an HF checkpoint holds them), else ``mcore``; ``format`` says where the tensors
        were lifted from, so an HF model resharded in memory is of kind ``mcore``."""
        return (
            "hf"
            if attrs.evolve(
                self, format="hf", mla_keys="mindspeed", gdn_keys="mindspeed", lora_keys="mindspeed"
            )
            == Layout(format="hf")
            else "mcore"
        )

    def describe(self) -> str:
        """One line: the kind, its parallel sizes and fusions, and ``(from FORMAT)`` when the
        tensors were lifted from the other format."""
        parts = [self.kind, f"tp={self.tp}", f"pp={self.pp}"]
        if self.vpp_layers:
            parts.append(f"vpp_layers={self.vpp_layers}")
        if self.num_layer_list:
            parts.append("num_layer_list=" + ",".join(map(str, self.num_layer_list)))
        if self.noop_layers:
            parts.append("noop=" + ",".join(map(str, self.noop_layers)))
        if self.padded_vocab:
            parts.append(f"padded_vocab={self.padded_vocab}")
        parts.append("qkv=" + ("fused" if self.fused_qkv else "split"))
        parts.append("gate_up=" + ("fused" if self.fused_gate_up else "split"))
        if self.ep > 1 or self.etp is not None:
            parts.append(f"ep={self.ep} etp={self.expert_tp}")
        if self.grouped_gemm:
            parts.append("grouped_gemm")
        if self.kind == "mcore":
            parts.append(f"norms={self.norm_names}")
        if self.vision_tp > 1 or self.vision_fused or self.vision_layer_list or self.mm_keys != "bridge":
            parts.append(f"vision_tp={self.vision_tp}" + (" vision=fused" if self.vision_fused else ""))
            if self.vision_layer_list:
                parts.append("vision_layer_list=" + ",".join(map(str, self.vision_layer_list)))
            parts.append(f"mm_keys={self.mm_keys}")
        if self.mla_keys != "mindspeed":
            parts.append(f"mla_keys={self.mla_keys}")
        if self.gdn_keys != "mindspeed":
            parts.append(f"gdn_keys={self.gdn_keys}")
        if self.lora_keys != "mindspeed":
            parts.append(f"lora_keys={self.lora_keys}")
        if self.kind != self.format:
            parts.append(f"(from {self.format})")
        return " ".join(parts)


@attrs.frozen
class LayerSlot:
    """Where one Megatron layer lives: ``real`` is the model layer index (None for a no-op layer)."""

    mcore_index: int
    real: int | None
    stage: int
    chunk: int
    local: int


def mcore_num_layers(spec: ModelSpec, layout: Layout) -> int:
    return spec.num_layers + len(layout.noop_layers)


def num_chunks(spec: ModelSpec, layout: Layout) -> int:
    if layout.num_layer_list is not None and len(layout.num_layer_list) > layout.pp:
        return len(layout.num_layer_list) // layout.pp  # MindSpeed-MM's lists: one per chunk
    if layout.vpp_layers is None:
        return 1
    return mcore_num_layers(spec, layout) // (layout.pp * layout.vpp_layers)


def validate(spec: ModelSpec, layout: Layout) -> None:
    """Every check that needs both spec and layout; raises LayoutError with a one-line reason."""
    total = mcore_num_layers(spec, layout)
    parallel_mixers = is_hybrid(spec) and any(len(spec.blocks(i)) > 1 for i in range(spec.num_layers))
    even = not (layout.vpp_layers or layout.noop_layers or spec.num_layers % layout.pp) and (
        layout.num_layer_list is None or len(set(layout.num_layer_list)) == 1
    )
    if parallel_mixers and not even:  # Falcon-H1: a layer of Mamba and attention side by side
        raise LayoutError(
            f"layout: {spec.family}'s Megatron form, Megatron-Bridge's FalconH1 model "
            f"(falconh1_block.py), splits its {spec.num_layers} layers evenly over the pipeline "
            f"stages, with no virtual stages or no-op layers; use a {setting('pp')} that divides "
            f"{spec.num_layers}, without {setting('num_layer_list')}, {setting('vpp_layers')} or "
            f"{setting('noop_layers')}"
        )
    if layout.noop_layers and is_hybrid(spec):
        raise LayoutError(
            f"layout: megatron-core's MambaModel, which {spec.family} converts to, has no no-op layers "
            f"(its hybrid pattern names every layer); drop {setting('noop_layers')} (PP with "
            f"{setting('num_layer_list')} works)"
        )
    if layout.vpp_layers and is_hybrid(spec):
        raise LayoutError(
            f"layout: megatron-core's MambaModel, which {spec.family} converts to, builds no virtual "
            f"pipeline stages (ssm/mamba_block.py); drop {setting('vpp_layers')} (PP with "
            f"{setting('num_layer_list')} works)"
        )
    if layout.tp > 1 and has_gdn_modules(spec):
        if layout.gdn_keys == "mindspeed":
            raise LayoutError(
                f"layout: MindSpeed-LLM's {spec.family} layout (in_proj_qkvz / in_proj_ba, q_proj / k_proj "
                f"/ v_proj, whole on every rank) converts only with tensor parallel size 1; use "
                f"{setting('gdn_keys', 'mcore')} (megatron-core's GatedDeltaNet) or {setting('tp', 1)}"
            )
        for heads, what in ((spec.linear_k_heads, "key"), (spec.linear_v_heads, "value")):
            if has_gdn(spec) and heads % layout.tp:
                raise LayoutError(
                    f"layout: {heads} gated-delta-net {what} heads are not divisible by tensor parallel "
                    f"size {layout.tp}; choose a TP that divides linear_num_{what}_heads"
                )
    if layout.tp > 1:
        layer_heads = {spec.attn_heads(i) for i in range(spec.total_layers) if spec.has_attention(i)}
        for n in sorted(layer_heads | {spec.num_heads}):
            if n % layout.tp:
                raise LayoutError(
                    f"layout: {n} attention heads are not divisible by tensor parallel "
                    f"size {layout.tp}; choose a TP that divides the head count"
                )
        groups = {spec.attn_kv_heads(i) for i in range(spec.total_layers) if spec.has_attention(i)}
        for g in sorted(groups | {spec.num_kv_heads}):
            if g % layout.tp:
                raise LayoutError(
                    f"layout: {g} query groups (KV heads) are not divisible by tensor "
                    f"parallel size {layout.tp}; choose a TP that divides the KV head count"
                )
        if spec.mqa_o_groups % layout.tp:  # DeepSeek-V4's wo_a: each rank holds whole groups of heads
            raise LayoutError(
                f"layout: {spec.mqa_o_groups} output groups (o_groups) are not divisible by tensor "
                f"parallel size {layout.tp}; choose a TP that divides them"
            )
        has_dense_mlp = any(spec.has_block(i, "mlp") for i in range(spec.total_layers))
        if any(spec.has_block(i, "mamba") for i in range(spec.num_layers)) and (
            spec.mamba_groups % layout.tp or spec.mamba_heads % layout.tp
        ):
            raise LayoutError(
                f"layout: the Mamba mixers' {spec.mamba_groups} B/C groups and {spec.mamba_heads} heads "
                f"must both divide by tensor parallel size {layout.tp} (megatron-core's MambaMixer keeps "
                f"whole groups on a rank); choose a TP that divides both"
            )
        # the mixers ckpt-ir names in Megatron itself split by channels (short_conv, mamba1) or heads
        own = {"short_conv": ("hidden size", spec.hidden_size), "kda": ("heads", spec.kda_heads)}
        own["mamba1"] = ("inner width", spec.mamba1_inner)
        for block, (what, n) in own.items():
            if n % layout.tp and any(spec.has_block(i, block) for i in range(spec.num_layers)):
                raise LayoutError(
                    f"layout: the {block} layers' {what} {n} is not divisible by tensor parallel size "
                    f"{layout.tp}; choose a TP that divides it"
                )
        if has_dense_mlp and spec.ffn_hidden_size % layout.tp:
            raise LayoutError(
                f"layout: ffn hidden size {spec.ffn_hidden_size} is not divisible by tensor "
                f"parallel size {layout.tp}"
            )
        rows = layout.padded_vocab or spec.vocab_size
        if rows % layout.tp:
            raise LayoutError(
                f"layout: vocabulary of {rows} rows does not split evenly over tensor parallel size "
                f"{layout.tp}; pass {setting('vocab_divisible_by')} to pad it"
            )
    if (layout.ep > 1 or layout.grouped_gemm) and not spec.num_experts:
        raise LayoutError("layout: expert parallelism / grouped GEMM need a mixture-of-experts model")
    if spec.num_experts:
        if spec.num_experts % layout.ep:
            raise LayoutError(
                f"layout: {spec.num_experts} experts are not divisible by expert parallel size "
                f"{layout.ep}; choose an EP that divides the expert count"
            )
        etp = layout.expert_tp
        if etp > 1 and spec.moe_ffn_hidden_size % etp:
            raise LayoutError(
                f"layout: expert ffn size {spec.moe_ffn_hidden_size} is not divisible by expert "
                f"tensor parallel size {etp}"
            )
        if etp > 1 and spec.expert_bias:  # megatron-core asserts "Bias in Moe is only supported when ETP==1"
            raise LayoutError(
                f"layout: megatron-core supports expert biases (gpt-oss) only with expert tensor "
                f"parallel size 1, got {etp}; pass {setting('etp', 1)}"
            )
        if layout.tp > 1 and spec.shared_ffn_hidden_size % layout.tp:
            raise LayoutError(
                f"layout: shared expert ffn size {spec.shared_ffn_hidden_size} is not divisible by "
                f"tensor parallel size {layout.tp}"
            )
    _validate_vision(spec, layout)
    if layout.padded_vocab is not None and layout.padded_vocab < spec.vocab_size:
        raise LayoutError(
            f"layout: padded vocab {layout.padded_vocab} is smaller than the vocabulary {spec.vocab_size}"
        )
    bad = [i for i in layout.noop_layers if i >= total]
    if bad:
        raise LayoutError(
            f"layout: no-op layer indices {bad} are outside the {total} Megatron layers "
            f"({spec.num_layers} real + {len(layout.noop_layers)} no-op)"
        )
    if layout.num_layer_list is not None:
        if sum(layout.num_layer_list) != total:
            raise LayoutError(
                f"layout: {setting('num_layer_list', layout.num_layer_list)} sums to "
                f"{sum(layout.num_layer_list)} but the model has {total} layers"
            )
    elif layout.vpp_layers is not None:
        if total % (layout.pp * layout.vpp_layers):
            raise LayoutError(
                f"layout: {total} layers do not split into pipeline size {layout.pp} x "
                f"{layout.vpp_layers} layers per virtual stage"
            )
    elif total % layout.pp:
        raise LayoutError(
            f"layout: {total} layers do not split evenly over pipeline parallel size {layout.pp}; "
            f"pass {setting('num_layer_list')} to give each stage its count"
        )


def _validate_vision(spec: ModelSpec, layout: Layout) -> None:
    """A vision stack's TP size must divide its heads and widths (whole heads on a rank), and its
    pipeline layer list must place its layers."""
    vision = spec.vision
    if vision is None:
        if layout.vision_tp > 1 or layout.vision_fused or layout.vision_layer_list:
            raise LayoutError(f"layout: {spec.family} has no vision tower; its vision settings do not apply")
        return
    t = layout.vision_tp
    if t not in (1, layout.tp):
        raise LayoutError(
            f"layout: the vision tower's tensor parallel size {t} must be 1 or the TP size {layout.tp}"
        )
    if t > 1:
        sizes = {"heads": vision.num_heads, "MLP width": vision.ffn_hidden_size}
        if vision.merger_size:
            sizes["merger width"] = vision.merger_hidden
        for what, n in sizes.items():
            if n % t:
                raise LayoutError(
                    f"layout: the vision tower's {what} {n} is not divisible by its tensor parallel size "
                    f"{t}; choose a TP that divides it"
                )
    if layout.vision_layer_list is not None:
        counts, places = layout.vision_layer_list, layout.pp * num_chunks(spec, layout)
        if len(counts) != places or sum(counts) != vision.num_layers or any(n < 0 for n in counts):
            raise LayoutError(
                f"layout: vision layer list {','.join(map(str, counts))} must give each of the {places} "
                f"pipeline places ({layout.pp} stages x virtual chunks) a count, {vision.num_layers} vision "
                f"layers in all"
            )


def vision_slots(spec: ModelSpec, layout: Layout) -> list[tuple[int, int, int]]:
    """(stage, chunk, local index) of each vision layer: the layer list's stages in order (chunk
    after chunk for a virtual pipeline), all on stage 0 without one."""
    vision = spec.vision
    assert vision is not None
    counts = layout.vision_layer_list or (vision.num_layers,)
    out: list[tuple[int, int, int]] = []
    for flat, n in enumerate(counts):
        chunk, stage = divmod(flat, layout.pp) if layout.vision_layer_list else (0, 0)
        out.extend((stage, chunk, local) for local in range(n))
    return out


def expert_rank_files(layout: Layout) -> list[tuple[int, int]]:
    """The (tp, ep) rank directories written for each pipeline stage.  With expert TP = 1 and
    TP > 1, Megatron's expert grid reuses the TP ranks, so only the pairs some process owns exist:
    (t, t % EP) when EP divides TP, else (e % TP, e) when TP divides EP."""
    tp, ep = layout.tp, layout.ep
    if layout.expert_tp == tp or tp == 1 or ep == 1:
        return [(t, e) for e in range(ep) for t in range(tp)]
    if tp % ep == 0:
        return [(t, t % ep) for t in range(tp)]
    if ep % tp == 0:
        return [(e % tp, e) for e in range(ep)]
    raise LayoutError(
        f"layout: with expert tensor parallel size 1, TP {tp} and EP {ep} must divide one another"
    )


def expert_owner(spec: ModelSpec, layout: Layout, expert: int) -> tuple[int, int]:
    """Global expert -> (EP rank, local index)."""
    per = spec.num_experts // layout.ep
    return divmod(expert, per)


def layer_slots(spec: ModelSpec, layout: Layout) -> list[LayerSlot]:
    """All Megatron layer positions in global order, with their stage/chunk/local index.

    Real layers fill the non-no-op positions in order; local indices count every position of the
    chunk (no-op ones included), so a chunk's stored layer numbers have gaps where no-ops sit.
    """
    validate(spec, layout)
    total = mcore_num_layers(spec, layout)
    noop = set(layout.noop_layers)
    where: list[tuple[int, int, int]] = [(0, 0, 0)] * total  # stage, chunk, local
    if layout.vpp_layers is not None:
        lv = layout.vpp_layers
        for g in range(total):
            block, local = divmod(g, lv)
            chunk, stage = divmod(block, layout.pp)
            where[g] = (stage, chunk, local)
    else:
        counts = layout.num_layer_list or (total // layout.pp,) * layout.pp
        g = 0
        for flat, n in enumerate(counts):  # stage after stage (chunk after chunk: MindSpeed-MM's lists)
            chunk, stage = divmod(flat, layout.pp)
            for local in range(n):
                where[g] = (stage, chunk, local)
                g += 1
    slots, real = [], 0
    for g in range(total):
        stage, chunk, local = where[g]
        if g in noop:
            slots.append(LayerSlot(g, None, stage, chunk, local))
        else:
            slots.append(LayerSlot(g, real, stage, chunk, local))
            real += 1
    return slots


def text_ends(spec: ModelSpec, layout: Layout) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (stage, chunk) holding the language model's embedding and the one holding its final
    norm and output layer: the first and last pipeline places (MindSpeed-MM's lists: the first
    and last with layers, chunk after chunk; its converter misplaces them when the first has
    none)."""
    counts = layout.num_layer_list
    chunks = num_chunks(spec, layout)
    if counts is None or all(counts):
        return (0, 0), (layout.pp - 1, chunks - 1)
    filled = [f for f, n in enumerate(counts) if n]
    (c0, s0), (c1, s1) = divmod(filled[0], layout.pp), divmod(filled[-1], layout.pp)
    return (s0, c0), (s1, c1)


def padded_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return math.ceil(vocab / multiple) * multiple
