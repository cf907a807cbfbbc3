"""Dense families of ``ckpt_ir/families/dense.py`` (the others are in ``test_hf_roundtrip.py``):
tiny random models built and saved by transformers (``tests/family_models.py``) convert HF ->
Megatron-Core (TP2 with a PP layout, and more) -> HF bit-exactly, and transformers' logits on the
result equal the original's.  Rows of packed tensors (GLM's gate_up_proj, BLOOM's query_key_value)
and Megatron-Bridge's keys (Gemma 3, OLMo 2's post norms) are checked against the format facts with
slicing written here, not with ckpt-ir's own rules."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt_ir.api as ck
from tests.family_models import (
    ALTERNATING,
    CONFIGS,
    assert_lora_merge_equals_peft,
    assert_round_trip,
    listed_families,
    model_cache,
    rank,
)
from tests.test_hf_roundtrip import convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "seed_oss": (dict(tp=2, pp=2),),
    "glm": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3))),
    "glm4": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    "hunyuan_v1_dense": (dict(tp=2, pp=2),),
    "bloom": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=1, pp=2, vpp_layers=1)),
    "gemma3_text": (
        dict(tp=2, pp=2),
        dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te"),
        dict(ckpt_format="torch_dist"),
    ),
    "olmo2": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    # issue 31's dense families: one layout each, TP2 with an uneven PP2 (a few with TE norm names)
    "granite": (dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te"),),
    "internlm3": (dict(tp=2, pp=2, num_layer_list=(3, 1)),),
    "ernie4_5": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "smollm3": (dict(tp=2, pp=2, num_layer_list=(3, 1)),),
    "ministral3": (dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te"),),
    "arcee": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "exaone4": (dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te"),),
    "olmo3": (dict(tp=2, pp=2, num_layer_list=(3, 1)),),
    "cohere": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "cohere2": (dict(tp=2, pp=2, num_layer_list=(3, 1), norm_names="te"),),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "dense")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    """The round trip; for the families with a RANK_FACTS entry, the Megatron rank files it went
    through also hold what the format facts say (rows built here from the HF tensors, args from
    the HF config)."""
    src = models(family)
    assert_round_trip(src, tmp_path, family, LAYOUTS[family][layout])
    if family in RANK_FACTS:
        cfg = json.load(open(f"{src}/config.json"))
        RANK_FACTS[family](hf_state(src), cfg, str(tmp_path / "mid"))


def _rows(t: torch.Tensor, rank: int, parts: int = 2) -> torch.Tensor:
    """TP rank ``rank``'s rows of a column-parallel tensor (an even split of dim 0)."""
    return t.chunk(parts)[rank]


def _args(mid: str, name: str = "mp_rank_00_000") -> dict:
    return vars(rank(mid, name)["args"])


def _biased_llama(hf: dict, mid: str, stage0: str) -> None:
    """Llama with attention_bias and mlp_bias: rank t's linear_qkv.bias holds query group t's
    [q heads; k; v] biases (2 groups of 2 heads, head_dim from the rows), its linear_fc1.bias
    [gate_t; up_t]; the row-parallel linear_proj / linear_fc2 biases are whole on every rank."""
    p = "model.layers.0."
    q, k, v = (hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv")
    gate, up = hf[p + "mlp.gate_proj.bias"], hf[p + "mlp.up_proj.bias"]
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        d = "decoder.layers.0."
        assert torch.equal(
            sd[d + "self_attention.linear_qkv.bias"], torch.cat([_rows(q, t), _rows(k, t), _rows(v, t)])
        )
        assert torch.equal(sd[d + "mlp.linear_fc1.bias"], torch.cat([_rows(gate, t), _rows(up, t)]))
        assert torch.equal(sd[d + "self_attention.linear_proj.bias"], hf[p + "self_attn.o_proj.bias"])
        assert torch.equal(sd[d + "mlp.linear_fc2.bias"], hf[p + "mlp.down_proj.bias"])
    args = _args(mid, stage0)
    assert (args["add_qkv_bias"], args["add_bias_linear"]) == (True, True)


def _granite(hf: dict, cfg: dict, mid: str) -> None:
    _biased_llama(hf, mid, "mp_rank_00_000")
    sd = rank(mid, "mp_rank_01_000")["model"]  # TE norm names: the norms fused into the linears
    assert torch.equal(
        sd["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
        hf["model.layers.0.input_layernorm.weight"],
    )
    assert torch.equal(
        sd["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
        hf["model.layers.0.post_attention_layernorm.weight"],
    )
    assert _args(mid)["softmax_scale"] == cfg["attention_multiplier"]


def _ernie4_5(hf: dict, cfg: dict, mid: str) -> None:
    _biased_llama(hf, mid, "mp_rank_00_000")
    for t in range(2):  # tied: the last stage's output_layer is the embedding's rows of rank t
        last = rank(mid, f"mp_rank_0{t}_001")["model"]
        assert torch.equal(last["output_layer.weight"], _rows(hf["model.embed_tokens.weight"], t))
    assert _args(mid)["rotary_interleaved"] is True


def _arcee(hf: dict, cfg: dict, mid: str) -> None:
    """No gate: linear_fc1 is up_proj alone, split by rows; relu2 is Megatron's squared_relu."""
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        for kind in ("weight", "bias"):
            up = hf[f"model.layers.0.mlp.up_proj.{kind}"]
            assert torch.equal(sd[f"decoder.layers.0.mlp.linear_fc1.{kind}"], _rows(up, t))
    args = _args(mid)
    assert (args["swiglu"], args["squared_relu"], args["add_bias_linear"]) == (False, True, True)


def _exaone4(hf: dict, cfg: dict, mid: str) -> None:
    """Megatron-Bridge's exaone4_bridge.py keys (with TE names): post norms under linear_proj /
    linear_fc2 .post_layernorm, no pre norm anywhere; rotary only on the sliding layers."""
    sd = rank(mid, "mp_rank_00_000")["model"]
    bridge = {
        "self_attention.linear_proj.post_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc2.post_layernorm.weight": "post_feedforward_layernorm.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    }
    for mkey, hkey in bridge.items():
        assert torch.equal(sd[f"decoder.layers.0.{mkey}"], hf[f"model.layers.0.{hkey}"]), mkey
    assert not [k for k in sd if "input_layernorm" in k or "pre_mlp" in k or "layer_norm_weight" in k]
    args = _args(mid)
    sliding = [t == "sliding_attention" for t in cfg["layer_types"]]
    assert args["no_rope_freq"] == [int(not s) for s in sliding]
    assert (args["window_size"], args["qk_layernorm"]) == ([cfg["sliding_window"] - 1, 0], True)


def _cohere(hf: dict, cfg: dict, mid: str) -> None:
    """One norm per layer (no pre_mlp_layernorm); the per-head q/k LayerNorm weights [heads,
    head_dim] split over TP with their heads, under q_layernorm / k_layernorm."""
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        assert not [k for k in sd if "pre_mlp" in k]
        for x in "qk":
            got = sd[f"decoder.layers.0.self_attention.{x}_layernorm.weight"]
            assert torch.equal(got, _rows(hf[f"model.layers.0.self_attn.{x}_norm.weight"], t))
    args = _args(mid)
    assert (args["normalization"], args["rotary_interleaved"]) == ("LayerNorm", True)


def _args_from_config(want) -> object:
    """A check of the rank files' args only: ``want(cfg)`` gives the expected values."""

    def check(hf: dict, cfg: dict, mid: str) -> None:
        args = _args(mid)
        assert {k: args.get(k) for k in want(cfg)} == want(cfg)

    return check


RANK_FACTS = {
    "granite": _granite,
    "internlm3": lambda hf, cfg, mid: _biased_llama(hf, mid, "mp_rank_00_000"),
    "ernie4_5": _ernie4_5,
    "arcee": _arcee,
    "exaone4": _exaone4,
    "cohere": _cohere,
    # SmolLM3's no_rope_layers holds 1 where a layer rotates, megatron-core's no_rope_freq 1 where not
    "smollm3": _args_from_config(lambda cfg: {"no_rope_freq": [1 - r for r in cfg["no_rope_layers"]]}),
    "ministral3": _args_from_config(
        lambda cfg: {
            "position_embedding_type": "yarn",
            "rotary_base": cfg["rope_parameters"]["rope_theta"],
            "yarn_rotary_scaling_factor": cfg["rope_parameters"]["factor"],
            **{
                f"yarn_{k}": cfg["rope_parameters"][k]
                for k in (
                    "original_max_position_embeddings",
                    "beta_fast",
                    "beta_slow",
                    "mscale",
                    "mscale_all_dim",
                )
            },
        }
    ),
    "olmo3": _args_from_config(
        lambda cfg: {
            "rotary_base": cfg["rope_parameters"]["full_attention"]["rope_theta"],
            "rotary_base_local": cfg["rope_parameters"]["sliding_attention"]["rope_theta"],
            "window_size": [cfg["sliding_window"] - 1, 0],
            "post_norm_only": True,
        }
    ),
    # Cohere 2 rotates only in its sliding-window layers
    "cohere2": _args_from_config(
        lambda cfg: {
            "no_rope_freq": [int(t != "sliding_attention") for t in cfg["layer_types"]],
            "window_size": [cfg["sliding_window"] - 1, 0],
            "normalization": "LayerNorm",
        }
    ),
}


def test_glm_gate_up_rows_follow_megatron_fc1(models, tmp_path):
    """GLM's HF gate_up_proj is [gate; up]; Megatron's TP-sharded linear_fc1 holds on rank t
    [gate rows of t; up rows of t] (format facts), so rank 0's fc1 is built from the HF rows."""
    src = models("glm")
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    hf = hf_state(src)["model.layers.0.mlp.gate_up_proj.weight"]
    f = hf.shape[0] // 2
    for t in range(2):
        sd = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)["model"]
        fc1 = sd["decoder.layers.0.mlp.linear_fc1.weight"]
        half = f // 2
        want = torch.cat([hf[t * half : (t + 1) * half], hf[f + t * half : f + (t + 1) * half]])
        assert torch.equal(fc1, want)


def test_glm_args_carry_partial_rotary(models, tmp_path):
    mid = str(tmp_path / "mid")
    convert(models("glm"), mid, ck.Target(to="mcore", tp=2))
    args = torch.load(f"{mid}/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.rotary_percent, args.kv_channels, args.add_qkv_bias) == (0.5, 32, True)


def test_bloom_rank_files_follow_the_format_facts(models, tmp_path):
    """BLOOM's query_key_value is [q; k; v] head by head (transformers views its rows as
    [heads, 3, head_dim]); Megatron's linear_qkv with one head per query group has the same order,
    so TP rank t holds HF rows of its heads unchanged.  linear_fc1 is dense_h_to_4h alone (no
    gate): a plain row split.  Row-parallel biases, norms and the embedding LayerNorm are whole on
    every rank; with PP the last stage keeps a copy of the tied embedding as output_layer."""
    src = models("bloom")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
    h, heads, d = 64, 4, 16
    qkv = hf["transformer.h.0.self_attention.query_key_value.weight"].view(heads, 3, d, h)
    qkv_bias = hf["transformer.h.0.self_attention.query_key_value.bias"].view(heads, 3, d)
    fc1, f = hf["transformer.h.0.mlp.dense_h_to_4h.weight"], 4 * h // 2
    for t in range(2):
        first = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}_000/model_optim_rng.pt", weights_only=False)
        last = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}_001/model_optim_rng.pt", weights_only=False)
        sd = first["model"]
        mine = slice(t * heads // 2, (t + 1) * heads // 2)
        assert torch.equal(sd["decoder.layers.0.self_attention.linear_qkv.weight"], qkv[mine].reshape(-1, h))
        assert torch.equal(sd["decoder.layers.0.self_attention.linear_qkv.bias"], qkv_bias[mine].reshape(-1))
        assert torch.equal(sd["decoder.layers.0.mlp.linear_fc1.weight"], fc1[t * f : (t + 1) * f])
        for key, name in {
            "embedding.word_embeddings.norm.weight": "transformer.word_embeddings_layernorm.weight",
            "embedding.word_embeddings.norm.bias": "transformer.word_embeddings_layernorm.bias",
            "decoder.layers.0.mlp.linear_fc2.bias": "transformer.h.0.mlp.dense_4h_to_h.bias",
            "decoder.layers.0.self_attention.linear_proj.bias": "transformer.h.0.self_attention.dense.bias",
            "decoder.layers.0.input_layernorm.bias": "transformer.h.0.input_layernorm.bias",
        }.items():
            assert torch.equal(sd[key], hf[name]), key
        v = 128 // 2
        assert torch.equal(last["model"]["decoder.final_layernorm.bias"], hf["transformer.ln_f.bias"])
        assert torch.equal(
            last["model"]["output_layer.weight"],
            hf["transformer.word_embeddings.weight"][t * v : (t + 1) * v],
        )
        args = first["args"]
        assert (args.position_embedding_type, args.swiglu, args.add_bias_linear, args.ffn_hidden_size) == (
            "alibi",
            False,
            True,
            4 * h,
        )


def test_bloom_verify_compares_every_unit(models, tmp_path, capsys):
    """``ckpt-ir verify`` runs BLOOM from Megatron rank files unit by unit (its tied head is the
    input embedding, named word_embeddings, not embed_tokens) and finds them equal to the source."""
    from ckpt_ir.commands.cli import main

    src, mid = models("bloom"), str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
    assert main(["verify", src, mid]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.3" in out and "transformer.ln_f" in out and "OK: the outputs agree" in out


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


def test_models_lists_the_dense_families_with_their_mindspeed_names(capsys):
    lines = listed_families(capsys)
    want = {
        "mistral": "mistral,magistral",
        "seed_oss": "seed-oss",
        "glm": "glm4_9b",
        "glm4": "glm4",
        "bloom": "bloom,bloom_3b",
    }
    for family, names in want.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)
    assert {"hunyuan_v1_dense", "gemma3_text", "olmo2"} <= set(lines)
    issue31 = "granite internlm3 ernie4_5 smollm3 ministral3 arcee exaone4 olmo3 cohere cohere2".split()
    assert set(issue31) <= set(lines)
    from ckpt_ir.families import by_name

    # none is in MindSpeed-LLM's registry (configs/checkpoint/model_cfg.json at c77308a)
    assert not [f for f in issue31 if by_name(f).mindspeed_names]


@pytest.mark.parametrize("family", ["glm", "bloom"])
def test_peft_adapter_merge_equals_peft_merge_and_unload(models, tmp_path, family):
    """LoRA on the family's linear layers (GLM's packed gate_up_proj, BLOOM's query_key_value: A
    shared, B stacked like the weight) merges to exactly what peft's merge_and_unload gives."""
    assert_lora_merge_equals_peft(models(family), tmp_path, family)
