"""Checkpoints written by megatron-core itself (GPTModel + DDP + DistributedOptimizer, saved as
``megatron.training`` does: plain Megatron-LM args, rng_state with numpy arrays, optimizer
entries, _extra_state, distrib_optim.pt) convert to HF with the weights megatron-core held."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.cli import main as cli_main
from tests import distopt_fixtures as F


def test_megatron_core_checkpoint_converts_to_hf_with_its_weights(tmp_path):
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=72, layers=4, heads=4, kv_heads=2, ffn=120, vocab=256, tied=False)
    out = str(tmp_path / "megatron")
    info = F.make_distopt_checkpoint(out, hf, tp=2, pp=2, dp=1, bucket_size=4096, steps=1, bf16=True,
                                     init="hf", vocab_divisible_by=128)
    assert info
    # plain Megatron-LM args do not name the family: the error says what to do
    assert cli_main(["convert", out, str(tmp_path / "x"), "--to", "hf"]) == 1
    back = str(tmp_path / "back")
    assert cli_main(["convert", out, back, "--to", "hf", "--hf-config", hf, "--quiet"]) == 0
    got = load_file(os.path.join(back, "model.safetensors"))
    src = ck.load(out, hf_config=__import__("json").load(open(os.path.join(hf, "config.json"))))
    assert "distrib_optim.pt" in " ".join(src.dropped)  # optimizer state is reported, not silently ignored
    # every HF tensor equals megatron-core's own (trained, bf16) parameter, gathered by the rules
    truth = {}
    for stage in range(2):
        for rank in range(2):
            gt = torch.load(os.path.join(out, "ground_truth", f"mp_rank_{rank:02d}_{stage:03d}.pt"), weights_only=False)
            for name, p in gt["params"].items():
                truth.setdefault((stage, name), {})[rank] = p["model_param"]
    emb = torch.cat([truth[(0, "embedding.word_embeddings.weight")][r] for r in range(2)])[:256]
    assert torch.equal(got["model.embed_tokens.weight"], emb)
    fc2 = torch.cat([truth[(1, "decoder.layers.1.mlp.linear_fc2.weight")][r] for r in range(2)], dim=1)
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], fc2)
    norm = truth[(1, "decoder.final_layernorm.weight")][0]
    assert torch.equal(got["model.norm.weight"], norm)
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
