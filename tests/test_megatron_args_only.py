"""A Megatron-Core model that no HF family computes reshards from its args alone; one that GPT-2
computes converts to HF from its args alone.

The source is written by megatron-core 0.16 itself (``tests/distopt_fixtures.py``, ``gpt=True``):
a GPTModel with LayerNorm (weights and biases), a GELU MLP without gating, learned absolute
position embeddings and biases on every linear layer, untied, trained one Adam step with the
distributed optimizer at TP=2 PP=2.  No ``--hf-config`` is given anywhere.  Oracles:

* megatron-core's own forward (``tests/mcore_harness.py``) on the resharded checkpoints equals its
  forward on the source (loaded with no missing or unexpected keys);
* TP2PP2 -> TP1PP1 -> TP2PP2 gives back the very tensors megatron-core wrote (model weights and
  ``distrib_optim.pt``), and megatron-core resumes that output with the source's state;
* an HF target is refused in one line naming the args no family has.

The second source is GPT-2's shape as Megatron-LM's GPT examples train it (multi-head attention,
tied embeddings, Megatron-LM's default fused bias-GELU), fp32, also written by megatron-core after
one step: converted to HF with no HF config, transformers' GPT2LMHeadModel gives megatron-core's
own logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from tests import distopt_fixtures as F
from tests.mcore_harness import run_job
from tests.test_megatron_oracle import WORLD

SIZES = dict(
    num_hidden_layers=4,
    hidden_size=72,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=120,
    vocab_size=256,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
# GPT-2's shape: multi-head attention, tied embeddings
GPT2_SIZES = dict(SIZES, num_key_value_heads=4, tie_word_embeddings=True)
IDS = [[(7 * i + 3) % 256 for i in range(12)], [(11 * i + 5) % 256 for i in range(12)]]
STATES = ("param", "exp_avg", "exp_avg_sq")
# target layouts, each converted from the source with no --hf-config
LAYOUTS = {
    "tp1pp1": ["--tp", "1", "--pp", "1"],
    "tp1pp2-vpp": ["--tp", "1", "--pp", "2", "--vpp-layers", "1"],
    "tp1pp4": ["--tp", "1", "--pp", "4"],
    "tp2pp1": ["--tp", "2", "--pp", "1"],
}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("args_only")
    sizes = root / "sizes"
    sizes.mkdir()
    (sizes / "config.json").write_text(json.dumps(SIZES))  # the fixture's sizes; ckpt-ir never sees it
    src = str(root / "src")
    F.make_distopt_checkpoint(src, str(sizes), tp=2, pp=2, dp=1, bucket_size=4096, steps=1, gpt=True)
    return root, str(sizes), src


def _assert_same_files(src: str, back: str) -> None:
    """``back`` holds the very model tensors, optimizer settings and distrib_optim.pt buffers that
    megatron-core wrote to ``src`` (TP2 PP2)."""
    for stage in range(2):
        for rank in range(2):
            d = F.mp_dir_name(rank, stage, 2)
            want = torch.load(os.path.join(src, "iter_0000001", d, "model_optim_rng.pt"), weights_only=False)
            got = torch.load(os.path.join(back, "iter_0000001", d, "model_optim_rng.pt"), weights_only=False)
            keys = [k for k in want["model"] if not k.endswith("_extra_state")]
            assert sorted(keys) == sorted(k for k in got["model"] if not k.endswith("_extra_state"))
            for k in keys:
                assert torch.equal(got["model"][k], want["model"][k]), (d, k)
            assert got["optimizer"] == want["optimizer"]
            o_want = torch.load(os.path.join(src, "iter_0000001", d, "distrib_optim.pt"))
            o_got = torch.load(os.path.join(back, "iter_0000001", d, "distrib_optim.pt"))
            ((key, w),) = o_want[0].items()
            assert list(o_got[0]) == [key] and o_got[0][key]["numel_unpadded"] == w["numel_unpadded"]
            for field in STATES:
                assert torch.equal(o_got[0][key][field], w[field]), (d, field)


def _convert(src: str, dst: str, *flags: str) -> None:
    assert cli_main(["convert", src, dst, "--to", "mcore", "--target-dp", "1", "--quiet", *flags]) == 0


def test_the_model_is_recognised_as_args_only_and_hf_is_refused(gpt, capsys, tmp_path):
    _, _, src = gpt
    capsys.readouterr()
    assert cli_main(["convert", src, str(tmp_path / "tp1"), "--to", "mcore", "--tp", "1"]) == 0
    err = capsys.readouterr().err
    assert "no HF family computes this Megatron model" in err and "family megatron" in err
    # GPT-2's shape (LayerNorm, GELU, learned positions, biases) but grouped-query attention
    gqa = "look like gpt2 but the gpt2 family cannot express these args (num_kv_heads: args give 2, gpt2 gives 4)"
    assert gqa in err, err
    hf = tmp_path / "hf"
    assert cli_main(["convert", src, str(hf), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no HF checkpoint (or transformers model) for it" in err and gqa in err, (
        err
    )
    assert not hf.exists()
    assert cli_main(["verify", src, src]) == 1  # transformers has no model for it either
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and gqa in err, err


def test_round_trip_with_optimizer_state_is_bit_exact_and_resumes(gpt):
    root, sizes, src = gpt
    tp1, back = str(root / "rt_tp1"), str(root / "rt_back")
    _convert(src, tp1, "--tp", "1", "--pp", "1")
    _convert(tp1, back, "--tp", "2", "--pp", "2")
    _assert_same_files(src, back)
    got = torch.load(
        os.path.join(back, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )
    assert any(k.endswith("linear_fc1.bias") for k in got["model"])  # the args-only tensors are there
    assert got["args"].normalization == "LayerNorm" and got["args"].swiglu is False
    assert got["args"].position_embedding_type == "learned_absolute"
    # megatron-core itself resumes the round-tripped files with the source's state, parameter by parameter
    resumed = str(root / "resumed")
    F.resume_distopt_checkpoint(resumed, sizes, back, tp=2, pp=2, dp=1, bucket_size=4096, gpt=True)
    for stage in range(2):
        for rank in range(2):
            name = F.mp_dir_name(rank, stage, 2) + ".pt"
            a = torch.load(os.path.join(src, "ground_truth", name), weights_only=False)["params"]
            b = torch.load(os.path.join(resumed, "ground_truth", name), weights_only=False)["params"]
            assert a.keys() == b.keys() and "embedding.position_embeddings.weight" in a or stage
            for key in a:
                for field in (*STATES, "model_param"):
                    assert torch.equal(a[key][field], b[key][field]), (name, key, field)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A Megatron-LM GPT of GPT-2's shape, in fp32, with values spread enough (0.5) that GELU's
    exact and tanh forms give logits more than the tolerance apart."""
    root = tmp_path_factory.mktemp("gpt2")
    sizes = root / "sizes"
    sizes.mkdir()
    (sizes / "config.json").write_text(json.dumps(GPT2_SIZES))
    src = str(root / "src")
    F.make_distopt_checkpoint(
        src, str(sizes), tp=2, pp=2, dp=1, steps=1, bf16=False, gpt=True, bias_gelu_fusion=True, init_std=0.5
    )
    return src


@pytest.fixture(scope="module")
def logits(gpt, gpt2):
    root, _, src = gpt
    outs = {"src": (src, 2, 2, None)}
    for name, flags in LAYOUTS.items():
        out = str(root / name)
        _convert(src, out, *flags)
        tp, pp = int(flags[1]), int(flags[3])
        outs[name] = (out, tp, pp, 2 if "--vpp-layers" in flags else None)
    # torch_dist, loaded by megatron-core's dist_checkpointing at TP1 PP2
    td = str(root / "td")
    assert (
        cli_main(
            ["convert", src, td, "--to", "mcore", "--ckpt-format", "torch_dist", "--no-optimizer", "--quiet"]
        )
        == 0
    )
    outs["torch_dist-tp1pp2"] = (td, 1, 2, None)
    cases = [
        {
            "name": name,
            "ckpt": out,
            "tp": tp,
            "pp": pp,
            "vpp": vpp,
            "gpt": True,
            "hf_config": SIZES,
            "padded_vocab": 256,
            "tied": False,
            "qkv_bias": True,
            "qk_norm": False,
            "input_ids": IDS,
            "out": str(root / f"{name}.logits.pt"),
            "torch_dist": name.startswith("torch_dist"),
        }
        for name, (out, tp, pp, vpp) in outs.items()
    ]
    cases.append(  # megatron-core's own forward of the GPT-2-shaped source, fused bias-GELU as trained
        dict(
            cases[0],
            name="gpt2",
            ckpt=gpt2,
            hf_config=GPT2_SIZES,
            tied=True,
            arch={"bias_activation_fusion": True},
            out=str(root / "gpt2.logits.pt"),
        )
    )
    return {c["name"]: result for c, result in zip(cases, run_job(root, cases, WORLD))}


@pytest.mark.parametrize("layout", [*sorted(LAYOUTS), "torch_dist-tp1pp2"])
def test_megatron_core_computes_the_source_logits_after_a_reshard(logits, layout):
    ref, ref_reports = logits["src"]
    got, reports = logits[layout]
    for r in (*ref_reports, *reports):  # every parameter of every rank came from the checkpoint
        for chunk in r["chunks"]:
            assert chunk["missing"] == [] and chunk["unexpected"] == [], chunk
    # random N(0, 0.02) weights give small logits: the tolerance is far below their spread
    assert ref.shape == got.shape == (2, 12, 256) and ref.std() > 5e-3
    assert torch.allclose(got, ref, rtol=0, atol=1e-6), (got - ref).abs().max()


def test_torch_dist_round_trip_with_optimizer_state_is_bit_exact(gpt):
    """torch (TP2 PP2) -> torch_dist (optimizer state fully reshardable) -> torch (TP2 PP2, local
    norm names): the very tensors megatron-core wrote, optimizer state included."""
    root, _, src = gpt
    td, back = str(root / "td_opt"), str(root / "td_back")
    assert cli_main(["convert", src, td, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    _convert(td, back, "--tp", "2", "--pp", "2", "--norm-names", "local")
    _assert_same_files(src, back)


def test_noop_layers_and_vocab_padding_round_trip_bit_exact(gpt):
    """Through TP1 PP2 with two no-op layers and the vocabulary padded to 384 rows (zero rows, zero
    moments), then back to TP2 PP2 padded to 256: the very files megatron-core wrote."""
    root, _, src = gpt
    mid, back = str(root / "noop"), str(root / "noop_back")
    _convert(
        src, mid, "--tp", "1", "--pp", "2", "--noop-layers", "4,5", "--make-vocab-size-divisible-by", "384"
    )
    blob = torch.load(
        os.path.join(mid, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )
    assert (
        blob["model"]["embedding.word_embeddings.weight"].shape == (384, 72) and blob["args"].num_layers == 6
    )
    _convert(mid, back, "--tp", "2", "--pp", "2", "--make-vocab-size-divisible-by", "128")
    _assert_same_files(src, back)


def test_a_megatron_lm_gpt_of_gpt2_shape_converts_to_gpt2_without_an_hf_config(
    gpt2, logits, tmp_path, capsys
):
    """No --hf-config: the args infer gpt2, and transformers' GPT2LMHeadModel on the output gives
    the logits megatron-core computes on the source.  Megatron-LM's default fused bias-GELU is the
    tanh approximation (gelu_fast); read as exact GELU the logits move by more than the
    tolerance (measured: 3e-6 against megatron-core, 5e-4 with exact GELU)."""
    from transformers import AutoModelForCausalLM

    hf = str(tmp_path / "hf")
    capsys.readouterr()
    assert cli_main(["convert", gpt2, hf, "--to", "hf"]) == 0
    assert (
        "inferred family gpt2 from args (GELU, LayerNorm, learned positions, add_bias_linear, tied embeddings)"
        in capsys.readouterr().err
    )
    with open(os.path.join(hf, "config.json")) as fh:
        cfg = json.load(fh)
    s = GPT2_SIZES
    want = {
        "model_type": "gpt2",
        "n_layer": s["num_hidden_layers"],
        "n_embd": s["hidden_size"],
        "n_head": s["num_attention_heads"],
        "n_inner": s["intermediate_size"],
        "n_positions": s["max_position_embeddings"],
        "vocab_size": s["vocab_size"],
        "layer_norm_epsilon": s["rms_norm_eps"],
        "tie_word_embeddings": True,
        "activation_function": "gelu_fast",
    }
    assert {k: cfg.get(k) for k in want} == want
    ref, reports = logits["gpt2"]
    assert all(c["missing"] == [] == c["unexpected"] for r in reports for c in r["chunks"])

    def forward(path: str) -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor(IDS)).logits

    got = forward(hf)
    assert ref.shape == got.shape == (2, 12, 256) and ref.abs().max() > 1
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with open(os.path.join(hf, "config.json"), "w") as fh:
        json.dump(dict(cfg, activation_function="gelu"), fh)
    assert (forward(hf) - ref).abs().max() > 2e-4  # measured: 5e-4
