"""Vision-language families: a language model and a vision tower (patch embedding, a stack of ViT
layers, a merger to the language model's width) in one checkpoint (qwen2_vl, qwen2_5_vl).

The language model is an ordinary family's table (Qwen2: q/k/v biases, M-RoPE, which has no
weights) whose config keys live in the HF config's ``text_config`` (or, in a legacy config, at its
top level); the vision tower is a stack of its own (``ModelSpec.vision``, canonical names under
``vision.``), read from ``vision_config`` by the family's :class:`~ckpt_ir.families.Tower`.  Its
layers are ordinary layers' roles (pre-norm attention with fused ``[q; k; v]`` on disk, an MLP), so
their splits and shapes come from the role table asked of the tower's spec.

HF names: transformers 5.25's ``save_pretrained`` (and the hub) write Qwen2-VL and Qwen2.5-VL with
the legacy names, ``model.layers.N`` and ``visual.*`` (transformers' conversion_mapping.py renames
them to ``model.language_model.*`` / ``model.visual.*`` in memory only); see
docs/reference/vision-language-models.md section 1.
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import (
    LANGUAGE_MODEL,
    ConfigKey,
    Family,
    ImageInput,
    Packed,
    Tested,
    Tower,
    by_name,
    dense,  # noqa: F401  (gemma3_text, the language model of gemma3)
    register,
)
from ckpt_ir.families.blocks import LLAMA_TENSORS, config_with

P = "visual.blocks.{i}."
V = "vision.layers.{i}."


def _qkv(kind: str) -> Packed:
    """The tower's attention ``qkv`` (``[q; k; v]`` rows) as the canonical q, k and v."""
    return Packed(
        P + f"attn.qkv.{kind}",
        tuple(V + f"attn.{p}.{kind}" for p in "qkv"),
        ("q_size", "kv_size", "kv_size"),
        stack="vision",
    )


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


def _head_dim(cfg: dict[str, Any]) -> int:
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

QWEN25_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *VISION_SHAPE,
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, _head_dim),
        ConfigKey("ffn_hidden_size", "intermediate_size"),
        ConfigKey("merger_out", "out_hidden_size"),
    ),
    # RMSNorm (eps 1e-6, fixed by Qwen2RMSNorm's default), a gated MLP
    constants=(*VISION_CONSTANTS, ("gated_mlp", True), ("norm_eps", 1e-6)),
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
    image=QWEN_IMAGE,
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
        packed=(_qkv("weight"), _qkv("bias")),
        config=config_with(),
        constants=(("qkv_bias", True),),
        text_config="text_config",
        towers=(QWEN25_TOWER,),
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2",
                "--tp 2 --pp 2",
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
        packed=(_qkv("weight"), _qkv("bias")),
        config=config_with(),
        constants=(("qkv_bias", True),),
        text_config="text_config",
        towers=(QWEN2_TOWER,),
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 1,1",
            ),
            mcore_missing=NO_MCORE,
            mindspeed=(("qwen2vl-tp2pp2", "identical"),),
        ),
    )
)


# Gemma 3 (model_type gemma3): the gemma3_text family's language model under language_model.*
# (transformers 5.25 saves language_model.model.*, language_model.lm_head.weight when untied), a
# SigLIP tower under vision_tower.* (docs/reference/vision-language-models.md section 1.2: a hub
# checkpoint's vision_tower.vision_model.* is not read yet) and multi_modal_projector.*
GEMMA3_TEXT = by_name("gemma3_text")
S = "vision_tower.encoder.layers.{i}."
SIGLIP = (
    ("vision_tower.embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
    ("vision_tower.embeddings.patch_embedding.bias", "vision.patch_embed.bias"),
    ("vision_tower.embeddings.position_embedding.weight", "vision.pos_embed.weight"),
    *(
        (S + f"layer_norm{n}.{kind}", V + f"{c}.{kind}")
        for n, c in ((1, "attn_norm"), (2, "mlp_norm"))
        for kind in ("weight", "bias")
    ),
    *(
        (S + f"self_attn.{p}_proj.{kind}", V + f"attn.{p}.{kind}")
        for p in "qkv"
        for kind in ("weight", "bias")
    ),
    *((S + f"self_attn.out_proj.{kind}", V + f"attn.o.{kind}") for kind in ("weight", "bias")),
    *(
        (S + f"mlp.{hf}.{kind}", V + f"mlp.{c}.{kind}")
        for hf, c in (("fc1", "fc1"), ("fc2", "down"))
        for kind in ("weight", "bias")
    ),
    ("vision_tower.post_layernorm.weight", "vision.final_norm.weight"),
    ("vision_tower.post_layernorm.bias", "vision.final_norm.bias"),
    # Gemma3MultiModalProjector: a Gemma RMSNorm, then x @ W with W stored [vision, text]
    ("multi_modal_projector.mm_soft_emb_norm.weight", "vision.projector.norm.weight"),
    ("multi_modal_projector.mm_input_projection_weight", "vision.projector.weight"),
)
SIGLIP_TOWER = Tower(
    "vision",
    "vision_config",
    (
        ConfigKey("num_layers", "num_hidden_layers"),
        ConfigKey("num_heads", "num_attention_heads"),
        ConfigKey("num_kv_heads", "num_attention_heads"),
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
        ConfigKey("ffn_hidden_size", "intermediate_size"),
        ConfigKey("patch_size", "patch_size"),
        ConfigKey("patch_channels", "num_channels", 3),
        ConfigKey("pos_embed_size", None, lambda cfg: (cfg["image_size"] // cfg["patch_size"]) ** 2),
        ConfigKey("projector_out", None, lambda cfg: cfg[LANGUAGE_MODEL]["hidden_size"]),
        ConfigKey("activation", "hidden_act"),
        ConfigKey("norm_eps", "layer_norm_eps", 1e-6),
    ),
    # LayerNorms with biases, biases on every linear and the patch convolution, a plain MLP
    constants=(
        *VISION_CONSTANTS[:3],
        ("patch_bias", True),
        ("gated_mlp", False),
        ("norm_bias", True),
        ("post_norm", True),
    ),
    # Megatron-Bridge gemma_vl/gemma3_vl_bridge.py:137 (the norm, renamed) and 152-156 (the
    # weight transposed to [text, vision], a ColumnParallelLinear: modeling_gemma3_vl.py:316-325)
    bridge_keys=(
        ("multi_modal_projector.mm_soft_embed_norm.weight", "vision.projector.norm.weight"),
        ("multi_modal_projector.proj.weight", "vision.projector.weight"),
    ),
    # an image at SigLIP's one size, mm_tokens_per_image placeholders between <start_of_image> and
    # <end_of_image> (transformers 5.25 processing_gemma3.py:48-49), token_type_ids 1 on them: the
    # image attends to itself both ways (modeling_gemma3.py:671 get_block_sequence_ids_for_mask)
    image=ImageInput(
        "image",
        "image_token_id",
        around=("boi_token_id", "eoi_token_id"),
        tokens="mm_tokens_per_image",
        type_ids="token_type_ids",
    ),
)


def _language_model(hf: str) -> str:
    return "language_model." + hf


register(
    Family(
        name="gemma3",
        model_types=("gemma3",),
        architecture="Gemma3ForConditionalGeneration",
        tensors=tuple((_language_model(h), c) for h, c in GEMMA3_TEXT.tensors) + SIGLIP,
        config=GEMMA3_TEXT.config,
        constants=GEMMA3_TEXT.constants,
        megatron_args=lambda cfg: GEMMA3_TEXT.megatron_args({**cfg, **cfg.get("text_config", {})}),
        megatron_keys=GEMMA3_TEXT.megatron_keys,
        transposed=("multi_modal_projector.mm_input_projection_weight",),
        text_config="text_config",
        towers=(SIGLIP_TOWER,),
        tested=Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2", "--tp 2 --pp 2"),
            mcore_missing=(
                "no: Megatron-Bridge's Gemma3VLModel wraps transformers' SiglipVisionModel for the tower "
                "(gemma_vl/modeling_gemma3_vl.py:93-100), not a megatron-core module"
            ),
        ),
    )
)
