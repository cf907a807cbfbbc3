"""The megatron-core keys-and-shapes oracle for hybrid models (``tests/mcore_hybrid.py``) against
the format facts of docs/reference/composed-blocks.md §2.2, §2.3 and §2.5 (measured with
megatron-core 0.16.1): one job, forked gloo ranks, tiny dims (the document's: hidden 64, Mamba
heads of 16 with state 16 in 2 groups, 4 attention heads in 2 query groups, ffn 96, 4 experts of
32 and a shared expert of 48; GDN 2 key heads, 4 value heads, head dims 16).

The expected keys and shapes are the document's formulas evaluated at these dims, and the TP2
shapes it lists as measured are checked against those formulas too.  The checkpoint cases use
megatron-core's own writers: a torch_dist checkpoint saved at TP2 x PP2 and loaded strictly at
TP1 gives back, per TP rank, exactly the per-part blocks of §2.3 that a torch-format rank file of
the same model holds; a model that differs (one layer fewer, or the local norm naming) is refused
with exactly the keys that differ.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.mcore_hybrid import load_results, mcore_keys

H, V = 64, 128  # hidden, vocabulary
NH, NG, HD = 4, 2, 16  # attention heads, query groups, head dim (H / NH)
F, FE, FS, E = 96, 32, 48, 4  # dense ffn, expert ffn, shared expert ffn, experts
P, N, G, L = 16, 16, 2, 4  # Mamba head dim, state dim, groups, conv kernel (fixed 4 in MC 0.16.1)
D = 2 * H  # d_inner: expand 2 when mamba_num_heads is None (§2.1)
HM = D // P  # Mamba heads
HK, HV, DK, DV = 2, 4, 16, 16  # GDN key heads, value heads, key / value head dims

MAMBA = dict(
    kind="mamba",
    hidden=H,
    heads=NH,
    groups=NG,
    ffn=F,
    vocab=V,
    mamba_head_dim=P,
    mamba_state_dim=N,
    mamba_num_groups=G,
    hybrid_override_pattern="M*-E",
    num_moe_experts=E,
    moe_ffn_hidden_size=FE,
    moe_shared_expert_intermediate_size=FS,
)
PP2 = dict(tp=2, pp=2, num_layers_in_first_pipeline_stage=1)  # stage 0: "M"; stage 1: "*-E"
GDN = dict(
    kind="gdn",
    tp=2,
    pp=1,
    hidden=H,
    heads=NH,
    groups=NG,
    kv_channels=HD,
    ffn=F,
    vocab=V,
    num_layers=2,
    linear_attention_freq=2,  # layer i is softmax attention iff (i + 1) % 2 == 0 (§2.5)
    linear_key_head_dim=DK,
    linear_value_head_dim=DV,
    linear_num_key_heads=HK,
    linear_num_value_heads=HV,
    linear_conv_kernel_dim=L,
    attention_output_gate=True,
    qk_layernorm=True,
    layernorm_zero_centered_gamma=True,
)

# §2.3, "Measured TP2 rank shapes"
MEASURED_TP2_MAMBA = {
    "in_proj.weight": [164, 64],
    "conv1d.weight": [96, 1, 4],
    "dt_bias": [4],
    "A_log": [4],
    "D": [4],
    "norm.weight": [64],
    "out_proj.weight": [64, 64],
}
MEASURED_TP2_GDN = {
    "in_proj.weight": [100, 64],
    "conv1d.weight": [64, 1, 4],
    "A_log": [2],
    "dt_bias": [2],
    "out_norm.weight": [16],
    "out_proj.weight": [64, 32],
}


def mamba_mixer(t: int) -> dict:
    """§2.2 / §2.3: a Mamba mixer's tensors on one of t TP ranks."""
    return {
        "in_proj.weight": [(2 * D + 2 * G * N + HM) // t, H],
        "conv1d.weight": [(D + 2 * G * N) // t, 1, L],
        "conv1d.bias": [(D + 2 * G * N) // t],
        "dt_bias": [HM // t],
        "A_log": [HM // t],
        "D": [HM // t],
        "norm.weight": [D // t],
        "out_proj.weight": [H, D // t],
    }


def gdn_mixer(t: int) -> dict:
    """§2.3 / §2.5: a gated-delta-net's tensors on one of t TP ranks."""
    qk, v = HK * DK, HV * DV
    return {
        "in_proj.weight": [(2 * qk + 2 * v + 2 * HV) // t, H],
        "conv1d.weight": [(2 * qk + v) // t, 1, L],
        "A_log": [HV // t],
        "dt_bias": [HV // t],
        "out_norm.weight": [DV],
        "out_proj.weight": [H, v // t],
    }


def te_layer(kind: str, t: int) -> dict:
    """§2.2: the keys and shapes of one Megatron layer of a MambaModel (TE spec), t TP ranks."""
    if kind == "M":
        return {
            "mixer.in_proj.layer_norm_weight": [H],
            **{f"mixer.{k}": s for k, s in mamba_mixer(t).items()},
        }
    if kind == "*":
        return {
            "self_attention.linear_qkv.weight": [(NH + 2 * NG) * HD // t, H],
            "self_attention.linear_qkv.layer_norm_weight": [H],
            "self_attention.linear_proj.weight": [H, NH * HD // t],
        }
    if kind == "-":
        return {
            "mlp.linear_fc1.weight": [2 * F // t, H],
            "mlp.linear_fc1.layer_norm_weight": [H],
            "mlp.linear_fc2.weight": [H, F // t],
        }
    assert kind == "E"
    out = {"pre_mlp_layernorm.weight": [H], "mlp.router.weight": [E, H]}
    for e in range(E):
        out[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = [2 * FE // t, H]
        out[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = [H, FE // t]
    out["mlp.shared_experts.linear_fc1.weight"] = [2 * FS // t, H]
    out["mlp.shared_experts.linear_fc2.weight"] = [H, FS // t]
    return out


# §2.2 "Norm naming": the local (MindSpeed-LLM) spec's separate norms instead of TE's fused ones
LOCAL_NORM = {"M": "norm.weight", "*": "input_layernorm.weight", "-": "pre_mlp_layernorm.weight"}
TE_NORM = {
    "M": "mixer.in_proj.layer_norm_weight",
    "*": "self_attention.linear_qkv.layer_norm_weight",
    "-": "mlp.linear_fc1.layer_norm_weight",
}


def local_layer(kind: str, t: int) -> dict:
    out = dict(te_layer(kind, t))
    if kind in TE_NORM:
        del out[TE_NORM[kind]]
        out[LOCAL_NORM[kind]] = [H]
    return out


def stage_keys(layers: str, t: int, first: bool, last: bool, layer=te_layer) -> dict:
    """A stage's legacy keys: its layers numbered from 0 (§2.2), embedding on the first stage,
    ``decoder.final_norm`` and the output layer on the last."""
    out = {"embedding.word_embeddings.weight": [V // t, H]} if first else {}
    for j, kind in enumerate(layers):
        out.update({f"decoder.layers.{j}.{k}": s for k, s in layer(kind, t).items()})
    if last:
        out.update({"decoder.final_norm.weight": [H], "output_layer.weight": [V // t, H]})
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    dist, legacy = str(root / "dist"), str(root / "torch")
    cases = [
        dict(MAMBA, **PP2, save={"dir": dist, "format": "torch_dist"}),
        dict(MAMBA, **PP2, save={"dir": legacy, "format": "torch"}),
        dict(MAMBA, tp=1, pp=1, ckpt=dist, dump=True),
        dict(MAMBA, **PP2, ckpt=legacy, dump=True),
        dict(MAMBA, **PP2, spec="local", ckpt=legacy),
        dict(MAMBA, tp=2, pp=1, hybrid_override_pattern="M*-", ckpt=dist),
        GDN,
    ]
    reports = mcore_keys(cases, root / "job")
    return {
        "te_pp2": reports[0],
        "tp1": reports[2],
        "legacy_pp2": reports[3],
        "local_pp2": reports[4],
        "fewer": reports[5],
        "gdn": reports[6],
        "dump": lambda i, rank: torch.load(os.path.join(root / "job", f"case{i}.rank{rank}.sd.pt")),
    }


def test_the_measured_tp2_shapes_are_the_formulas():
    mamba, gdn = mamba_mixer(2), gdn_mixer(2)
    assert {k: mamba[k] for k in MEASURED_TP2_MAMBA} == MEASURED_TP2_MAMBA
    assert gdn == MEASURED_TP2_GDN


def test_mamba_te_spec_tp1_has_the_keys_of_each_layer_type(oracle):
    for r in oracle["tp1"]:
        assert r["model"] == "MambaModel" and r["layers"] == list("M*-E") and r["offset"] == 0
        assert r["state_dict"] == stage_keys("M*-E", 1, True, True)
        # _extra_state follows every linear and the TE core attention; the norms have none
        assert "decoder.layers.1.self_attention.core_attention._extra_state" in r["extra_state"]
        assert not [k for k in r["extra_state"] if "norm" in k]
        assert r["modules"]["decoder.layers.3.mlp.experts"] == "SequentialMLP"


def test_mamba_tp2_pp2_ranks_hold_per_rank_blocks_numbered_locally(oracle):
    by_stage = {0: ("M", True, False), 1: ("*-E", False, True)}
    for r in oracle["te_pp2"]:
        layers, first, last = by_stage[r["pp_rank"]]
        assert r["layers"] == list(layers) and r["offset"] == (0 if first else 1)
        assert r["state_dict"] == stage_keys(layers, 2, first, last)


def test_mamba_torch_dist_keys_are_global_per_part_tensors(oracle):
    ranks = oracle["te_pp2"]
    sharded = {}
    for r in ranks:
        for key, entry in r["sharded"].items():
            sharded.setdefault(key, []).append((r, entry))
    gn = G * N
    parts = {"z": D, "x": D, "B": gn, "C": gn, "dt": HM}
    for name, rows in parts.items():
        for r, entry in sharded[f"decoder.layers.0.mixer.in_proj.weight.{name}"]:
            assert entry["global_shape"] == [rows, H]
            (shard,) = entry["shards"]
            assert shard["local_shape"] == [rows // 2, H]
            assert shard["global_offset"] == [r["tp_rank"] * rows // 2, 0]
    for leaf, tail in (("weight", [1, L]), ("bias", [])):
        for name, rows in (("x", D), ("B", gn), ("C", gn)):
            for _, entry in sharded[f"decoder.layers.0.mixer.conv1d.{leaf}.{name}"]:
                assert entry["global_shape"] == [rows, *tail]
    # global layer numbers: stage 1's first layer is layer 1; the fused norm is replicated over TP
    for r, entry in sharded["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"]:
        assert entry["shards"][0]["replica_id"] == [0, r["tp_rank"], 0]
    for _, entry in sharded["decoder.layers.3.mlp.experts.experts.linear_fc1.weight"]:
        assert entry["global_shape"] == [E, 2 * FE, H]
    assert "decoder.layers.0.mixer.in_proj.weight" not in sharded
    assert not [k for k in sharded if k.startswith("decoder.layers.0.") and "mixer" not in k]


def test_mamba_local_spec_names_the_norms_separately(oracle):
    for r in oracle["local_pp2"]:
        layers, first, last = {0: ("M", True, False), 1: ("*-E", False, True)}[r["pp_rank"]]
        assert r["spec"] == "local"
        assert r["state_dict"] == stage_keys(layers, 2, first, last, layer=local_layer)
        assert not [k for k in r["extra_state"] if "core_attention" in k]


def test_gdn_model_has_the_gdn_and_gated_attention_keys(oracle):
    for r in oracle["gdn"]:
        assert r["model"] == "GPTModel" and r["layers"] == ["G", "*"]
        sd = r["state_dict"]
        gdn = {f"decoder.layers.0.self_attention.{k}": s for k, s in gdn_mixer(2).items()}
        gdn["decoder.layers.0.self_attention.in_proj.layer_norm_weight"] = [H]
        # gated attention: per query group [q heads; gates; k; v] (§2.3), q/k norms per head
        attention = {
            "decoder.layers.1.self_attention.linear_qkv.weight": [(2 * NH + 2 * NG) * HD // 2, H],
            "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": [H],
            "decoder.layers.1.self_attention.q_layernorm.weight": [HD],
            "decoder.layers.1.self_attention.k_layernorm.weight": [HD],
            "decoder.layers.1.self_attention.linear_proj.weight": [H, NH * HD // 2],
        }
        mlp = {
            f"decoder.layers.{i}.mlp.{k}": s
            for i in (0, 1)
            for k, s in {
                "linear_fc1.weight": [F, H],
                "linear_fc1.layer_norm_weight": [H],
                "linear_fc2.weight": [H, F // 2],
            }.items()
        }
        top = {
            "embedding.word_embeddings.weight": [V // 2, H],
            "decoder.final_layernorm.weight": [H],
            "output_layer.weight": [V // 2, H],
        }
        assert sd == {**gdn, **attention, **mlp, **top}
        qk, v = HK * DK, HV * DV
        parts = {"query": qk, "key": qk, "value": v, "z": v, "beta": HV, "alpha": HV}
        for name, rows in parts.items():
            assert r["sharded"][f"decoder.layers.0.self_attention.in_proj.weight.{name}"]["global_shape"] == [
                rows,
                H,
            ]
        for name in ("query", "key", "value"):
            assert f"decoder.layers.0.self_attention.conv1d.weight.{name}" in r["sharded"]


def test_a_torch_dist_checkpoint_loads_strictly_in_another_layout(oracle):
    for res in load_results(oracle["tp1"]):
        assert res["format"] == "torch_dist" and res["ok"], res
        assert res["missing"] == res["unexpected"] == res["state_dict_missing"] == []
    for res in load_results(oracle["legacy_pp2"]):
        assert res["format"] == "torch" and res["ok"], res


def test_the_resharded_load_gives_back_the_rank_files_blocks(oracle):
    """TP1 from torch_dist vs the TP2 rank files of the same model: per rank, each part's chunk."""
    whole = oracle["dump"](2, 0)
    gn = G * N
    for rank in (0, 1):  # stage 0 (layer 0: "M"), TP ranks 0 and 1
        part = oracle["dump"](3, rank)
        mixer = "decoder.layers.0.mixer."
        z, x, b, c, dt = torch.split(whole[mixer + "in_proj.weight"], [D, D, gn, gn, HM])
        want = torch.cat([p.chunk(2)[rank] for p in (z, x, b, c, dt)])
        assert torch.equal(part[mixer + "in_proj.weight"], want)
        assert not torch.equal(part[mixer + "in_proj.weight"], whole[mixer + "in_proj.weight"].chunk(2)[rank])
        for leaf in ("weight", "bias"):
            xs, bs, cs = torch.split(whole[mixer + f"conv1d.{leaf}"], [D, gn, gn])
            assert torch.equal(
                part[mixer + f"conv1d.{leaf}"], torch.cat([p.chunk(2)[rank] for p in (xs, bs, cs)])
            )
        for name in ("dt_bias", "A_log", "D", "norm.weight"):
            assert torch.equal(part[mixer + name], whole[mixer + name].chunk(2)[rank])
        assert torch.equal(
            part[mixer + "out_proj.weight"], whole[mixer + "out_proj.weight"].chunk(2, dim=1)[rank]
        )


def test_a_checkpoint_of_another_model_is_refused_with_the_keys_that_differ(oracle):
    saved = {k for r in oracle["te_pp2"] for k in (*r["sharded"], *r["sharded_objects"])}
    moe_layer = {k for k in saved if k.startswith("decoder.layers.3.")}
    assert moe_layer
    for res in load_results(oracle["fewer"]):
        assert not res["ok"] and res["error"] is None
        assert set(res["missing"]) == moe_layer and res["unexpected"] == []
    te_stage = {0: "M", 1: "*-E"}
    for r, res in zip(oracle["local_pp2"], load_results(oracle["local_pp2"])):
        layers = te_stage[r["pp_rank"]]
        local = {f"decoder.layers.{j}.{LOCAL_NORM[k]}" for j, k in enumerate(layers) if k in LOCAL_NORM}
        te = {f"decoder.layers.{j}.{TE_NORM[k]}" for j, k in enumerate(layers) if k in TE_NORM}
        te |= {
            f"decoder.layers.{j}.self_attention.core_attention._extra_state"
            for j, k in enumerate(layers)
            if k == "*"
        }
        assert not res["ok"] and set(res["missing"]) == local and set(res["unexpected"]) == te
