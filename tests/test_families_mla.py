"""Multi-latent-attention families of ``ckpt_ir/families/mla.py`` (deepseek_v3 is in
``test_deepseek.py``, plm in ``test_families_remote_code.py``): tiny random models built and saved
by transformers (``tests/family_models.py``) convert HF -> Megatron-Core (a PP layout, TP2 x EP2,
no-op layers) -> HF bit-exactly, and transformers' logits on the result equal the original's.  The
DSA indexer's rank-file keys and replication are checked against MindSpeed-LLM's layout (format
facts written here)."""

from __future__ import annotations

import shutil

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import FormatError
from tests.family_models import (
    DENSE,
    append_mtp_layer,
    assert_round_trip,
    listed_families,
    model_cache,
    rank,
)
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "deepseek_v2": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "minicpm3": (dict(tp=2, pp=2), dict(tp=2, pp=2, noop_layers=(2, 5))),
    "deepseek_v32": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "glm_moe_dsa": (dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=2, ep=2, grouped_gemm=True)),
    # GLM-4.7-Flash (issue 31): one conversion through TP2 x EP2 x PP2 with an uneven layer list
    # (megatron-core's logits on its rank files: test_megatron_mla_oracle.py)
    "glm4_moe_lite": (dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1), grouped_gemm=True),),
    # LongCat-Flash (3 layers of two MLA sublayers + a shortcut MoE with zero experts): TP2 x EP2,
    # MindSpeed-LLM's release recipe (expert TP 1, grouped GEMM) over an uneven PP2, and VPP
    "longcat_flash": (
        dict(tp=2, ep=2),
        dict(tp=2, pp=2, ep=2, etp=1, num_layer_list=(2, 1), grouped_gemm=True),
        # a virtual pipeline (a no-op layer makes the 3 layers 2 stages x 2 chunks of 1)
        dict(pp=2, vpp_layers=1, noop_layers=(3,)),
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "mla")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


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
        r = rank(mid, f"mp_rank_0{t}")
        sd = r["model"]
        assert r["args"].enable_dsa_indexer is True
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
    _, sd = append_mtp_layer(src, DENSE["hidden_size"])
    n = 4  # the MTP layer's HF index
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, grouped_gemm=True))
    assert ck.load(mid).spec.mtp_layers == 1
    last = rank(mid, "mp_rank_01_001_001")["model"]
    assert torch.equal(
        last["mtp.layers.0.transformer_layer.self_attention.dsa_indexer.wq_b.weight"],
        sd[f"model.layers.{n}.self_attn.indexer.wq_b.weight"],
    )
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_longcat_rank_files_hold_mindspeeds_longcat_layer(models, tmp_path):
    """MindSpeed-LLM's LongCat layer (convert_ckpt_longcat.py, model_builder.py; measured order in
    docs/reference/composed-blocks.md 4.2): per layer input_layernorm_0, pre_mlp_layernorm_0, the
    MLA modules self_attention_0.* (linear_qkv = [q_a_proj; kv_a_proj_with_mqa] whole on every TP
    rank, q_b / kv_b by rows, o_proj by columns), the router with a row per routed and zero
    expert, this EP rank's experts, mlps_0 (fc1 [gate_r; up_r]), then sublayer 1's set."""
    src = models("longcat_flash")
    hf = hf_state(src)
    spec = ck.load(src).spec
    assert (spec.num_layers, spec.num_experts, spec.zero_experts) == (3, 4, 2)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2))
    sub = ("input_layernorm_{k}.weight", "pre_mlp_layernorm_{k}.weight")
    sub += tuple(
        f"self_attention_{{k}}.{m}.weight"
        for m in (
            "linear_qkv",
            "linear_proj",
            "q_layernorm",
            "kv_layernorm",
            "linear_q_up_proj",
            "linear_kv_up_proj",
        )
    )
    mlps = ("mlps_{k}.linear_fc1.weight", "mlps_{k}.linear_fc2.weight")
    experts = tuple(f"mlp.experts.local_experts.{j}.linear_fc{n}.weight" for j in range(2) for n in (1, 2))
    layer = tuple(k.format(k=0) for k in sub) + ("mlp.router.weight", "mlp.router.expert_bias") + experts
    layer += tuple(k.format(k=0) for k in mlps) + tuple(k.format(k=1) for k in sub + mlps)
    want = ["embedding.word_embeddings.weight"]
    want += [f"decoder.layers.{i}.{k}" for i in range(3) for k in layer]
    want += ["decoder.final_layernorm.weight", "output_layer.weight"]
    for t, e in ((0, 0), (1, 0), (0, 1), (1, 1)):
        sd = rank(mid, f"mp_rank_{t:02d}_{e:03d}")["model"]
        assert [k for k in sd if not k.endswith("_extra_state")] == want
        h, d = "model.layers.2.", "decoder.layers.2."
        assert torch.equal(
            sd[d + "self_attention_1.linear_qkv.weight"],
            torch.cat(
                [hf[h + "self_attn.1.q_a_proj.weight"], hf[h + "self_attn.1.kv_a_proj_with_mqa.weight"]]
            ),
        )
        assert torch.equal(
            sd[d + "self_attention_1.linear_kv_up_proj.weight"],
            hf[h + "self_attn.1.kv_b_proj.weight"].chunk(2)[t],
        )
        assert torch.equal(
            sd[d + "self_attention_0.linear_proj.weight"], hf[h + "self_attn.0.o_proj.weight"].chunk(2, 1)[t]
        )
        assert sd[d + "mlp.router.weight"].shape == (6, 64)
        assert torch.equal(sd[d + "mlp.router.weight"], hf[h + "mlp.router.classifier.weight"])
        assert torch.equal(sd[d + "mlp.router.expert_bias"], hf[h + "mlp.router.e_score_correction_bias"])
        gate, up = (hf[h + f"mlps.0.{p}_proj.weight"].chunk(2)[t] for p in ("gate", "up"))
        assert torch.equal(sd[d + "mlps_0.linear_fc1.weight"], torch.cat([gate, up]))
        expert = 2 * e + 1  # local expert 1 of EP rank e
        gate, up = (hf[h + f"mlp.experts.{expert}.{p}_proj.weight"].chunk(2)[t] for p in ("gate", "up"))
        assert torch.equal(sd[d + "mlp.experts.local_experts.1.linear_fc1.weight"], torch.cat([gate, up]))


@pytest.mark.parametrize("zero", [2, 0, None, "absent"])
def test_longcat_router_rows_are_routed_plus_zero_experts(models, tmp_path, zero):
    """LongcatFlashTopkRouter scores n_routed_experts + (zero_expert_num or 0) choices, and
    LongcatFlashConfig's zero_expert_num defaults to 256: the 4 + 2 router rows of the model
    match only zero_expert_num 2; other values are a one-line error naming the tensor."""
    import json

    src = str(tmp_path / "hf")
    shutil.copytree(models("longcat_flash"), src)
    cfg = json.load(open(f"{src}/config.json"))
    if zero == "absent":
        del cfg["zero_expert_num"]
    else:
        cfg["zero_expert_num"] = zero
    json.dump(cfg, open(f"{src}/config.json", "w"))
    if zero == 2:
        assert ck.load(src).spec.zero_experts == 2
        return
    rows = {0: 4, None: 4, "absent": 4 + 256}[zero]
    with pytest.raises(
        FormatError, match=rf"router\.classifier\.weight has shape \[6, 64\] .* implies \[{rows}, 64\]"
    ):
        ck.load(src)


def test_models_lists_the_mla_families_with_their_mindspeed_names(capsys):
    lines = listed_families(capsys)
    want = {
        "deepseek_v2": "deepseek2,deepseek2-lite",
        "minicpm3": "minicpm3",
        "deepseek_v32": "deepseek32",
        "glm_moe_dsa": "glm5",
        "longcat_flash": "longcat",
    }
    assert "glm4_moe_lite" in lines  # no MindSpeed-LLM entry
    for family, names in want.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)
