"""``--to mcore --ckpt-format torch_dist``: megatron-core's own ``dist_checkpointing.load`` reads
ckpt-ir's output into a GPTModel's sharded state dict at two different TP/PP layouts (CPU, gloo,
``tests/mcore_harness.py``), and the model's logits equal transformers' on the source; from HF
and from a ``torch``-format checkpoint (plain Megatron-LM args, no HF config)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.errors import UsageError
from tests.mcore_harness import run_job
from tests.test_family_inference import plain_args
from tests.test_megatron_oracle import INPUT_IDS, WORLD, _build_hf

LAYOUTS = ((1, 1), (2, 2))


def _dense_case(name: str, out: str, m: dict, tp: int, pp: int, root: str) -> dict:
    """A harness case loading the torch_dist ``out`` of the dense HF model ``m`` at (tp, pp)."""
    return {
        "name": name,
        "ckpt": out,
        "tp": tp,
        "pp": pp,
        "vpp": None,
        "torch_dist": True,
        "hf_config": m["config"],
        "padded_vocab": 128,
        "tied": m["tied"],
        "qkv_bias": m["qkv_bias"],
        "qk_norm": m["qk_norm"],
        "input_ids": INPUT_IDS,
        "out": os.path.join(root, f"{name}.pt"),
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-dist-write")
    models = {
        "llama": _build_hf(str(root / "llama"), "llama", 4, False, 128, 500000.0, seed=3),
        "qwen2": _build_hf(str(root / "qwen2"), "qwen2", 4, True, 128, 1000000.0, seed=4),
    }
    outs = {}
    for name, m in models.items():  # HF -> torch_dist
        outs[name] = str(root / f"{name}-td")
        assert (
            cli_main(
                ["convert", m["dir"], outs[name], "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
            )
            == 0
        )
    # torch format TP=2 PP=2 with plain Megatron-LM args -> torch_dist (the family inferred)
    mc = str(root / "llama-tp2pp2")
    assert (
        cli_main(
            ["convert", models["llama"]["dir"], mc, "--to", "mcore", "--tp", "2", "--pp", "2", "--quiet"]
        )
        == 0
    )
    plain_args(mc)
    outs["llama-from-torch"] = str(root / "llama-from-torch-td")
    assert (
        cli_main(
            [
                "convert",
                mc,
                outs["llama-from-torch"],
                "--to",
                "mcore",
                "--ckpt-format",
                "torch_dist",
                "--quiet",
            ]
        )
        == 0
    )
    cases = []
    for name, out in outs.items():
        m = models[name.split("-")[0]]
        for tp, pp in LAYOUTS:
            cases.append(
                {**_dense_case(f"{name}-tp{tp}pp{pp}", out, m, tp, pp, str(root)), "ref": name.split("-")[0]}
            )
    results = {
        c["name"]: (logits, models[c["ref"]]["logits"], reports)
        for c, (logits, reports) in zip(cases, run_job(root, cases, WORLD))
    }
    return results, outs


@pytest.mark.parametrize("source", ["llama", "qwen2", "llama-from-torch"])
@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_megatron_loads_torch_dist_with_the_source_logits(loaded, source, tp, pp):
    results, _ = loaded
    logits, ref, reports = results[f"{source}-tp{tp}pp{pp}"]
    for r in reports:  # every parameter of every rank's model came from the checkpoint
        for chunk in r["chunks"]:
            assert chunk["missing"] == [] and chunk["unexpected"] == [], chunk
    assert logits.shape == ref.shape
    assert torch.allclose(logits, ref, rtol=0, atol=1e-4), (logits - ref).abs().max()


def test_torch_dist_output_reads_back_bit_exact(loaded, tmp_path):
    _, outs = loaded
    back = str(tmp_path / "back")
    assert cli_main(["convert", outs["llama-from-torch"], back, "--to", "hf", "--quiet"]) == 0
    direct = str(tmp_path / "direct")
    assert cli_main(["convert", outs["llama"], direct, "--to", "hf", "--quiet"]) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(os.path.join(back, "model.safetensors")),
        load_file(os.path.join(direct, "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_dist_is_layout_free():
    with pytest.raises(UsageError, match="reshards"):
        ck.Target(to="mcore", ckpt_format="torch_dist", tp=2)


def test_optimizer_state_written_fully_reshardable_is_resumed_by_megatron(tmp_path, capsys):
    """A megatron-core run (TP=2, DP=1, bf16 with fp32 masters, hidden 72, several DDP buckets, two
    Adam steps) saved in the torch format with plain Megatron-LM args converts to torch_dist with
    its optimizer state (fully reshardable); megatron-core loads model and optimizer with
    dist_checkpointing at TP=1 PP=2 and holds the source's masters and moments bit for bit."""
    from tests import distopt_fixtures as F
    from tests.test_distopt_reshard import STATES, _assert_same_state, _global, _truth

    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=72, layers=4, heads=4, kv_heads=2, ffn=120, vocab=256, tied=False)
    src = str(tmp_path / "src")
    F.make_distopt_checkpoint(src, hf, tp=2, pp=1, dp=1, bucket_size=4096, steps=2, bf16=True, init="hf")
    td = str(tmp_path / "td")
    assert cli_main(["convert", src, td, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    resumed = str(tmp_path / "resumed")
    F.resume_torch_dist_checkpoint(resumed, hf, td, tp=1, pp=2, dp=1, bucket_size=4096)
    source, loaded = _truth(src, 2, 1), _truth(resumed, 1, 2)
    for field in STATES:
        _assert_same_state(_global(source, 4, field), _global(loaded, 2, field))
    _assert_same_state(_global(source, 4, "model_param"), _global(loaded, 2, "model_param"), torch.bfloat16)
    # read back with its state: ckpt-ir's own output is not Megatron-Core <= 0.19's shifted save,
    # so no PR #5077 warning although its args say overlapped gradient reduction
    common = torch.load(os.path.join(td, "iter_0000002", "common.pt"), weights_only=False)
    assert vars(common["args"])["overlap_grad_reduce"]
    capsys.readouterr()
    assert cli_main(["convert", td, str(tmp_path / "back"), "--to", "mcore", "--quiet"]) == 0
    assert "5077" not in capsys.readouterr().err


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped-gemm"])
def test_moe_optimizer_state_written_fully_reshardable_is_resumed_by_megatron(tmp_path, grouped):
    """Mixtral trained by megatron-core with EP=2, DP=2 (a dense and an expert DistributedOptimizer,
    chained) saved in the torch format converts to torch_dist with its optimizer state; megatron-core
    loads it at TP=2 PP=2 EP=2 (expert TP 1) with dist_checkpointing + ChainedOptimizer.load_state_dict
    and holds the source's masters, Adam moments and bf16 weights bit for bit, experts included;
    also into grouped-GEMM experts (GroupedMLP, the output written with --moe-grouped-gemm)."""
    from tests import distopt_fixtures as F
    from tests.test_distopt_reshard import _truth, assert_same_training_state

    hf = str(tmp_path / "hf")
    F.make_tiny_hf_mixtral(
        hf, hidden=72, layers=2, heads=4, kv_heads=2, ffn=100, experts=4, topk=2, vocab=256
    )
    src = str(tmp_path / "src")
    F.make_distopt_checkpoint(
        src, hf, tp=1, pp=1, dp=2, ep=2, bucket_size=4096, steps=2, bf16=True, init="hf"
    )
    td = str(tmp_path / "td")
    argv = ["convert", src, td, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
    assert cli_main(argv + ["--moe-grouped-gemm"] * grouped) == 0
    # common.pt: one optimizer state dict per chained optimizer, the source's LR scheduler; loadable
    # the way Megatron-Core 0.19 loads it (weights_only, argparse.Namespace allowed)
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(os.path.join(td, "iter_0000002", "common.pt"), weights_only=True)
    blob = torch.load(
        os.path.join(src, "iter_0000002", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )
    assert sorted(common["optimizer"]) == [0, 1]
    assert common["opt_param_scheduler"] == blob["opt_param_scheduler"]
    resumed = str(tmp_path / "resumed")
    F.resume_torch_dist_checkpoint(
        resumed, hf, td, tp=2, pp=2, dp=1, ep=2, etp=1, bucket_size=4096, grouped_gemm=grouped
    )
    source = _truth(src, 1, 1, ep=2, experts=4)
    loaded = _truth(resumed, 2, 2, ep=2, experts=4, grouped=(72, 100) if grouped else None)
    assert any(".local_experts.3." in k for _, k in loaded)
    assert_same_training_state(source, 2, loaded, 1)


def test_moe_output_equals_megatron_cores_own_save(tmp_path):
    """Mixtral (every layer MoE): ckpt-ir's torch_dist output of the HF model holds exactly what
    megatron-core's own dist_checkpointing.save writes for that model (a GPTModel initialised from
    it): the same keys, stacked shapes ([L, E, 2F, H] experts), sharded objects and values."""
    from tests import distopt_fixtures as F

    hf = F.make_tiny_hf_mixtral(
        str(tmp_path / "hf"), hidden=64, layers=2, heads=4, kv_heads=2, ffn=48, experts=4, topk=2, vocab=128
    )
    theirs = str(tmp_path / "megatron")
    F.make_torch_dist_checkpoint(theirs, hf, tp=1, pp=1, dp=1, init="hf")
    mine = str(tmp_path / "mine")
    assert cli_main(["convert", hf, mine, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    from ckpt_ir.io.dcp import read_metadata

    a, b = (
        read_metadata(os.path.join(theirs, "iter_0000001")),
        read_metadata(os.path.join(mine, "iter_0000001")),
    )
    assert {k: t.shape for k, t in a.tensors.items()} == {k: t.shape for k, t in b.tensors.items()}
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in b.tensors and set(a.objects) == set(
        b.objects
    )
    x, y = (
        F.read_torch_dist(os.path.join(theirs, "iter_0000001")),
        F.read_torch_dist(os.path.join(mine, "iter_0000001")),
    )
    for k, v in x.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, y[k]), k
        else:
            assert v == y[k], k


# torch_dist written at TP1 EP1 (no layout), loaded by megatron-core at these (tp, pp, ep) layouts
MOE_LAYOUTS = ((2, 1, 2), (1, 2, 2))


def _moe_case(
    out: str, m: dict, family: str, root: str, tp: int, pp: int, ep: int, grouped_gemm=False
) -> dict:
    """A harness case loading the torch_dist ``out`` of the oracle's MoE model ``m`` (HF ``family``)
    at (tp, pp, ep), expert TP = TP."""
    from tests import test_megatron_moe_oracle as O

    return {
        "name": f"tp{tp}pp{pp}ep{ep}",
        "ckpt": out,
        "tp": tp,
        "pp": pp,
        "vpp": None,
        "ep": ep,
        "etp": tp,
        "torch_dist": True,
        "hf_config": m["config"],
        "padded_vocab": 128,
        "tied": bool(m["config"].get("tie_word_embeddings")),
        "qkv_bias": family == "qwen2_moe",
        "qk_norm": False,
        "moe": {**O._moe_config(family, m["config"]), "grouped_gemm": grouped_gemm},
        "input_ids": O.INPUT_IDS,
        "out": os.path.join(root, f"tp{tp}pp{pp}ep{ep}.pt"),
    }


@pytest.fixture(scope="module")
def moe_loaded(tmp_path_factory):
    """Qwen2-MoE with a dense layer (mlp_only_layers, so Megatron saves per-layer keys), a
    sigmoid-gated shared expert, qkv bias and tied embeddings: HF -> torch_dist, then megatron-core's
    dist_checkpointing.load into GPTModels at other TP / PP / EP, run forward."""
    from tests import test_megatron_moe_oracle as O

    root = tmp_path_factory.mktemp("torch-dist-moe")
    m = O._build_hf(
        str(root / "hf"),
        "qwen2_moe",
        seed=5,
        **{k: v for k, v in O.MODELS["qwen2_moe"].items() if k != "family"},
    )
    out = str(root / "td")
    assert (
        cli_main(["convert", m["dir"], out, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    )
    cases = [_moe_case(out, m, "qwen2_moe", str(root), tp, pp, ep) for tp, pp, ep in MOE_LAYOUTS]
    return out, m, {c["name"]: result for c, result in zip(cases, run_job(root, cases, WORLD))}


@pytest.mark.parametrize("tp, pp, ep", MOE_LAYOUTS)
def test_moe_with_dense_layers_and_shared_experts_loads_with_the_source_logits(moe_loaded, tp, pp, ep):
    from ckpt_ir.io.dcp import read_metadata

    out, m, results = moe_loaded
    keys = read_metadata(os.path.join(out, "iter_0000001")).tensors
    # a dense layer among MoE ones: per-layer keys, experts stacked on their own axis
    assert "decoder.layers.1.mlp.linear_fc1.weight" in keys
    assert keys["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].shape[0] == 4
    assert "decoder.layers.0.mlp.shared_experts.gate_weight" in keys
    logits, reports = results[f"tp{tp}pp{pp}ep{ep}"]
    for r in reports:
        for chunk in r["chunks"]:
            assert chunk["missing"] == [] and chunk["unexpected"] == [], chunk
    assert {"MoELayer", "MLP"} <= {t for r in reports for c in r["chunks"] for t in c["mlp_modules"].values()}
    torch.testing.assert_close(logits, m["logits"], atol=1e-4, rtol=1e-5)


def _glm4_moe_with_mtp(path: str) -> dict:
    """GLM-4.5-style: a dense first layer, MoE layers with a shared expert and a router score bias,
    q/k norms, qkv bias, and one MTP layer stored as GLM-4.5's release does (model.layers.{L}.*:
    a MoE decoder layer plus enorm, hnorm, eh_proj, shared_head.norm; transformers saves none)."""
    from tests.family_models import CONFIGS, append_mtp_layer, build

    build(path, "glm4_moe")
    cfg, sd = append_mtp_layer(path, CONFIGS["glm4_moe"]["hidden_size"])
    return {"config": cfg, "tensors": sd}


def test_moe_with_mtp_loads_into_megatron_core_at_another_ep(tmp_path):
    """torch_dist written whole (EP1) is loaded by megatron-core's dist_checkpointing into a GPTModel
    with an MTP block at EP2; every loaded tensor that the HF source names is checked against it
    by Megatron's layouts written out here (fc1 = [gate; up], qkv interleaved per query group,
    global expert 2*ep_rank + j on EP rank ep_rank)."""
    m = _glm4_moe_with_mtp(str(tmp_path / "hf"))
    out = str(tmp_path / "td")
    assert (
        cli_main(
            ["convert", str(tmp_path / "hf"), out, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
        )
        == 0
    )
    from ckpt_ir.io.dcp import read_metadata

    md = read_metadata(os.path.join(out, "iter_0000001"))
    assert "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight" in md.tensors
    assert (
        "mtp.layers.0.final_layernorm.weight" in md.tensors
        and "decoder.layers.0.mlp.linear_fc1.weight" in md.tensors
    )
    cfg = m["config"]
    case = {
        "name": "glm4_moe-mtp-ep2",
        "ckpt": out,
        "tp": 1,
        "pp": 1,
        "vpp": None,
        "ep": 2,
        "etp": 1,
        "torch_dist": True,
        "load_only": True,
        "hf_config": {**cfg, "rms_norm_eps": cfg["rms_norm_eps"]},
        "padded_vocab": 128,
        "tied": False,
        "qkv_bias": True,
        "qk_norm": True,
        "moe": {
            "num_experts": 4,
            "topk": 2,
            "ffn_hidden_size": 32,
            "layer_freq": [0, 1, 1, 1],
            "shared_ffn_hidden_size": 32,
        },
        "config_extra": {
            "mtp_num_layers": 1,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
        },
        "input_ids": [[1, 2, 3]],
        "out": str(tmp_path / "mtp"),
    }
    ((_, reports),) = run_job(tmp_path, [case], WORLD)
    hf, d = m["tensors"], 16  # head_dim = 64 / 4
    for rank in range(WORLD):
        report = reports[rank]
        assert all(c["missing"] == [] and c["unexpected"] == [] for c in report["chunks"]), report
        sd = torch.load(f"{case['out']}.rank{rank}.sd.pt")
        ep_rank = report["ep_rank"]

        def fc1(p: str) -> torch.Tensor:
            return torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]])

        def qkv(i: int, kind: str) -> torch.Tensor:
            q, k, v = (hf[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv")
            groups = 2
            hpg = q.shape[0] // d // groups
            return torch.cat(
                [
                    t
                    for g in range(groups)
                    for t in (
                        q[g * hpg * d : (g + 1) * hpg * d],
                        k[g * d : (g + 1) * d],
                        v[g * d : (g + 1) * d],
                    )
                ]
            )

        want = {
            "decoder.layers.0.mlp.linear_fc1.weight": fc1("model.layers.0.mlp."),
            "decoder.layers.2.self_attention.linear_qkv.weight": qkv(2, "weight"),
            "decoder.layers.2.self_attention.linear_qkv.bias": qkv(2, "bias"),
            "decoder.layers.1.mlp.shared_experts.linear_fc2.weight": hf[
                "model.layers.1.mlp.shared_experts.down_proj.weight"
            ],
            "decoder.layers.3.mlp.router.expert_bias": hf["model.layers.3.mlp.gate.e_score_correction_bias"],
            "mtp.layers.0.enorm.weight": hf["model.layers.4.enorm.weight"],
            "mtp.layers.0.hnorm.weight": hf["model.layers.4.hnorm.weight"],
            "mtp.layers.0.eh_proj.weight": hf["model.layers.4.eh_proj.weight"],
            "mtp.layers.0.final_layernorm.weight": hf["model.layers.4.shared_head.norm.weight"],
            "mtp.layers.0.transformer_layer.self_attention.linear_proj.weight": hf[
                "model.layers.4.self_attn.o_proj.weight"
            ],
            "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight": hf[
                "model.layers.4.self_attn.q_norm.weight"
            ],
            "mtp.layers.0.transformer_layer.mlp.router.weight": hf["model.layers.4.mlp.gate.weight"],
        }
        for j in range(2):
            e = 2 * ep_rank + j
            want[f"decoder.layers.2.mlp.experts.local_experts.{j}.linear_fc1.weight"] = fc1(
                f"model.layers.2.mlp.experts.{e}."
            )
            want[f"mtp.layers.0.transformer_layer.mlp.experts.local_experts.{j}.linear_fc2.weight"] = hf[
                f"model.layers.4.mlp.experts.{e}.down_proj.weight"
            ]
        for key, value in want.items():
            assert key in sd, (rank, key, sorted(sd)[:50])
            assert torch.equal(sd[key], value.to(sd[key].dtype)), (rank, key)


def test_moe_layer_norm_follows_the_layer_spec(moe_loaded, tmp_path):
    """Megatron-Core's Transformer-Engine layer spec gives a MoE layer its own pre-MLP norm module
    (``pre_mlp_layernorm``, no key map), the local spec maps it to ``mlp.linear_fc1.layer_norm_*``
    (gpt_layer_specs.py): the written key follows the norm naming the output's args name."""
    from ckpt_ir.io.dcp import read_metadata

    out, m, _ = moe_loaded
    local = read_metadata(os.path.join(out, "iter_0000001")).tensors
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in local  # MoE layer, local spec
    te = str(tmp_path / "te")
    assert (
        cli_main(
            [
                "convert",
                m["dir"],
                te,
                "--to",
                "mcore",
                "--ckpt-format",
                "torch_dist",
                "--norm-names",
                "te",
                "--quiet",
            ]
        )
        == 0
    )
    keys = read_metadata(os.path.join(te, "iter_0000001")).tensors
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys  # MoE layer: a norm module of its own
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys  # dense layer: fused into fc1
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in keys
    back = str(tmp_path / "back")  # and it reads back to the source's tensors
    assert cli_main(["convert", te, back, "--to", "hf", "--quiet"]) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(os.path.join(m["dir"], "model.safetensors")),
        load_file(os.path.join(back, "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mla_moe_mtp_loads_into_megatron_core_at_another_ep(tmp_path):
    """DeepSeek-V3 (multi-latent attention with q-LoRA, a dense first layer, shared expert, router
    score bias, one MTP layer) written whole is loaded by megatron-core's dist_checkpointing at EP2
    into a GPTModel with MLA (megatron-core's own keys: linear_q_down_proj, linear_kv_down_proj,
    q/kv_layernorm; the torch format's fused linear_qkv is split) and an MTP block.  Load only:
    the MTP layer's tensors are what this checks (test_megatron_mla_oracle.py runs MLA forward
    passes).  Read back by ckpt-ir, the output converts to the source HF tensors bit for bit."""
    from tests.test_deepseek import build_deepseek

    src = build_deepseek(str(tmp_path / "hf"))
    out = str(tmp_path / "td")
    assert cli_main(["convert", src, out, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    cfg = json.load(open(os.path.join(src, "config.json")))
    case = {
        "name": "deepseek-ep2",
        "ckpt": out,
        "tp": 1,
        "pp": 1,
        "vpp": None,
        "ep": 2,
        "etp": 1,
        "torch_dist": True,
        "load_only": True,
        "hf_config": cfg,
        "padded_vocab": 128,
        "tied": False,
        "qkv_bias": False,
        "qk_norm": True,
        "moe": {
            "num_experts": 4,
            "topk": 2,
            "ffn_hidden_size": 32,
            "layer_freq": [0, 1, 1],
            "shared_ffn_hidden_size": 32,
        },
        "mla": {
            "q_lora_rank": 24,
            "kv_lora_rank": 16,
            "qk_head_dim": 8,
            "qk_pos_emb_head_dim": 4,
            "v_head_dim": 8,
        },
        "config_extra": {
            "mtp_num_layers": 1,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
        },
        "input_ids": [[1, 2, 3]],
        "out": str(tmp_path / "mla"),
    }
    ((_, reports),) = run_job(tmp_path, [case], WORLD)
    from safetensors.torch import load_file

    hf = load_file(os.path.join(src, "model.safetensors"))
    for rank in range(WORLD):
        assert all(c["missing"] == [] and c["unexpected"] == [] for c in reports[rank]["chunks"]), reports[
            rank
        ]
        sd = torch.load(f"{case['out']}.rank{rank}.sd.pt")
        ep_rank = reports[rank]["ep_rank"]
        want = {}
        for prefix, i in (("decoder.layers.1.", 1), ("mtp.layers.0.transformer_layer.", 3)):
            a = f"model.layers.{i}.self_attn."
            want.update(
                {
                    prefix + "self_attention.linear_q_down_proj.weight": hf[a + "q_a_proj.weight"],
                    prefix + "self_attention.linear_q_up_proj.weight": hf[a + "q_b_proj.weight"],
                    prefix + "self_attention.linear_kv_down_proj.weight": hf[a + "kv_a_proj_with_mqa.weight"],
                    prefix + "self_attention.linear_kv_up_proj.weight": hf[a + "kv_b_proj.weight"],
                    prefix + "self_attention.q_layernorm.weight": hf[a + "q_a_layernorm.weight"],
                    prefix + "self_attention.kv_layernorm.weight": hf[a + "kv_a_layernorm.weight"],
                    prefix + "self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
                    prefix + "pre_mlp_layernorm.weight": hf[
                        f"model.layers.{i}.post_attention_layernorm.weight"
                    ],
                }
            )
            for j in range(2):
                e = f"model.layers.{i}.mlp.experts.{2 * ep_rank + j}."
                want[prefix + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = torch.cat(
                    [hf[e + "gate_proj.weight"], hf[e + "up_proj.weight"]]
                )
        want["decoder.layers.0.input_layernorm.weight"] = hf["model.layers.0.input_layernorm.weight"]
        want["decoder.layers.0.pre_mlp_layernorm.weight"] = hf[
            "model.layers.0.post_attention_layernorm.weight"
        ]
        want["mtp.layers.0.eh_proj.weight"] = hf["model.layers.3.eh_proj.weight"]
        for key, value in want.items():
            assert key in sd, (rank, key)
            assert torch.equal(sd[key], value.to(sd[key].dtype)), (rank, key)
    # ckpt-ir reads megatron-core's MLA and MTP keys back: HF -> torch_dist -> HF is bit-exact
    back = str(tmp_path / "back")
    assert cli_main(["convert", out, back, "--to", "hf", "--quiet"]) == 0
    again = load_file(os.path.join(back, "model.safetensors"))
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)


def test_grouped_gemm_experts_load_into_megatron_cores_grouped_mlp(tmp_path):
    """Mixtral HF -> torch_dist with --moe-grouped-gemm: the args say moe_grouped_gemm, the experts
    keep the per-expert keys and ``[L, E, ...]`` shapes (what megatron-core's GroupedMLP maps its
    weight1 / weight2 to in its sharded state dict), and megatron-core's dist_checkpointing.load
    fills GroupedMLP experts (through the harness's pure-torch grouped_gemm) at TP1 EP2 and TP2
    EP2, every local expert running, with transformers' logits."""
    from ckpt_ir.io.dcp import read_metadata
    from tests import test_megatron_moe_oracle as O

    m = O._build_hf(
        str(tmp_path / "hf"),
        "mixtral",
        seed=6,
        **{k: v for k, v in O.MODELS["mixtral"].items() if k != "family"},
    )
    out = str(tmp_path / "td")
    argv = ["convert", m["dir"], out, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
    assert cli_main(argv + ["--moe-grouped-gemm"]) == 0
    it_dir = os.path.join(out, "iter_0000001")
    assert torch.load(os.path.join(it_dir, "common.pt"), weights_only=False)["args"].moe_grouped_gemm is True
    keys = read_metadata(it_dir).tensors
    assert keys["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape[:2] == (2, 4)
    cases = [_moe_case(out, m, "mixtral", str(tmp_path), tp, 1, 2, grouped_gemm=True) for tp in (1, 2)]
    for logits, reports in run_job(tmp_path, cases, WORLD):
        for r in reports:
            for chunk in r["chunks"]:
                assert chunk["missing"] == [] and chunk["unexpected"] == [], chunk
                assert set(chunk["mlp_modules"].values()) == {"MoELayer", "GroupedMLP"}
            assert r["gmm_calls"] and all(n > 0 for sizes in r["gmm_calls"] for n in sizes)
        torch.testing.assert_close(logits, m["logits"], atol=1e-4, rtol=1e-5)
    # a model-only output names no optimizer sharding, so it converts on (to grouped torch-format
    # rank files, then HF) with nothing to ask for, bit for bit
    back, hf2 = str(tmp_path / "back"), str(tmp_path / "hf2")
    assert (
        cli_main(["convert", out, back, "--to", "mcore", "--ep", "2", "--moe-grouped-gemm", "--quiet"]) == 0
    )
    assert cli_main(["convert", back, hf2, "--to", "hf", "--quiet"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (m["dir"], hf2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _common_state(it_dir: str) -> dict:
    """The ``common_state`` entry's bytes, unpickled the way Megatron-Core 0.19 does
    (``torch.load(..., weights_only=True)``, ``argparse.Namespace`` allowed), element 0."""
    import io

    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(it_dir).read_metadata()
    ((_, where),) = [(i, w) for i, w in md.storage_data.items() if i.fqn == "common_state/shard_0_1"]
    with open(os.path.join(it_dir, where.relative_path), "rb") as f:
        f.seek(where.offset)
        raw = f.read(where.length)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(io.BytesIO(raw), weights_only=True)[0]


def test_megatron_core_0_19_layout_loads_with_the_source_logits(tmp_path):
    """--torch-dist-version 0.19 writes Megatron-Core 0.19's own layout (from its source): no
    common.pt, the common state as the sharded object ``common_state``, metadata.json with the
    sharded backend only.  The common state equals the 0.15 layout's common.pt; megatron-core
    loads the model (0.16.1's loader, with 0.19's common-state reader in the harness) at TP2 PP2
    with transformers' logits; ckpt-ir reads it back bit for bit."""
    m = _build_hf(str(tmp_path / "llama"), "llama", 4, False, 128, 500000.0, seed=3)
    new, old = str(tmp_path / "v19"), str(tmp_path / "v15")
    argv = ["convert", m["dir"], new, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
    assert cli_main(argv + ["--torch-dist-version", "0.19"]) == 0
    assert (
        cli_main(["convert", m["dir"], old, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    )
    it_dir = os.path.join(new, "iter_0000001")
    assert not os.path.exists(os.path.join(it_dir, "common.pt"))
    with open(os.path.join(it_dir, "metadata.json")) as f:
        assert json.load(f) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    state = _common_state(it_dir)
    with torch.serialization.safe_globals([argparse.Namespace]):
        want = torch.load(os.path.join(old, "iter_0000001", "common.pt"), weights_only=True)
    assert state.keys() == want.keys() and vars(state["args"]) == vars(want["args"])
    assert all(state[k] == want[k] for k in state if k != "args")
    ((logits, reports),) = run_job(tmp_path, [_dense_case("v19-tp2pp2", new, m, 2, 2, str(tmp_path))], WORLD)
    for r in reports:
        for chunk in r["chunks"]:
            assert chunk["missing"] == [] and chunk["unexpected"] == [], chunk
    assert torch.allclose(logits, m["logits"], rtol=0, atol=1e-4), (logits - m["logits"]).abs().max()
    back = str(tmp_path / "back")
    assert cli_main(["convert", new, back, "--to", "hf", "--quiet"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (m["dir"], back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_dist_version_needs_torch_dist():
    with pytest.raises(UsageError, match="torch_dist_version"):
        ck.Target(to="mcore", torch_dist_version="0.19")


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(to="mcore", verify_integrity=True), "--verify-integrity"),  # Megatron hashes only torch_dist
        (dict(to="hf", megatron_version="0.17"), "--megatron-version 0.17"),
        (dict(to="mcore", megatron_version="latest"), "--megatron-version latest"),
        (
            dict(to="mcore", ckpt_format="torch_dist", torch_dist_version="0.19", megatron_version="0.18"),
            "--torch-dist-version 0.19",  # a layout that release cannot load
        ),
    ],
)
def test_megatron_release_settings_that_cannot_hold_are_usage_errors(tmp_path, capsys, settings, named):
    with pytest.raises(UsageError):
        ck.Target(**settings)
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in settings.items()]
    assert cli_main(["convert", str(tmp_path / "none"), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
