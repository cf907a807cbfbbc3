"""Mamba families of ``ckpt_ir/families/mamba.py`` (mamba2, Nemotron-H): a tiny random model built
and saved by transformers converts HF -> Megatron-Core (megatron-core's MambaModel keys; TP2 splits
the mixers' in_proj / conv1d part by part) -> HF bit-exactly, and transformers' logits on the result
equal the original's.  The rank files' Mamba keys and per-rank rows are checked against the format
facts (megatron-core ``ssm/mamba_mixer.py``; docs/reference/composed-blocks.md §2.2-2.3)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import convert

MAMBA = dict(n_groups=2, conv_kernel=4, chunk_size=8)  # 8 heads of 16, state 16: d = 128
CONFIGS = {
    "mamba2": dict(
        MAMBA,
        hidden_size=64,
        num_heads=8,
        head_dim=16,
        state_size=16,
        expand=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # every block kind: Mamba, MoE (non-gated relu2 experts, score-correction bias, shared
    # expert), attention, MLP
    "nemotron_h": dict(
        DENSE,
        **MAMBA,
        head_dim=16,
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
    ),
}
LAYOUTS = {
    "mamba2": (dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=2, norm_names="te")),
    "nemotron_h": (dict(tp=2, ep=2, norm_names="te"), dict(pp=2, num_layer_list=(3, 1))),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mamba")
    return {f: build(str(root / f), f, configs=CONFIGS) for f in CONFIGS}


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models[family], tmp_path, family, LAYOUTS[family][layout])


def test_nemotron_h_layers_hold_their_blocks_and_one_norm_each(models):
    """Nemotron-H's one ``norm`` per layer is the input norm of the layer's only block."""
    ckpt = ck.load(models["nemotron_h"])
    assert [ckpt.spec.blocks(i) for i in range(4)] == [("mamba",), ("moe",), ("attention",), ("mlp",)]
    norms = sorted(n for n in ckpt.tensors if n.endswith("norm.weight") and n.startswith("layers."))
    assert norms == [
        "layers.0.mamba.norm.weight",
        "layers.0.mamba_norm.weight",
        "layers.1.mlp_norm.weight",
        "layers.2.attn_norm.weight",
        "layers.3.mlp_norm.weight",
    ]


def test_mamba_mixer_splits_over_tp_part_by_part(models, tmp_path):
    """TP rank r holds in_proj rows [z_r; x_r; B_r; C_r; dt_r] and conv1d channels [x_r; B_r; C_r]
    (z, x: d = 128 rows; B, C: groups 2 x state 16; dt: 8 heads), megatron-core's MambaMixer;
    per-head tensors and the gated norm are plain chunks; the final norm is MambaModel's."""
    src = models["mamba2"]
    hf = load_file(f"{src}/model.safetensors")
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    w = hf["backbone.layers.1.mixer.in_proj.weight"]
    conv = hf["backbone.layers.1.mixer.conv1d.weight"]
    parts = dict(zip("zxBCd", torch.split(w, [128, 128, 32, 32, 8])))
    conv_parts = torch.split(conv, [128, 32, 32])
    for r in range(2):
        sd = rank(mid, f"mp_rank_{r:02d}")["model"]
        want = torch.cat([p.chunk(2)[r] for p in parts.values()])
        assert torch.equal(sd["decoder.layers.1.mixer.in_proj.weight"], want)
        assert torch.equal(
            sd["decoder.layers.1.mixer.conv1d.weight"], torch.cat([p.chunk(2)[r] for p in conv_parts])
        )
        assert torch.equal(
            sd["decoder.layers.1.mixer.A_log"], hf["backbone.layers.1.mixer.A_log"].chunk(2)[r]
        )
        assert torch.equal(
            sd["decoder.layers.1.mixer.norm.weight"], hf["backbone.layers.1.mixer.norm.weight"].chunk(2)[r]
        )
        assert torch.equal(
            sd["decoder.layers.1.mixer.out_proj.weight"],
            hf["backbone.layers.1.mixer.out_proj.weight"].chunk(2, 1)[r],
        )
        assert torch.equal(sd["decoder.layers.1.norm.weight"], hf["backbone.layers.1.norm.weight"])
        assert torch.equal(sd["decoder.final_norm.weight"], hf["backbone.norm_f.weight"])
        assert "decoder.final_layernorm.weight" not in sd


def test_tp_must_divide_the_mamba_groups(models, tmp_path):
    """2 B/C groups do not split over TP 4: a one-line error naming the tensor, nothing written."""
    with pytest.raises(Exception, match=r"in_proj|groups"):
        convert(models["mamba2"], str(tmp_path / "mid"), ck.Target(to="mcore", tp=4))
    assert not (tmp_path / "mid").exists()


def test_verify_runs_a_hybrid_layer_by_layer(models, tmp_path):
    """``ckpt-ir verify`` builds Nemotron-H from its config (config.json spells Mamba's infinite
    time_step_limit {"__float__": "Infinity"}, decoded as transformers decodes it) and finds the
    HF model and its Megatron TP2 PP2 conversion equal, layer by layer; a changed Mamba element
    names its layer."""
    from tests.cli_contract import cli

    src = models["nemotron_h"]
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
    r = cli("verify", src, mid, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    sd = load_file(f"{bad}/model.safetensors")
    sd["backbone.layers.0.mixer.D"][3] += 1.0
    save_file(sd, f"{bad}/model.safetensors", metadata={"format": "pt"})
    r = cli("verify", mid, bad)
    assert r.returncode == 1 and "first at layer 0" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(pp=2, vpp_layers=1), "builds no virtual pipeline stages"),
        (dict(pp=2, noop_layers=(4, 5)), "has no no-op layers"),
    ],
    ids=["vpp", "noop"],
)
def test_no_virtual_pipeline_or_noop_layers_for_mamba_models(models, tmp_path, layout, message):
    """megatron-core's MambaStack asserts it has no virtual pipeline stages, and its hybrid pattern
    gives every layer a block (no no-op layers): each refused in one line."""
    with pytest.raises(Exception, match=message) as e:
        convert(models["nemotron_h"], str(tmp_path / "mid"), ck.Target(to="mcore", **layout))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mid").exists()
