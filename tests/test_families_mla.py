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


def test_models_lists_the_mla_families_with_their_mindspeed_names(capsys):
    lines = listed_families(capsys)
    want = {
        "deepseek_v2": "deepseek2,deepseek2-lite",
        "minicpm3": "minicpm3",
        "deepseek_v32": "deepseek32",
        "glm_moe_dsa": "glm5",
    }
    assert "glm4_moe_lite" in lines  # no MindSpeed-LLM entry
    for family, names in want.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)
