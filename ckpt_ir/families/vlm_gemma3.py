"""Vision-language family Gemma 3 (gemma3): the gemma3_text language model, a SigLIP tower and
Gemma 3's projector (docs/families.md, vision-language models)."""

from __future__ import annotations

from ckpt_ir.families import (
    LANGUAGE_MODEL,
    ConfigKey,
    Family,
    HfNaming,
    ImageInput,
    Tested,
    Tower,
    by_name,
    dense,  # noqa: F401  (gemma3_text, the language model of gemma3)
    register,
)
from ckpt_ir.families.vlm import LLAVA_MEMORY, VISION_CONSTANTS, V, language_model_name

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


register(
    Family(
        name="gemma3",
        model_types=("gemma3",),
        architecture="Gemma3ForConditionalGeneration",
        tensors=tuple((language_model_name(h), c) for h, c in GEMMA3_TEXT.tensors) + SIGLIP,
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
