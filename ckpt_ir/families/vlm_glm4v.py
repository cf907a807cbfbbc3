"""Vision-language families GLM-4.1V and GLM-4.5V (glm4v, glm4v_moe): the glm4 / glm4_moe language
model and GLM's tower (docs/families.md, vision-language models)."""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.families import (
    ConfigKey,
    Family,
    ImageInput,
    MegatronTower,
    Tested,
    Tower,
    by_name,
    dense,  # noqa: F401  (glm4, the language model of glm4v)
    moe,  # noqa: F401  (glm4_moe, the language model of glm4v_moe)
    register,
)
from ckpt_ir.families.blocks import (
    config_with,
)
from ckpt_ir.families.vlm import V, tower_qkv, vision_head_dim

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
        ConfigKey("head_dim", None, vision_head_dim),
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
            *tower_qkv(G + "attn.qkv"),
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
