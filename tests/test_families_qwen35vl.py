"""Qwen3.5's vision-language families (qwen3_5_vl, qwen3_5_vl_moe: the gated-delta-net hybrid
language model under ``model.language_model.*``, the hub's MTP layer under the top-level ``mtp.*``,
Qwen3-VL's tower without DeepStack): HF -> Megatron-Core -> HF is bit-exact with the side files back
byte for byte and transformers' logits on text plus a generated image equal, in Megatron-Bridge's
layout (``qwen_vl/qwen35_vl_bridge.py``: the language model under ``language_model.`` with
megatron-core's GatedDeltaNet, its MTP layer as ``language_model.mtp.*``, the tower in Megatron's
modules under ``vision_model.`` split over the language model's TP on pipeline stage 0:
docs/reference/vision-language-models.md sections 2.2, 2.3).  The expected rank-file tensors are
computed here from the HF tensors by those rules; MindSpeed-MM has no Megatron layout of Qwen3.5,
and both ways of asking for it are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import UsageError
from tests.test_families_qwen3vl import TOWER_WEIGHT, build, check_bridge, logits, per_head, rank_models
from tests.test_families_vlm import TEXT, TOKENS, assert_side_files
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# the language model: layer 0 gated-delta-net (2 key heads, 4 value heads), layer 1 gated full
# attention; rotary on half of each 16-wide head, M-RoPE sections summing to its 4 frequencies
Q35_TEXT = dict(
    TEXT,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    layer_types=["linear_attention", "full_attention"],
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
    },
)
# Qwen3-VL's tower (patch 4, temporal patch 2, 2x2 merge, 16 learned positions), no DeepStack
Q35_VISION = dict(
    depth=2,
    num_heads=4,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
    hidden_size=32,
    intermediate_size=48,
    out_hidden_size=64,
    num_position_embeddings=16,
)
CONFIGS = {
    "qwen3_5": dict(text_config=Q35_TEXT, vision_config=Q35_VISION, **TOKENS),
    # every layer MoE (per-expert tensors on disk), a gated shared expert 40 wide
    "qwen3_5_moe": dict(
        text_config=dict(
            Q35_TEXT,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=40,
        ),
        vision_config=Q35_VISION,
        **TOKENS,
    ),
}
# the test cases are named by model type; the families they test (tests/test_support_matrix.py)
FAMILY = {"qwen3_5": "qwen3_5_vl", "qwen3_5_moe": "qwen3_5_vl_moe"}
LAYOUTS = {
    "qwen3_5": (dict(tp=1), dict(tp=2), dict(tp=2, pp=2, num_layer_list=(1, 1))),
    "qwen3_5_moe": (dict(tp=1), dict(tp=2, ep=2), dict(pp=2, ep=2, num_layer_list=(1, 1))),
}
H = Q35_TEXT["hidden_size"]


def add_mtp_layer(path: str) -> dict:
    """Give the checkpoint at ``path`` the hub's MTP layer (transformers ignores ``^mtp.*``):
    ``mtp.layers.0.*`` = a random copy of full-attention layer 1, and the un-numbered ``mtp.fc``
    [H, 2H], ``mtp.norm``, ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``.  The
    gated-delta-net norm is drawn from [0.5, 2], where megatron-core's zero-centred out_norm
    (w - 1) is exact (tests/family_models.py's build does the same for the text family)."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    g = torch.Generator().manual_seed(7)
    norm = "model.language_model.layers.0.linear_attn.norm.weight"
    sd[norm] = torch.rand(sd[norm].shape, generator=g) * 1.5 + 0.5
    layer = "model.language_model.layers.1."
    for k in [k for k in sd if k.startswith(layer)]:
        sd["mtp.layers.0." + k[len(layer) :]] = torch.randn(sd[k].shape, generator=g)
    for k in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        sd[f"mtp.{k}.weight"] = torch.randn(H, generator=g)
    sd["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=g)
    save_file(sd, f, metadata={"format": "pt"})
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35vl")
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            cache[model_type] = build(str(root / model_type), model_type, CONFIGS)
            add_mtp_layer(cache[model_type])
        return cache[model_type]

    return get


def check_tower_and_mtp(mid: str, hf: dict, layout: dict, inner: str = "transformer_layer") -> None:
    """Megatron-Bridge's names and splits (docs/reference/vision-language-models.md section 2.3;
    qwen35_vl_bridge.py:71-142, no DeepStack list), beyond check_bridge's: the qkv bias per head,
    the attention output and the merger split like a row / column parallel linear (bias whole);
    the MTP layer on the last stage under language_model.mtp.layers.0 (qwen35_bridge.py:320-336,
    597-611; ``inner`` the transformer layer's module name: mtp_model_layer from Megatron-Core
    0.17, which Bridge's table names), fc = eh_proj split on dim 0, norms whole."""
    check_bridge(mid, hf, layout, dict(Q35_VISION, deepstack_visual_indexes=[]))
    tp, pp, heads = layout.get("tp", 1), layout.get("pp", 1), Q35_VISION["num_heads"]
    v, lm, mtp = "vision_model.", "model.language_model.", "language_model.mtp.layers.0."
    for (t, p, _), sd in rank_models(mid, layout).items():
        assert not any("deepstack" in k for k in sd)
        assert all(k.startswith(("vision_model.", "language_model.")) for k in sd), sorted(sd)[0]
        want = {}
        if p == 0:
            layer = v + "decoder.layers.0.self_attention."
            want = {
                layer + "linear_qkv.bias": per_head(hf["model.visual.blocks.0.attn.qkv.bias"], heads).chunk(
                    tp
                )[t],
                layer + "linear_proj.weight": hf["model.visual.blocks.0.attn.proj.weight"].chunk(tp, 1)[t],
                layer + "linear_proj.bias": hf["model.visual.blocks.0.attn.proj.bias"],
                v + "merger.linear_fc1.weight": hf["model.visual.merger.linear_fc1.weight"].chunk(tp)[t],
                v + "merger.linear_fc2.weight": hf["model.visual.merger.linear_fc2.weight"].chunk(tp, 1)[t],
                v + "merger.linear_fc2.bias": hf["model.visual.merger.linear_fc2.bias"],
                v + "patch_embed.proj.bias": hf["model.visual.patch_embed.proj.bias"],
                # the gated-delta-net layer in megatron-core's module (qwen35_bridge.py:525-528)
                "language_model.decoder.layers.0.self_attention.A_log": hf[
                    lm + "layers.0.linear_attn.A_log"
                ].chunk(tp)[t],
            }
        if p == pp - 1:
            want |= {
                mtp + "eh_proj.weight": hf["mtp.fc.weight"].chunk(tp)[t],
                mtp + "enorm.weight": hf["mtp.pre_fc_norm_embedding.weight"],
                mtp + "hnorm.weight": hf["mtp.pre_fc_norm_hidden.weight"],
                mtp + "final_layernorm.weight": hf["mtp.norm.weight"],
                mtp + f"{inner}.self_attention.q_layernorm.weight": hf[
                    "mtp.layers.0.self_attn.q_norm.weight"
                ],
                mtp + f"{inner}.self_attention.linear_proj.weight": hf[
                    "mtp.layers.0.self_attn.o_proj.weight"
                ].chunk(tp, 1)[t],
            }
        else:
            assert not any(k.startswith("language_model.mtp.") for k in sd), (t, p)
        for k, x in want.items():
            assert torch.equal(sd[k], x), (k, t, p)


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(models, tmp_path, model_type):
    src = models(model_type)
    cfg = json.load(open(f"{src}/config.json"))
    spec = ck.load(src).spec
    assert (spec.family, spec.mtp_layers, spec.vision.deepstack_layers) == (FAMILY[model_type], 1, ())
    want, hf = logits(src), hf_state(src)
    back = src
    for n, layout in enumerate(LAYOUTS[model_type]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        check_tower_and_mtp(mid, hf, layout)
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        assert_side_files(src, back)
        assert json.load(open(f"{back}/config.json")) == cfg
    # equal tensors and config give equal logits; checked once, on the last layout's output, and
    # the image reaches them: one changed tower weight changes them
    assert torch.equal(logits(back), want)
    assert not torch.equal(logits(back, scale=TOWER_WEIGHT), want)


def test_mtp_layer_in_bridges_megatron_core_0_17_names(models, tmp_path):
    """Megatron-Bridge's MTP table names the layer's module mtp_model_layer (Megatron-Core 0.17 on,
    qwen35_bridge.py:329-336): --megatron-version 0.17 writes those names, and they read back."""
    src, mid, back = models("qwen3_5_moe"), str(tmp_path / "mid"), str(tmp_path / "back")
    layout = dict(tp=2, ep=2)
    convert(src, mid, ck.Target(to="mcore", megatron_version="0.17", **layout))
    check_tower_and_mtp(mid, hf_state(src), layout, inner="mtp_model_layer")
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_mindspeed_mm_layout_is_refused_in_one_line(models, tmp_path, capsys):
    """MindSpeed-MM converts Qwen3.5 to DCP only (checkpoint/vlm_model/converters/qwen3_5.py:303-308:
    Qwen35Converter.hf_to_mm / mm_to_hf are ``pass``): --mm-keys mindspeed and mm-convert
    Qwen35Converter are one-line usage errors (exit 2), and nothing is written."""
    from ckpt_ir.commands.cli import main

    src, mid = models("qwen3_5"), str(tmp_path / "mid")
    with pytest.raises(UsageError, match=r"MindSpeed-MM has no Megatron layout of qwen3_5_vl's") as e:
        convert(src, mid, ck.Target(to="mcore", mm_keys="mindspeed"))
    assert "\n" not in str(e.value) and not os.path.exists(mid)
    cli = ["mm-convert", "Qwen35Converter", "hf_to_mm", "--cfg.mm_dir", mid, "--cfg.hf_config.hf_dir", src]
    capsys.readouterr()  # what building the model printed
    assert main(cli) == 2
    err = capsys.readouterr().err.strip()
    assert "Qwen35Converter: MindSpeed-MM has no Megatron layout of Qwen3.5" in err and "\n" not in err
    assert not os.path.exists(mid)
