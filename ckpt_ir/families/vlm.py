"""Vision-language families Qwen2-VL and Qwen2.5-VL (qwen2_vl, qwen2_5_vl), and what the other
vision-language table modules share (the tower's config keys and constants, the Qwen image
layout, transformers' in-memory names): a language model and a vision tower (patch embedding, a
stack of ViT layers, a merger to the language model's width) in one checkpoint.

The language model is an ordinary family's table (Qwen2: q/k/v biases, M-RoPE, which has no
weights) whose config keys live in the HF config's ``text_config`` (or, in a legacy config, at its
top level); the vision tower is a stack of its own (``ModelSpec.vision``, canonical names under
``vision.``), read from ``vision_config`` by the family's :class:`~ckpt_ir.families.Tower`.  Its
layers are ordinary layers' roles (pre-norm attention with fused ``[q; k; v]`` on disk, an MLP), so
their splits and shapes come from the role table asked of the tower's spec.

HF names: transformers 5.25's ``save_pretrained`` (and the hub) write Qwen2-VL and Qwen2.5-VL with
the legacy names, ``model.layers.N`` and ``visual.*`` (transformers' conversion_mapping.py renames
them to ``model.language_model.*`` / ``model.visual.*`` in memory only); see
docs/reference/vision-language-models.md section 1.  The other vision-language families:
vlm_gemma3, vlm_qwen3, vlm_qwen3_5, vlm_glm4v, vlm_internvl, vlm_mistral3_llama4, vlm_kimi_k25.
"""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.families import (
    ConfigKey,
    Family,
    ImageInput,
    MegatronTower,
    Packed,
    Tested,
    Tower,
    register,
)
from ckpt_ir.families.blocks import (
    LLAMA_TENSORS,
    config_with,
)

P = "visual.blocks.{i}."
V = "vision.layers.{i}."


def tower_qkv(hf: str) -> tuple[Packed, Packed]:
    """A tower's fused attention projection ``hf`` (an HF name below the layer's ``{i}``, without
    ``.weight`` / ``.bias``: rows ``[q; k; v]``) as the canonical q, k and v of its layer, weight
    and bias."""

    def packed(kind: str) -> Packed:
        parts = tuple(V + f"attn.{p}.{kind}" for p in "qkv")
        return Packed(f"{hf}.{kind}", parts, ("q_size", "kv_size", "kv_size"), stack="vision")

    return packed("weight"), packed("bias")


# the patch embedding, each block's norms and attention output, the merger (transformers'
# Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel)
VISION_COMMON = (
    ("visual.patch_embed.proj.weight", "vision.patch_embed.weight"),
    (P + "norm1.weight", V + "attn_norm.weight"),
    (P + "norm1.bias", V + "attn_norm.bias"),
    (P + "attn.proj.weight", V + "attn.o.weight"),
    (P + "attn.proj.bias", V + "attn.o.bias"),
    (P + "norm2.weight", V + "mlp_norm.weight"),
    (P + "norm2.bias", V + "mlp_norm.bias"),
    ("visual.merger.ln_q.weight", "vision.merger.norm.weight"),
    ("visual.merger.ln_q.bias", "vision.merger.norm.bias"),
    ("visual.merger.mlp.0.weight", "vision.merger.fc1.weight"),
    ("visual.merger.mlp.0.bias", "vision.merger.fc1.bias"),
    ("visual.merger.mlp.2.weight", "vision.merger.fc2.weight"),
    ("visual.merger.mlp.2.bias", "vision.merger.fc2.bias"),
)
# Qwen2.5-VL's block MLP: gated (SiLU), biases on all three projections
QWEN25_VISION_MLP = tuple(
    (P + f"mlp.{hf}_proj.{kind}", V + f"mlp.{c}.{kind}")
    for hf, c in (("gate", "gate"), ("up", "up"), ("down", "down"))
    for kind in ("weight", "bias")
)
# Qwen2-VL's block MLP: fc1, quick-GELU, fc2, with biases
QWEN2_VISION_MLP = tuple(
    (P + f"mlp.{hf}.{kind}", V + f"mlp.{c}.{kind}")
    for hf, c in (("fc1", "fc1"), ("fc2", "down"))
    for kind in ("weight", "bias")
)


def vision_head_dim(cfg: dict[str, Any]) -> int:
    return cfg["hidden_size"] // cfg["num_heads"]


# what both towers read of vision_config, and fix: a 3-D patch convolution without a bias, biases
# on the attention's qkv and output and on the MLPs (block and merger)
VISION_SHAPE = (
    ConfigKey("num_layers", "depth"),
    ConfigKey("num_heads", "num_heads"),
    ConfigKey("num_kv_heads", "num_heads"),
    ConfigKey("patch_size", "patch_size"),
    ConfigKey("patch_temporal", "temporal_patch_size"),
    ConfigKey("patch_channels", "in_channels", 3),
    ConfigKey("merger_size", "spatial_merge_size"),
    ConfigKey("activation", "hidden_act"),
)
VISION_CONSTANTS = (("qkv_bias", True), ("o_bias", True), ("mlp_bias", True), ("patch_bias", False))
# a Qwen2-VL image: patch rows and their grid (transformers 5.25 image_processing_qwen2_vl.py:201-210),
# the placeholders between <|vision_start|> and <|vision_end|>, mm_token_type_ids 1 on them for
# M-RoPE's positions (modeling_qwen2_5_vl.py:934 get_rope_index, 1124 compute_3d_position_ids)
QWEN_IMAGE = ImageInput(
    "patches",
    "image_token_id",
    around=("vision_start_token_id", "vision_end_token_id"),
    type_ids="mm_token_type_ids",
)

# MindSpeed-MM's names of the Qwen2 / Qwen2.5-VL tower (converters/qwen2vl.py create_qwen2vl_ops:
# its RenameOp; the layers as GPTModel layers with local norm names)
QWEN_MINDSPEED = MegatronTower(
    layers="image_encoder.encoder.blocks.layers.",
    keys=(
        ("image_encoder.encoder.patch_embed.proj.weight", "vision.patch_embed.weight"),
        ("image_encoder.encoder.patch_embed.proj.bias", "vision.patch_embed.bias"),
        ("image_encoder.projector.layernorm.weight", "vision.merger.norm.weight"),
        ("image_encoder.projector.layernorm.bias", "vision.merger.norm.bias"),
        ("image_encoder.projector.encoder.linear_fc1.weight", "vision.merger.fc1.weight"),
        ("image_encoder.projector.encoder.linear_fc1.bias", "vision.merger.fc1.bias"),
        ("image_encoder.projector.encoder.linear_fc2.weight", "vision.merger.fc2.weight"),
        ("image_encoder.projector.encoder.linear_fc2.bias", "vision.merger.fc2.bias"),
    ),
)

# MindSpeed-MM's names of the Qwen2 / Qwen2.5-VL tower in its canonical layout
# (enable_canonical_hf_struct: converters/qwen2vl.py:94-108, qwen2_5vl.py:36-47): the same keys, but
# attn.qkv renamed as it is, rows [q; k; v] (no per-head interleave), and Qwen2.5-VL's gate_proj /
# up_proj kept apart under their HF leaf names (Qwen2-VL's fc1 / fc2 are linear_fc1 / linear_fc2
# as in the default layout).  Over TP: gate / up each by rows (canonical_qwen2_5_vl_tp_patterns,
# qwen2_5vl.py:103-111); the qkv, which MindSpeed-MM's converter cuts as plain rows (RowSplit,
# qwen2vl.py:119), rank r holding [q_r; k_r; v_r] as MindSpeed-MM's canonical attention reads its
# output ([3, heads per rank, head dim]: mindspeed_mm/patchs/canonical_layer_patch.py:344-353)
QWEN_MINDSPEED_CANONICAL = attrs.evolve(
    QWEN_MINDSPEED,
    layer_keys=tuple(
        (f"mlp.{p}_proj.{kind}", f"mlp.{p}.{kind}") for p in ("gate", "up") for kind in ("weight", "bias")
    ),
    packed=tuple(
        (f"self_attention.linear_qkv.{kind}", tuple(f"attn.{p}.{kind}" for p in "qkv"))
        for kind in ("weight", "bias")
    ),
)

QWEN25_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *VISION_SHAPE,
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, vision_head_dim),
        ConfigKey("ffn_hidden_size", "intermediate_size"),
        ConfigKey("merger_out", "out_hidden_size"),
    ),
    # RMSNorm (eps 1e-6, fixed by Qwen2RMSNorm's default), a gated MLP
    constants=(*VISION_CONSTANTS, ("gated_mlp", True), ("norm_eps", 1e-6)),
    mindspeed=QWEN_MINDSPEED,
    mindspeed_canonical=QWEN_MINDSPEED_CANONICAL,
    image=QWEN_IMAGE,
)
# Qwen2-VL's vision_config: its width is embed_dim (hidden_size is the language model's, the
# merger's output), the MLP mlp_ratio times it; LayerNorms with biases (eps 1e-6)
QWEN2_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *VISION_SHAPE,
        ConfigKey("hidden_size", "embed_dim"),
        ConfigKey("head_dim", None, lambda cfg: cfg["embed_dim"] // cfg["num_heads"]),
        ConfigKey("ffn_hidden_size", None, lambda cfg: int(cfg["embed_dim"] * cfg["mlp_ratio"])),
        ConfigKey("merger_out", "hidden_size"),
    ),
    constants=(*VISION_CONSTANTS, ("gated_mlp", False), ("norm_bias", True), ("norm_eps", 1e-6)),
    mindspeed=QWEN_MINDSPEED,
    mindspeed_canonical=QWEN_MINDSPEED_CANONICAL,
    image=QWEN_IMAGE,
)

# transformers 5.25 builds Qwen2-VL and Qwen2.5-VL as model.language_model.* and model.visual.*
# from the stored model.* and visual.* (conversion_mapping.py:145, 1153-1157); peft's adapters
# name the modules so
QWEN_VL_MEMORY = (("visual.", "model.visual."), ("model.", "model.language_model."))

# transformers' "llava" renames (conversion_mapping.py:102, 885-893): Gemma 3, Mistral 3, InternVL
# store language_model.model.*, vision_tower.*, multi_modal_projector.* and build model.*
LLAVA_MEMORY = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

# why no megatron-core model checks the rank files
NO_MCORE = (
    "no: megatron-core 0.16's multimodal LLaVAModel has no Qwen2-VL tower (3-D patches, window "
    "attention, the merger); Megatron-Bridge's Qwen25VLModel wraps transformers' own"
)

register(
    Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        architecture="Qwen2_5_VLForConditionalGeneration",
        tensors=LLAMA_TENSORS + VISION_COMMON + QWEN25_VISION_MLP,
        packed=tower_qkv(P + "attn.qkv"),
        config=config_with(),
        constants=(("qkv_bias", True),),
        text_config="text_config",
        towers=(QWEN25_TOWER,),
        memory=QWEN_VL_MEMORY,
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2",
                "--tp 2 --pp 2",
                "--ckpt-format torch_dist",
                "--tp 2 --pp 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 2,0",
                "--pp 3 --num-layer-list 0,1,1 --mm-keys mindspeed --vision-layer-list 2,0,0",
            ),
            mcore_missing=NO_MCORE,
            mindspeed=(
                *((case, "identical") for case in ("qwen25vl-tp1", "qwen25vl-tp2", "qwen25vl-tp2pp2")),
                ("qwen25vl-pp2-vit-split", "identical"),
                ("qwen25vl-vpp2", "identical"),
                (
                    "qwen25vl-llm-first-stage-empty",
                    "identical to MindSpeed-MM's files of llm [[1,1]] one stage later; its own lose the "
                    "last layer, the final norm and the output layer",
                ),
                (
                    "qwen25vl-vocab-odd-tp2",
                    "identical but the embedding and output layer, padded to 162 rows where MindSpeed-MM "
                    "keeps 160 of 161",
                ),
                ("qwen25vl-canonical-tp1", "identical"),
                *(
                    (
                        case,
                        "identical but the tower's linear_qkv: rank r holds [q_r; k_r; v_r] of HF's qkv, as "
                        "MindSpeed-MM's canonical attention reads it; its converter cuts [q; k; v] as plain rows",
                    )
                    for case in ("qwen25vl-canonical-tp2", "qwen25vl-canonical-tp2pp2")
                ),
            ),
        ),
    )
)
register(
    Family(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        architecture="Qwen2VLForConditionalGeneration",
        tensors=LLAMA_TENSORS + VISION_COMMON + QWEN2_VISION_MLP,
        packed=tower_qkv(P + "attn.qkv"),
        config=config_with(),
        constants=(("qkv_bias", True),),
        text_config="text_config",
        towers=(QWEN2_TOWER,),
        memory=QWEN_VL_MEMORY,
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2 --pp 2",
                "--ckpt-format torch_dist",
                "--tp 2 --pp 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 1,1",
                "--tp 2 --pp 2 --num-layer-list 1,1 --mm-keys mindspeed-canonical --vision-layer-list 1,1",
            ),
            mcore_missing=NO_MCORE,
            mindspeed=(
                ("qwen2vl-tp2pp2", "identical"),
                (
                    "qwen2vl-canonical-tp2",
                    "identical but the tower's linear_qkv: rank r holds [q_r; k_r; v_r] of HF's qkv, as "
                    "MindSpeed-MM's canonical attention reads it; its converter cuts [q; k; v] as plain rows",
                ),
            ),
        ),
    )
)


def language_model_name(hf: str) -> str:
    return "language_model." + hf
