"""Hybrid-attention families of ``ckpt_ir/families/hybrid.py`` (Qwen3-Next): a tiny random model
built and saved by transformers (``tests/family_models.py``) converts HF -> Megatron-Core (PP with
uneven stages, EP2 grouped GEMM; TP 1 only) -> HF bit-exactly, and transformers' logits on the
result equal the original's.  The gated-delta-net and MTP tensors' rank-file keys are checked
against MindSpeed-LLM's layout (format facts written here)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import DENSE, assert_round_trip, listed_families, model_cache, rank
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    # gated-delta-net layers: TP 1 only (MindSpeed-LLM's qwen3-next layout)
    "qwen3_next": (dict(pp=2, num_layer_list=(3, 1)), dict(ep=2, grouped_gemm=True)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "hybrid")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


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
    sd = append_qwen3_next_mtp_layer(src, DENSE["hidden_size"])
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    assert ck.load(mid).spec.mtp_layers == 1
    last = rank(mid, "mp_rank_00_001")["model"]  # PP2: the last stage; EP2: EP rank 1
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


def test_qwen3_next_layers_under_mindspeed_names(models, tmp_path, capsys):
    """``ckpt-ir models`` lists the family under MindSpeed-LLM's name qwen3-next, and its layout
    (qkv_type "mix", convert_hf2mg.py) is written: a gated-delta-net layer's HF tensors are copied
    whole to self_attention.{in_proj_qkvz, in_proj_ba, conv1d, A_log, dt_bias, norm, out_proj}; a
    full-attention layer keeps q_proj (with its gate rows), k_proj and v_proj unfused beside
    linear_proj and the q/k layernorms."""
    assert "--model-type-hf qwen3-next" in listed_families(capsys)["qwen3_next"]
    src = models("qwen3_next")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", ep=2))
    sd = rank(mid, "mp_rank_00_000")["model"]
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
