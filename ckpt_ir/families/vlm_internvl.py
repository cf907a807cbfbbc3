"""Vision-language family InternVL (internvl) in transformers' naming and OpenGVLab's remote-code
one (docs/families.md, vision-language models)."""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import (
    LANGUAGE_MODEL,
    ConfigKey,
    Family,
    HfNaming,
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
from ckpt_ir.families.vlm import LLAVA_MEMORY, V, language_model_name

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
        tensors=tuple((language_model_name(h), c) for h, c in LLAMA_TENSORS) + INTERNVL_VISION,
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
