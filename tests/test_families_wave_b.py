"""Wave-B families: tiny random models built and saved by transformers convert HF -> Megatron-Core
(a PP layout, and TP2 x EP2 where the family allows it) -> HF bit-exactly, and transformers'
logits on the result equal the original's.  The DSA indexer's rank-file keys and replication
are checked against MindSpeed-LLM's layout (format facts written here)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.test_families_wave_a import append_mtp_layer, assert_round_trip, model_cache
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

BASE = dict(
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
# MLA + DSA: index_topk (4) below the prompt length (12), so the indexer's choice changes logits
DSA = dict(
    BASE,
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
)
CONFIGS = {
    "deepseek_v32": DSA,
    # layers 1 and 3 reuse the previous layer's top-k and carry no indexer
    "glm_moe_dsa": dict(DSA, indexer_types=["full", "shared", "full", "shared"]),
    "hy_v3": dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    # layers 0-2 gated-delta-net, layer 3 gated full attention; 2 key heads, 4 value heads
    "qwen3_next": dict(
        BASE,
        head_dim=16,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
    ),
}
LAYOUTS = {
    "deepseek_v32": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "glm_moe_dsa": (dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=2, ep=2, grouped_gemm=True)),
    "hy_v3": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    # gated-delta-net layers: TP 1 only (MindSpeed-LLM's qwen3-next layout)
    "qwen3_next": (dict(pp=2, num_layer_list=(3, 1)), dict(ep=2, grouped_gemm=True)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "wave-b", CONFIGS)


CASES = [(f, i) for f in CONFIGS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


def _rank(mid: str, name: str) -> dict:
    return torch.load(f"{mid}/iter_0000001/{name}/model_optim_rng.pt", weights_only=False)


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_dsa_indexer_is_whole_on_every_tp_rank_under_mindspeed_names(models, tmp_path, family):
    """MindSpeed-LLM (convert_hf2mg.py) clones the indexer's wq_b, wk, k_norm (weight and bias)
    and weights_proj whole onto every TP rank under self_attention.dsa_indexer.*; GLM-5's
    "shared" layers have none, and the args say enable_dsa_indexer."""
    src = models(family)
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    full = [0, 2] if family == "glm_moe_dsa" else [0, 1, 2, 3]
    for t in range(2):
        rank = _rank(mid, f"mp_rank_0{t}")
        sd = rank["model"]
        assert rank["args"].enable_dsa_indexer is True
        for i in range(4):
            keys = {k for k in sd if k.startswith(f"decoder.layers.{i}.self_attention.dsa_indexer.")}
            if i not in full:
                assert keys == set()
                continue
            want = {
                f"decoder.layers.{i}.self_attention.dsa_indexer.{t}": hf[
                    f"model.layers.{i}.self_attn.indexer.{t}"
                ]
                for t in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
            }
            assert keys == set(want)
            for k, v in want.items():
                assert torch.equal(sd[k], v), k


def test_glm_moe_dsa_shared_indexer_layers_come_from_the_config(models):
    spec = ck.load(models("glm_moe_dsa")).spec
    assert spec.shared_index_layers == (1, 3) and spec.index_heads == 2 and spec.index_head_dim == 16
    assert ck.load(models("deepseek_v32")).spec.shared_index_layers == ()


def test_deepseek_v32_mtp_layer_with_indexer_round_trips(models, tmp_path):
    """A DeepSeek-V3.2 MTP layer (model.layers.{num_hidden_layers}.*, as the release stores it:
    a MoE decoder layer with its indexer, enorm, hnorm, eh_proj, shared_head and embedding copies)
    goes to mtp.layers.0.transformer_layer.* and back unchanged."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("deepseek_v32"), src)
    _, sd = append_mtp_layer(src, BASE["hidden_size"])
    n = 4  # the MTP layer's HF index
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, grouped_gemm=True))
    assert ck.load(mid).spec.mtp_layers == 1
    last = _rank(mid, "mp_rank_01_001_001")["model"]
    assert torch.equal(
        last["mtp.layers.0.transformer_layer.self_attention.dsa_indexer.wq_b.weight"],
        sd[f"model.layers.{n}.self_attn.indexer.wq_b.weight"],
    )
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2, pp=2, ep=2, grouped_gemm=True), dict(tp=2, ep=2)],
    ids=["tp2pp2ep2-grouped", "tp2ep2"],
)
def test_hy_v3_mtp_layer_round_trips(models, tmp_path, layout):
    """A Hunyuan V3 MTP layer as the release stores it (model.layers.{num_hidden_layers}.*: a MoE
    decoder layer, enorm, hnorm, eh_proj, final_layernorm; no embedding / head copies, no MTP count
    in the config) goes to MindSpeed-LLM's mtp.layers.0.* (Megatron-Core's MTP keys; with PP the
    last stage gets the embedding, as Megatron's MTP needs it there) and back unchanged."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("hy_v3"), src)
    _, sd = append_mtp_layer(src, BASE["hidden_size"], hunyuan=True)
    n, pp = 4, layout.get("pp", 1)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    assert ck.load(mid).spec.mtp_layers == 1
    last = _rank(mid, "mp_rank_01_001_001" if pp == 2 else "mp_rank_01_001")["model"]
    mtp = {
        "mtp.layers.0.enorm.weight": sd[f"model.layers.{n}.enorm.weight"],
        "mtp.layers.0.hnorm.weight": sd[f"model.layers.{n}.hnorm.weight"],
        "mtp.layers.0.eh_proj.weight": sd[f"model.layers.{n}.eh_proj.weight"].chunk(2)[1],  # TP rank 1
        "mtp.final_layernorms.0.weight": sd[f"model.layers.{n}.final_layernorm.weight"],
        "mtp.layers.0.transformer_layer.mlp.router.expert_bias": sd[f"model.layers.{n}.mlp.expert_bias"],
        "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight": sd[
            f"model.layers.{n}.self_attn.q_norm.weight"
        ],
        "final_layernorm.weight": sd["model.norm.weight"],
    }
    for k, v in mtp.items():
        assert torch.equal(last[k], v), k
    # PP 1: the main embedding; PP 2: the last stage's copy for the MTP layer
    assert torch.equal(last["embedding.word_embeddings.weight"], sd["model.embed_tokens.weight"].chunk(2)[1])
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def append_qwen3_next_mtp_layer(path: str, hidden: int) -> dict:
    """Give the Qwen3-Next checkpoint at ``path`` its released MTP layer (transformers ignores
    ``^mtp.*``): ``mtp.layers.0.*`` = a random copy of full-attention MoE layer 3, plus the
    un-numbered ``mtp.fc`` [H, 2H], ``mtp.norm``, ``mtp.pre_fc_norm_embedding`` and
    ``mtp.pre_fc_norm_hidden``.  Returns the tensors."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    g = torch.Generator().manual_seed(7)
    for k in [k for k in sd if k.startswith("model.layers.3.")]:
        sd[k.replace("model.layers.3.", "mtp.layers.0.")] = torch.randn(sd[k].shape, generator=g)
    for k in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        sd[f"mtp.{k}.weight"] = torch.randn(hidden, generator=g)
    sd["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
    save_file(sd, f, metadata={"format": "pt"})
    return sd


@pytest.mark.parametrize(
    "layout", [dict(pp=2, num_layer_list=(3, 1)), dict(ep=2, grouped_gemm=True)], ids=["pp2", "ep2-grouped"]
)
def test_qwen3_next_mtp_layer_round_trips(models, tmp_path, layout):
    """Qwen3-Next's MTP layer (mtp.layers.0.* and the un-numbered mtp.fc / norm /
    pre_fc_norm_*, as released) goes to MindSpeed-LLM's mtp.layers.0.* on the last stage (a
    gated full-attention MoE layer; fc = eh_proj, pre_fc_norm_embedding = enorm,
    pre_fc_norm_hidden = hnorm, norm = the MTP head norm) and back to the same HF keys."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("qwen3_next"), src)
    sd = append_qwen3_next_mtp_layer(src, BASE["hidden_size"])
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    assert ck.load(mid).spec.mtp_layers == 1
    last = _rank(mid, "mp_rank_00_001")["model"]  # PP2: the last stage; EP2: EP rank 1
    want = {
        "mtp.layers.0.enorm.weight": sd["mtp.pre_fc_norm_embedding.weight"],
        "mtp.layers.0.hnorm.weight": sd["mtp.pre_fc_norm_hidden.weight"],
        "mtp.layers.0.eh_proj.weight": sd["mtp.fc.weight"],
        "mtp.final_layernorms.0.weight": sd["mtp.norm.weight"],
        "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight": sd[
            "mtp.layers.0.self_attn.q_norm.weight"
        ],
        "mtp.layers.0.transformer_layer.mlp.shared_experts.gate_weight": sd[
            "mtp.layers.0.mlp.shared_expert_gate.weight"
        ],
    }
    for k, v in want.items():
        assert torch.equal(last[k], v), k
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_qwen3_next_mtp_keys_rename_both_ways_and_refuse_a_second_unnumbered_layer():
    """The family's rename: mtp.layers.k.X <-> model.layers.{n + k}.X and the un-numbered
    mtp.fc / norm / pre_fc_norm_* <-> model.layers.{n}.mtp.*; main layers and other keys pass
    through; a second MTP layer's fc has no HF name (one-line FormatError naming the key)."""
    from ckpt_ir.errors import FormatError
    from ckpt_ir.families import by_name

    rename = by_name("qwen3_next").hf_rename
    pairs = {
        "mtp.layers.0.self_attn.q_proj.weight": "model.layers.4.self_attn.q_proj.weight",
        "mtp.layers.1.mlp.gate.weight": "model.layers.5.mlp.gate.weight",
        "mtp.fc.weight": "model.layers.4.mtp.fc.weight",
        "mtp.pre_fc_norm_hidden.weight": "model.layers.4.mtp.pre_fc_norm_hidden.weight",
        "model.layers.3.mtp.fc.weight": "model.layers.3.mtp.fc.weight",  # a main layer: untouched
        "model.norm.weight": "model.norm.weight",
        "mtp.unknown.weight": "mtp.unknown.weight",  # left for the coverage check to report
    }
    for hf, table in pairs.items():
        assert rename(hf, 4, False) == table
        if not hf.startswith("model.layers.3."):
            assert rename(table, 4, True) == hf
    with pytest.raises(FormatError, match=r"model\.layers\.5\.mtp\.fc\.weight"):
        rename("model.layers.5.mtp.fc.weight", 4, True)


def test_hy_v3_router_and_shared_experts_under_megatron_names(models, tmp_path):
    """HYV3's router (mlp.router.gate), score bias (mlp.expert_bias) and shared_mlp reach the
    MindSpeed keys; layer 0 (mlp_layer_types "dense") is a dense MLP."""
    src = models("hy_v3")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    sd = _rank(mid, "mp_rank_00")["model"]
    assert torch.equal(sd["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.router.gate.weight"])
    assert torch.equal(sd["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.expert_bias"])
    f = hf["model.layers.1.mlp.shared_mlp.gate_proj.weight"].shape[0] // 2
    assert torch.equal(
        sd["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"],
        torch.cat(
            [
                hf["model.layers.1.mlp.shared_mlp.gate_proj.weight"][:f],
                hf["model.layers.1.mlp.shared_mlp.up_proj.weight"][:f],
            ]
        ),
    )
    assert "decoder.layers.0.mlp.router.weight" not in sd and "decoder.layers.0.mlp.linear_fc1.weight" in sd


def test_models_lists_wave_b_families_with_mindspeed_names(capsys):
    from ckpt_ir.commands.cli import main

    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    names_of = {
        "deepseek_v32": "deepseek32",
        "glm_moe_dsa": "glm5",
        "hy_v3": "HYV3",
        "qwen3_next": "qwen3-next",
    }
    for family, names in names_of.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)


def test_qwen3_next_layers_under_mindspeed_names(models, tmp_path):
    """MindSpeed-LLM's qwen3-next layout (qkv_type "mix", convert_hf2mg.py): a gated-delta-net
    layer's HF tensors are copied whole to self_attention.{in_proj_qkvz, in_proj_ba, conv1d,
    A_log, dt_bias, norm, out_proj}; a full-attention layer keeps q_proj (with its gate rows),
    k_proj and v_proj unfused beside linear_proj and the q/k layernorms."""
    src = models("qwen3_next")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", ep=2))
    sd = _rank(mid, "mp_rank_00_000")["model"]
    gdn = {
        "in_proj_qkvz.weight": "in_proj_qkvz.weight",
        "in_proj_ba.weight": "in_proj_ba.weight",
        "conv1d.weight": "conv1d.weight",
        "A_log": "A_log",
        "dt_bias": "dt_bias",
        "norm.weight": "norm.weight",
        "out_proj.weight": "out_proj.weight",
    }
    for i in (0, 1, 2):
        attn = {k for k in sd if k.startswith(f"decoder.layers.{i}.self_attention.")}
        assert attn == {f"decoder.layers.{i}.self_attention.{m}" for m in gdn}
        for m, h in gdn.items():
            assert torch.equal(
                sd[f"decoder.layers.{i}.self_attention.{m}"], hf[f"model.layers.{i}.linear_attn.{h}"]
            )
    full = {
        "q_proj.weight": "q_proj.weight",
        "k_proj.weight": "k_proj.weight",
        "v_proj.weight": "v_proj.weight",
        "linear_proj.weight": "o_proj.weight",
        "q_layernorm.weight": "q_norm.weight",
        "k_layernorm.weight": "k_norm.weight",
    }
    assert {k for k in sd if k.startswith("decoder.layers.3.self_attention.")} == {
        f"decoder.layers.3.self_attention.{m}" for m in full
    }
    for m, h in full.items():
        assert torch.equal(sd[f"decoder.layers.3.self_attention.{m}"], hf[f"model.layers.3.self_attn.{h}"])
    assert sd["decoder.layers.3.self_attention.q_proj.weight"].shape == (2 * 4 * 16, 64)  # [q; gate] per head
    assert torch.equal(
        sd["decoder.layers.0.mlp.shared_experts.gate_weight"],
        hf["model.layers.0.mlp.shared_expert_gate.weight"],
    )


def test_qwen3_next_refuses_tensor_parallelism_in_one_line(models, tmp_path):
    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert

    out = tmp_path / "out"
    assert_clean_error(
        cli_convert(models("qwen3_next"), out, "--tp", "2"), out, names=("gated-delta-net", "--tp 1")
    )
