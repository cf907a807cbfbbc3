"""Vision-language family kimi_k25 (Kimi-K2.5): a DeepSeek-V3 language model (MLA, MoE; the
``deepseek_v3`` family's table) beside MoonViT, a vision tower of pre-norm LayerNorm layers with a
packed ``[q; k; v]`` attention (2-D RoPE, no weights) and a plain GELU MLP, learned positions on a
grid, a final LayerNorm and a projector (a LayerNorm over the tower's width, then an MLP over
``merge_kernel_size`` neighbouring patches to the language model's width).

HF names are the hub's (the release's remote code, ``KimiK25ForConditionalGeneration``;
docs/reference/vision-language-models.md sections 1.1-1.4): ``language_model.model.*`` and
``language_model.lm_head.weight``, ``vision_tower.patch_embed.{proj,pos_emb}.*``,
``vision_tower.encoder.blocks.N.{norm0,norm1,wqkv,wo,mlp.fc0,mlp.fc1}.*``,
``vision_tower.encoder.final_layernorm.*``, ``mm_projector.{pre_norm,proj.0,proj.2}.*``.
transformers 5.25 (``Kimi_K25ForConditionalGeneration``) reads them through its conversion
(conversion_mapping.py:734-786: renames, ``wqkv`` split into q / k / v with a RoPE permutation) but
saves another naming; ckpt-ir reads and writes the hub's.  Whether the embeddings are tied is the
top level's ``tie_word_embeddings`` (``Kimi_K25Config``: true when absent,
configuration_kimi_k25.py:77).  The vision_config is read in transformers' keys
(``Kimi_K25VisionConfig``: num_hidden_layers, hidden_size, pos_emb_height, ...) or the release's
remote-code spellings (``vt_num_hidden_layers``, ``vt_hidden_size``, ``init_pos_emb_height``, ...).

The released routed experts are INT4 pack-quantized (compressed-tensors); ckpt_ir.quant reads them
dequantized as Megatron-Bridge does.

Megatron: Megatron-Bridge's ``KimiK25VLBridge`` (``models/kimi_vl/kimi_k25_vl_bridge.py``:
242-270): the language model a GPTModel under ``language_model.`` (DeepSeek's common mapping list
re-prefixed, 246-254), the tower and projector in their HF form ``vision_tower.**`` and
``mm_projector.**``, whole on every TP rank (``ReplicatedMapping``, 256-268) of pipeline stage 0,
where ``KimiK25VLModel`` builds them (``modeling_kimi_k25_vl.py``:159-229, ``pre_process``).
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.families import (
    LANGUAGE_MODEL,
    TOP_LEVEL,
    ConfigKey,
    Family,
    ImageInput,
    Tested,
    Tower,
    by_name,
    mla,  # noqa: F401  (deepseek_v3, the language model)
    register,
)
from ckpt_ir.families.vlm import tower_qkv

V = "vision.layers.{i}."
B = "vision_tower.encoder.blocks.{i}."
LM = "language_model."
DEEPSEEK_V3 = by_name("deepseek_v3")


def _pairs(hf: str, canonical: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{hf}.{kind}", f"{canonical}.{kind}") for kind in ("weight", "bias"))


KIMI_VISION = (
    *_pairs("vision_tower.patch_embed.proj", "vision.patch_embed"),
    ("vision_tower.patch_embed.pos_emb.weight", "vision.pos_embed.weight"),
    *_pairs(B + "norm0", V + "attn_norm"),
    *_pairs(B + "wo", V + "attn.o"),
    *_pairs(B + "norm1", V + "mlp_norm"),
    *_pairs(B + "mlp.fc0", V + "mlp.fc1"),
    *_pairs(B + "mlp.fc1", V + "mlp.down"),
    *_pairs("vision_tower.encoder.final_layernorm", "vision.final_norm"),
    # the projector: its LayerNorm over the tower's width, then the merger MLP (proj.1 is the GELU)
    *_pairs("mm_projector.pre_norm", "vision.merger.norm"),
    *_pairs("mm_projector.proj.0", "vision.merger.fc1"),
    *_pairs("mm_projector.proj.2", "vision.merger.fc2"),
)


def _top(cfg: dict[str, Any]) -> dict[str, Any]:
    """The top level of the config, from the language model's view or the tower's."""
    view = cfg.get(LANGUAGE_MODEL, cfg)
    return view.get(TOP_LEVEL, view)


def _merger_size(cfg: dict[str, Any]) -> int:
    """The side of the square of patches the projector merges (merge_kernel_size); its norm is
    over the tower's width (projection_hidden_size / mm_hidden_size must equal it)."""
    kernel = cfg.get("merge_kernel_size", [2, 2])
    width = cfg.get("hidden_size", cfg.get("vt_hidden_size"))
    top = _top(cfg)
    norm = top.get("projection_hidden_size", cfg.get("mm_hidden_size", width))
    if len(kernel) != 2 or kernel[0] != kernel[1] or norm != width:
        raise FormatError(
            f"vision_config: merge_kernel_size {list(kernel)} and projection_hidden_size {norm} (tower width "
            f"{width}); the kimi_k25 family reads a square kernel and a projector norm as wide as the tower"
        )
    return int(kernel[0])


def _width(cfg: dict[str, Any]) -> int:
    return cfg["hidden_size"] if "hidden_size" in cfg else cfg["vt_hidden_size"]


def _heads(cfg: dict[str, Any]) -> int:
    return cfg["num_attention_heads"] if "num_attention_heads" in cfg else cfg["vt_num_attention_heads"]


KIMI_TOWER = Tower(
    "vision",
    "vision_config",
    (
        ConfigKey("num_layers", "num_hidden_layers", aliases=("vt_num_hidden_layers",)),
        ConfigKey("num_heads", "num_attention_heads", aliases=("vt_num_attention_heads",)),
        ConfigKey("num_kv_heads", "num_attention_heads", aliases=("vt_num_attention_heads",)),
        ConfigKey("hidden_size", "hidden_size", aliases=("vt_hidden_size",)),
        ConfigKey("head_dim", None, lambda cfg: _width(cfg) // _heads(cfg)),
        ConfigKey("ffn_hidden_size", "intermediate_size", aliases=("vt_intermediate_size",)),
        ConfigKey("patch_size", "patch_size"),
        ConfigKey("pos_embed_width", "pos_emb_width", aliases=("init_pos_emb_width",)),
        ConfigKey(
            "pos_embed_size",
            None,
            lambda cfg: (
                cfg.get("pos_emb_height", cfg.get("init_pos_emb_height"))
                * cfg.get("pos_emb_width", cfg.get("init_pos_emb_width"))
            ),
        ),
        ConfigKey("merger_size", None, _merger_size),
        ConfigKey("merger_out", None, lambda cfg: cfg[LANGUAGE_MODEL]["hidden_size"]),
        ConfigKey("activation", "hidden_act", "gelu_pytorch_tanh"),
    ),
    # Conv2d(3, E) with a bias; LayerNorms with biases (eps 1e-5); biases on wqkv, wo, fc0, fc1
    # and the projector (modeling_kimi_k25.py:149, 221-223, 294-301, 377-378, 494, 552-556)
    constants=(
        ("patch_channels", 3),
        ("patch_bias", True),
        ("qkv_bias", True),
        ("o_bias", True),
        ("mlp_bias", True),
        ("gated_mlp", False),
        ("norm_bias", True),
        ("norm_eps", 1e-5),
        ("post_norm", True),
    ),
    # pixel_values [patches, channels, patch, patch] with image_grid_thw [[1, rows, columns]]
    # (transformers 5.25 image_processing_kimi_k25.py:131-149, 211-215), one image token per
    # merge_kernel_size patches (processing_kimi_k25.py:61-64)
    image=ImageInput("patches", "image_token_id", patch_rows="chw"),
)

register(
    Family(
        name="kimi_k25",
        model_types=("kimi_k25",),
        architecture="KimiK25ForConditionalGeneration",
        tensors=tuple((LM + h, c) for h, c in DEEPSEEK_V3.tensors) + KIMI_VISION,
        # MoonViT's wqkv: [q; k; v] rows as stored (the RoPE pairs of the release's own layout, which
        # transformers permutes on load only)
        packed=tower_qkv(B + "wqkv"),
        config=(
            *(k for k in DEEPSEEK_V3.config if k.field != "tied_embeddings"),
            ConfigKey("tied_embeddings", None, lambda cfg: bool(_top(cfg).get("tie_word_embeddings", True))),
        ),
        constants=DEEPSEEK_V3.constants,
        megatron_args=lambda cfg: DEEPSEEK_V3.megatron_args({**cfg, **cfg.get("text_config", {})}),
        text_config="text_config",
        towers=(KIMI_TOWER,),
        # transformers builds the language model as model.language_model.* (a prefix rename) but
        # shifts the tower's names by one (conversion_mapping.py:734-760): its in-memory mlp.fc1 is
        # the stored mlp.fc0, which a prefix table cannot say
        peft_refused=(
            "transformers renames its tower's modules on load (norm0/norm1 to norm1/norm2, fc0/fc1 to "
            "fc1/fc2), so an adapter's module names are not the checkpoint's"
        ),
        tested=Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2 --mla-keys mindspeed",
                "--tp 2 --pp 2",
                "--ep 2",
                "--ckpt-format torch_dist",
            ),
            mcore_missing=(
                "no: Megatron-Bridge's KimiK25VLModel wraps the release's remote-code MoonViT tower and "
                "projector (kimi_vl/modeling_kimi_k25_vl.py:159-229), not megatron-core modules"
            ),
        ),
    )
)
