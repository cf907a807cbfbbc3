"""Vision-language families: a language model and a vision tower (patch embedding, a stack of ViT
layers, a merger to the language model's width) in one checkpoint (qwen2_vl, qwen2_5_vl, gemma3,
qwen3_vl, qwen3_vl_moe, glm4v, glm4v_moe, internvl).

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

import attrs

from ckpt_ir.families import (
    LANGUAGE_MODEL,
    ConfigKey,
    ExpertStack,
    Family,
    HfNaming,
    ImageInput,
    MegatronTower,
    Packed,
    Renumbered,
    Tested,
    Tower,
    by_name,
    dense,  # noqa: F401  (gemma3_text, the language model of gemma3)
    moe,  # noqa: F401  (glm4_moe, the language model of glm4v_moe)
    register,
)
from ckpt_ir.families.blocks import (
    ATTENTION,
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    LLAMA_TENSORS,
    QWEN_MOE_CONFIG,
    config_with,
    qwen_router_args,
)

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
        ConfigKey("head_dim", None, _head_dim),
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
        packed=(_qkv("weight"), _qkv("bias")),
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
        packed=(_qkv("weight"), _qkv("bias")),
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


# Gemma 3 (model_type gemma3): the gemma3_text family's language model under language_model.*
# (transformers 5.25 saves language_model.model.*, language_model.lm_head.weight when untied), a
# SigLIP tower under vision_tower.* (the hub's checkpoints: vision_tower.vision_model.*, GEMMA3_HUB)
# and multi_modal_projector.*
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
    # the attention-pooling head, where vision_use_head leaves it (SigLIP's default, True:
    # configuration_siglip.py:103); Gemma 3 feeds the projector the last hidden state
    # (modeling_gemma3.py:765-767), so the head's output is never used: carried as data
    ("vision_tower.head.probe", "vision.pool_head.probe"),
    *(
        (f"vision_tower.head.attention.{hf}", f"vision.pool_head.attn.{c}")
        for hf, c in (
            ("in_proj_weight", "in_proj.weight"),
            ("in_proj_bias", "in_proj.bias"),
            ("out_proj.weight", "o.weight"),
            ("out_proj.bias", "o.bias"),
        )
    ),
    *(
        (f"vision_tower.head.{hf}.{kind}", f"vision.pool_head.{c}.{kind}")
        for hf, c in (("layernorm", "norm"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
        for kind in ("weight", "bias")
    ),
    # Gemma3MultiModalProjector: a Gemma RMSNorm, then x @ W with W stored [vision, text]
    ("multi_modal_projector.mm_soft_emb_norm.weight", "vision.projector.norm.weight"),
    ("multi_modal_projector.mm_input_projection_weight", "vision.projector.weight"),
)
# the hub's Gemma 3 checkpoints (google/gemma-3-*) keep SigLIP's inner module in the tower's names,
# vision_tower.vision_model.*; transformers strips it on load and a fresh save_pretrained writes
# vision_tower.* (transformers conversion_mapping.py:90, 1047; docs/reference/vision-language-models.md
# section 1.2); Megatron-Bridge reads either and keeps vision_tower.* (gemma3_vl_bridge.py:107-117)
GEMMA3_HUB = HfNaming(
    "hub",
    tuple(
        (hf, "vision_tower.vision_model." + hf[len("vision_tower.") :])
        for hf, _ in SIGLIP
        if hf.startswith("vision_tower.")
    ),
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
        # derived, not written back: the config keeps its own key (or its absence)
        ConfigKey("pool_head", None, lambda cfg: bool(cfg.get("vision_use_head", True))),
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
        namings=(GEMMA3_HUB,),
        memory=LLAVA_MEMORY,
        tested=Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2", "--tp 2 --pp 2", "--ckpt-format torch_dist"),
            mcore_missing=(
                "no: Megatron-Bridge's Gemma3VLModel wraps transformers' SiglipVisionModel for the tower "
                "(gemma_vl/modeling_gemma3_vl.py:93-100), not a megatron-core module"
            ),
        ),
    )
)


# Qwen3-VL (model_type qwen3_vl) and Qwen3-VL-MoE: a qwen3 / qwen3_moe language model under
# model.language_model.* (transformers 5.25 saves the names it holds in memory: no legacy names,
# docs/reference/vision-language-models.md section 1.1); the tower under model.visual.* with a
# patch convolution with a bias, learned positions (pos_embed, bilinearly interpolated to the
# grid), LayerNorm blocks with a plain GELU MLP (linear_fc1 / linear_fc2), the merger (its
# LayerNorm over the tower's width) and the DeepStack mergers: deepstack_merger_list.J reads the
# output of vision layer deepstack_visual_indexes[J] (TF modeling_qwen3_vl.py:652-659, 701-714);
# the IR keeps it as that layer's block deepstack
Q3 = "model.visual."
Q3B = Q3 + "blocks.{i}."
Q3_DEEPSTACK = Q3B + "deepstack_merger."  # the table's name; HF: deepstack_merger_list.J.


def _q3_qkv(kind: str) -> Packed:
    return Packed(
        Q3B + f"attn.qkv.{kind}",
        tuple(V + f"attn.{p}.{kind}" for p in "qkv"),
        ("q_size", "kv_size", "kv_size"),
        stack="vision",
    )


def _lm(tensors: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A text family's table under model.language_model. (lm_head stays at the top level)."""
    return tuple(
        ("model.language_model." + h[len("model.") :] if h.startswith("model.") else h, c) for h, c in tensors
    )


BW = ("weight", "bias")
QWEN3_VISION = (
    *((Q3 + f"patch_embed.proj.{k}", f"vision.patch_embed.{k}") for k in BW),
    (Q3 + "pos_embed.weight", "vision.pos_embed.weight"),
    *(
        (Q3B + f"{hf}.{k}", V + f"{c}.{k}")
        for hf, c in (
            ("norm1", "attn_norm"),
            ("attn.proj", "attn.o"),
            ("norm2", "mlp_norm"),
            ("mlp.linear_fc1", "mlp.fc1"),
            ("mlp.linear_fc2", "mlp.down"),
        )
        for k in BW
    ),
    *(
        (Q3 + f"merger.{hf}.{k}", f"vision.merger.{c}.{k}")
        for hf, c in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2"))
        for k in BW
    ),
    *(
        (Q3_DEEPSTACK + f"{hf}.{k}", V + f"deepstack.{c}.{k}")
        for hf, c in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2"))
        for k in BW
    ),
)
QWEN3_DEEPSTACK = Renumbered(Q3 + "deepstack_merger_list.", Q3_DEEPSTACK, "deepstack_layers", "vision")

# MindSpeed-MM's names (converters/qwen3vl_megatron.py:11-15 the placement, 18-44 and 86-94 the
# renames: DeepStack merger J under the blocks of vision layer deepstack_visual_indexes[J])
QWEN3_MINDSPEED = MegatronTower(
    layers="image_encoder.encoder.blocks.layers.",
    keys=(
        *((f"image_encoder.encoder.patch_embed.proj.{k}", f"vision.patch_embed.{k}") for k in BW),
        ("image_encoder.encoder.pos_embed.weight", "vision.pos_embed.weight"),
        *((f"image_encoder.projector.layernorm.{k}", f"vision.merger.norm.{k}") for k in BW),
        *(
            (f"image_encoder.projector.encoder.linear_{c}.{k}", f"vision.merger.{c}.{k}")
            for c in ("fc1", "fc2")
            for k in BW
        ),
    ),
    first=("vision.patch_embed.", "vision.pos_embed."),
    layer_keys=(
        *((f"deepstack_layer.layernorm.{k}", f"deepstack.norm.{k}") for k in BW),
        *(
            (f"deepstack_layer.encoder.linear_{c}.{k}", f"deepstack.{c}.{k}")
            for c in ("fc1", "fc2")
            for k in BW
        ),
    ),
)

# Megatron-Bridge's names (qwen_vl/qwen3_vl_bridge.py:122-194; modules and their TP split:
# modelling_qwen3_vl/model.py:346-372): the tower in Megatron's modules under vision_model., a
# Transformer Engine layer spec (each norm fused into the linear after it), split over the
# language model's TP, whole on pipeline stage 0; the DeepStack mergers as a list of their own
QWEN3_BRIDGE = MegatronTower(
    layers="vision_model.decoder.layers.",
    keys=(
        *((f"vision_model.patch_embed.proj.{k}", f"vision.patch_embed.{k}") for k in BW),
        ("vision_model.pos_embed.weight", "vision.pos_embed.weight"),
        *((f"vision_model.merger.patch_norm.{k}", f"vision.merger.norm.{k}") for k in BW),
        *(
            (f"vision_model.merger.linear_{c}.{k}", f"vision.merger.{c}.{k}")
            for c in ("fc1", "fc2")
            for k in BW
        ),
    ),
    first=("vision.",),
    norm_names="te",
    listed=(
        *(
            (f"vision_model.decoder.deepstack_merger_list.{{j}}.patch_norm.{k}", f"deepstack.norm.{k}")
            for k in BW
        ),
        *(
            (f"vision_model.decoder.deepstack_merger_list.{{j}}.linear_{c}.{k}", f"deepstack.{c}.{k}")
            for c in ("fc1", "fc2")
            for k in BW
        ),
    ),
    listed_by="deepstack_layers",
    # Transformer Engine's modules (Qwen3VLModel builds the tower with the TE layer spec and a TENorm
    # / TEColumnParallelLinear / TERowParallelLinear patch merger, modelling_qwen3_vl/model.py:348-353):
    # each saves an _extra_state object (megatron-core transformer/utils.py:75-148, 151-191)
    extra_state=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "patch_norm"),
)

# why no megatron-core model checks the rank files
NO_MCORE_QWEN3 = (
    "no whole-model logits: megatron-core 0.16 has no Qwen3-VL model (3-D patches, interpolated learned "
    "positions, DeepStack); Megatron-Bridge's Qwen3VLModel is its own (modelling_qwen3_vl/model.py). "
    "Its tower's layers are megatron-core's ViT layers (model.py:349-356: "
    "get_vit_layer_with_transformer_engine_spec, with Qwen3VLSelfAttention, attention.py:59, adding no "
    "parameters): at TP 2 each rank file's vision_model.decoder.layers.* load with strict=True into "
    "megatron-core's TransformerBlock of get_vit_layer_with_local_spec() layers (Transformer Engine "
    "not installed: its fused norm names mapped to input_layernorm / pre_mlp_layernorm) and give "
    "transformers' vision blocks' output (tests/mcore_vision.py); the patch embedding, positions, "
    "merger and DeepStack mergers are Megatron-Bridge's own modules (utils.py:32, 112; "
    "transformer_block.py:56, 90), which megatron-core lacks. The torch_dist (layers stacked "
    "[L, ...]) loads with megatron-core's dist_checkpointing.load at TP 2, nothing asked for absent, "
    "into that block's own sharded_state_dict under vision_model.decoder. (TE's norm names from the "
    "layer spec's sharded_state_dict_keys_map) plus the mergers, patch embedding and positions "
    "rebuilt from megatron-core's ColumnParallelLinear / RowParallelLinear and torch modules; every "
    "rank's pieces equal the HF tensors (tests/vlm_dist_harness.py)"
)

QWEN3_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *VISION_SHAPE,
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, _head_dim),
        ConfigKey("ffn_hidden_size", "intermediate_size"),
        ConfigKey("merger_out", "out_hidden_size"),
        ConfigKey("pos_embed_size", "num_position_embeddings"),
        ConfigKey("deepstack_layers", "deepstack_visual_indexes", ()),
    ),
    # LayerNorms with biases (eps 1e-6, fixed: modeling_qwen3_vl.py:175, 330-331), biases on the
    # patch convolution and every linear, a plain MLP
    constants=(
        *VISION_CONSTANTS[:3],
        ("patch_bias", True),
        ("gated_mlp", False),
        ("norm_bias", True),
        ("norm_eps", 1e-6),
    ),
    mindspeed=QWEN3_MINDSPEED,
    bridge=QWEN3_BRIDGE,
    # Qwen2-VL's image rows and grid (Qwen2VLImageProcessor for qwen3_vl and qwen3_5:
    # image_processing_auto.py:149-152; Qwen3VLProcessor, processing_auto.py:83-85: 73-76 the
    # placeholders per image, 178 mm_token_type_ids; the ids configuration_qwen3_vl.py:136-139);
    # the DeepStack mergers' outputs are added to the first decoder layers' outputs at the
    # placeholders inside transformers' forward, so verify needs nothing more for them
    image=QWEN_IMAGE,
)

register(
    Family(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        architecture="Qwen3VLForConditionalGeneration",
        tensors=_lm(LLAMA_TENSORS) + QWEN3_VISION,
        packed=(_q3_qkv("weight"), _q3_qkv("bias")),
        config=config_with(),
        constants=(("qk_norm", True),),
        text_config="text_config",
        towers=(QWEN3_TOWER,),
        renumbered=(QWEN3_DEEPSTACK,),
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2",
                "--tp 2 --pp 2 --num-layer-list 2,1",
                "--ckpt-format torch_dist",
                "--tp 2 --pp 2 --num-layer-list 2,1 --mm-keys mindspeed --vision-layer-list 1,1",
            ),
            mcore_missing=NO_MCORE_QWEN3,
            # bench/peers/mindspeed_mm.py: Qwen3VLMegatronConverter's rank files and ckpt-ir's
            # identical, and each side's mm_to_hf of the other's files back bit for bit
            mindspeed=tuple(
                (case, "identical") for case in ("qwen3vl-tp1", "qwen3vl-tp2", "qwen3vl-tp2pp2-vit-split")
            ),
        ),
    )
)

# Qwen3-VL-MoE: the language model a qwen3_moe whose experts are stacked per layer; transformers
# 5.25 holds and saves them [experts, 2 x moe width, hidden] (each expert's [gate; up] rows) and
# [experts, hidden, moe width] (modeling_qwen3_vl_moe.py:122-123), the table's orientation; the
# hub's releases store them transposed, [experts, hidden, 2 x moe width] and [experts, moe width,
# hidden] (transformers' load rule Transpose(1, 2): conversion_mapping.py:1527-1538; Megatron-Bridge
# exports that orientation, qwen_vl/qwen3_vl_bridge.py:373-378; MindSpeed-MM reads only it,
# vlm_model/operator.py:582-611): the naming "hub", told from the shapes (a gate_up_proj with
# hidden = 2 x moe width is square, its down_proj then is not), and written back as read
LM = "model.language_model.layers.{i}."
EXPERT = "layers.{i}.mlp.experts.{e}."
QWEN3_MOE_HUB = HfNaming(
    "hub", (), transposed=(LM + "mlp.experts.gate_up_proj", LM + "mlp.experts.down_proj")
)
register(
    Family(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        architecture="Qwen3VLMoeForConditionalGeneration",
        tensors=_lm(EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP)
        + ((LM + "mlp.gate.weight", "layers.{i}.mlp.router.weight"),)
        + QWEN3_VISION,
        packed=(_q3_qkv("weight"), _q3_qkv("bias")),
        stacked=(
            ExpertStack(LM + "mlp.experts.gate_up_proj", (EXPERT + "gate.weight", EXPERT + "up.weight")),
            ExpertStack(LM + "mlp.experts.down_proj", (EXPERT + "down.weight",)),
        ),
        config=config_with(*QWEN_MOE_CONFIG),
        constants=(("qk_norm", True),),
        megatron_args=qwen_router_args,
        namings=(QWEN3_MOE_HUB,),
        text_config="text_config",
        towers=(QWEN3_TOWER,),
        renumbered=(QWEN3_DEEPSTACK,),
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2 --ep 2",
                "--ckpt-format torch_dist",
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --mm-keys mindspeed",
                "--pp 2 --ep 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 2,0",
            ),
            mcore_missing=NO_MCORE_QWEN3,
            # bench/peers/mindspeed_mm.py, the experts in the hub's orientation (the one MindSpeed-MM
            # reads), and in transformers' (which it transposes the wrong way)
            mindspeed=(
                ("qwen3vlmoe-tp2ep2", "identical"),
                ("qwen3vlmoe-pp2ep2", "identical"),
                (
                    "qwen3vlmoe-transformers-orientation-tp2ep2",
                    "identical to MindSpeed-MM's files of the same model in the hub's orientation; its own "
                    "files of this input hold every expert tensor transposed the wrong way (ExpertSplitOp "
                    "takes .T of the hub's [Ex, T, 2Im]), and its mm_to_hf writes the hub's orientation",
                ),
            ),
        ),
    )
)


# GLM-4.1V (glm4v) and GLM-4.5V (glm4v_moe), transformers models/glm4v/modeling_glm4v.py and
# models/glm4v_moe/modeling_glm4v_moe.py: the glm4 / glm4_moe families' language model under
# model.language_model.* (lm_head.weight at the top), saved so by transformers 5.25 and on the hub
# (same names in memory), and a tower under model.visual.* (docs/reference/vision-language-models.md
# sections 1.1, 1.3, 1.4): a 3-D patch convolution with a bias, an RMSNorm after it
# (post_conv_layernorm), learned positions ((image_size / patch_size)^2 rows, interpolated to the
# grid), pre-norm layers (RMSNorm, qkv = [q; k; v] with a bias only with attention_bias, proj
# without one, a gated MLP out_hidden_size wide without biases: Glm4VisionMlp), a final RMSNorm
# (post_layernorm), a 2-D convolution merging spatial_merge_size^2 patches to out_hidden_size
# (downsample) and a merger (proj, a LayerNorm, a gated MLP intermediate_size wide)
G = "model.visual.blocks.{i}."


def _glm_qkv(kind: str) -> Packed:
    return Packed(
        G + f"attn.qkv.{kind}",
        tuple(V + f"attn.{p}.{kind}" for p in "qkv"),
        ("q_size", "kv_size", "kv_size"),
        stack="vision",
    )


GLM_VISION = (
    ("model.visual.patch_embed.proj.weight", "vision.patch_embed.weight"),
    ("model.visual.patch_embed.proj.bias", "vision.patch_embed.bias"),
    ("model.visual.post_conv_layernorm.weight", "vision.patch_norm.weight"),
    ("model.visual.embeddings.position_embedding.weight", "vision.pos_embed.weight"),
    (G + "norm1.weight", V + "attn_norm.weight"),
    (G + "attn.proj.weight", V + "attn.o.weight"),
    (G + "norm2.weight", V + "mlp_norm.weight"),
    *((G + f"mlp.{p}_proj.weight", V + f"mlp.{p}.weight") for p in ("gate", "up", "down")),
    ("model.visual.post_layernorm.weight", "vision.final_norm.weight"),
    ("model.visual.downsample.weight", "vision.downsample.weight"),
    ("model.visual.downsample.bias", "vision.downsample.bias"),
    ("model.visual.merger.proj.weight", "vision.merger.proj.weight"),
    ("model.visual.merger.post_projection_norm.weight", "vision.merger.proj_norm.weight"),
    ("model.visual.merger.post_projection_norm.bias", "vision.merger.proj_norm.bias"),
    *((f"model.visual.merger.{p}_proj.weight", f"vision.merger.{p}.weight") for p in ("gate", "up", "down")),
)

# MindSpeed-MM's names of the tower (checkpoint/vlm_model/converters/glm.py:31-85: its RenameOp and
# UpGateMergeOp; placement glm.py:24-28): GlmViT's own attention module keeps qkv = [q; k; v] and
# proj, plain nn.Linear whole on every TP rank (mindspeed_mm/models/vision/vision_encoders/
# glm4v_vl_vit_model.py:235-236), its MLP a Megatron MLP (ColumnParallelLinear linear_fc1 =
# [gate; up], RowParallelLinear linear_fc2: models/common/module_spec/glm4v_layer_spec.py:204-222,
# llava_layer_spec.py:52-59), the projector GlmMLP plain nn.Linear (projectors/glm_mlp.py:25-29)
E_ = "image_encoder.encoder."
GLM_MINDSPEED = MegatronTower(
    layers=E_ + "blocks.layers.",
    keys=(
        (E_ + "patch_embed.proj.weight", "vision.patch_embed.weight"),
        (E_ + "patch_embed.proj.bias", "vision.patch_embed.bias"),
        (E_ + "post_conv_layernorm.weight", "vision.patch_norm.weight"),
        (E_ + "embeddings.position_embedding.weight", "vision.pos_embed.weight"),
        (E_ + "blocks.final_layernorm.weight", "vision.final_norm.weight"),
        (E_ + "downsample.weight", "vision.downsample.weight"),
        (E_ + "downsample.bias", "vision.downsample.bias"),
        ("image_encoder.projector.proj.weight", "vision.merger.proj.weight"),
        ("image_encoder.projector.post_projection_norm.weight", "vision.merger.proj_norm.weight"),
        ("image_encoder.projector.post_projection_norm.bias", "vision.merger.proj_norm.bias"),
        *(
            (f"image_encoder.projector.{p}_proj.weight", f"vision.merger.{p}.weight")
            for p in ("gate", "up", "down")
        ),
    ),
    first=("vision.patch_embed.", "vision.patch_norm.", "vision.pos_embed."),
    layer_keys=(("self_attention.proj.weight", "attn.o.weight"),),
    packed=(
        *(
            (f"self_attention.qkv.{kind}", tuple(f"attn.{p}.{kind}" for p in "qkv"))
            for kind in ("weight", "bias")
        ),
        ("mlp.linear_fc1.weight", ("mlp.gate.weight", "mlp.up.weight")),
    ),
    whole=("self_attention.qkv.weight", "self_attention.qkv.bias", "self_attention.proj.weight"),
)

# a GLM-4.1V image: Qwen2-VL's patch rows and grid (transformers 5.25 image_processing_glm4v.py:
# 143-170), one placeholder per downsample_size^2 patches (processing_glm4v.py:56-59; the
# downsampling convolution is what merges them, modeling_glm4v.py:715-719, 772) between
# <|begin_of_image|> and <|end_of_image|> (MindSpeed-MM's mm_plugin.py:778; the ids are
# configuration_glm4v.py:135-138, 165-168), mm_token_type_ids 1 on them for M-RoPE
# (processing_glm4v.py:164-182; modeling_glm4v.py:955-1009 get_rope_index)
GLM_IMAGE = ImageInput(
    "patches",
    "image_token_id",
    around=("image_start_token_id", "image_end_token_id"),
    type_ids="mm_token_type_ids",
    merge="downsample_size",
)

GLM_TOWER = Tower(
    "vision",
    "vision_config",
    (
        ConfigKey("num_layers", "depth"),
        ConfigKey("num_heads", "num_heads"),
        ConfigKey("num_kv_heads", "num_heads"),
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, _head_dim),
        # the layers' MLP is out_hidden_size wide (Glm4VisionMlp), the merger's intermediate_size
        ConfigKey("ffn_hidden_size", "out_hidden_size"),
        ConfigKey("merger_out", "out_hidden_size"),
        ConfigKey("merger_ffn", "intermediate_size"),
        ConfigKey("patch_size", "patch_size"),
        ConfigKey("patch_temporal", "temporal_patch_size"),
        ConfigKey("patch_channels", "in_channels", 3),
        ConfigKey("downsample_size", "spatial_merge_size"),
        ConfigKey("pos_embed_size", None, lambda cfg: (cfg["image_size"] // cfg["patch_size"]) ** 2),
        ConfigKey("qkv_bias", "attention_bias", False),
        ConfigKey("activation", "hidden_act"),
        ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
    ),
    constants=(
        ("o_bias", False),
        ("mlp_bias", False),
        ("gated_mlp", True),
        ("patch_bias", True),
        ("patch_norm", True),
        ("post_norm", True),
    ),
    mindspeed=GLM_MINDSPEED,
    # Megatron-Bridge's GLM45VBridge: ReplicatedMapping("visual.**", "model.visual.**")
    # (glm_vl/glm_45v_bridge.py:146-149), the module built on the first stage
    # (modeling_glm_45v.py:127-130)
    bridge_prefix=("model.visual.", "visual."),
    image=GLM_IMAGE,
)


def _in_language_model(hf: str) -> str:
    """A text family's HF name as GLM-4.xV's language model holds it (model.language_model.*)."""
    return "model.language_model." + hf[len("model.") :] if hf.startswith("model.") else hf


def _glm_text(name: str) -> dict[str, Any]:
    text = by_name(name)
    return dict(
        tensors=tuple((_in_language_model(h), c) for h, c in text.tensors) + GLM_VISION,
        packed=(
            *(attrs.evolve(p, hf=_in_language_model(p.hf)) for p in text.packed),
            _glm_qkv("weight"),
            _glm_qkv("bias"),
        ),
        constants=text.constants,
        megatron_args=(
            (lambda cfg: text.megatron_args({**cfg, **cfg.get("text_config", {})}))
            if text.megatron_args
            else None
        ),
        text_config="text_config",
        towers=(GLM_TOWER,),
    )


GLM_NO_MCORE = (
    "no: megatron-core 0.16's LLaVAModel has no GLM-4.1V tower (3-D patches, a downsampling "
    "convolution, the gated merger); Megatron-Bridge's GLM45VModel wraps transformers' own"
)

register(
    Family(
        name="glm4v",
        model_types=("glm4v",),
        architecture="Glm4vForConditionalGeneration",
        # transformers' Glm4vTextAttention: head_dim = hidden / heads whatever the config says, a
        # bias on q, k and v always (modeling_glm4v.py:549-559)
        config=config_with(
            ConfigKey("head_dim", None, lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
        ),
        # MindSpeed-MM's Glm4vTransformerLayer (glm4v_layer_spec.py:41, 73; converters/glm.py:80)
        megatron_keys=(
            ("decoder.layers.{i}.post_self_attn_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
        ),
        **{**_glm_text("glm4"), "constants": (("post_norms", True), ("qkv_bias", True))},
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2 --pp 2",
                "--pp 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 2,0",
                "--tp 2 --pp 2 --num-layer-list 1,1 --mm-keys mindspeed --vision-layer-list 1,1",
            ),
            mcore_missing=GLM_NO_MCORE,
            mindspeed=(
                *((case, "identical") for case in ("glm4v-tp1", "glm4v-pp2", "glm4v-pp2-vit-split")),
                (
                    "glm4v-tp2pp2",
                    "identical to MindSpeed-MM's files at TP 1 split as its GLM model builds the modules (the "
                    "language model and the tower's MLP split, the tower's attention and projector whole); its "
                    "own copy every tensor whole to every rank (no TP rules), and its mm_to_hf writes nothing",
                ),
            ),
        ),
    )
)
register(
    Family(
        name="glm4v_moe",
        model_types=("glm4v_moe",),
        architecture="Glm4vMoeForConditionalGeneration",
        config=by_name("glm4_moe").config,
        # MindSpeed-MM's GlmConverter reads Glm4vConfig (a dense language model) only
        **{**_glm_text("glm4_moe"), "towers": (attrs.evolve(GLM_TOWER, mindspeed=None),)},
        tested=Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2 --ep 2", "--pp 2 --ep 2", "--ckpt-format torch_dist"),
            mcore_missing=GLM_NO_MCORE,
        ),
    )
)


# InternVL (docs/reference/vision-language-models.md sections 1.3, 1.4): a Qwen2 (or Llama) language
# model under language_model.*, an InternViT tower (a class token and positions for it and each
# patch, pre-norm layers with q / k / v apart, optional q / k norms over the whole width, per-channel
# layer scales) and a projector after a pixel shuffle.  Two HF namings: transformers 5.25's
# InternVLForConditionalGeneration (model_type internvl, the table below: save_pretrained's names,
# its llava rule keeping language_model.model.* on disk, conversion_mapping.py:103) and OpenGVLab's
# remote code (model_type internvl_chat, InternVLChatModel, config llm_config / vision_config: the
# INTERNVL_CHAT naming), related as transformers' own conversion script relates them
# (convert_internvl_weights_to_hf.py's ORIGINAL_TO_CONVERTED_KEY_MAPPING_VISION / _MULTI): the
# remote attn.qkv = [q; k; v] rows, ls1 / ls2 = lambda_1 / lambda_2, mlp1.0 / 1 / 3 = the projector's
# layer_norm / linear_1 / linear_2.  The remote code is never run: its config is read as JSON.
IV = "vision_tower.encoder.layer.{i}."
# transformers models/internvl/modeling_internvl.py: the class token and positions [1, 1 + patches,
# E] (235, 249), q / k RMSNorms over the whole width (129), layer scales lambda_1 / lambda_2 (352-353,
# applied 364, 376), the post-norm unless use_mean_pooling (444), the projector's layer_norm over
# E / downsample_ratio^2, linear_1, linear_2 (492-500)
INTERNVL_VISION = (
    ("vision_tower.embeddings.cls_token", "vision.cls_token"),
    ("vision_tower.embeddings.patch_embeddings.projection.weight", "vision.patch_embed.weight"),
    ("vision_tower.embeddings.patch_embeddings.projection.bias", "vision.patch_embed.bias"),
    ("vision_tower.embeddings.position_embeddings", "vision.cls_pos_embed"),
    *(
        (IV + f"layernorm_{hf}.{kind}", V + f"{c}.{kind}")
        for hf, c in (("before", "attn_norm"), ("after", "mlp_norm"))
        for kind in ("weight", "bias")
    ),
    *(
        (IV + f"attention.{p}_proj.{kind}", V + f"attn.{p}.{kind}")
        for p in "qkv"
        for kind in ("weight", "bias")
    ),
    (IV + "attention.q_norm.weight", V + "attn.q_full_norm.weight"),
    (IV + "attention.k_norm.weight", V + "attn.k_full_norm.weight"),
    *((IV + f"attention.projection_layer.{kind}", V + f"attn.o.{kind}") for kind in ("weight", "bias")),
    *(
        (IV + f"mlp.{hf}.{kind}", V + f"mlp.{c}.{kind}")
        for hf, c in (("fc1", "fc1"), ("fc2", "down"))
        for kind in ("weight", "bias")
    ),
    (IV + "lambda_1", V + "attn_scale"),
    (IV + "lambda_2", V + "mlp_scale"),
    # use_mean_pooling false: a LayerNorm after the layers (InternVLVisionModel.layernorm)
    ("vision_tower.layernorm.weight", "vision.final_norm.weight"),
    ("vision_tower.layernorm.bias", "vision.final_norm.bias"),
    *(
        (f"multi_modal_projector.{hf}.{kind}", f"vision.shuffle_proj.{c}.{kind}")
        for hf, c in (("layer_norm", "norm"), ("linear_1", "fc1"), ("linear_2", "fc2"))
        for kind in ("weight", "bias")
    ),
)
# the remote code's names of the same tensors (InternVisionModel, InternVLChatModel.mlp1)
RV = "vision_model.encoder.layers.{i}."
INTERNVL_CHAT = HfNaming(
    "internvl_chat",
    (
        ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
        *(
            (
                f"vision_tower.embeddings.patch_embeddings.projection.{kind}",
                f"vision_model.embeddings.patch_embedding.{kind}",
            )
            for kind in ("weight", "bias")
        ),
        ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
        *(
            (IV + f"{hf}.{kind}", RV + f"{remote}.{kind}")
            for hf, remote in (
                ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"),
                ("attention.projection_layer", "attn.proj"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            )
            for kind in ("weight", "bias")
        ),
        (IV + "attention.q_norm.weight", RV + "attn.q_norm.weight"),
        (IV + "attention.k_norm.weight", RV + "attn.k_norm.weight"),
        (IV + "lambda_1", RV + "ls1"),
        (IV + "lambda_2", RV + "ls2"),
        *(
            (f"multi_modal_projector.{hf}.{kind}", f"mlp1.{n}.{kind}")
            for hf, n in (("layer_norm", 0), ("linear_1", 1), ("linear_2", 3))
            for kind in ("weight", "bias")
        ),
    ),
    packed=tuple(
        Packed(
            RV + f"attn.qkv.{kind}",
            tuple(V + f"attn.{p}.{kind}" for p in "qkv"),
            ("q_size",) * 3,
            stack="vision",
        )
        for kind in ("weight", "bias")
    ),
    model_types=("internvl_chat",),
)


def _remote(cfg: dict[str, Any]) -> bool:
    """Whether a tower's config view is the remote code's (its top level nests llm_config)."""
    return "llm_config" in cfg[LANGUAGE_MODEL]


def _side(value: Any) -> int:
    """An image or patch size: transformers' InternVLVisionConfig keeps [height, width], the
    remote code one int; a non-square one is refused."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value} is not supported")
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(f"size {value!r} is not an integer")
    return value


def _positions(cfg: dict[str, Any]) -> int:
    if not _remote(cfg) and not cfg.get("use_absolute_position_embeddings", True):
        return 0
    return (_side(cfg["image_size"]) // _side(cfg["patch_size"])) ** 2 + 1


def _shuffle(cfg: dict[str, Any]) -> int:
    ratio = cfg[LANGUAGE_MODEL].get("downsample_ratio", 0.5)
    factor = round(1 / ratio)
    if factor * ratio != 1:
        raise ValueError(f"downsample_ratio {ratio} is not 1 / an integer")
    return factor


INTERNVL_TOWER = Tower(
    "vision",
    "vision_config",
    (
        ConfigKey("num_layers", "num_hidden_layers"),
        ConfigKey("num_heads", "num_attention_heads"),
        ConfigKey("num_kv_heads", "num_attention_heads"),
        ConfigKey("hidden_size", "hidden_size"),
        ConfigKey("head_dim", None, lambda cfg: cfg["hidden_size"] // cfg["num_attention_heads"]),
        ConfigKey("ffn_hidden_size", "intermediate_size"),
        ConfigKey("patch_size", None, lambda cfg: _side(cfg["patch_size"])),
        ConfigKey("patch_channels", "num_channels", 3),
        ConfigKey("activation", "hidden_act", "gelu"),
        ConfigKey("norm_eps", "layer_norm_eps", 1e-6),
        # transformers' attention_bias / use_qk_norm, the remote code's qkv_bias / qk_normalization
        ConfigKey("qkv_bias", "attention_bias", False, aliases=("qkv_bias",)),
        ConfigKey("qk_full_norm", "use_qk_norm", False, aliases=("qk_normalization",)),
        # LayerNorms (with biases) or RMSNorms: norm_type, whose default is layer_norm in
        # transformers' config class and rms_norm in the remote one
        ConfigKey(
            "norm_bias",
            None,
            lambda cfg: cfg.get("norm_type", "rms_norm" if _remote(cfg) else "layer_norm") == "layer_norm",
        ),
        ConfigKey("cls_positions", None, _positions),
        ConfigKey("post_norm", None, lambda cfg: not _remote(cfg) and not cfg.get("use_mean_pooling", True)),
        ConfigKey("shuffle_size", None, _shuffle),
        ConfigKey("shuffle_out", None, lambda cfg: cfg[LANGUAGE_MODEL]["hidden_size"]),
        ConfigKey(
            "layer_blocks",
            None,
            lambda cfg: (("attention", "mlp", "layer_scale"),) * cfg["num_hidden_layers"],
        ),
    ),
    # a 2-D patch convolution with a bias, biases on the attention output and the MLP, a plain MLP
    constants=(
        ("o_bias", True),
        ("mlp_bias", True),
        ("patch_bias", True),
        ("gated_mlp", False),
        ("cls_token", True),
    ),
    # MindSpeed-MM's InternVLConverter (checkpoint/vlm_model/converters/internvl.py:15-30, its
    # RenameOp; PPStageSchema 154-158: the embeddings with the first vision layers, the projector
    # with the last); Megatron-Bridge has no InternVL bridge, so its layout is the default
    mindspeed=MegatronTower(
        layers="image_encoder.encoder.encoder.layers.",
        keys=(
            ("image_encoder.encoder.embeddings.class_embedding", "vision.cls_token"),
            ("image_encoder.encoder.embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
            ("image_encoder.encoder.embeddings.patch_embedding.bias", "vision.patch_embed.bias"),
            ("image_encoder.encoder.embeddings.position_embedding", "vision.cls_pos_embed"),
            *(
                (f"image_encoder.projector.{mm}.{kind}", f"vision.shuffle_proj.{c}.{kind}")
                for mm, c in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2"))
                for kind in ("weight", "bias")
            ),
        ),
        first=("vision.patch_embed.", "vision.cls_"),
        layer_keys=(
            ("ls1", "attn_scale"),
            ("ls2", "mlp_scale"),
            ("self_attention.q_layernorm.weight", "attn.q_full_norm.weight"),
            ("self_attention.k_layernorm.weight", "attn.k_full_norm.weight"),
        ),
        # attn.qkv renamed as it is, rows [q; k; v] (RenameOp 16), split over TP part by part by
        # whole heads (UnalignedRowSplit, create_internvl_tp_patterns 143-146; operator.py:508-530)
        packed=tuple(
            (f"self_attention.linear_qkv.{kind}", tuple(f"attn.{p}.{kind}" for p in "qkv"))
            for kind in ("weight", "bias")
        ),
    ),
    mm_keys="mindspeed",
    # one tile at the tower's image_size, image_seq_length placeholders (transformers 5.25
    # processing_internvl.py:52, 143: (image_size / patch)^2 x downsample_ratio^2 of them; the
    # <img> / </img> around them are the tokenizer's, not the config's, and plain text to the model)
    image=ImageInput("image", "image_token_id", tokens="image_seq_length"),
)


def _llm_qkv_bias(cfg: dict[str, Any]) -> bool:
    """The language model's q / k / v biases: Qwen2's always, Llama's by attention_bias."""
    kind = cfg.get("model_type") or ""
    archs = cfg.get("architectures") or []
    if kind == "qwen2" or "Qwen2ForCausalLM" in archs:
        return True
    if kind == "llama" or "LlamaForCausalLM" in archs:
        return bool(cfg.get("attention_bias", False))
    raise ValueError(f"language model {kind or archs} is not supported (Qwen2 and Llama are)")


register(
    Family(
        name="internvl",
        model_types=("internvl", "internvl_chat"),
        architecture="InternVLForConditionalGeneration",
        tensors=tuple((_language_model(h), c) for h, c in LLAMA_TENSORS) + INTERNVL_VISION,
        config=config_with(ConfigKey("qkv_bias", None, _llm_qkv_bias)),
        namings=(INTERNVL_CHAT,),
        text_config="text_config",
        text_config_aliases=("llm_config",),
        towers=(INTERNVL_TOWER,),
        # transformers' "llava" renames (conversion_mapping.py:103, 888-893); the remote code keeps
        # the stored names in memory, its language model's the table's (language_model.model.*)
        memory=LLAVA_MEMORY,
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2",
                "--pp 2 --num-layer-list 1,1 --vision-layer-list 2,0",
                "--tp 2 --pp 2 --num-layer-list 1,1 --vision-layer-list 1,1",
                "--tp 2 --mm-keys bridge",
                "--tp 2 --pp 2 --mm-keys bridge",
                "--ckpt-format torch_dist --mm-keys bridge",
            ),
            mcore_missing=(
                "no: megatron-core 0.16's LLaVAModel hosts an InternViT tower's layer scales only through "
                "Megatron-LM's own layer spec (examples/multimodal/layer_specs.py), and does not build on CPU "
                "without Transformer Engine (docs/reference/vision-language-models.md section 4)"
            ),
            mindspeed=(
                ("internvl-tp1", "identical"),
                (
                    "internvl-tp2",
                    "identical; ckpt-ir's mm_to_hf of MindSpeed-MM's files is bit-exact, MindSpeed-MM's own "
                    "reverse gives back every ViT attn.qkv scrambled ([q_0; k_0; v_0; q_1; ...])",
                ),
                (
                    "internvl-tp2pp2",
                    "identical; MindSpeed-MM's own reverse scrambles the ViT attn.qkv as at TP 2, ckpt-ir's "
                    "is bit-exact",
                ),
                ("internvl-pp2-vit-split", "identical"),
            ),
        ),
    )
)
