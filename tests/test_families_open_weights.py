"""Gemma 3, OLMo 2, OLMoE and gpt-oss: tiny random models built and saved by transformers convert
HF -> Megatron-Core (two layouts each, one with PP; TP2 x EP2 for the MoEs) -> HF bit-exactly with
equal transformers logits.  The Megatron tensors are checked against the HF ones with slicing
written here from the format facts (gpt-oss's interleaved [E, H, 2F] gate_up_proj, Megatron-Bridge's
per-expert [gate; up] fc1), not with ckpt-ir's own rules."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import LayoutError, VerifyError
from tests.test_families_wave_a import assert_round_trip, model_cache
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state

DENSE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CONFIGS = {
    # sliding window shorter than the test sequence (12), so windowed and global layers differ
    "gemma3_text": dict(
        DENSE,
        head_dim=32,
        sliding_window=4,
        layer_types=ALTERNATING,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "olmo2": dict(DENSE),
    "olmoe": dict(DENSE, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(
        DENSE,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=ALTERNATING,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
}
LAYOUTS = {
    "gemma3_text": (
        dict(tp=2, pp=2),
        dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te"),
        dict(ckpt_format="torch_dist"),
    ),
    "olmo2": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    "olmoe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    # megatron-core builds expert biases only with expert TP 1
    "gpt_oss": (dict(tp=2, pp=2, etp=1), dict(tp=2, ep=2, etp=1), dict(ckpt_format="torch_dist")),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "open-weights", CONFIGS)


def rank(mid: str, name: str) -> dict:
    return torch.load(f"{mid}/iter_0000001/{name}/model_optim_rng.pt", weights_only=False)


CASES = [(f, i) for f in CONFIGS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    back = assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])
    assert json.load(open(f"{back}/config.json"))["model_type"] == family


def test_gpt_oss_experts_follow_megatron_bridge(models, tmp_path):
    """HF gate_up_proj[e] is [H, 2F] with gate in the even columns and up in the odd ones; expert
    e's Megatron fc1 is [gate; up] as [out, in] rows (Megatron-Bridge), its bias likewise; fc2 is
    down_proj[e] transposed; with TP2 x EP2 and expert TP 1 the rank files are (t, ep) = (0, 0)
    and (1, 1), each holding whole experts of its EP rank; the sinks (softmax_offset) are split
    over TP with the heads; the router's own bias is mlp.router.bias."""
    src = models("gpt_oss")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2, etp=1))
    gu, gub = (
        hf["model.layers.1.mlp.experts.gate_up_proj"],
        hf["model.layers.1.mlp.experts.gate_up_proj_bias"],
    )
    down, downb = hf["model.layers.1.mlp.experts.down_proj"], hf["model.layers.1.mlp.experts.down_proj_bias"]
    for t, ep in ((0, 0), (1, 1)):
        sd = rank(mid, f"mp_rank_0{t}_00{ep}")["model"]
        for local in range(2):
            e = ep * 2 + local
            key = f"decoder.layers.1.mlp.experts.local_experts.{local}."
            assert torch.equal(sd[key + "linear_fc1.weight"], torch.cat([gu[e][:, 0::2].T, gu[e][:, 1::2].T]))
            assert torch.equal(sd[key + "linear_fc1.bias"], torch.cat([gub[e][0::2], gub[e][1::2]]))
            assert torch.equal(sd[key + "linear_fc2.weight"], down[e].T)
            assert torch.equal(sd[key + "linear_fc2.bias"], downb[e])
        sinks = hf["model.layers.1.self_attn.sinks"]
        assert torch.equal(
            sd["decoder.layers.1.self_attention.core_attention.softmax_offset"], sinks[t * 2 : t * 2 + 2]
        )
        assert torch.equal(sd["decoder.layers.1.mlp.router.bias"], hf["model.layers.1.mlp.router.bias"])
        assert torch.equal(
            sd["decoder.layers.1.self_attention.linear_proj.bias"], hf["model.layers.1.self_attn.o_proj.bias"]
        )
    args = rank(mid, "mp_rank_00_000")["args"]
    assert (args.softmax_type, args.add_bias_linear, args.window_size, args.window_attn_skip_freq) == (
        "learnable",
        True,
        [3, 0],
        2,
    )
    assert (args.glu_linear_offset, args.activation_func_clamp_value) == (1.0, 7.0)


def test_gpt_oss_expert_tp_and_grouped_gemm_are_refused_with_the_reason(models, tmp_path):
    """megatron-core builds expert biases only with expert TP 1, and the legacy grouped-GEMM
    weight1/weight2 format has no place for them: both are refused before anything is written."""
    src = models("gpt_oss")
    with pytest.raises(
        LayoutError, match="expert biases .* only with expert tensor parallel size 1, got 2; pass etp=1"
    ):
        convert(src, str(tmp_path / "a"), ck.Target(to="mcore", tp=2))
    with pytest.raises(VerifyError, match="grouped-GEMM expert format .* has no expert biases"):
        convert(src, str(tmp_path / "b"), ck.Target(to="mcore", ep=2, grouped_gemm=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_olmo2_has_only_post_norms_under_the_sandwich_keys(models, tmp_path):
    """OLMo 2 layers have no input / pre-MLP norm: none is invented in the rank files; the post
    norms take the sandwich-norm keys and the full-width q/k norms are whole on every TP rank (as
    MindSpeed-LLM writes MiniMax-M2's)."""
    src = models("olmo2")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}")["model"]
        assert not [
            k for k in sd if "input_layernorm" in k or "pre_mlp_layernorm" in k or "layer_norm_weight" in k
        ]
        assert torch.equal(
            sd["decoder.layers.2.post_attn_norm.weight"], hf["model.layers.2.post_attention_layernorm.weight"]
        )
        assert torch.equal(
            sd["decoder.layers.2.post_mlp_layernorm.weight"],
            hf["model.layers.2.post_feedforward_layernorm.weight"],
        )
        q = hf["model.layers.2.self_attn.q_norm.weight"]
        assert torch.equal(sd["decoder.layers.2.self_attention.q_layernorm.weight"], q)


def test_gemma3_keys_tied_head_and_window_args(models, tmp_path):
    """Megatron-Bridge's Gemma 3 keys (with Transformer Engine norm names): the post norms under
    linear_proj / linear_fc2 .post_layernorm, the pre norms fused into linear_qkv / linear_fc1.
    Tied embeddings: with PP the last stage carries Megatron's copy of the embedding as
    output_layer.  The args carry the sliding window, the pattern, both rope bases and the
    query_pre_attn_scalar softmax scale, and the HF config comes back whole."""
    src = models("gemma3_text")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, norm_names="te"))
    last = rank(mid, "mp_rank_01_001")["model"]
    assert torch.equal(last["output_layer.weight"], hf["model.embed_tokens.weight"][64:])
    bridge = {  # Megatron-Bridge gemma3_bridge.py mapping_registry; layer 3 is stage 1's local layer 1
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        "self_attention.linear_proj.post_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_feedforward_layernorm.weight",
        "mlp.linear_fc2.post_layernorm.weight": "post_feedforward_layernorm.weight",
    }
    for mkey, hkey in bridge.items():
        assert torch.equal(last[f"decoder.layers.1.{mkey}"], hf[f"model.layers.3.{hkey}"]), mkey
    assert not [k for k in last if "post_attn_norm" in k or "post_mlp_layernorm" in k]
    args = rank(mid, "mp_rank_00_000")["args"]
    assert (args.window_size, args.window_attn_skip_freq) == ([3, 0], 2)
    assert (args.rotary_base, args.rotary_base_local) == (1000000.0, 10000.0)
    assert args.softmax_scale == 24**-0.5 and args.untie_embeddings_and_output_weights is False
    back = str(tmp_path / "back")
    convert(mid, back, ck.Target(to="hf"))
    cfg = json.load(open(f"{back}/config.json"))
    assert (
        cfg["layer_types"] == ALTERNATING
        and cfg["rope_parameters"] == CONFIGS["gemma3_text"]["rope_parameters"]
    )


def test_models_lists_the_families(capsys):
    from ckpt_ir.cli import main

    assert main(["models"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"gemma3_text", "olmo2", "olmoe", "gpt_oss"} <= listed


@pytest.mark.parametrize(
    "change,names",
    [
        # config says 3 experts, the stacked tensors hold 4
        (lambda cfg: cfg.update(num_local_experts=3), ("mlp.experts.", "3 experts")),
        # config says a wider expert FFN than gate_up_proj's columns hold
        (lambda cfg: cfg.update(intermediate_size=64), ("gate_up_proj (shape [4, 64, 192])", "gate.weight")),
    ],
    ids=["expert-count", "ffn-width"],
)
def test_gpt_oss_stacked_experts_that_do_not_match_the_config_are_one_line_errors(
    models, tmp_path, change, names
):
    import shutil

    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert

    src = tmp_path / "src"
    shutil.copytree(models("gpt_oss"), src)
    cfg = json.load(open(src / "config.json"))
    change(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    assert_clean_error(cli_convert(src, dst, "--ep", "2"), dst, names=("model.safetensors", *names))


def test_gemma3_args_from_a_transformers_4_config():
    """Released Gemma 3 configs written by transformers 4 keep the global rope base in rope_theta,
    the sliding one in rope_local_base_freq and the layer pattern as sliding_window_pattern (every
    6th layer global); transformers 5 nests rope_parameters per layer type and lists layer_types."""
    from ckpt_ir.families import by_name

    args = by_name("gemma3_text").megatron_args
    old = {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 512, "sliding_window_pattern": 6}
    assert {
        k: args(old)[k] for k in ("rotary_base", "rotary_base_local", "window_size", "window_attn_skip_freq")
    } == {
        "rotary_base": 1e6,
        "rotary_base_local": 1e4,
        "window_size": [511, 0],
        "window_attn_skip_freq": 6,
    }
    irregular = dict(CONFIGS["gemma3_text"], layer_types=["full_attention", "sliding_attention"])
    assert args(irregular)["window_attn_skip_freq"] == [0, 1]  # Megatron's per-layer list, 1 = sliding


def test_gpt_oss_bf16_round_trip_is_bit_exact(models, tmp_path):
    """The bf16 form (as the hub's dequantized gpt-oss checkpoints store it) through TP2 x PP2 x
    EP2 and back: every byte equal, the config's dtype kept."""
    from transformers import AutoModelForCausalLM

    src, mid, back = (str(tmp_path / n) for n in ("bf16", "mid", "back"))
    AutoModelForCausalLM.from_pretrained(models("gpt_oss"), dtype=torch.bfloat16).save_pretrained(src)
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, etp=1))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert hf_state(back)["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert json.load(open(f"{back}/config.json"))["dtype"] == "bfloat16"


def test_gpt_oss_attention_lora_merges_like_peft_and_expert_lora_is_refused(models, tmp_path):
    """A peft adapter on gpt-oss's biased q/k/v/o merges (through Megatron TP2 x EP2) to exactly
    peft's merge_and_unload.  LoRA on the stacked experts (target_parameters) is refused in one
    line: its [E, H, 2F] interleaved layout is not the one ckpt-ir's fused-expert LoRA split reads."""
    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert
    from tests.test_lora_variants import assert_equal_files, make_adapter, peft_merged

    base = models("gpt_oss")
    adapter, mid, out = (str(tmp_path / n) for n in ("adapter", "mid", "out"))
    make_adapter(base, adapter, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    want = peft_merged(base, adapter, str(tmp_path / "peft"))
    assert (
        cli_convert(base, mid, "--tp", "2", "--ep", "2", "--etp", "1", "--lora-load", adapter).returncode == 0
    )
    assert cli_convert(mid, out, to="hf").returncode == 0
    assert_equal_files(out, want)

    experts = str(tmp_path / "experts")
    make_adapter(base, experts, target_parameters=["mlp.experts.gate_up_proj"])
    dst = tmp_path / "refused"
    assert_clean_error(
        cli_convert(base, dst, "--lora-load", experts, to="hf"),
        dst,
        names=("stacked experts", "merge_and_unload"),
    )


def _mxfp4_gpt_oss(base: str, dst: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A gpt-oss checkpoint in the hub's form: each layer's stacked experts as MXFP4 ``*_blocks``
    [experts, out, in / 32, 16] (two e2m1 values per byte) and e8m0 ``*_scales`` [experts, out,
    in / 32] (random codes), ``quantization_config`` as the releases carry it; the rest as ``base``.
    Returns the (blocks, scales) pairs by tensor name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dst)
    g = torch.Generator().manual_seed(7)
    pairs = {}
    for f in sorted(os.listdir(dst)):
        if not f.endswith(".safetensors"):
            continue
        sd = load_file(os.path.join(dst, f))
        for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            experts, rows_in, out = sd.pop(name).shape  # HF stores [E, in, out]
            blocks = torch.randint(0, 256, (experts, out, rows_in // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 132, (experts, out, rows_in // 32), dtype=torch.uint8, generator=g)
            sd[name + "_blocks"], sd[name + "_scales"] = blocks, scales
            pairs[name] = (blocks, scales)
        save_file(sd, os.path.join(dst, f), metadata={"format": "pt"})
    index = os.path.join(dst, "model.safetensors.index.json")
    if os.path.exists(index):  # the shard map names the stored tensors
        idx = json.load(open(index))
        for name in pairs:
            shard = idx["weight_map"].pop(name)
            idx["weight_map"].update({name + "_blocks": shard, name + "_scales": shard})
        json.dump(idx, open(index, "w"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return pairs


def test_gpt_oss_mxfp4_checkpoint_dequantizes_like_transformers(models, tmp_path):
    """The hub's MXFP4 gpt-oss: ckpt-ir's bf16 HF output holds, for every layer's stacked experts,
    transformers' own dequantization (convert_moe_packed_tensors) bit for bit, and the rest of the
    model unchanged; through Megatron (TP2 x EP2, expert TP 1) and back the same bytes; and
    transformers' dequantizing MXFP4 loader computes the same logits as the converted model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base = models("gpt_oss")
    mx = str(tmp_path / "mxfp4")
    pairs = _mxfp4_gpt_oss(base, mx)
    assert len(pairs) == 2 * 4  # gate_up and down of each of the 4 layers
    out, mid, back = str(tmp_path / "bf16"), str(tmp_path / "mid"), str(tmp_path / "back")
    convert(mx, out, ck.Target(to="hf", dtype="bf16"))
    got, src = hf_state(out), hf_state(base)
    assert "quantization_config" not in json.load(open(f"{out}/config.json"))
    for name, (blocks, scales) in pairs.items():
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want), name
    for name, t in src.items():
        if name not in pairs:
            assert torch.equal(got[name], t.to(torch.bfloat16)), name
    convert(mx, mid, ck.Target(to="mcore", tp=2, ep=2, etp=1, dtype="bf16"))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(out, back)
    from transformers import AutoModelForCausalLM, Mxfp4Config

    ref = AutoModelForCausalLM.from_pretrained(
        mx, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)
