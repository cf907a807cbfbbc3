"""GLM-4.1V (glm4v) and GLM-4.5V (glm4v_moe): the glm4 / glm4_moe language model under
``model.language_model.*`` and GLM's vision tower under ``model.visual.*`` (a 3-D patch convolution
and a norm after it, learned positions, RMSNorm layers with ``qkv`` = [q; k; v], a final norm, a
downsampling convolution, a merger with a gated MLP).  HF -> Megatron-Core -> HF is bit-exact with
the side files back byte for byte, and transformers' logits on text plus a generated image are
equal, in two Megatron layouts:

* Megatron-Bridge's (``GLM45VBridge``, glm_vl/glm_45v_bridge.py:146-149: the tower as
  ``visual.**`` = HF ``model.visual.**``, whole on every TP rank of stage 0; the language model
  under ``language_model.*``); GLM-4.1V has no bridge and takes the same layout;
* MindSpeed-MM's (``GlmConverter``, checkpoint/vlm_model/converters/glm.py:31-85): ``text_decoder.*``
  and ``image_encoder.*``, the tower's attention ``self_attention.qkv`` = [q; k; v] and
  ``self_attention.proj`` whole on every TP rank (plain nn.Linear in its GlmViT), its MLP
  ``linear_fc1`` = [gate; up] split as Megatron's MLP ([gate_r; up_r]), ``linear_fc2`` by columns.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import build_vlm, image_logits, model_cache, rank
from tests.test_families_vlm import SIDE_FILES, assert_side_files, patch_inputs
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# partial rotary (half of head_dim 16), M-RoPE sections summing to 16 * 0.5 / 2
TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [1, 1, 2],
        "partial_rotary_factor": 0.5,
    },
)
# the tower: 32 wide, its layers' MLP out_hidden_size (64) wide, the merger's intermediate_size
# (48); 16 x 16 pixels of 4 x 4 patches (16 positions), 2 x 2 merged; a qkv bias (attention_bias)
VISION = dict(
    depth=2,
    num_heads=4,
    hidden_size=32,
    intermediate_size=48,
    out_hidden_size=64,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    image_size=16,
    attention_bias=True,
)
TOKENS = dict(
    image_token_id=150,
    video_token_id=151,
    image_start_token_id=152,
    image_end_token_id=153,
    video_start_token_id=154,
    video_end_token_id=155,
)
# GLM-4.5V: layer 0 dense, layer 1 MoE (4 experts 32 wide, top 2, a shared expert, a score bias)
MOE = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_shared_experts=1,
    attention_bias=True,
)
CONFIGS = {
    "glm4v": dict(text_config=TEXT, vision_config=VISION, **TOKENS),
    "glm4v_moe": dict(text_config=dict(TEXT, **MOE), vision_config=VISION, **TOKENS),
}
MM = dict(mm_keys="mindspeed")
LAYOUTS: dict[str, tuple[dict, ...]] = {
    "glm4v": (
        dict(tp=1),
        dict(tp=2, pp=2),
        dict(MM, pp=2, num_layer_list=(1, 1), vision_layer_list=(2, 0)),
        dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
    ),
    "glm4v_moe": (dict(tp=1), dict(tp=2, ep=2), dict(pp=2, ep=2)),
}


def build(path: str, model_type: str) -> str:
    """A tiny model built and saved by transformers, every parameter and the router's score bias random."""
    return build_vlm(path, model_type, CONFIGS[model_type], SIDE_FILES)


def inputs(cfg: dict) -> dict[str, torch.Tensor]:
    """Token ids around one generated image of GRID patches between GLM's begin / end of image
    (as Glm4vImageProcessor lays out the patches: Qwen2-VL's rows)."""
    return patch_inputs(cfg, "image_start_token_id", "image_end_token_id")


def logits(path: str) -> torch.Tensor:
    return image_logits(path, inputs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "glm4v", build)


def _files(mid: str, layout: dict) -> dict[tuple[int, int, int], dict]:
    """(TP, PP, EP rank) -> the model dict of each rank file of a Megatron directory."""
    tp, pp, ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
    out = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                if layout.get("mm_keys") == "mindspeed":
                    path = f"{mid}/release/{name}/model_optim_rng.pt"
                    out[(t, p, e)] = torch.load(path, weights_only=False)["model"]
                else:
                    out[(t, p, e)] = rank(mid, name)["model"]
    return out


def assert_bridge_files(mid: str, hf: dict, layout: dict) -> None:
    """Megatron-Bridge's GLM45VBridge layout: HF model.visual.X is visual.X, whole on every TP (and
    EP) rank of stage 0 and nowhere else."""
    visual = {"visual." + k[len("model.visual.") :]: k for k in hf if k.startswith("model.visual.")}
    for (t, p, e), sd in _files(mid, layout).items():
        keys = {k for k in sd if not k.startswith("language_model.")}
        assert keys == (set(visual) if p == 0 else set()), (t, p, e)
        for k in keys:
            assert torch.equal(sd[k], hf[visual[k]]), k


def assert_mindspeed_files(mid: str, hf: dict, layout: dict, cfg: dict) -> None:
    """MindSpeed-MM's GLM names (converters/glm.py RenameOp, UpGateMergeOp, QKVMergeOp), its
    placement (glm.py:19-28: patch embedding, post-conv norm and positions with the first stage
    holding vision layers; final norm, downsample and projector with the last), and the TP split its
    GLM model builds: the tower's qkv / proj whole, its MLP split as Megatron's; the language model's
    linear_qkv = per KV group [q of the group; k_g; v_g], split by rows."""
    tp, counts = layout.get("tp", 1), layout["vision_layer_list"]
    files = _files(mid, layout)
    E = "image_encoder.encoder."
    firsts = (E + "patch_embed.", E + "post_conv_layernorm.", E + "embeddings.position_embedding.")
    lasts = ("image_encoder.projector.", E + "blocks.final_layernorm.", E + "downsample.")
    filled = [p for p, n in enumerate(counts) if n]
    for (t, p, _), sd in files.items():
        layers = {int(k.split(".")[4]) for k in sd if k.startswith(E + "blocks.layers.")}
        assert layers == set(range(counts[p])), (t, p)
        assert {k for k in sd if k.startswith(firsts)} == (
            {
                E + "patch_embed.proj.weight",
                E + "patch_embed.proj.bias",
                E + "post_conv_layernorm.weight",
                E + "embeddings.position_embedding.weight",
            }
            if p == filled[0]
            else set()
        ), (t, p)
        assert any(k.startswith(lasts) for k in sd) == (p == filled[-1]), (t, p)
    v = cfg["vision_config"]
    for layer in range(v["depth"]):
        p = next(s for s in range(len(counts)) if sum(counts[: s + 1]) > layer)
        local = f"{E}blocks.layers.{layer - sum(counts[:p])}."
        hf_layer = f"model.visual.blocks.{layer}."
        gate, up = hf[hf_layer + "mlp.gate_proj.weight"], hf[hf_layer + "mlp.up_proj.weight"]
        for t in range(tp):
            sd = files[(t, p, 0)]
            for kind in ("weight", "bias"):  # whole [q; k; v] on every rank
                assert torch.equal(
                    sd[local + f"self_attention.qkv.{kind}"], hf[hf_layer + f"attn.qkv.{kind}"]
                )
            assert torch.equal(sd[local + "self_attention.proj.weight"], hf[hf_layer + "attn.proj.weight"])
            fc1 = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
            assert torch.equal(sd[local + "mlp.linear_fc1.weight"], fc1)
            down = hf[hf_layer + "mlp.down_proj.weight"].chunk(tp, dim=1)[t]
            assert torch.equal(sd[local + "mlp.linear_fc2.weight"], down)
    text = cfg["text_config"]
    heads, groups = text["num_attention_heads"], text["num_key_value_heads"]
    d = text["hidden_size"] // heads
    prefix = "model.language_model.layers.0.self_attn."
    q, k, vv = (hf[prefix + f"{n}_proj.weight"] for n in "qkv")
    per = heads // groups
    qkv = torch.cat(
        [
            torch.cat([q[g * per * d : (g + 1) * per * d], k[g * d : (g + 1) * d], vv[g * d : (g + 1) * d]])
            for g in range(groups)
        ]
    )
    first = next(p for p, n in enumerate(layout["num_layer_list"]) if n)
    for t in range(tp):
        sd = files[(t, first, 0)]
        assert torch.equal(
            sd["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"], qkv.chunk(tp)[t]
        )
        assert "text_decoder.decoder.layers.0.post_self_attn_layernorm.weight" in sd


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(models, tmp_path, family):
    src = models(family)
    ckpt = ck.load(src)
    assert ckpt.spec.family == family and ckpt.spec.vision is not None
    want = logits(src)
    hf = hf_state(src)
    cfg = json.load(open(f"{src}/config.json"))
    for n, layout in enumerate(LAYOUTS[family]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        if layout.get("mm_keys") == "mindspeed":
            assert_mindspeed_files(mid, hf, layout, cfg)
        else:
            assert_bridge_files(mid, hf, layout)
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        assert_side_files(src, back)
        assert torch.equal(logits(back), want), layout
    # the image reaches the logits: one changed weight of the merger changes them
    f = os.path.join(back, "model.safetensors")
    sd = load_file(f)
    sd["model.visual.merger.down_proj.weight"] = sd["model.visual.merger.down_proj.weight"] * 1.5
    save_file(sd, f, metadata={"format": "pt"})
    assert not torch.equal(logits(back), want)


def mm_convert(method: str, *cfg: str) -> int:
    from ckpt_ir.commands.cli import main

    return main(["mm-convert", "GlmConverter", method, *cfg])


def test_mm_convert_glm_converter_both_ways(models, tmp_path):
    """``ckpt-ir mm-convert GlmConverter``: hf_to_mm at TP 2 (MindSpeed-MM's own writes whole
    tensors there; ckpt-ir splits what its GLM model splits), and mm_to_hf (MindSpeed-MM's writes
    nothing) gives the HF tensors and side files back bit for bit."""
    src = models("glm4v")
    mm, back = str(tmp_path / "mm"), str(tmp_path / "back")
    sizes = ("--cfg.parallel_config.tp_size", "2")
    nested = ("--cfg.parallel_config.llm_pp_layers", "[[2]]", "--cfg.parallel_config.vit_pp_layers", "[[2]]")
    assert mm_convert("hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *nested, *sizes) == 0
    hf = hf_state(src)
    layout = dict(MM, tp=2, pp=1, num_layer_list=(2,), vision_layer_list=(2,))
    assert_mindspeed_files(mm, hf, layout, json.load(open(f"{src}/config.json")))
    embed = hf["model.language_model.embed_tokens.weight"]
    for t in range(2):
        sd = _files(mm, layout)[(t, 0, 0)]
        assert torch.equal(sd["text_decoder.embedding.word_embeddings.weight"], embed.chunk(2)[t])
    flat = ("--cfg.parallel_config.llm_pp_layers", "[2]", "--cfg.parallel_config.vit_pp_layers", "[2]")
    args = ("--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *flat, *sizes)
    assert mm_convert("mm_to_hf", *args) == 0
    assert_same_tensors(src, back)
    assert_side_files(src, back)
