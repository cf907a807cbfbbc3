"""Wave-A families: tiny random models built and saved by transformers convert HF -> Megatron-Core
(TP2 with a PP layout, and TP2 x EP2 for MoE) -> HF bit-exactly, and transformers' logits on the
result equal the original's.  Rows of packed tensors are checked against the format facts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state, logits

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
# per family: config overrides (tiny sizes; head_dim != hidden / heads where the family allows it)
CONFIGS = {
    "seed_oss": dict(DENSE, head_dim=32),
    "glm": dict(DENSE, head_dim=32, partial_rotary_factor=0.5),
    "glm4": dict(DENSE, head_dim=32, partial_rotary_factor=0.5),
    "deepseek_v2": dict(
        DENSE,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    "minicpm3": dict(
        DENSE,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        scale_emb=2.5,
        scale_depth=1.4,
        dim_model_base=32,
    ),
    "glm4_moe": dict(
        DENSE,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        n_group=1,
        topk_group=1,
    ),
    "hunyuan_v1_dense": dict(
        DENSE, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    "hunyuan_v1_moe": dict(
        DENSE,
        head_dim=16,
        num_experts=4,
        moe_topk=[2, 2, 1, 2],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "phimoe": dict(DENSE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True),
    "minimax_m2": dict(
        DENSE,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # BLOOM's own config keys (n_layer / n_head; no intermediate size: the MLP is 4 x hidden)
    "bloom": dict(hidden_size=64, n_head=4, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "seed_oss": (dict(tp=2, pp=2),),
    "glm": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3))),
    "glm4": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    "deepseek_v2": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "glm4_moe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "hunyuan_v1_dense": (dict(tp=2, pp=2),),
    "hunyuan_v1_moe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "phimoe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True, norm_names="te")),
    "minimax_m2": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "minicpm3": (dict(tp=2, pp=2), dict(tp=2, pp=2, noop_layers=(2, 5))),
    "bloom": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=1, pp=2, vpp_layers=1)),
}


def build(path: str, model_type: str, layers: int = 4, seed: int = 0, configs: dict | None = None) -> str:
    """A tiny model built by transformers (config overrides from ``configs``, this module's
    CONFIGS by default), random values in every parameter and buffer the checkpoint stores
    (router score biases too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = (CONFIGS if configs is None else configs)[model_type]
    cfg = AutoConfig.for_model(model_type, **dict(overrides, num_hidden_layers=layers))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


def model_cache(tmp_path_factory, name: str, configs: dict | None = None):
    """A module fixture's getter: each family's tiny model (see :func:`build`) built once."""
    root = tmp_path_factory.mktemp(name)
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            cache[model_type] = build(str(root / model_type), model_type, configs=configs)
        return cache[model_type]

    return get


def append_mtp_layer(path: str, hidden: int, hunyuan: bool = False) -> tuple[dict, dict]:
    """Give the 4-layer checkpoint at ``path`` one multi-token-prediction layer as DeepSeek-V3 /
    GLM-4.5 releases store it (transformers saves none): ``model.layers.4.*`` = a random copy of MoE
    layer 1 plus enorm, hnorm, eh_proj and shared_head.norm, with the embedding and head repeated;
    ``num_nextn_predict_layers`` = 1.  ``hunyuan``: as Hunyuan V3 stores it (MindSpeed-LLM's HYV3
    entry; transformers ignores ``model.layers.<num_hidden_layers>.*``): the head norm is
    ``final_layernorm``, no embedding / head copies, no MTP count in the config.
    Returns (config, tensors)."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    n = 4
    g = torch.Generator().manual_seed(7)
    for k in [k for k in sd if k.startswith("model.layers.1.")]:  # a MoE layer's tensors
        sd[k.replace("model.layers.1.", f"model.layers.{n}.")] = torch.randn(sd[k].shape, generator=g)
    for k, shape in {
        "enorm": (hidden,),
        "hnorm": (hidden,),
        "eh_proj": (hidden, 2 * hidden),
        "final_layernorm" if hunyuan else "shared_head.norm": (hidden,),
    }.items():
        sd[f"model.layers.{n}.{k}.weight"] = torch.randn(shape, generator=g)
    if not hunyuan:
        sd[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(path, "config.json")))
    if not hunyuan:
        cfg = dict(cfg, num_nextn_predict_layers=1)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return cfg, sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "wave-a")


def assert_round_trip(src: str, tmp_path, family: str, layout: dict) -> str:
    """HF (family ``family``) -> mcore at ``layout`` -> HF is bit-exact and computes the same
    transformers logits; returns the HF output."""
    assert ck.load(src).spec.family == family
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert torch.equal(logits(src, IDS), logits(back, IDS))
    return back


CASES = [(f, i) for f in CONFIGS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


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


def test_phimoe_biases_are_carried_under_megatron_names(models, tmp_path):
    """Every LayerNorm bias, o_proj.bias and lm_head.bias reaches the rank files (MindSpeed-LLM's
    phi3.5-moe converter drops them): norm and row-parallel biases whole on each TP rank, the
    output-layer bias split by vocabulary rows like its weight."""
    src = models("phimoe")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    v = hf["lm_head.bias"].shape[0] // 2
    for t in range(2):
        sd = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)["model"]
        assert torch.equal(
            sd["decoder.layers.1.input_layernorm.bias"], hf["model.layers.1.input_layernorm.bias"]
        )
        assert torch.equal(
            sd["decoder.layers.1.pre_mlp_layernorm.bias"], hf["model.layers.1.post_attention_layernorm.bias"]
        )
        assert torch.equal(
            sd["decoder.layers.1.self_attention.linear_proj.bias"], hf["model.layers.1.self_attn.o_proj.bias"]
        )
        assert torch.equal(sd["decoder.final_layernorm.bias"], hf["model.norm.bias"])
        assert torch.equal(sd["output_layer.bias"], hf["lm_head.bias"][t * v : (t + 1) * v])


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


def test_minimax_full_width_qk_norm_is_whole_on_every_rank(models, tmp_path):
    """MiniMax-M2's q_norm [heads*head_dim] / k_norm [kv_heads*head_dim] normalise the whole
    projection; MindSpeed-LLM's converter writes them whole on every TP rank under the
    q_layernorm / k_layernorm keys (compared bit for bit by bench/peers/mindspeed_v2.py)."""
    src = models("minimax_m2")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    q, k = hf["model.layers.0.self_attn.q_norm.weight"], hf["model.layers.0.self_attn.k_norm.weight"]
    assert q.shape == (4 * 32,) and k.shape == (2 * 32,)
    for t in range(2):
        sd = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)["model"]
        assert torch.equal(sd["decoder.layers.0.self_attention.q_layernorm.weight"], q)
        assert torch.equal(sd["decoder.layers.0.self_attention.k_layernorm.weight"], k)
        assert torch.equal(
            sd["decoder.layers.0.mlp.router.expert_bias"],
            hf["model.layers.0.block_sparse_moe.e_score_correction_bias"],
        )


def test_glm4_moe_mtp_layer_round_trips(models, tmp_path):
    """GLM-4.5's released checkpoints carry MTP layers as model.layers.{num_hidden_layers}.* (a MoE
    decoder layer plus enorm, hnorm, eh_proj, shared_head.norm and copies of the embedding and
    head); transformers saves none, so one is written here the way the release stores it."""
    import shutil

    src = str(tmp_path / "hf")
    shutil.copytree(models("glm4_moe"), src)
    _, sd = append_mtp_layer(src, CONFIGS["glm4_moe"]["hidden_size"])
    n = 4  # the MTP layer's HF index
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, grouped_gemm=True))
    assert ck.load(mid).spec.mtp_layers == 1
    last = torch.load(f"{mid}/iter_0000001/mp_rank_01_001_001/model_optim_rng.pt", weights_only=False)[
        "model"
    ]
    assert torch.equal(last["mtp.layers.0.enorm.weight"], sd[f"model.layers.{n}.enorm.weight"])
    assert torch.equal(
        last["mtp.layers.0.transformer_layer.mlp.router.expert_bias"],
        sd[f"model.layers.{n}.mlp.gate.e_score_correction_bias"],
    )
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_models_lists_every_family_with_its_mindspeed_names(capsys):
    from ckpt_ir.commands.cli import main

    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    want = {
        "seed_oss": "seed-oss",
        "glm": "glm4_9b",
        "glm4": "glm4",
        "deepseek_v2": "deepseek2,deepseek2-lite",
        "minicpm3": "minicpm3",
        "glm4_moe": "glm45-moe,glm45,glm45-air",
        "hunyuan_v1_moe": "hunyuan",
        "minimax_m2": "minimax_m2",
        "phimoe": "phi3.5-moe",
        "mistral": "mistral,magistral",
        "bloom": "bloom,bloom_3b",
    }
    for family, names in want.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)
    assert "hunyuan_v1_dense" in lines


def test_glm_args_carry_partial_rotary(models, tmp_path):
    mid = str(tmp_path / "mid")
    convert(models("glm"), mid, ck.Target(to="mcore", tp=2))
    args = torch.load(f"{mid}/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.rotary_percent, args.kv_channels, args.add_qkv_bias) == (0.5, 32, True)


@pytest.mark.parametrize("family", ["glm", "phimoe", "bloom"])
def test_peft_adapter_merge_equals_peft_merge_and_unload(models, tmp_path, family):
    """LoRA on the family's linear layers (GLM's packed gate_up_proj, BLOOM's query_key_value: A
    shared, B stacked like the weight) merges to exactly what peft's merge_and_unload gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_lora import cli, make_peft_adapter

    base = models(family)
    adapter = str(tmp_path / "adapter")
    targets = {
        "glm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
        "phimoe": ("q_proj", "k_proj", "v_proj", "o_proj"),
        # query_key_value packs q/k/v head by head: B's rows follow that packing
        "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    }[family]
    make_peft_adapter(base, adapter, targets)
    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        .merge_and_unload()
        .state_dict()
    )
    out = str(tmp_path / "merged")
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    ours = hf_state(out)
    # in memory transformers 5 renames / fuses the MoE block (router, 3-D experts); on disk it is
    # per expert, so the MoE tensors are compared where the names agree and attention everywhere
    assert {k for k in ours if ".self_attn." in k or ".mlp." in k and family == "glm"} <= set(merged)
    for k in set(ours) & set(merged):
        assert torch.equal(ours[k], merged[k]), k
