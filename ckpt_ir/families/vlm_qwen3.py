"""Vision-language families Qwen3-VL and Qwen3-VL-MoE (qwen3_vl, qwen3_vl_moe): a Qwen3 language
model and a tower with learned positions and DeepStack mergers, in Megatron-Bridge's Megatron-form
layout and MindSpeed-MM's (docs/families.md, vision-language models)."""

from __future__ import annotations

from ckpt_ir.families import (
    ConfigKey,
    ExpertStack,
    Family,
    HfNaming,
    MegatronTower,
    Renumbered,
    Tested,
    Tower,
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
from ckpt_ir.families.vlm import QWEN_IMAGE, VISION_CONSTANTS, VISION_SHAPE, V, tower_qkv, vision_head_dim

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


def language_model_table(tensors: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
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
        ConfigKey("head_dim", None, vision_head_dim),
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
        tensors=language_model_table(LLAMA_TENSORS) + QWEN3_VISION,
        packed=tower_qkv(Q3B + "attn.qkv"),
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
        tensors=language_model_table(EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP)
        + ((LM + "mlp.gate.weight", "layers.{i}.mlp.router.weight"),)
        + QWEN3_VISION,
        packed=tower_qkv(Q3B + "attn.qkv"),
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
