"""Checkpoints written by megatron-core itself (GPTModel + DDP + DistributedOptimizer, saved as
``megatron.training`` does: plain Megatron-LM args, rng_state with numpy arrays, optimizer
entries, _extra_state, distrib_optim.pt) convert to HF with the weights megatron-core held."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from tests import distopt_fixtures as F


def test_megatron_core_checkpoint_converts_to_hf_with_its_weights(tmp_path, capsys):
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=72, layers=4, heads=4, kv_heads=2, ffn=120, vocab=256, tied=False)
    out = str(tmp_path / "megatron")
    info = F.make_distopt_checkpoint(
        out, hf, tp=2, pp=2, dp=1, bucket_size=4096, steps=1, bf16=True, init="hf", vocab_divisible_by=128
    )
    assert info
    back = str(tmp_path / "back")
    assert cli_main(["convert", out, back, "--to", "hf", "--hf-config", hf, "--quiet"]) == 0
    got = load_file(os.path.join(back, "model.safetensors"))
    # plain Megatron-LM args do not name the family: it is inferred from them (and printed), with
    # the same tensors as with --hf-config and a config transformers computes the same logits with
    capsys.readouterr()
    inferred = str(tmp_path / "inferred")
    assert cli_main(["convert", out, inferred, "--to", "hf"]) == 0
    assert (
        "inferred family llama from args (swiglu, RMSNorm, rope, untied output layer)"
        in capsys.readouterr().err
    )
    alone = load_file(os.path.join(inferred, "model.safetensors"))
    assert alone.keys() == got.keys() and all(torch.equal(alone[k], got[k]) for k in got)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(inferred, dtype=torch.float32)(ids).logits
    assert torch.allclose(la, lb, rtol=0, atol=1e-5)
    src = ck.load(out, hf_config=__import__("json").load(open(os.path.join(hf, "config.json"))))
    assert "distrib_optim.pt" in " ".join(src.dropped)  # optimizer state is reported, not silently ignored
    # every HF tensor equals megatron-core's own (trained, bf16) parameter, gathered by the rules
    truth = {}
    for stage in range(2):
        for rank in range(2):
            gt = torch.load(
                os.path.join(out, "ground_truth", f"mp_rank_{rank:02d}_{stage:03d}.pt"), weights_only=False
            )
            for name, p in gt["params"].items():
                truth.setdefault((stage, name), {})[rank] = p["model_param"]
    emb = torch.cat([truth[(0, "embedding.word_embeddings.weight")][r] for r in range(2)])[:256]
    assert torch.equal(got["model.embed_tokens.weight"], emb)
    fc2 = torch.cat([truth[(1, "decoder.layers.1.mlp.linear_fc2.weight")][r] for r in range(2)], dim=1)
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], fc2)
    norm = truth[(1, "decoder.final_layernorm.weight")][0]
    assert torch.equal(got["model.norm.weight"], norm)
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16


def _gather_truth(out: str, tp: int, pp: int, field: str) -> dict:
    truth: dict = {}
    for stage in range(pp):
        for rank in range(tp):
            name = F.mp_dir_name(rank, stage, pp)
            gt = torch.load(os.path.join(out, "ground_truth", f"{name}.pt"), weights_only=False)
            for key, p in gt["params"].items():
                truth.setdefault((stage, key), {})[rank] = p[field]
    return truth


def test_fp32_masters_of_a_distributed_optimizer_export_to_hf(trained_tp2pp2dp2, tmp_path):
    """TP=2, PP=2, DP=2, several DDP buckets, hidden 72 (parameters not multiples of 64), bf16
    training (tests/conftest.py): --weights-from master exports the fp32 masters, equal to
    megatron-core's own."""
    import json

    from transformers import AutoModelForCausalLM

    hf, out = trained_tp2pp2dp2
    back = str(tmp_path / "masters")
    assert (
        cli_main(
            ["convert", out, back, "--to", "hf", "--hf-config", hf, "--weights-from", "master", "--quiet"]
        )
        == 0
    )
    got = load_file(os.path.join(back, "model.safetensors"))
    truth = _gather_truth(out, 2, 2, "param")
    assert all(t.dtype == torch.float32 for t in got.values())
    assert torch.equal(
        got["model.embed_tokens.weight"],
        torch.cat([truth[(0, "embedding.word_embeddings.weight")][r] for r in range(2)])[:256],
    )
    assert torch.equal(
        got["model.layers.2.self_attn.o_proj.weight"],
        torch.cat([truth[(1, "decoder.layers.0.self_attention.linear_proj.weight")][r] for r in range(2)], 1),
    )
    assert torch.equal(
        got["model.layers.1.input_layernorm.weight"], truth[(0, "decoder.layers.1.input_layernorm.weight")][0]
    )
    # masters differ from the bf16 model weights (so this really read the optimizer state)
    bf16 = _gather_truth(out, 2, 2, "model_param")
    assert not torch.equal(
        truth[(0, "decoder.layers.1.input_layernorm.weight")][0],
        bf16[(0, "decoder.layers.1.input_layernorm.weight")][0].float(),
    )
    # transformers on the exported masters == transformers on the masters placed by hand
    exported = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_config(exported.config, dtype=torch.float32)
    sd = {k: v.clone() for k, v in got.items()}
    reference.load_state_dict(sd, strict=False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert json.load(open(os.path.join(back, "config.json")))["dtype"] == "float32"


def test_masters_with_tied_embeddings_across_stages(tmp_path):
    """PP=2 with tied embeddings gives the embedding and the output layer buckets of their own (a
    vocab of 201 rows makes the alignment gap visible); the rebuilt layout must still match."""
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=201, tied=True)
    out = str(tmp_path / "megatron")
    F.make_distopt_checkpoint(
        out, hf, tp=1, pp=2, dp=2, bucket_size=2048, steps=1, bf16=True, init="hf", vocab_divisible_by=1
    )
    back = str(tmp_path / "masters")
    assert (
        cli_main(
            ["convert", out, back, "--to", "hf", "--hf-config", hf, "--weights-from", "master", "--quiet"]
        )
        == 0
    )
    got = load_file(os.path.join(back, "model.safetensors"))
    truth = _gather_truth(out, 1, 2, "param")
    assert torch.equal(got["model.embed_tokens.weight"], truth[(0, "embedding.word_embeddings.weight")][0])
    assert torch.equal(got["model.norm.weight"], truth[(1, "decoder.final_layernorm.weight")][0])


def test_layout_mismatch_is_a_clear_error(tmp_path):
    """The rebuilt layout is checked against numel_unpadded: optimizer state that does not match the
    model's parameters fails loudly instead of shifting every state."""
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=72, layers=2, heads=4, kv_heads=2, ffn=120, vocab=256, tied=False)
    out = str(tmp_path / "megatron")
    F.make_distopt_checkpoint(out, hf, tp=1, pp=1, dp=3, bucket_size=4096, steps=1, bf16=True, init="hf")
    path = os.path.join(out, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    ck_ = torch.load(path, weights_only=False)
    del ck_["model"]["decoder.layers.0.input_layernorm.weight"]  # a parameter the optimizer state has
    torch.save(ck_, path)
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            out,
            str(tmp_path / "x"),
            "--to",
            "hf",
            "--hf-config",
            hf,
            "--weights-from",
            "master",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "rebuilt parameter layout" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )


def test_training_state_survives_a_reshard_without_the_optimizer(tmp_path, capsys):
    """A megatron-core run's checkpoint without distrib_optim.pt, resharded with --no-optimizer,
    keeps its args (counters, schedule, tokenizer; the layout fields updated), the LR scheduler
    (megatron-core's OptimizerParamScheduler.load_state_dict accepts it), the FLOP counter and the
    iteration; the RNG state stays on an unchanged grid and is reported dropped on another one."""
    import glob

    import numpy as np
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=256, tied=False)
    src = str(tmp_path / "megatron")
    extra = {
        "consumed_train_samples": 64,
        "train_iters": 100,
        "tokenizer_type": "HuggingFaceTokenizer",
        "tokenizer_model": "/models/tiny",
        "lr_decay_style": "cosine",
        "world_size": 2,
    }
    F.make_distopt_checkpoint(
        src, hf, tp=2, pp=1, dp=1, steps=3, bf16=True, init="hf", lr=1e-2, extra_args=extra
    )
    for f in glob.glob(os.path.join(src, "iter_*", "*", "model_optim_rng.pt")):  # a run that counted FLOPs
        obj = torch.load(f, weights_only=False)
        obj["num_floating_point_operations_so_far"] = 123456789.0
        torch.save(obj, f)
    for f in glob.glob(os.path.join(src, "iter_*", "*", "distrib_optim.pt")):
        os.remove(f)

    def rank_file(root, rank):
        return os.path.join(root, "iter_0000003", f"mp_rank_{rank:02d}", "model_optim_rng.pt")

    want = torch.load(rank_file(src, 0), weights_only=False)

    other = str(tmp_path / "tp1")
    capsys.readouterr()
    assert (
        cli_main(["convert", src, other, "--to", "mcore", "--tp", "1", "--no-optimizer", "--hf-config", hf])
        == 0
    )
    err = capsys.readouterr().err
    got = torch.load(rank_file(other, 0), weights_only=False)
    assert (
        got["iteration"] == 3 and open(os.path.join(other, "latest_checkpointed_iteration.txt")).read() == "3"
    )
    assert got["opt_param_scheduler"] == want["opt_param_scheduler"]
    assert got["num_floating_point_operations_so_far"] == 123456789.0
    a, b = vars(got["args"]), vars(want["args"])
    changed = {k for k in b if a.get(k, "missing") != b[k]}
    # only the layout changed (expert TP of a dense model falls back to Megatron's default, None = TP)
    assert changed == {"tensor_model_parallel_size", "expert_tensor_parallel_size", "world_size"}, changed
    assert a["expert_tensor_parallel_size"] is None
    assert a["tensor_model_parallel_size"] == 1 and a["world_size"] == 1
    for k in (
        "consumed_train_samples",
        "seq_length",
        "lr",
        "train_iters",
        "tokenizer_type",
        "tokenizer_model",
        "make_vocab_size_divisible_by",
        "ddp_bucket_size",
        "optimizer",
        "clip_grad",
        "params_dtype",
    ):
        assert a[k] == b[k], k
    assert "rng_state" not in got
    assert "dropped: rng_state: per-rank random-number state of another parallel layout" in err
    assert "dropped: mp_rank_00" in err or "optimizer settings" in err  # one line per kind, at the end
    assert err.rstrip().splitlines()[-1].startswith("dropped: ")

    # megatron-core's own scheduler accepts the carried state and continues the schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=100,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=100,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
    )
    sched.load_state_dict(got["opt_param_scheduler"])
    assert sched.num_steps == 3 and sched.num_steps == want["opt_param_scheduler"]["num_steps"]
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    ref = OptimizerParamScheduler(
        fresh,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=100,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=100,
        wd_incr_style="constant",
    )
    ref.step(increment=3)
    assert opt.param_groups[0]["lr"] == fresh.param_groups[0]["lr"] > 0

    same = str(tmp_path / "tp2")  # the same grid: every rank keeps its RNG state
    assert (
        cli_main(
            [
                "convert",
                src,
                same,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--no-optimizer",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    for rank in range(2):
        w = torch.load(rank_file(src, rank), weights_only=False)["rng_state"][0]
        g = torch.load(rank_file(same, rank), weights_only=False)
        assert torch.equal(g["rng_state"][0]["torch_rng_state"], w["torch_rng_state"])
        assert all(np.array_equal(x, y) for x, y in zip(g["rng_state"][0]["np_rng_state"], w["np_rng_state"]))
        assert g["opt_param_scheduler"] == want["opt_param_scheduler"]

    # an HF target says what it leaves behind
    capsys.readouterr()
    assert cli_main(["convert", src, str(tmp_path / "out_hf"), "--to", "hf", "--hf-config", hf]) == 0
    err = capsys.readouterr().err
    assert (
        "dropped: training state: learning-rate scheduler, FLOP counter, training args, RNG state of the Megatron "
        "run" in err
    )
