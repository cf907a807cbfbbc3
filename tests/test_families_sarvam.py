"""Sarvam's two models (issue 31; transformers 5 models/sarvam_moe, models/sarvam_mla and
conversion_mapping.py; Megatron-Bridge models/sarvam/*_bridge.py): tiny random models built and
saved by transformers (tests/family_models.py ``build``) convert HF -> Megatron-Core (TP2 x EP2
with grouped GEMM; EP2 x uneven PP2) -> HF bit-exactly, and transformers' logits on the result
equal the original's.  The rank files are checked against the HF tensors under the Megatron names
Megatron-Bridge's mapping tables give, with slicing written here from those mappings."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt_ir.api as ck
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import convert, hf_state

MOE = dict(
    DENSE,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
CONFIGS = {
    # GQA with per-head q/k norms; qkv bias on, so the packed bias is exercised too
    "sarvam_moe": dict(MOE, head_dim=16, n_routed_experts=4, use_qk_norm=True, attention_bias=True),
    # multi-latent attention without q-LoRA (the release's q_lora_rank: null)
    "sarvam_mla": dict(
        MOE,
        num_key_value_heads=4,
        n_routed_experts=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
}
LAYERS = 3  # one dense layer, two MoE layers
LAYOUTS = {
    "sarvam_moe": (
        dict(tp=2, ep=2, grouped_gemm=True),
        dict(pp=2, ep=2, num_layer_list=(1, 2)),
    ),
    "sarvam_mla": (
        dict(tp=2, ep=2, grouped_gemm=True),
        dict(pp=2, ep=2, num_layer_list=(1, 2)),
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sarvam")
    return {f: build(str(root / f), f, layers=LAYERS, configs=CONFIGS) for f in CONFIGS}


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models[family], tmp_path, family, LAYOUTS[family][layout])


def test_sarvam_moe_saves_the_release_names(models):
    """transformers renames the release tensors at load only; save_pretrained writes them back
    (sarvam_moe_bridge.py's HF names), so that is the one naming the family reads and writes."""
    sd = hf_state(models["sarvam_moe"])
    assert "model.word_embeddings.weight" in sd and "model.embed_tokens.weight" not in sd
    assert "model.layers.1.attention.query_key_value.bias" in sd
    assert "model.layers.1.mlp.gate.expert_bias" in sd
    assert not any("self_attn" in k for k in sd)


def test_sarvam_moe_release_config_spellings_read_the_same(models, tmp_path):
    """The release config's num_experts / num_shared_experts / use_qkv_bias
    (SarvamMoEConfig.attribute_map) give the spec GLM-4.5's spellings give."""
    import shutil

    src = str(tmp_path / "release")
    shutil.copytree(models["sarvam_moe"], src)
    cfg = json.load(open(f"{src}/config.json"))
    renamed = {
        "n_routed_experts": "num_experts",
        "n_shared_experts": "num_shared_experts",
        "attention_bias": "use_qkv_bias",
    }
    release = {renamed.get(k, k): v for k, v in cfg.items()}
    json.dump(release, open(f"{src}/config.json", "w"))
    a, b = ck.load(models["sarvam_moe"]).spec, ck.load(src).spec
    assert (b.num_experts, b.shared_ffn_hidden_size, b.qkv_bias) == (4, 32, True)
    assert a == b


def test_sarvam_moe_rank_files_hold_the_bridge_mappings(models, tmp_path):
    """sarvam_moe_bridge.py:57-103 under TP2 x EP2: linear_qkv = ConcatenatedQKVMapping's
    per-group [q_g; k_g; v_g] rows of query_key_value ([q; k; v]), TP rank t holding group t;
    q/k_layernorm whole; router.expert_bias = mlp.gate.expert_bias; the local experts
    linear_fc1 = [gate; up] of global expert 2 * ep_rank + j."""
    src = models["sarvam_moe"]
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2))
    heads, kv, d = DENSE["num_attention_heads"], DENSE["num_key_value_heads"], 16
    qkv = hf["model.layers.1.attention.query_key_value.weight"]
    q, k, v = qkv.split([heads * d, kv * d, kv * d])
    per = heads // kv
    for t in range(2):
        for e in range(2):
            sd = rank(mid, f"mp_rank_0{t}_00{e}")["model"]
            want = torch.cat(
                [q[t * per * d : (t + 1) * per * d], k[t * d : (t + 1) * d], v[t * d : (t + 1) * d]]
            )
            assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.weight"], want)
            assert torch.equal(
                sd["decoder.layers.1.self_attention.q_layernorm.weight"],
                hf["model.layers.1.attention.query_layernorm.weight"],
            )
            assert torch.equal(
                sd["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.gate.expert_bias"]
            )
            for j in range(2):
                x = f"model.layers.1.mlp.experts.{2 * e + j}."
                f = 32 // 2
                gate, up = hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]
                assert torch.equal(
                    sd[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"],
                    torch.cat([gate[t * f : (t + 1) * f], up[t * f : (t + 1) * f]]),
                )


def test_sarvam_mla_saves_deepseek_v3_names_expert_by_expert(models):
    """transformers stacks the experts at load (conversion_mapping.py: qwen2_moe's rules) and
    save_pretrained unstacks them: sarvam_mla_bridge.py's per-expert names, no q-LoRA, no MTP."""
    sd = hf_state(models["sarvam_mla"])
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in sd
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in sd
    assert "model.layers.0.self_attn.q_proj.weight" in sd
    assert not any("gate_up_proj" in k or "q_a_proj" in k for k in sd)
    assert not any(k.startswith(f"model.layers.{LAYERS}.") for k in sd)


def test_sarvam_mla_rank_files_hold_the_bridge_mappings(models, tmp_path):
    """sarvam_mla_bridge.py:55-103 under TP2 x EP2 (--mla-keys mcore: megatron-core's own MLA keys,
    local spec): linear_q_proj, linear_kv_down_proj and linear_kv_up_proj are ColumnParallelLinear
    (rows cut over TP), kv_layernorm and the router's expert_bias whole on every rank."""
    src = models["sarvam_mla"]
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2, mla_keys="mcore"))
    p = "model.layers.1."
    q, kv_b = hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.kv_b_proj.weight"]
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        a = "decoder.layers.1.self_attention."
        assert torch.equal(sd[a + "linear_q_proj.weight"], q.chunk(2)[t])
        assert torch.equal(sd[a + "linear_kv_up_proj.weight"], kv_b.chunk(2)[t])
        assert torch.equal(
            sd[a + "linear_kv_down_proj.weight"], hf[p + "self_attn.kv_a_proj_with_mqa.weight"].chunk(2)[t]
        )
        assert torch.equal(sd[a + "kv_layernorm.weight"], hf[p + "self_attn.kv_a_layernorm.weight"])
        assert torch.equal(
            sd["decoder.layers.1.mlp.router.expert_bias"], hf[p + "mlp.gate.e_score_correction_bias"]
        )
