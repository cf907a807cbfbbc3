"""Megatron-Core as the oracle for gpt-oss: ckpt-ir's ``--to mcore`` output of a tiny random
gpt-oss (biases on q/k/v/o, router and experts; sinks; alternating sliding-window and global
layers; the clamped (up + 1) * quick-GELU(gate) GLU) loads into megatron-core 0.16's ``GPTModel``
(local spec, ``SequentialMLP`` experts, CPU, gloo; see ``tests/mcore_harness.py``) with no
missing or extra key, and its logits equal transformers' on the HF source.

The Megatron model is configured from the HF config alone (never from the args ckpt-ir wrote):
``add_bias_linear``, ``softmax_type="learnable"`` (the sinks are ``core_attention.softmax_offset``),
``window_size=(sliding_window - 1, 0)`` on the layers ``layer_types`` marks as sliding,
``activation_func=quick_gelu`` with ``glu_linear_offset=1`` and the clamp.  A control with the
sinks zeroed in the rank files must disagree, so the comparison sees them.  Rope is the default
kind here: megatron-core's YaRN is not compared (the released models use YaRN).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from tests.mcore_harness import run_job

WORLD = 4
SEQ = 12
INPUT_IDS = [[(7 * i + 3) % 120 for i in range(SEQ)], [(11 * i + 5) % 120 for i in range(SEQ)]]
CONFIG = dict(
    hidden_size=64,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=128,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,  # shorter than SEQ: the windowed layer differs from a global one
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    tie_word_embeddings=False,
)
CASES = {
    # megatron-core builds expert biases only with expert TP 1
    "tp2ep2": ["--tp", "2", "--ep", "2", "--etp", "1"],  # heads and sinks split over TP, experts over EP
    "tp1pp2ep2": ["--pp", "2", "--ep", "2"],
    "tp2pp2": ["--tp", "2", "--pp", "2", "--etp", "1"],
}
ZEROED_SINKS = "tp2ep2-sinks-zeroed"


def _zero_sinks(src: str, dst: str) -> None:
    shutil.copytree(src, dst)
    it = os.path.join(dst, "iter_0000001")
    for d in os.listdir(it):
        path = os.path.join(it, d, "model_optim_rng.pt")
        blob = torch.load(path, weights_only=False)
        for k, v in blob["model"].items():
            if k.endswith("softmax_offset"):
                blob["model"][k] = torch.zeros_like(v)
        torch.save(blob, path)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mcore-gpt-oss")
    hf_dir = str(root / "hf")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt_oss", **CONFIG), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        out = model(torch.tensor(INPUT_IDS), output_router_logits=True)
    model.save_pretrained(hf_dir)
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    outs = {}
    for case, args in CASES.items():
        outs[case] = str(root / case)
        assert cli_main(["convert", hf_dir, outs[case], "--to", "mcore", "--quiet", *args]) == 0
    outs[ZEROED_SINKS] = str(root / ZEROED_SINKS)
    _zero_sinks(outs["tp2ep2"], outs[ZEROED_SINKS])
    jobs = []
    for case, ckpt in outs.items():
        blob = torch.load(
            os.path.join(
                ckpt,
                "iter_0000001",
                sorted(os.listdir(os.path.join(ckpt, "iter_0000001")))[0],
                "model_optim_rng.pt",
            ),
            weights_only=False,
        )
        a = vars(blob["args"])  # the layout only; the model comes from the HF config
        jobs.append(
            {
                "name": case,
                "ckpt": ckpt,
                "tp": a["tensor_model_parallel_size"],
                "pp": a["pipeline_model_parallel_size"],
                "ep": a["expert_model_parallel_size"],
                "etp": a["expert_tensor_parallel_size"],
                "hf_config": hf,
                "padded_vocab": a["padded_vocab_size"],
                "tied": False,
                "qkv_bias": True,
                "qk_norm": False,
                "gpt_oss": True,
                "moe": {"num_experts": 4, "topk": 2, "ffn_hidden_size": 48, "pre_softmax": False},
                "input_ids": INPUT_IDS,
                "out": str(root / f"{case}.pt"),
            }
        )
    reports = [per_rank for _, per_rank in run_job(str(root), jobs, WORLD)]
    results = {jc["name"]: {"reports": r, "logits": torch.load(jc["out"])} for jc, r in zip(jobs, reports)}
    return {"ref": out.logits, "routers": out.router_logits, "cases": results}


def test_reference_routing_is_not_a_near_tie(oracle):
    for logits in oracle["routers"]:
        top = logits.float().topk(3, dim=-1).values
        assert (top[:, 1] - top[:, 2]).min() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_exactly_and_logits_match_transformers(oracle, case):
    r = oracle["cases"][case]
    for rep in r["reports"]:
        for chunk in rep["chunks"]:
            assert chunk["unexpected"] == []
            assert [k for k in chunk["missing"] if not k.endswith("._extra_state")] == []
            assert chunk["loaded"] == chunk["params"]
    ref = oracle["ref"]
    got = r["logits"][..., : ref.shape[-1]]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_comparison_sees_the_sinks(oracle):
    got = oracle["cases"][ZEROED_SINKS]["logits"][..., : oracle["ref"].shape[-1]]
    assert (got - oracle["ref"]).abs().max() > 1e-2
