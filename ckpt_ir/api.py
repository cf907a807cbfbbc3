"""Python API: one conversion driver, and the steps it is made of.

    import ckpt_ir.api as ck
    ck.convert("Qwen2.5-0.5B", "qwen-tp2pp2", ck.Target(to="mcore", tp=2, pp=2))

or step by step (load, derive or parse a pipeline, run it, plan, write):

    src = ck.load("Qwen2.5-0.5B")
    target = ck.Target(to="mcore", tp=2, pp=2)
    out = ck.run(src, ck.derive_pipeline(src, target))
    ck.save(out, "qwen-tp2pp2", target)

Every change to the IR between the source and the output is a pass of the pipeline, so the
pipeline printed by ``convert --print-pipeline`` is exactly what runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ckpt_ir.backends.plan import Plan
from ckpt_ir.errors import UsageError, setting
from ckpt_ir.frontends import load
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.layout import (
    GDN_KEYS,
    LORA_KEYS,
    MINDSPEED_MM_KEYS,
    MLA_KEYS,
    MM_KEYS,
    Layout,
    has_gdn_modules,
)
from ckpt_ir.passes.carry import DropOptimizerState, RenameLora, RenameMla, RenameMm, RenameNorms
from ckpt_ir.passes.cast import CastPass, DequantizePass
from ckpt_ir.passes.fusion import FuseGateUp, FuseQKV, FuseVision, UnfuseGateUp, UnfuseQKV, UnfuseVision
from ckpt_ir.passes.layers import DropMtp
from ckpt_ir.passes.lora import AttachLora, LoraMerge
from ckpt_ir.passes.manager import (
    GATHERED,
    NO_NOOP,
    UNFUSED,
    UNPADDED,
    FunctionPass,
    Instrumentation,
    Pass,
    PassManager,
    Pipeline,
    parse_pipeline,
)
from ckpt_ir.passes.parallel import (
    Gather,
    GroupExperts,
    InsertNoopLayers,
    RemoveNoopLayers,
    Shard,
    UngroupExperts,
)
from ckpt_ir.passes.vocab import PadVocab, UnpadVocab, padded_size, padding_rows

__all__ = [  # in the order of the API reference (docs/api.md)
    "convert",
    "Target",
    "Conversion",
    "load",
    "derive_pipeline",
    "parse_pipeline",
    "run",
    "plan",
    "save",
    "attach_lora",
    "check_target",
    "summarize_dropped",
    "Checkpoint",
    "Pipeline",
    "Plan",
]


@attrs.frozen(kw_only=True)
class Target:
    """What the user asked for: the output's format and layout.  An impossible combination is a
    :class:`~ckpt_ir.errors.UsageError` when the Target is made.

    ``to``: ``"hf"``, ``"mcore"`` or ``"peft"`` (a LoRA-only adapter).  ``dtype``: cast floating
    tensors to ``"bf16"``, ``"fp16"`` or ``"fp32"`` (None keeps the source's).

    Megatron layout (``to="mcore"`` only; unset means 1 / none): ``tp``, ``pp``; ``vpp_layers``
    (layers per virtual pipeline stage) or ``num_layer_list`` (layers per stage);
    ``noop_layers`` (global indices of no-op layers); ``vocab_divisible_by`` (pad the vocabulary
    to a multiple of it times ``tp``); ``norm_names`` (``"local"``, ``"te"`` or ``"te-input"``;
    None keeps the source's); ``mla_keys``: whose modules multi-latent attention is written with,
    ``"mindspeed"`` (MindSpeed-LLM's fused ``linear_qkv``) or ``"mcore"`` (megatron-core's own, as
    Megatron-LM writes them; None keeps the source's, or, for a vision-language model written in a
    Megatron naming anew, that naming's: ``multimodal.TEXT_MLA_KEYS``, Megatron-Bridge's ``"mcore"``);
    ``gdn_keys``: whose modules gated-delta-net
    models (Qwen3-Next, Qwen3.5) are written with, ``"mindspeed"`` (MindSpeed-LLM's qwen3-next
    layout: HF's packed projections, TP 1 only) or ``"mcore"`` (megatron-core's GatedDeltaNet and
    gated linear_qkv, any TP); None: :func:`default_gdn_keys`; ``lora_keys``: keep the source's LoRA
    unmerged and name its factors ``"mindspeed"`` (``X.lora_A.default.weight``) or ``"bridge"``
    (Megatron-Bridge's ``X.adapter.linear_in.weight``, split over TP as Bridge holds them;
    ``ckpt_ir.megatron.keys.LORA_NAMINGS``; None: merge it, as without); ``ep`` (expert parallel), ``etp`` (expert tensor parallel: 1 or
    ``tp``), ``grouped_gemm`` (grouped-GEMM experts); ``ckpt_format`` (``"torch"`` rank
    directories, ``"torch_dist"``: whole tensors Megatron reshards on load, written for
    Megatron-Core ``torch_dist_version`` ``"0.15"`` (0.15-0.18) or ``"0.19"``, or
    ``"fsdp_dtensor"``: whole tensors Megatron-FSDP loads, weights only);
    ``megatron_version`` (``"X.Y"``, the Megatron-Core release the output is for: ``torch`` rank
    files name multi-token prediction as its GPTModel does, ``mtp_model_layer`` from 0.17; None
    keeps a Megatron source's naming, else MindSpeed-LLM's); ``verify_integrity`` (``torch_dist``:
    write Megatron-Core's ``integrity.json``, the SHA-256 of every file of the iteration); ``optimizer``
    (carry the source's distributed-optimizer state, when it has any) laid out for data-parallel
    size ``dp`` (None: the source's); ``shared_copies``: tensors Megatron stores once (DeepSeek's
    MTP embedding and head copies) are compared before writing (``"check"``) or dropped, as
    MindSpeed-LLM does (``"drop"``); ``mtp_layers``: multi-token-prediction layers to keep (None:
    all).

    A vision-language model to Megatron: ``mm_keys``, whose names (``"bridge"``: Megatron-Bridge's,
    the language model under ``language_model.`` with Transformer Engine's norm names and the
    vision tower as its bridge keeps it; ``"mindspeed"``: MindSpeed-MM's ``text_decoder.`` /
    ``image_encoder.``; ``"mindspeed-canonical"``: MindSpeed-MM's canonical layout, q / k / v and
    gate / up kept apart; None keeps the source's, Megatron-Bridge's for an HF source);
    ``vision_tp``, the tower's TP size (None: 1 with bridge, ``tp`` with mindspeed);
    ``vision_layer_list``, its layers per pipeline stage (None: all on stage 0).

    HF output: ``max_shard_size`` (bytes per safetensors file, default 5 GB); ``hf_config_dir``
    (config.json, tokenizer and side files from that directory); ``quantize="fp8"`` writes
    block-scaled FP8 weights in tiles of ``quant_block_size`` with ``quant_scale_fmt``
    (``"float"`` or ``"ue8m0"``) scales.

    LoRA: ``lora_load``, an adapter (a PEFT directory or a Megatron LoRA checkpoint) merged for
    ``hf`` / ``mcore`` or exported for ``peft``; ``lora_rank``, ``lora_alpha`` and
    ``lora_targets`` (module names) are checked against the adapter (an alpha the adapter does
    not record is taken from here).
    """

    to: str
    dtype: str | None = None
    tp: int = 1
    pp: int = 1
    vpp_layers: int | None = None
    num_layer_list: tuple[int, ...] | None = None
    noop_layers: tuple[int, ...] = ()
    vocab_divisible_by: int | None = None
    norm_names: str | None = None
    mla_keys: str | None = None
    gdn_keys: str | None = None
    lora_keys: str | None = None
    max_shard_size: int | None = None
    hf_config_dir: str | None = None
    ep: int = 1
    etp: int | None = None
    grouped_gemm: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    shared_copies: str = "check"
    optimizer: bool = True
    dp: int | None = None
    lora_load: str | None = None
    mtp_layers: int | None = None
    ckpt_format: str = "torch"
    torch_dist_version: str = "0.15"
    megatron_version: str | None = None
    verify_integrity: bool = False
    quantize: str | None = None
    quant_block_size: int = 128
    quant_scale_fmt: str = "float"
    # a vision-language model's Megatron layout: whose names (None: the source's; an HF source:
    # Megatron-Bridge's), the tower's TP size (None: 1 with Megatron-Bridge's names, tp with
    # MindSpeed-MM's) and its layers per pipeline stage (None: all on stage 0)
    mm_keys: str | None = None
    vision_tp: int | None = None
    vision_layer_list: tuple[int, ...] | None = None

    def __attrs_post_init__(self) -> None:
        if self.to not in ("hf", "mcore", "peft"):
            raise UsageError(f"{setting('to', self.to)}: choose hf, mcore or peft")
        if self.quantize is not None and (self.quantize != "fp8" or self.to != "hf"):
            raise UsageError(
                f"{setting('quantize', self.quantize)}: only fp8, and only with {setting('to', 'hf')}"
            )
        if self.quant_scale_fmt not in ("float", "ue8m0") or self.quant_block_size < 1:
            raise UsageError(
                f"{setting('quant_scale_fmt', self.quant_scale_fmt)} / "
                f"{setting('quant_block_size', self.quant_block_size)}: use float or ue8m0 and a positive block size"
            )
        for name in ("tp", "pp", "ep", "vpp_layers", "etp", "vocab_divisible_by", "dp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{setting(name)} must be at least 1, got {value}")
        for name, values, least in (
            ("num_layer_list", self.num_layer_list, 0 if self.mm_keys in MINDSPEED_MM_KEYS else 1),
            ("vision_layer_list", self.vision_layer_list or (), 0),
            ("noop_layers", self.noop_layers, 0),
        ):
            if values and min(values) < least:
                raise UsageError(
                    f"{setting(name)} entries must be at least {least}, got {','.join(map(str, values))}"
                )
        if self.mm_keys not in (None, *MM_KEYS):
            raise UsageError(f"{setting('mm_keys', self.mm_keys)}: choose {' or '.join(MM_KEYS)}")
        if (self.mm_keys or self.vision_tp or self.vision_layer_list) and self.to != "mcore":
            raise UsageError(
                f"{setting('mm_keys')} / {setting('vision_tp')} / {setting('vision_layer_list')} apply only "
                f"with {setting('to', 'mcore')}"
            )
        if self.mla_keys not in (None, *MLA_KEYS):
            raise UsageError(f"{setting('mla_keys', self.mla_keys)}: choose {' or '.join(MLA_KEYS)}")
        if self.mla_keys and (self.to != "mcore" or self.ckpt_format != "torch"):
            raise UsageError(
                f"{setting('mla_keys', self.mla_keys)} applies only with {setting('to', 'mcore')} in the "
                f"torch format (torch_dist always holds megatron-core's own MLA modules)"
            )
        if self.lora_keys not in (None, *LORA_KEYS):
            raise UsageError(f"{setting('lora_keys', self.lora_keys)}: choose {' or '.join(LORA_KEYS)}")
        if self.lora_keys and (self.to != "mcore" or self.ckpt_format != "torch"):
            raise UsageError(
                f"{setting('lora_keys', self.lora_keys)} applies only with {setting('to', 'mcore')} in the "
                f"torch format"
            )
        if self.gdn_keys not in (None, *GDN_KEYS):
            raise UsageError(f"{setting('gdn_keys', self.gdn_keys)}: choose {' or '.join(GDN_KEYS)}")
        if self.gdn_keys and (
            self.to != "mcore" or self.gdn_keys == "mindspeed" and self.ckpt_format != "torch"
        ):
            raise UsageError(
                f"{setting('gdn_keys', self.gdn_keys)} applies only with {setting('to', 'mcore')}, and "
                f"MindSpeed-LLM's layout only in the torch format (torch_dist holds megatron-core's modules)"
            )
        if self.mla_keys == "mcore" and self.norm_names == "te-input":
            raise UsageError(
                f"{setting('norm_names', 'te-input')} (MindSpeed-LLM's input norm fused into linear_qkv) has no "
                f"place in megatron-core's MLA modules ({setting('mla_keys', 'mcore')}); use local or te"
            )
        if self.to != "mcore" and (
            self.tp != 1
            or self.pp != 1
            or self.vpp_layers
            or self.num_layer_list
            or self.noop_layers
            or self.vocab_divisible_by
            or self.ep != 1
            or self.etp
            or self.grouped_gemm
            or self.dp
        ):
            names = "tp pp vpp_layers num_layer_list noop_layers vocab_divisible_by ep etp grouped_gemm dp"
            raise UsageError(
                f"{'/'.join(setting(n) for n in names.split())} apply only with {setting('to', 'mcore')}"
            )
        if self.ckpt_format not in ("torch", "torch_dist", "fsdp_dtensor"):
            raise UsageError(
                f"{setting('ckpt_format', self.ckpt_format)}: choose torch, torch_dist or fsdp_dtensor"
            )
        if self.torch_dist_version not in ("0.15", "0.19") or (
            self.torch_dist_version != "0.15" and self.ckpt_format != "torch_dist"
        ):
            raise UsageError(
                f"{setting('torch_dist_version', self.torch_dist_version)}: choose 0.15 or 0.19, with "
                f"{setting('ckpt_format', 'torch_dist')}"
            )
        if self.megatron_version is not None:
            if self.to != "mcore" or re.fullmatch(r"\d+\.\d+(\.\d+)?", self.megatron_version) is None:
                raise UsageError(
                    f"{setting('megatron_version', self.megatron_version)}: give a Megatron-Core release as X.Y "
                    f"(e.g. 0.17), with {setting('to', 'mcore')}"
                )
            if self.torch_dist_version == "0.19" and (self.megatron_release or ()) < (0, 19):
                raise UsageError(
                    f"{setting('torch_dist_version', '0.19')}: Megatron-Core {self.megatron_version} cannot load that "
                    f"layout; leave out {setting('torch_dist_version', metavar='V')} (the default layout, 0.15, "
                    f"loads in 0.15 and later)"
                )
        if self.verify_integrity and (self.to != "mcore" or self.ckpt_format != "torch_dist"):
            raise UsageError(
                f"{setting('verify_integrity')}: only with {setting('to', 'mcore')} "
                f"{setting('ckpt_format', 'torch_dist')} (Megatron-Core hashes only torch_dist checkpoints)"
            )
        if self.ckpt_format != "torch" and (
            self.to != "mcore"
            or self.tp != 1
            or self.pp != 1
            or self.vpp_layers
            or self.num_layer_list
            or self.noop_layers
            or self.ep != 1
            or self.etp
            or self.dp
        ):
            names = "tp pp vpp_layers num_layer_list noop_layers ep etp dp"
            raise UsageError(
                f"{setting('ckpt_format', self.ckpt_format)} (with {setting('to', 'mcore')}) holds whole tensors "
                f"that Megatron reshards when it loads them: leave out {'/'.join(setting(n) for n in names.split())}"
            )

    def __repr__(self) -> str:
        """The settings that differ from their defaults, as the call that makes them:
        ``Target(to='mcore', tp=2)``."""
        given = [
            f"{a.name}={getattr(self, a.name)!r}"
            for a in attrs.fields(Target)
            if a.default is attrs.NOTHING or getattr(self, a.name) != a.default
        ]
        return f"Target({', '.join(given)})"

    @property
    def megatron_release(self) -> tuple[int, ...] | None:
        """``megatron_version`` as numbers, e.g. ``(0, 17)``."""
        return None if self.megatron_version is None else tuple(map(int, self.megatron_version.split(".")))

    @property
    def carries_optimizer(self) -> bool:
        """Whether the source's optimizer state should be lifted for this target."""
        return self.to == "mcore" and self.optimizer


def attach_lora(base: Checkpoint, path: str) -> Checkpoint:
    """Add the LoRA adapter at ``path`` to ``base`` (the ``attach-lora`` pass, after bringing a base
    into the whole, unfused layout a PEFT adapter's HF module names need)."""
    from ckpt_ir.frontends import peft

    steps = _normalise(base.layout, unfuse=True) if peft.detect(path) else []
    return run(base, [*steps, AttachLora(path=path)])


def _normalise(
    lay: Layout, *, unfuse: bool, keep_grouped: bool = False, unpad: bool = True, unfuse_vision: bool = False
) -> list[Pass]:
    """Steps from any layout to the whole, canonical one (gathered, no no-op layers; no vocabulary
    padding when ``unpad``; unfused when ``unfuse``, a vision tower also when ``unfuse_vision``)."""
    steps: list[Pass] = []
    if (
        lay.tp > 1
        or lay.pp > 1
        or lay.vpp_layers
        or lay.num_layer_list
        or lay.ep > 1
        or lay.etp is not None
        or lay.vision_tp > 1
        or lay.vision_layer_list
    ):
        steps.append(Gather())
    if lay.grouped_gemm and not keep_grouped:
        steps.append(UngroupExperts())
    if lay.noop_layers:
        steps.append(RemoveNoopLayers())
    if lay.padded_vocab and unpad:
        steps.append(UnpadVocab())
    if unfuse and lay.fused_gate_up:
        steps.append(UnfuseGateUp())
    if unfuse and lay.fused_qkv:
        steps.append(UnfuseQKV())
    if (unfuse or unfuse_vision) and lay.vision_fused:
        steps.append(UnfuseVision())
    return steps


def _default_mm_keys(src: Checkpoint) -> str:
    """The Megatron naming of a vision-language model converted from HF when none is asked: its
    tower's (``Tower.mm_keys``: MindSpeed-MM's where Megatron-Bridge has no bridge)."""
    from ckpt_ir.families import by_name

    return by_name(src.spec.family).towers[0].mm_keys


def derive_pipeline(src: Checkpoint, target: Target) -> Pipeline:
    """The standard pipeline from the source to the target, every IR change a pass: dequantize a
    quantized source (unless the target quantizes), normalise (gather, drop no-op layers, unfuse;
    drop vocabulary padding for an HF / PEFT target), attach and merge LoRA, drop what the target
    does not carry (MTP layers beyond ``mtp_layers``, optimizer state), cast, then build the target
    layout (fuse, padding, no-op layers, grouped experts, shard, norm naming).  A Megatron target
    keeps the source's padded vocabulary (its padding rows as they are) unless
    ``vocab_divisible_by`` gives another size.  ``convert --print-pipeline`` prints it."""
    from ckpt_ir import quant
    from ckpt_ir.frontends import peft
    from ckpt_ir.megatron import mindspeed_mm, multimodal

    lay = src.layout
    to_mcore = target.to == "mcore"
    attach = [AttachLora(path=target.lora_load)] if target.lora_load else []
    peft_adapter = bool(target.lora_load) and peft.detect(target.lora_load)  # type: ignore[arg-type]
    steps: list[Pass] = []
    if not target.quantize and any(quant.is_dequantized(s) for t in src.tensors.values() for s in t.shards):
        steps.append(DequantizePass(dtype=target.dtype))  # quantized storage -> compute dtype
    if not peft_adapter:  # a Megatron adapter shares the base's layout
        steps += attach
    unfuse = target.to in ("hf", "peft") or peft_adapter
    vlm = src.spec.vision is not None
    if not vlm and (target.mm_keys or target.vision_tp or target.vision_layer_list):
        raise UsageError(
            f"{setting('mm_keys')} / {setting('vision_tp')} / {setting('vision_layer_list')}: {src.spec.family} "
            f"has no vision tower; leave them out"
        )
    mm_keys = target.mm_keys or (_default_mm_keys(src) if vlm and lay.kind == "hf" else lay.mm_keys)
    # the tower in Megatron's modules (MindSpeed-MM's; Megatron-Bridge's Qwen3-VL), split over TP;
    # else Megatron-Bridge keeps it in its HF form (Qwen2.5-VL), whole on every TP rank
    megatron_form = vlm and mindspeed_mm.megatron_tower(src.spec, mm_keys) is not None
    if vlm and mm_keys == "bridge" and (target.vision_tp or 1) > 1 and not megatron_form:
        raise UsageError(
            f"{setting('vision_tp', target.vision_tp)}: Megatron-Bridge's names ({setting('mm_keys', 'bridge')}) "
            f"keep {src.spec.family}'s vision tower whole on every TP rank; use {setting('mm_keys', 'mindspeed')}"
        )
    if megatron_form and mm_keys == "bridge" and target.vision_tp not in (None, target.tp):
        raise UsageError(
            f"{setting('vision_tp', target.vision_tp)}: Megatron-Bridge splits {src.spec.family}'s vision tower "
            f"over the language model's TP ({target.tp}); leave it out"
        )
    # MindSpeed-MM's canonical layout keeps the language model's q / k / v and gate / up apart
    keep_apart = to_mcore and mm_keys == mindspeed_mm.CANONICAL
    steps += _normalise(
        lay,
        unfuse=unfuse or keep_apart,
        keep_grouped=to_mcore and target.grouped_gemm,
        unpad=not to_mcore,
        unfuse_vision=not megatron_form or (keep_apart and not mindspeed_mm.fuses_tower(src.spec, mm_keys)),
    )
    fused_qkv, fused_gate_up = (False, False) if unfuse else (lay.fused_qkv, lay.fused_gate_up)
    gdn = default_gdn_keys(src, target) if to_mcore and _has_gdn(src) else None
    if target.gdn_keys and not gdn and target.gdn_keys != lay.gdn_keys:
        raise UsageError(
            f"{setting('gdn_keys', target.gdn_keys)}: {src.spec.family} has no gated-delta-net layers "
            f"or gated attention; leave it out"
        )
    if gdn and fused_qkv and gdn != lay.gdn_keys:  # the other Megatron modules: fused anew
        steps.append(UnfuseQKV())
        fused_qkv = False
    if peft_adapter:
        steps += attach
    has_lora = src.spec.lora_rank is not None or bool(target.lora_load)
    # --lora-keys names the LoRA factors a Megatron target keeps unmerged
    if has_lora and target.to != "peft" and not (to_mcore and target.lora_keys):
        targets = ",".join(target.lora_targets) or None
        steps.append(LoraMerge(alpha=target.lora_alpha, rank=target.lora_rank, targets=targets))
    if target.mtp_layers is not None and src.spec.mtp_layers > target.mtp_layers:
        steps.append(DropMtp(keep=target.mtp_layers))
    if src.states and not target.carries_optimizer:
        steps.append(DropOptimizerState())
    if target.dtype:
        # tensors the target's loader keeps in fp32 stay fp32 (DeepSeek's router, gpt-oss' norms in fp16)
        steps.append(CastPass(dtype=target.dtype, keep_fp32="megatron" if to_mcore else "transformers"))
    if to_mcore:
        if not fused_qkv and not keep_apart:
            steps.append(FuseQKV(gdn=gdn))
        if not fused_gate_up and not keep_apart:
            steps.append(FuseGateUp())
        if megatron_form and not lay.vision_fused and mindspeed_mm.fuses_tower(src.spec, mm_keys):
            steps.append(FuseVision())
        if vlm and mm_keys != lay.mm_keys:  # before shard: MindSpeed-MM's layer lists may hold zeros
            steps.append(RenameMm(keys=mm_keys))
        vision_tp = target.vision_tp or (target.tp if megatron_form else 1)
        rows = padding_rows(src)
        size = (
            padded_size(src.spec.vocab_size, target.vocab_divisible_by, target.tp)
            if target.vocab_divisible_by
            else rows
        )
        if size != rows:
            steps.append(PadVocab(size=size))
        if target.noop_layers:
            steps.append(InsertNoopLayers(layers=target.noop_layers))
        if target.grouped_gemm and not lay.grouped_gemm:
            steps.append(GroupExperts())
        if (
            target.tp > 1
            or target.pp > 1
            or target.vpp_layers
            or target.num_layer_list
            or target.ep > 1
            or vision_tp > 1
            or target.vision_layer_list
        ):
            steps.append(
                Shard(
                    tp=target.tp,
                    pp=target.pp,
                    vpp_layers=target.vpp_layers,
                    num_layer_list=target.num_layer_list,
                    ep=target.ep,
                    etp=None if target.etp == target.tp else target.etp,
                    vision_tp=vision_tp,
                    vision_layer_list=target.vision_layer_list,
                )
            )
        renames: list[Pass] = []
        norm_names = target.norm_names
        if norm_names is None and gdn == "mcore" and lay.gdn_keys != "mcore":
            norm_names = "te"  # megatron-core builds GatedDeltaNet models with Transformer Engine only
        elif norm_names is None and vlm and (mm_keys in MINDSPEED_MM_KEYS or lay.kind == "hf"):
            # Megatron-Bridge's language model has Transformer Engine's names; MindSpeed-MM's local ones
            norm_names = "te" if mm_keys == "bridge" else "local"
        if norm_names and norm_names != lay.norm_names:
            renames.append(RenameNorms(names=norm_names))
        mla_keys = target.mla_keys
        if mla_keys is None and vlm and src.spec.mla and (lay.kind == "hf" or mm_keys != lay.mm_keys):
            # a vision-language model's Megatron layout fixes its language model's MLA modules
            # (Megatron-Bridge's: megatron-core's); a Megatron source in its layout keeps its own
            mla_keys = multimodal.TEXT_MLA_KEYS.get(mm_keys)
        if mla_keys and mla_keys != lay.mla_keys:
            if not src.spec.mla:
                raise UsageError(
                    f"{setting('mla_keys', mla_keys)}: {src.spec.family} has no multi-latent attention; "
                    f"leave it out"
                )
            # in the order that keeps the layout valid between the two (te-input has no mcore form)
            renames.insert(len(renames) if mla_keys == "mcore" else 0, RenameMla(keys=mla_keys))
        if target.lora_keys and target.lora_keys != lay.lora_keys:
            renames.append(RenameLora(keys=target.lora_keys))
        steps += renames
    return Pipeline(steps)


def _has_gdn(src: Checkpoint) -> bool:
    """Whether the model has gated-delta-net layers or gated attention (whose Megatron modules
    ``gdn_keys`` chooses)."""
    return has_gdn_modules(src.spec)


def default_gdn_keys(src: Checkpoint, target: Target) -> str:
    """Whose modules a gated-delta-net model is written with: ``target.gdn_keys`` when given, else
    MindSpeed-LLM's where that layout can hold the target (the torch format at TP 1) and the source
    is in it or is an HF model of a family MindSpeed-LLM converts (qwen3_next), else
    megatron-core's.  MindSpeed-LLM users keep the layout its converter writes (and its trainer
    loads) at TP 1; at TP > 1, in torch_dist and for families MindSpeed-LLM has no converter for
    (qwen3_5) megatron-core's GatedDeltaNet is the one Megatron form there is (Megatron-LM,
    Megatron-Bridge)."""
    from ckpt_ir.families import by_name

    if target.gdn_keys:
        return target.gdn_keys
    if target.ckpt_format != "torch" or target.tp > 1:
        return "mcore"
    if src.layout.fused_qkv:  # a Megatron source: its own layout
        return src.layout.gdn_keys
    return "mindspeed" if by_name(src.spec.family).mindspeed_names else "mcore"


# what run and convert take as a pipeline: text, or a list of texts, pass instances and plain
# Checkpoint -> Checkpoint functions (a Pipeline is such a list)
PipelineLike = str | Sequence[str | Pass | Callable[[Checkpoint], Checkpoint]]


def run(
    ckpt: Checkpoint, pipeline: PipelineLike, instrumentation: Instrumentation | None = None
) -> Checkpoint:
    """Run ``pipeline`` (pipeline text, or a list of pipeline texts, pass instances and plain
    ``Checkpoint -> Checkpoint`` functions, in order) with verification after every step."""
    return PassManager(as_pipeline(pipeline), instrumentation).run(ckpt)


def as_pipeline(pipeline: PipelineLike) -> Pipeline:
    """``pipeline`` as a :class:`Pipeline` of pass instances (a function becomes a
    :class:`~ckpt_ir.passes.manager.FunctionPass`)."""
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline) if pipeline.strip() else Pipeline()
    out = Pipeline()
    for step in pipeline:
        if isinstance(step, (str, Pass)):
            out += as_pipeline(step) if isinstance(step, str) else [step]
        elif callable(step):
            out.append(FunctionPass(step))
        else:
            raise TypeError(
                f"pipeline step {step!r}: expected pipeline text, a Pass or a Checkpoint -> Checkpoint function"
            )
    return out


# what an HF checkpoint or a PEFT adapter is: every Megatron arrangement of the tensors undone
HF_LAYOUT = (GATHERED, NO_NOOP, UNPADDED, UNFUSED)


def check_target(ckpt: Checkpoint, target: Target) -> None:
    """The IR must be what the target asks for, field by field: for Megatron each target setting
    that differs from its default, for HF and PEFT the layout those formats have (whole, unfused,
    unpadded tensors, no no-op layers), and the dtype.  A user pipeline that builds another layout
    or dtype is a usage error naming the fields; nothing is written."""
    from ckpt_ir.ir.dtypes import FLOATING, parse_dtype

    lay, diffs = ckpt.layout, []
    if target.to == "mcore":
        wanted = {
            "tp": (target.tp, lay.tp, 1),
            "pp": (target.pp, lay.pp, 1),
            "ep": (target.ep, lay.ep, 1),
            "vpp_layers": (target.vpp_layers, lay.vpp_layers, None),
            "num_layer_list": (target.num_layer_list, lay.num_layer_list, None),
            "noop_layers": (tuple(sorted(target.noop_layers)), lay.noop_layers, ()),
            "etp": (target.etp, lay.expert_tp if target.etp is not None else None, None),
            "grouped_gemm": (target.grouped_gemm, lay.grouped_gemm, False),
            "norm_names": (target.norm_names, lay.norm_names if target.norm_names else None, None),
            "mla_keys": (target.mla_keys, lay.mla_keys if target.mla_keys else None, None),
            "gdn_keys": (target.gdn_keys, lay.gdn_keys if target.gdn_keys else None, None),
            "lora_keys": (target.lora_keys, lay.lora_keys if target.lora_keys else None, None),
        }
        if target.vocab_divisible_by:
            size = padded_size(ckpt.spec.vocab_size, target.vocab_divisible_by, target.tp)
            wanted["vocab_divisible_by"] = (size, padding_rows(ckpt), None)
        diffs += [
            f"{setting(k, want)} but the pipeline gives {_show(got)}"
            for k, (want, got, default) in wanted.items()
            if want != default and want != got
        ]
    else:
        missing = [f"{req.what} (from {req.fix})" for req in HF_LAYOUT if not req.holds(ckpt)]
        if missing:
            diffs.append(
                f"{setting('to', target.to)} needs {', '.join(missing)} but the pipeline gives {lay.describe()}"
            )
    if target.dtype:
        want_dtype = parse_dtype(target.dtype)
        other = sorted({t.dtype for t in ckpt.tensors.values() if t.dtype in FLOATING} - {want_dtype})
        if other and ckpt.spec.dtype != want_dtype:
            diffs.append(
                f"{setting('dtype', target.dtype)} but the pipeline gives {', '.join(other)} tensors"
            )
    if diffs:
        raise UsageError(
            "the pipeline's output differs from the target: "
            + "; ".join(diffs)
            + " (add the passes to the pipeline, or leave those settings out)"
        )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def plan(ckpt: Checkpoint, target: Target) -> Plan:
    """Every output file the target format gets for ``ckpt``, from metadata only.  The IR is taken
    as it is (every change is a pass); it must match the target (:func:`check_target`)."""
    check_target(ckpt, target)
    if ckpt.states and not target.carries_optimizer:
        raise UsageError(
            "the checkpoint still carries optimizer state, which this target does not take; "
            "add drop-optimizer-state to the pipeline"
        )
    out = _plan(ckpt, target)
    padding = ckpt.meta.get("padding_checks")  # zero rows a split dropped (passes/fusion.py unfuse)
    if padding:
        out = attrs.evolve(out, checks=(*out.checks, *padding))
    notes = ckpt.meta.get("notes")
    if notes:  # what the user chose on purpose, kept with the output (e.g. --replicas take-rank0)
        from ckpt_ir.backends.plan import OutputFile
        from ckpt_ir.io.side_files import NOTES_FILE

        out = attrs.evolve(
            out, files=(*out.files, OutputFile(NOTES_FILE, "text", text="\n".join(notes) + "\n"))
        )
    return out


def check_family(ckpt: Checkpoint, target: Target) -> None:
    """An HF / PEFT target needs an HF family: refuse a model only its Megatron args describe."""
    if target.to != "mcore":
        from ckpt_ir.megatron.infer import require_hf

        require_hf(ckpt.spec, ckpt.source or "the checkpoint", ckpt.meta.get("family_from_args"))


def _plan(ckpt: Checkpoint, target: Target) -> Plan:
    check_family(ckpt, target)
    if target.to != "mcore":
        ckpt = _drop_training_state(ckpt)
    if target.to == "peft":
        from ckpt_ir.backends import peft
        from ckpt_ir.passes.lora import apply_lora_options

        return peft.plan(apply_lora_options(ckpt, target.lora_rank, target.lora_alpha, target.lora_targets))
    if target.to == "hf":
        from ckpt_ir.backends import hf

        kw: dict[str, Any] = {"hf_config_dir": target.hf_config_dir}
        if target.quantize:
            from ckpt_ir.quant import Fp8Output

            b = target.quant_block_size
            kw["quantize"] = Fp8Output((b, b), target.quant_scale_fmt)
        if target.max_shard_size:
            kw["max_shard_size"] = target.max_shard_size
        return hf.plan(ckpt, **kw)
    if target.ckpt_format == "torch_dist":
        from ckpt_ir.backends import torch_dist

        return torch_dist.plan(ckpt, version=target.torch_dist_version, integrity=target.verify_integrity)
    if target.ckpt_format == "fsdp_dtensor":
        from ckpt_ir.backends import fsdp_dtensor

        return fsdp_dtensor.plan(ckpt)
    from ckpt_ir.backends import mcore

    return mcore.plan(
        ckpt, shared_copies=target.shared_copies, dp=target.dp, megatron_version=target.megatron_release
    )


def _drop_training_state(ckpt: Checkpoint) -> Checkpoint:
    """An HF / PEFT target has no place for a Megatron run's training state: record what is left."""
    training = ckpt.meta.get("training") or {}
    present = [
        what
        for key, what in (
            ("opt_param_scheduler", "learning-rate scheduler"),
            ("num_floating_point_operations_so_far", "FLOP counter"),
            ("args", "training args"),
        )
        if training.get(key) is not None
    ]
    if any(v is not None for v in (training.get("rng_state") or {}).values()):
        present.append("RNG state")
    if not present:
        return ckpt
    why = f"{', '.join(present)} of the Megatron run: an HF checkpoint has no place for them (convert to mcore to keep them)"
    return attrs.evolve(ckpt, dropped={**ckpt.dropped, "training state": why})


def summarize_dropped(dropped: dict[str, str]) -> list[str]:
    """One line per kind of thing dropped (same reason), with a count and an example."""
    kinds: dict[str, list[str]] = {}
    for key, why in dropped.items():
        kinds.setdefault(why, []).append(key)
    return [
        f"dropped: {keys[0]}" + (f" and {len(keys) - 1} more like it" if len(keys) > 1 else "") + f": {why}"
        for why, keys in kinds.items()
    ]


def save(
    ckpt: Checkpoint | Plan,
    dst: str,
    target: Target | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    max_memory: int | None = None,
    allow_overflow: bool = False,
) -> dict:
    """Write ``ckpt`` to ``dst`` atomically as it is: planned for ``target`` (:func:`plan`), or an
    existing :class:`Plan`.  Nothing is derived or converted here: the IR must already be what
    ``target`` asks for (run the pipeline of :func:`derive_pipeline` first, or call
    :func:`convert`); a layout or dtype it lacks is a :class:`~ckpt_ir.errors.UsageError` naming
    the setting, before anything is written.  ``overwrite``: replace a non-empty ``dst`` that holds
    a checkpoint and nothing else; ``progress``: a progress bar on stderr; ``workers``: parallel
    writer processes (default: one per core); ``max_memory``: bytes of tensor data held at once
    (default: half the available memory); ``allow_overflow``: write tensors whose cast to a
    narrower dtype overflowed to infinity (listed in the result's ``overflows``) instead of
    refusing the whole output.  Returns the writer's statistics: ``seconds``, ``bytes_written``,
    ``bytes_read`` (source bytes, each once per writer process)."""
    from ckpt_ir.backends.execute import execute

    if isinstance(ckpt, Checkpoint):
        if target is None:
            raise TypeError("save: a Checkpoint needs a Target to be planned for")
        ckpt = plan(ckpt, target)
    return execute(
        ckpt,
        dst,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        max_memory=max_memory,
        allow_overflow=allow_overflow,
    )


@attrs.frozen
class Conversion:
    """What :func:`convert` did: the pipeline that ran, the output IR, its plan, and the writer's
    statistics (None for a dry run)."""

    pipeline: Pipeline
    output: Checkpoint
    plan: Plan
    stats: dict | None

    def __repr__(self) -> str:
        return (
            f"<Conversion pipeline={self.pipeline or '(no passes)'} output={self.output!r} plan={self.plan!r} "
            f"stats={self.stats!r}>"
        )


def convert(
    src: str | Checkpoint,
    dst: str,
    target: Target,
    *,
    pipeline: PipelineLike | None = None,
    instrumentation: Instrumentation | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    max_memory: int | None = None,
    load_options: dict[str, Any] | None = None,
    announce: Callable[[Pipeline], None] | None = None,
    allow_overflow: bool = False,
) -> Conversion:
    """The conversion driver (``ckpt-ir convert``, ``convert-ckpt`` and ``demo`` all use it):
    lift ``src`` (a path, or a lifted Checkpoint), run ``pipeline`` (default:
    :func:`derive_pipeline`), check the result against ``target``, plan the output once, and
    write it to ``dst`` atomically, as :func:`save` does (``dst`` is neither checked nor written
    when ``dry_run``).  ``load_options`` go to :func:`load` (``allow_unused``, ``hf_config``,
    ``family``, ``weights_from``, ``optimizer``, ``optimizer_layout``, ``replicas``,
    ``iteration``); ``announce`` is called with the pipeline before it runs; ``allow_overflow`` as
    for :func:`save`.  Returns the :class:`Conversion`."""
    from ckpt_ir.backends.execute import execute
    from ckpt_ir.frontends import check_replaceable
    from ckpt_ir.io.atomic import check_destination

    given = None if pipeline is None else as_pipeline(pipeline)  # a bad one stops before any read
    if not dry_run:
        check_destination(dst, overwrite, check_replaceable)
    if not isinstance(src, Checkpoint):
        opts = dict(load_options or {})
        opts.setdefault("optimizer", target.carries_optimizer and not target.lora_load)
        src = load(src, **opts)
    check_family(src, target)
    if target.to == "peft" and src.spec.lora_rank is None and not target.lora_load:
        raise UsageError(
            f"{setting('to', 'peft')} needs LoRA tensors: pass {setting('lora_load', metavar='DIR')} or a "
            f"checkpoint that carries LoRA"
        )
    steps = derive_pipeline(src, target) if given is None else given
    if announce is not None:
        announce(steps)
    out = run(src, steps, instrumentation)
    the_plan = plan(out, target)
    stats = None
    if not dry_run:
        stats = execute(
            the_plan,
            dst,
            overwrite=overwrite,
            progress=progress,
            workers=workers,
            max_memory=max_memory,
            allow_overflow=allow_overflow,
        )
    return Conversion(steps, out, the_plan, stats)
