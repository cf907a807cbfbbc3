"""Hybrid families of ``ckpt_ir/families/recurrent.py`` (LFM2, Kimi Linear, Jamba), whose
mixers (short convolution, Kimi delta attention, Mamba-1) no Megatron implementation has: a tiny
random model built and saved by transformers converts HF -> ckpt-ir's own Megatron layout (TP2,
uneven PP, EP2) -> HF bit-exactly with transformers' logits equal, and HF -> HF through bf16 and
back.  The rank files hold the documented keys (docs/formats.md) with the TP split each mixer's
maths allows, checked against slices of the HF tensors taken as transformers' forward reads them;
each layer's blocks and sizes are what transformers builds from the same config.json."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state, logits

CONFIGS = {
    # conv, attention, conv, conv; biases on the short convolutions (conv_bias); the MLP width
    # derived from intermediate_size: int(2 * 150 / 3) = 100, rounded up to a multiple of 32
    "lfm2": dict(
        DENSE,
        intermediate_size=150,
        block_multiple_of=32,
        layer_types=["conv", "full_attention", "conv", "conv"],
        conv_bias=True,
    ),
    # KDA, MLA (no q-LoRA), KDA, MLA; MLPs dense, MoE, MoE, dense; 4 KDA heads of 16
    "kimi_linear": dict(
        DENSE,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        linear_num_heads=4,
        linear_head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "dense"],
    ),
    # Mamba-1 layers 0 and 2 (MoE), attention layers 1 and 3 (dense); in_proj / out_proj biases
    "jamba": dict(
        DENSE,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        mamba_d_state=8,
        mamba_dt_rank=8,
        mamba_proj_bias=True,
    ),
}

# per family: the Megatron layouts to round-trip through (the GPTModel-like layer of ckpt-ir's own
# names takes a virtual pipeline as any GPT layer does)
LAYOUTS = {
    "lfm2": (dict(tp=2, pp=2, num_layer_list=(3, 1)), dict(tp=2, pp=2, vpp_layers=1)),
    "kimi_linear": (dict(tp=2, pp=2, ep=2, num_layer_list=(1, 3)), dict(pp=2, vpp_layers=1, ep=2)),
    "jamba": (
        dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1), grouped_gemm=True),
        dict(tp=2, pp=2, vpp_layers=1),
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recurrent")
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            cache[model_type] = build(str(root / model_type), model_type, configs=CONFIGS)
        return cache[model_type]

    return get


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_to_hf_through_bf16_and_fp32_is_bit_exact_with_same_logits(models, tmp_path, family):
    """bf16 -> fp32 -> bf16 returns every bf16 value (what transformers keeps in fp32, Kimi's
    router and dt_bias, stays fp32 throughout), and transformers computes the same logits."""
    half, wide, back = (str(tmp_path / n) for n in ("half", "wide", "back"))
    convert(models(family), half, ck.Target(to="hf", dtype="bf16"))
    convert(half, wide, ck.Target(to="hf", dtype="fp32"))
    convert(wide, back, ck.Target(to="hf", dtype="bf16"))
    assert_same_tensors(half, back)
    assert {str(t.dtype) for t in hf_state(wide).values()} == {"torch.float32"}
    assert torch.equal(logits(half, IDS), logits(back, IDS))


def _tp2(models, tmp_path, family: str) -> tuple[dict, list[dict]]:
    """The HF tensors and the two TP ranks' model state of ``family`` at TP2."""
    src = models(family)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    return hf_state(src), [rank(mid, f"mp_rank_{r:02d}")["model"] for r in (0, 1)]


def _layer_keys(sd: dict, i: int) -> set[str]:
    prefix = f"decoder.layers.{i}."
    return {k[len(prefix) :] for k in sd if k.startswith(prefix) and not k.endswith("_extra_state")}


def _rows(t: torch.Tensor, r: int, parts: int = 1) -> torch.Tensor:
    """Rank r's half of each of ``parts`` equal row blocks of ``t``, concatenated."""
    return torch.cat([p.chunk(2)[r] for p in t.chunk(parts)])


def test_lfm2_short_conv_layout(models, tmp_path):
    """A short-convolution layer is input_layernorm (operator_norm), short_conv.{in_proj, conv,
    out_proj} (weights and biases), pre_mlp_layernorm (ffn_norm) and the SwiGLU MLP.  The mixer
    computes out_proj(C * conv(B * x)) with [B; C; x] = in_proj rows in three equal chunks and
    every channel on its own, so TP rank r holds [B_r; C_r; x_r] and channels r of the conv;
    out_proj is row-parallel, its bias whole."""
    hf, ranks = _tp2(models, tmp_path, "lfm2")
    h = "model.layers.0."
    mixer = {f"short_conv.{m}.{leaf}" for m in ("in_proj", "conv", "out_proj") for leaf in ("weight", "bias")}
    mlp = {"mlp.linear_fc1.weight", "mlp.linear_fc2.weight"}
    assert _layer_keys(ranks[0], 0) == mixer | mlp | {"input_layernorm.weight", "pre_mlp_layernorm.weight"}
    for r, sd in enumerate(ranks):
        d = "decoder.layers.0."
        for leaf in ("weight", "bias"):
            assert torch.equal(
                sd[d + f"short_conv.in_proj.{leaf}"], _rows(hf[h + f"conv.in_proj.{leaf}"], r, 3)
            )
            assert torch.equal(sd[d + f"short_conv.conv.{leaf}"], _rows(hf[h + f"conv.conv.{leaf}"], r))
        assert torch.equal(
            sd[d + "short_conv.out_proj.weight"], hf[h + "conv.out_proj.weight"].chunk(2, 1)[r]
        )
        assert torch.equal(sd[d + "short_conv.out_proj.bias"], hf[h + "conv.out_proj.bias"])
        assert torch.equal(sd[d + "input_layernorm.weight"], hf[h + "operator_norm.weight"])
        assert torch.equal(sd[d + "pre_mlp_layernorm.weight"], hf[h + "ffn_norm.weight"])
    assert not any(k.startswith("short_conv.") for k in _layer_keys(ranks[0], 1))  # the attention layer


def test_kimi_delta_attention_layout(models, tmp_path):
    """A KDA layer holds kda.* beside input_layernorm: q, k, v, their convs, b, f_b, g_b and
    dt_bias split with the heads (dt_bias is per channel, head-major), A_log ([1, 1, heads, 1] in
    HF) one value per head, o row-parallel; the low-rank f_a, g_a and the per-head o_norm whole.
    An MLA layer keeps MindSpeed-LLM's MLA keys."""
    hf, ranks = _tp2(models, tmp_path, "kimi_linear")
    h, d = "model.layers.0.self_attn.", "decoder.layers.0.kda."
    split = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "b": "b_proj", "f_b": "f_b_proj", "g_b": "g_b_proj"}
    split |= {f"{p}_conv": f"{p}_conv1d" for p in "qkv"}
    whole = {"f_a": "f_a_proj", "g_a": "g_a_proj", "o_norm": "o_norm"}
    want = {f"kda.{c}.weight" for c in (*split, *whole, "o")} | {"kda.A_log", "kda.dt_bias"}
    assert {k for k in _layer_keys(ranks[0], 0) if k.startswith("kda.")} == want
    assert "input_layernorm.weight" in _layer_keys(ranks[0], 0)
    for r, sd in enumerate(ranks):
        for c, m in split.items():
            assert torch.equal(sd[d + f"{c}.weight"], _rows(hf[h + f"{m}.weight"], r)), c
        for c, m in whole.items():
            assert torch.equal(sd[d + f"{c}.weight"], hf[h + f"{m}.weight"]), c
        assert torch.equal(sd[d + "o.weight"], hf[h + "o_proj.weight"].chunk(2, 1)[r])
        assert torch.equal(sd[d + "dt_bias"], _rows(hf[h + "dt_bias"], r))
        assert torch.equal(sd[d + "A_log"], hf[h + "A_log"].flatten().chunk(2)[r])
    assert "self_attention.linear_qkv.weight" in _layer_keys(ranks[0], 1)  # MLA: [q; kv_a]


def test_jamba_mamba1_layout(models, tmp_path):
    """A Mamba-1 layer holds mamba1.*: in_proj rows [x; z] (the forward chunks them in two) split
    part by part, conv1d, dt_proj, A_log and D by channels, x_proj (channels in) and out_proj
    row-parallel, out_proj's bias and the dt / B / C norms whole."""
    hf, ranks = _tp2(models, tmp_path, "jamba")
    h, d = "model.layers.0.mamba.", "decoder.layers.0.mamba1."
    for r, sd in enumerate(ranks):
        for leaf in ("weight", "bias"):
            assert torch.equal(sd[d + f"in_proj.{leaf}"], _rows(hf[h + f"in_proj.{leaf}"], r, 2))
            assert torch.equal(sd[d + f"conv1d.{leaf}"], _rows(hf[h + f"conv1d.{leaf}"], r))
            assert torch.equal(sd[d + f"dt_proj.{leaf}"], _rows(hf[h + f"dt_proj.{leaf}"], r))
        for m in ("A_log", "D"):
            assert torch.equal(sd[d + m], _rows(hf[h + m], r))
        for m in ("x_proj.weight", "out_proj.weight"):
            assert torch.equal(sd[d + m], hf[h + m].chunk(2, 1)[r])
        for c, m in (("dt_norm", "dt_layernorm"), ("b_norm", "b_layernorm"), ("c_norm", "c_layernorm")):
            assert torch.equal(sd[d + f"{c}.weight"], hf[h + f"{m}.weight"])
        assert torch.equal(sd[d + "out_proj.bias"], hf[h + "out_proj.bias"])
    assert "mlp.router.weight" in _layer_keys(ranks[0], 0) and "mlp.linear_fc1.weight" in _layer_keys(
        ranks[0], 1
    )


# configs as released (keys transformers rewrites on save): each family's blocks and sizes must be
# what transformers builds from them
RELEASED = {
    # LFM2's older attention list; a width multiplier and rounding
    "lfm2-full_attn_idxs": (
        "lfm2",
        dict(CONFIGS["lfm2"], layer_types=None, full_attn_idxs=[1, 3], block_ffn_dim_multiplier=1.5),
    ),
    # Kimi-Linear's release config: sizes and (1-indexed) layer kinds in linear_attn_config
    "kimi_linear-linear_attn_config": (
        "kimi_linear",
        dict(
            {k: v for k, v in CONFIGS["kimi_linear"].items() if k not in ("layer_types", "mlp_layer_types")},
            linear_attn_config={
                "full_attn_layers": [2, 4],
                "kda_layers": [1, 3],
                "num_heads": 2,
                "head_dim": 8,
                "short_conv_kernel_size": 3,
            },
            first_k_dense_replace=2,
        ),
    ),
    "jamba-period3": (
        "jamba",
        dict(
            CONFIGS["jamba"],
            attn_layer_period=3,
            attn_layer_offset=2,
            expert_layer_offset=1,
            mamba_dt_rank="auto",
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(RELEASED))
def test_blocks_and_sizes_are_what_transformers_builds_from_the_config(tmp_path, case):
    from ckpt_ir.ir.verify import verify

    family, cfg = RELEASED[case]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = build(str(tmp_path / "hf"), family, configs={family: cfg})
    built = json.load(open(os.path.join(path, "config.json")))
    raw = dict(cfg, model_type=family, num_hidden_layers=4)
    json.dump(raw, open(os.path.join(path, "config.json"), "w"))  # as released
    if family == "kimi_linear":  # a dense MLP under mlp.*, which transformers also loads
        f = os.path.join(path, "model.safetensors")
        sd = load_file(f)
        sd = {re.sub(r"\.block_sparse_moe\.(\w+_proj)", r".mlp.\1", k): v for k, v in sd.items()}
        assert "model.layers.0.mlp.gate_proj.weight" in sd
        save_file(sd, f, metadata={"format": "pt"})
    c = ck.load(path)
    verify(c)  # every tensor transformers saved, of the shape the spec implies, and nothing missing
    mixers = {"conv": "short_conv", "linear_attention": "kda" if family == "kimi_linear" else "mamba1"}
    mixers |= {"full_attention": "mla" if family == "kimi_linear" else "attention"}
    if family == "jamba":  # transformers' properties, not saved
        from transformers import JambaConfig

        jc = JambaConfig(**raw)
        types, mlps = jc.layer_types, ["sparse" if n > 1 else "dense" for n in jc.layers_num_experts]
    else:
        types, mlps = built["layer_types"], built.get("mlp_layer_types", ["dense"] * 4)
    want = tuple((mixers[t], "moe" if m == "sparse" else "mlp") for t, m in zip(types, mlps))
    assert c.spec.layer_blocks == want


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("lfm2", dict(hidden_size=66, num_key_value_heads=4), "short_conv layers' hidden size 66"),
        ("kimi_linear", dict(linear_num_heads=6), "kda layers' heads 6"),
        (
            "jamba",
            dict(hidden_size=66, num_key_value_heads=4, mamba_expand=1),
            "mamba1 layers' inner width 66",
        ),
    ],
)
def test_a_tp_the_mixer_does_not_split_over_is_a_one_line_error(family, overrides, message):
    """Each mixer splits over TP by channels or heads (test_*_layout above): a TP that does not
    divide them is refused before anything is read, naming the block and the size."""
    from ckpt_ir.errors import LayoutError
    from ckpt_ir.families import by_name
    from ckpt_ir.ir.layout import Layout, validate

    spec = by_name(family).spec_from_config(dict(CONFIGS[family], num_hidden_layers=4, **overrides))
    with pytest.raises(
        LayoutError, match=f"^layout: the {message} is not divisible by tensor parallel size 4;"
    ):
        validate(spec, Layout(format="mcore", tp=4))
