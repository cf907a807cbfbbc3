"""Vision-language families whose towers run 2-D RoPE (no weights) over patches: mistral3
(Mistral 3 / Ministral 3: a Pixtral tower, a projector with a patch merger, a mistral or
ministral3 language model) and llama4 (Llama 4: its vision model with an unfold patch embedding,
a class embedding, learned positions and a pixel-shuffle adapter MLP, a one-layer projector, the
llama4_text language model with its mixture of experts).

HF names are what transformers 5.25's ``save_pretrained`` writes, which for both is the hub's
naming (docs/reference/vision-language-models.md sections 1.1-1.4): the language model under
``language_model.model.*`` and ``language_model.lm_head.weight`` (when untied), the tower under
``vision_tower.*`` (mistral3) or ``vision_model.*`` (llama4), the projector under
``multi_modal_projector.*``.  Whether the embeddings are tied is the top level's
``tie_word_embeddings`` (transformers reads it there, not in ``text_config``).

Megatron: Megatron-Bridge's layout, the language model a GPTModel under ``language_model.``, the
tower and projector in their HF form, whole on every TP rank of pipeline stage 0.  For mistral3
that is Megatron-Bridge's ``Ministral3Bridge`` (``models/ministral3/ministral3_bridge.py``:
154-166 the language model, 178-186 ``vision_tower.**`` and ``multi_modal_projector.**``
replicated; ``modeling_ministral3.py`` 117-157 builds them where ``pre_process``).  Megatron-Bridge
has no Llama 4 bridge (neither vision-language nor text: ``models/llama/llama4_utils.py`` holds a
layer spec only), so llama4 takes the same HF-form rule under ckpt-ir's own choice, documented in
docs/families.md.
"""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.families import (
    LANGUAGE_MODEL,
    TOP_LEVEL,
    ConfigKey,
    Family,
    ImageInput,
    Tested,
    Tower,
    by_name,
    dense,  # noqa: F401  (ministral3 / mistral, mistral3's language models)
    moe,  # noqa: F401  (llama4_text, llama4's language model)
    register,
)
from ckpt_ir.families.vlm import LLAVA_MEMORY

V = "vision.layers.{i}."
LM = "language_model."


def _top(cfg: dict[str, Any]) -> dict[str, Any]:
    """The top level of a multi-module model's config, from its language model's view (or a tower's)."""
    view = cfg.get(LANGUAGE_MODEL, cfg)
    return view.get(TOP_LEVEL, view)


def _text_hidden(cfg: dict[str, Any]) -> int:
    return cfg[LANGUAGE_MODEL]["hidden_size"]


def vision_head_dim(cfg: dict[str, Any]) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _tied(default: bool):  # noqa: ANN202
    return lambda cfg: bool(_top(cfg).get("tie_word_embeddings", default))


# what both towers read of vision_config (Pixtral's and Llama 4's keys agree)
TOWER_SHAPE = (
    ConfigKey("num_layers", "num_hidden_layers"),
    ConfigKey("num_heads", "num_attention_heads"),
    ConfigKey("num_kv_heads", "num_attention_heads"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("head_dim", None, vision_head_dim),
    ConfigKey("ffn_hidden_size", "intermediate_size"),
    ConfigKey("patch_size", "patch_size"),
    ConfigKey("patch_channels", "num_channels", 3),
    ConfigKey("activation", "hidden_act"),
)

# ---------------------------------------------------------------------------------------------
# mistral3: transformers' Mistral3ForConditionalGeneration (modeling_mistral3.py: the projector's
# RMSNorm, Mistral3PatchMerger's merging_layer [E, E m^2], linear_1 [T, E x feature layers], GELU,
# linear_2 [T, T]) and PixtralVisionModel (modeling_pixtral.py: patch_conv without a bias, ln_pre,
# layers of attention_norm, q/k/v/o without biases, ffn_norm, a gated feed_forward; RMSNorms of
# eps 1e-5, 2-D RoPE without weights)
PX = "vision_tower.transformer.layers.{i}."
PIXTRAL = (
    ("vision_tower.patch_conv.weight", "vision.patch_embed.weight"),
    ("vision_tower.ln_pre.weight", "vision.pre_norm.weight"),
    (PX + "attention_norm.weight", V + "attn_norm.weight"),
    *((PX + f"attention.{p}_proj.weight", V + f"attn.{p}.weight") for p in "qkvo"),
    (PX + "ffn_norm.weight", V + "mlp_norm.weight"),
    *((PX + f"feed_forward.{p}_proj.weight", V + f"mlp.{p}.weight") for p in ("gate", "up", "down")),
    ("multi_modal_projector.norm.weight", "vision.patch_merger.norm.weight"),
    ("multi_modal_projector.patch_merger.merging_layer.weight", "vision.patch_merger.weight"),
    *(
        (f"multi_modal_projector.linear_{n}.{kind}", f"vision.projector.fc{n}.{kind}")
        for n in (1, 2)
        for kind in ("weight", "bias")
    ),
)


def _feature_layers(cfg: dict[str, Any]) -> int:
    """How many tower layers' outputs the projector reads side by side (vision_feature_layer)."""
    layer = _top(cfg).get("vision_feature_layer", -1)
    return len(layer) if isinstance(layer, list) else 1


PIXTRAL_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *TOWER_SHAPE,
        ConfigKey("patch_merger_size", None, lambda cfg: _top(cfg).get("spatial_merge_size", 2)),
        ConfigKey("projector_mlp_in", None, lambda cfg: cfg["hidden_size"] * _feature_layers(cfg)),
        ConfigKey("projector_mlp_out", None, _text_hidden),
        ConfigKey(
            "projector_mlp_bias", None, lambda cfg: bool(_top(cfg).get("multimodal_projector_bias", False))
        ),
    ),
    constants=(
        ("qkv_bias", False),
        ("o_bias", False),
        ("mlp_bias", False),
        ("gated_mlp", True),
        ("patch_bias", False),
        ("pre_norm", True),
        ("norm_eps", 1e-5),
        ("projector_mlp_layers", 2),
    ),
    # an image of any whole number of merged patches, its size in image_sizes (transformers 5.25
    # image_processing_pixtral / processing_pixtral.py:93-98), one [IMG] per merged patch
    # (modeling_mistral3.py:84-95); the processor's [IMG_BREAK] after each row and [IMG_END] are
    # the tokenizer's ids, not the config's, and plain text to the model: verify leaves them out
    image=ImageInput("sized", "image_token_index", merge="patch_merger_size"),
)

# the language model: Ministral 3's table (mistral's tensors, head_dim, YaRN and Llama 4's query
# scaling in its Megatron args); a text_config of model_type mistral gets mistral's Megatron args
MINISTRAL3 = by_name("ministral3")
MISTRAL = by_name("mistral")


def _mistral_head_dim(cfg: dict[str, Any]) -> int:
    """A text_config without head_dim: Ministral3Config's default (128) where the key is absent,
    else (null, or MistralConfig) hidden / heads, as their __post_init__ sets it."""
    if cfg.get("model_type") == "ministral3" and "head_dim" not in cfg:
        return 128
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _mistral3_args(cfg: dict[str, Any]) -> dict[str, Any]:
    text = {**cfg, **cfg.get("text_config", {})}
    family = MINISTRAL3 if text.get("model_type") == "ministral3" else MISTRAL
    return family.megatron_args(text) if family.megatron_args else {}


register(
    Family(
        name="mistral3",
        model_types=("mistral3",),
        architecture="Mistral3ForConditionalGeneration",
        tensors=tuple((LM + h, c) for h, c in MINISTRAL3.tensors) + PIXTRAL,
        config=(
            *(k for k in MINISTRAL3.config if k.field not in ("tied_embeddings", "head_dim")),
            ConfigKey("head_dim", "head_dim", _mistral_head_dim),
            ConfigKey("tied_embeddings", None, _tied(True)),
        ),
        constants=MINISTRAL3.constants,
        megatron_args=_mistral3_args,
        text_config="text_config",
        towers=(PIXTRAL_TOWER,),
        memory=LLAVA_MEMORY,  # transformers' "llava" renames (conversion_mapping.py:105)
        tested=Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2", "--tp 2 --pp 2", "--ckpt-format torch_dist"),
            mcore_missing=(
                "no: Megatron-Bridge's Ministral3Model wraps transformers' PixtralVisionModel and "
                "projector (ministral3/modeling_ministral3.py:117-157), not megatron-core modules"
            ),
        ),
    )
)

# ---------------------------------------------------------------------------------------------
# llama4: transformers' Llama4ForConditionalGeneration (modeling_llama4.py: Llama4VisionModel's
# Llama4UnfoldConvolution linear [E, C P^2] without a bias, class_embedding [E],
# positional_embedding_vlm [(S/P)^2 + 1, E], layernorm_pre / layernorm_post, layers of LayerNorms,
# q/k/v/o and fc1 / fc2 with biases; Llama4VisionPixelShuffleMLP's fc1 [projector_input_dim, I]
# and fc2 [projector_output_dim, projector_output_dim] without biases;
# Llama4MultiModalProjector's linear_1 [T, vision_output_dim] without a bias)
LLAMA4_TEXT = by_name("llama4_text")
VM = "vision_model."
VL = "vision_model.model.layers.{i}."
LLAMA4_VISION = (
    (VM + "patch_embedding.linear.weight", "vision.patch_embed.weight"),
    (VM + "class_embedding", "vision.class_embed.weight"),
    (VM + "positional_embedding_vlm", "vision.pos_embed.weight"),
    *((VM + f"layernorm_pre.{kind}", f"vision.pre_norm.{kind}") for kind in ("weight", "bias")),
    *(
        (VL + f"{hf}.{kind}", V + f"{c}.{kind}")
        for hf, c in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
        for kind in ("weight", "bias")
    ),
    *(
        (VL + f"self_attn.{p}_proj.{kind}", V + f"attn.{p}.{kind}")
        for p in "qkvo"
        for kind in ("weight", "bias")
    ),
    *(
        (VL + f"mlp.{hf}.{kind}", V + f"mlp.{c}.{kind}")
        for hf, c in (("fc1", "fc1"), ("fc2", "down"))
        for kind in ("weight", "bias")
    ),
    *((VM + f"layernorm_post.{kind}", f"vision.final_norm.{kind}") for kind in ("weight", "bias")),
    *((VM + f"vision_adapter.mlp.fc{n}.weight", f"vision.adapter.fc{n}.weight") for n in (1, 2)),
    ("multi_modal_projector.linear_1.weight", "vision.projector.fc1.weight"),
)
LLAMA4_TOWER = Tower(
    "vision",
    "vision_config",
    (
        *TOWER_SHAPE,
        ConfigKey("norm_eps", "norm_eps", 1e-5),
        ConfigKey("pos_embed_size", None, lambda cfg: (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1),
        ConfigKey("adapter_in", "intermediate_size"),
        ConfigKey("adapter_hidden", "projector_input_dim"),
        ConfigKey("adapter_out", "projector_output_dim"),
        ConfigKey("projector_mlp_in", "vision_output_dim"),
        ConfigKey("projector_mlp_out", None, _text_hidden),
    ),
    constants=(
        ("qkv_bias", True),
        ("o_bias", True),
        ("mlp_bias", True),
        ("gated_mlp", False),
        ("norm_bias", True),
        ("patch_unfold", True),
        ("patch_bias", False),
        ("class_embed", True),
        ("pre_norm", True),
        ("post_norm", True),
        ("projector_mlp_layers", 1),
        ("projector_mlp_bias", False),
    ),
    # one tile at the tower's image_size between <|image_start|> and <|image_end|>, each patch
    # token standing for 1 / pixel_shuffle_ratio^2 patches (transformers 5.25 processing_llama4.py:
    # 77, 99-112, 129-131; the <|image|> before the patches is the tokenizer's, plain text)
    image=ImageInput(
        "image",
        "image_token_index",
        around=("boi_token_index", "eoi_token_index"),
        tokens=lambda c: (
            (c.vision_config.image_size // c.vision_config.patch_size) ** 2
            // round(1 / c.vision_config.pixel_shuffle_ratio**2)
        ),
    ),
)

register(
    Family(
        name="llama4",
        model_types=("llama4",),
        architecture="Llama4ForConditionalGeneration",
        tensors=tuple((LM + h, c) for h, c in LLAMA4_TEXT.tensors) + LLAMA4_VISION,
        stacked=tuple(attrs.evolve(st, hf=LM + st.hf) for st in LLAMA4_TEXT.stacked),
        config=(
            *(k for k in LLAMA4_TEXT.config if k.field != "tied_embeddings"),
            ConfigKey("tied_embeddings", None, _tied(False)),
        ),
        constants=LLAMA4_TEXT.constants,
        megatron_args=lambda cfg: LLAMA4_TEXT.megatron_args({**cfg, **cfg.get("text_config", {})}),
        megatron_keys=LLAMA4_TEXT.megatron_keys,
        text_config="text_config",
        towers=(LLAMA4_TOWER,),
        tested=Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2 --pp 2 --ep 2", "--ckpt-format torch_dist"),
            mcore_missing=(
                "no: Megatron-Bridge has no Llama 4 model with a vision tower, and megatron-core 0.16's "
                "LLaVAModel no Llama 4 vision model (unfold patch embedding, 2-D RoPE, pixel-shuffle adapter)"
            ),
        ),
    )
)
