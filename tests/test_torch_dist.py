"""Megatron-Core ``torch_dist`` checkpoints (``megatron.core.dist_checkpointing.save``, written by
megatron-core itself through ``tests/distopt_fixtures.py``) read without Megatron: weights convert
to HF with the logits of the original model, every stored tensor is assembled bit-exactly from
its chunks, optimizer state saved fully-reshardable lifts into ``Checkpoint.states``, and broken
or hostile inputs give one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.errors import FormatError
from ckpt_ir.frontends import detect
from ckpt_ir.io.dcp import read_metadata
from ckpt_ir.ir.expr import Reader, evaluate
from tests import distopt_fixtures as F

# stored key -> canonical role (per layer for the stacked decoder keys)
LAYER_ROLES = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "attn_norm.weight",
    "decoder.layers.self_attention.linear_qkv.weight": "attn.qkv.weight",
    "decoder.layers.self_attention.linear_proj.weight": "attn.o.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "mlp_norm.weight",
    "decoder.layers.mlp.linear_fc1.weight": "mlp.gate_up.weight",
    "decoder.layers.mlp.linear_fc2.weight": "mlp.down.weight",
}
GLOBAL_ROLES = {
    "embedding.word_embeddings.weight": "embed.weight",
    "decoder.final_layernorm.weight": "final_norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LOCAL_NORMS = {
    "decoder.layers.input_layernorm.weight": "attn_norm.weight",
    "decoder.layers.pre_mlp_layernorm.weight": "mlp_norm.weight",
}
IT = "iter_0000001"


def _hf(path, **kw) -> str:
    return F.make_tiny_hf_llama(
        str(path), **{**dict(hidden=72, layers=4, heads=4, kv_heads=2, ffn=120, vocab=200), **kw}
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_dist")


@pytest.fixture(scope="module")
def hf72(work):
    return _hf(work / "hf72")


@pytest.fixture(scope="module")
def tp1pp1(work, hf72):
    out = str(work / "tp1pp1")
    F.make_torch_dist_checkpoint(out, hf72, tp=1, pp=1, dp=1, init="hf")
    return out


@pytest.fixture(scope="module")
def tp2pp2(work, hf72):
    out = str(work / "tp2pp2")
    F.make_torch_dist_checkpoint(out, hf72, tp=2, pp=2, dp=1, init="hf")
    return out


@pytest.fixture(scope="module")
def trained(work, hf72):
    """bf16, trained 2 steps, TP=2 x DP=2, optimizer state saved fully reshardable.  One DDP bucket:
    megatron-core <= 0.19 saves fully-reshardable state shifted after the first bucket (Megatron-LM
    PR #5077), so only a single-bucket save holds the optimizer's true state."""
    out = str(work / "trained")
    F.make_torch_dist_checkpoint(
        out,
        hf72,
        tp=2,
        pp=1,
        dp=2,
        steps=2,
        bf16=True,
        init="hf",
        optim_sharding="fully_reshardable",
        bucket_size=None,
    )
    return out


def _cfg(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as fh:
        return json.load(fh)


def _to_hf(src: str, hf_dir: str, dst: str, *extra: str) -> dict:
    assert cli_main(["convert", src, dst, "--to", "hf", "--hf-config", hf_dir, "--quiet", *extra]) == 0
    return load_file(os.path.join(dst, "model.safetensors"))


def _same_logits(hf_dir: str, converted: str) -> None:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.allclose(la, lb, rtol=0, atol=1e-6), (la - lb).abs().max()


def _evaluate_all(nodes: dict) -> dict:
    with Reader() as r:
        return {n: evaluate(t.expr, r) for n, t in nodes.items()}


def _check_against_global_truth(ckpt_root: str, tensors: dict, layers: int) -> None:
    """Every tensor megatron-core saved (``ground_truth_global.pt``, built from each rank's
    ShardedTensors) equals the lifted tensors restacked, bit for bit."""
    truth = torch.load(os.path.join(ckpt_root, "ground_truth_global.pt"), weights_only=True)
    assert truth
    for key, t in truth.items():
        if key in GLOBAL_ROLES:
            if GLOBAL_ROLES[key] not in tensors:  # tied: the output layer is the embedding
                assert key == "output_layer.weight"
                continue
            got = tensors[GLOBAL_ROLES[key]]
        else:
            got = torch.stack([tensors[f"layers.{i}.{LAYER_ROLES[key]}"] for i in range(layers)])
        assert got.dtype == t.dtype and torch.equal(got, t), key


def test_detects_iteration_and_save_directories(tp1pp1):
    assert detect(tp1pp1) == "torch_dist"
    assert detect(os.path.join(tp1pp1, IT)) == "torch_dist"


def test_tp1pp1_converts_to_hf_with_the_original_logits(tp1pp1, hf72, tmp_path):
    got = _to_hf(tp1pp1, hf72, str(tmp_path / "hf"))
    want = load_file(os.path.join(hf72, "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    _same_logits(hf72, str(tmp_path / "hf"))


def test_tp2pp2_chunks_from_every_rank_assemble_exactly(tp2pp2, hf72, tmp_path):
    """Four ranks each saved their TP/PP shards: fused QKV, [gate; up] fc1 (four chunks per layer),
    row-parallel projections and a padded vocabulary all reassemble; hidden 72 is no multiple of 64."""
    src = ck.load(tp2pp2, hf_config=_cfg(hf72))
    assert src.layout.tp == 1 and src.layout.padded_vocab == 256 and src.layout.fused_gate_up
    assert any("_extra_state" in k for k in src.dropped)
    _check_against_global_truth(tp2pp2, _evaluate_all(src.tensors), 4)
    # a stacked layer reads only its own bytes
    qkv = src.tensors["layers.2.attn.qkv.weight"].expr
    assert qkv.nbytes == 144 * 72 * 4 and sum(ld.nbytes for ld in _loads(qkv)) == qkv.nbytes
    _to_hf(tp2pp2, hf72, str(tmp_path / "hf"))
    _same_logits(hf72, str(tmp_path / "hf"))


def _loads(e):
    from ckpt_ir.ir.expr import loads

    return loads(e)


def test_fully_parallel_save_converts(work, hf72, tmp_path):
    """FullyParallelSaveStrategyWrapper spreads the replicated tensors over the DP ranks' files."""
    out = str(work / "fully_parallel")
    F.make_torch_dist_checkpoint(out, hf72, tp=2, pp=1, dp=2, init="hf", fully_parallel=True)
    files = {c.file for t in read_metadata(os.path.join(out, IT)).tensors.values() for c in t.chunks}
    assert len({f.split("_")[2] for f in files}) == 4  # every one of the 4 ranks wrote tensors
    _to_hf(out, hf72, str(tmp_path / "hf"))
    _same_logits(hf72, str(tmp_path / "hf"))
    _check_against_global_truth(out, _evaluate_all(ck.load(out, hf_config=_cfg(hf72)).tensors), 4)


def test_tied_embeddings_across_stages(work, tmp_path):
    hf = _hf(work / "hf_tied", tied=True, layers=2)
    out = str(work / "tied")
    F.make_torch_dist_checkpoint(out, hf, tp=1, pp=2, dp=1, init="hf")
    assert "output_layer.weight" not in read_metadata(os.path.join(out, IT)).tensors
    src = ck.load(out, hf_config=_cfg(hf))
    assert "lm_head.weight" not in src.tensors and src.spec.tied_embeddings
    got = _to_hf(out, hf, str(tmp_path / "hf"))
    assert "lm_head.weight" not in got
    _same_logits(hf, str(tmp_path / "hf"))
    _check_against_global_truth(out, _evaluate_all(src.tensors), 2)


def test_trained_bf16_checkpoint_holds_megatrons_weights(trained, hf72, tmp_path):
    got = _to_hf(trained, hf72, str(tmp_path / "hf"))
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    src = ck.load(trained, hf_config=_cfg(hf72))
    assert src.spec.dtype == "BF16" and not src.states  # optimizer state only when asked for
    assert any(k.startswith("optimizer.state.") for k in src.dropped)
    tensors = _evaluate_all(src.tensors)
    _check_against_global_truth(trained, tensors, 4)
    # training changed the weights (so this is not the HF init read back)
    init = load_file(os.path.join(hf72, "model.safetensors"))
    assert not torch.equal(
        got["model.layers.0.mlp.down_proj.weight"], init["model.layers.0.mlp.down_proj.weight"].bfloat16()
    )
    # the Megatron rank files' own state dicts agree (fc2 is row-parallel: TP shards on dim 1)
    gt = [
        torch.load(os.path.join(trained, "ground_truth", f"mp_rank_{r:02d}.pt"), weights_only=False)
        for r in (0, 1)
    ]
    fc2 = torch.cat([g["model"]["decoder.layers.3.mlp.linear_fc2.weight"] for g in gt], dim=1)
    assert torch.equal(tensors["layers.3.mlp.down.weight"], fc2)


def _gather(parts: list, name: str):
    """TP=2 local tensors of one parameter -> the global (TP=1) tensor, by Megatron's rules."""
    if "linear_fc1.weight" in name:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if "linear_proj.weight" in name or "linear_fc2.weight" in name:
        return torch.cat(parts, dim=1)
    if "linear_qkv.weight" in name or "word_embeddings" in name or "output_layer" in name:
        return torch.cat(parts, dim=0)
    assert torch.equal(parts[0], parts[1]), name
    return parts[0]


def test_fully_reshardable_optimizer_state_lifts_into_states(trained, hf72):
    src = ck.load(trained, hf_config=_cfg(hf72), optimizer=True)
    assert set(src.states) == {"param", "exp_avg", "exp_avg_sq"}
    for nodes in src.states.values():
        assert list(nodes) == list(src.tensors)
        assert all(n.dtype == "F32" and n.shape == src.tensors[k].shape for k, n in nodes.items())
    assert src.meta["optimizer"]["optimizer"]["optimizer"]["param_groups"]
    got = {which: _evaluate_all(nodes) for which, nodes in src.states.items()}
    # 1. what torch.distributed.checkpoint itself reads from the files
    dcp = F.read_torch_dist(os.path.join(trained, IT), "optimizer.state.")
    canon = {**GLOBAL_ROLES, **LAYER_ROLES}
    for key, t in dcp.items():
        which, model_key = key[len("optimizer.state.") :].split(".", 1)
        role = canon[model_key]
        mine = (
            got[which][role]
            if model_key in GLOBAL_ROLES
            else torch.stack([got[which][f"layers.{i}.{role}"] for i in range(4)])
        )
        assert torch.equal(mine, t), key
    # 2. the distributed optimizer's own per-parameter state (master weights and Adam moments)
    truth = [
        torch.load(os.path.join(trained, "ground_truth", f"mp_rank_{r:02d}.pt"), weights_only=False)["optim"]
        for r in (0, 1)
    ]
    for name in truth[0]["params"]:
        if name.startswith("decoder.layers."):  # plain state-dict names, local norm naming
            i, rest = name[len("decoder.layers.") :].split(".", 1)
            canon_name = f"layers.{i}." + {**LAYER_ROLES, **LOCAL_NORMS}["decoder.layers." + rest]
        else:
            canon_name = GLOBAL_ROLES[name]
        for which in ("param", "exp_avg", "exp_avg_sq"):
            want = _gather([t["params"][name][which] for t in truth], name)
            assert torch.equal(got[which][canon_name], want), (name, which)
    # the fp32 masters round to the bf16 weights
    weights = _evaluate_all(src.tensors)
    assert torch.equal(got["param"]["layers.1.attn.o.weight"].bfloat16(), weights["layers.1.attn.o.weight"])


def test_master_weights_export(trained, hf72, tmp_path):
    got = _to_hf(trained, hf72, str(tmp_path / "hf"), "--weights-from", "master")
    assert all(v.dtype == torch.float32 for v in got.values())
    src = ck.load(trained, hf_config=_cfg(hf72), optimizer=True)
    want = evaluate(src.states["param"]["layers.0.attn.o.weight"].expr, Reader())
    assert torch.equal(got["model.layers.0.self_attn.o_proj.weight"], want)


def test_dp_reshardable_state_resumes_in_megatron_after_conversion(work, hf72, tmp_path, capsys):
    """Megatron-Core's default torch_dist optimizer layout (dp_reshardable, 0.15+): per (TP, PP) rank,
    one 1-D tensor per DDP bucket.  A TP=2 DP=2 run with several buckets, saved by megatron-core with
    default settings and plain Megatron-LM args, converts to the torch format TP=1 PP=2 DP=1 with no
    --hf-config; megatron-core resumes from it holding the source optimizer's own state bit for bit."""
    src = str(work / "dp_reshardable")
    F.make_torch_dist_checkpoint(
        src,
        hf72,
        tp=2,
        pp=1,
        dp=2,
        steps=2,
        bf16=True,
        init="hf",
        optim_sharding="dp_reshardable",
        bucket_size=4096,
    )
    assert any(".bucket_idx_1." in k for k in read_metadata(os.path.join(src, IT)).tensors)  # several buckets
    out = str(tmp_path / "tp1pp2")
    capsys.readouterr()
    assert (
        cli_main(
            [
                "convert",
                src,
                out,
                "--to",
                "mcore",
                "--pp",
                "2",
                "--target-dp",
                "1",
                "--make-vocab-size-divisible-by",
                "128",
                "--norm-names",
                "local",
            ]
        )
        == 0
    )
    assert "inferred family llama from args" in capsys.readouterr().err
    resumed = str(tmp_path / "resumed")
    F.resume_distopt_checkpoint(resumed, hf72, out, tp=1, pp=2, dp=1, bucket_size=None)
    _assert_resumed_with_source_state(src, resumed)
    # the resumed optimizer holds the source's Adam step
    blob = torch.load(
        os.path.join(out, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )
    assert blob["optimizer"]["optimizer"]["param_groups"][0]["step"] == 2
    _to_hf(src, hf72, str(tmp_path / "hf"), "--weights-from", "master")  # the fp32 masters export too


def test_moe_dp_reshardable_state_resumes_in_megatron_after_conversion(tmp_path):
    """A Mixtral trained by megatron-core with EP=2, DP=4 (expert DP 2) and saved with default
    torch_dist settings: dp_reshardable state of Megatron's chained optimizers, the dense one per
    (TP, PP) rank (``chained_0.``) and the expert one per (expert TP, EP, PP) rank (``chained_1.``).
    Converted to the torch format at TP2 PP2 EP2 expert-TP 1 DP1 with no --hf-config,
    megatron-core resumes from it holding the source optimizers' own state bit for bit."""
    from tests.test_distopt_reshard import assert_moe_resumes

    hf = F.make_tiny_hf_mixtral(
        str(tmp_path / "hf"), hidden=72, layers=2, heads=4, kv_heads=2, ffn=100, experts=4, topk=2, vocab=256
    )
    src = str(tmp_path / "src")
    F.make_torch_dist_checkpoint(
        src, hf, tp=1, pp=1, dp=4, ep=2, steps=2, bf16=True, init="hf", optim_sharding="dp_reshardable"
    )
    keys = read_metadata(os.path.join(src, IT)).tensors
    assert any(k.startswith("chained_1.optimizer.distributed.dp_group_idx_1.") for k in keys)
    assert any(".bucket_idx_1." in k for k in keys)  # several buckets
    out = str(tmp_path / "tp2pp2")
    args = ["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1", "--target-dp", "1", "--norm-names", "local"]
    assert cli_main(["convert", src, out, "--to", "mcore", "--quiet", *args]) == 0
    assert_moe_resumes(hf, src, out, str(tmp_path / "resumed"))
    # the optimizers' own state dicts (param groups with the Adam step) travel as [dense, expert]
    blob = torch.load(os.path.join(out, IT, "mp_rank_00_000_000", "model_optim_rng.pt"), weights_only=False)
    assert [o["optimizer"]["param_groups"][0]["step"] for o in blob["optimizer"]] == [2, 2]
    # the weights alone convert too (the chained optimizer keys are not model tensors), and the
    # experts' fp32 masters export: expert 3 is EP rank 1's local expert 1
    _to_hf(src, hf, str(tmp_path / "hf_out"))
    masters = _to_hf(src, hf, str(tmp_path / "hf_master"), "--weights-from", "master")
    gt = torch.load(os.path.join(src, "ground_truth", "mp_rank_00_001.pt"), weights_only=False)["params"]
    want = gt["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"]["param"]
    assert torch.equal(masters["model.layers.1.block_sparse_moe.experts.3.w2.weight"], want)


MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)


def test_mla_mtp_dp_reshardable_state_resumes_in_megatron_after_conversion(tmp_path, capsys):
    """A GPT with multi-latent attention and a multi-token-prediction layer, built by megatron-core
    (plain Megatron-LM args, no HF family, the local layer spec: MLA's down-projections split over
    TP) and saved dp_reshardable at TP=2 DP=2 with several buckets: its parameters lie in the order
    megatron-core registers them (MLA: linear_proj, q_down, q_up, kv_down, kv_up, q/kv norms; the
    MTP layer between the final norm and the output layer).  (megatron-core cannot run MLA forward
    on CPU, so the optimizer state is random, not trained.)  Converted to torch_dist (fully
    reshardable), megatron-core resumes it at TP=1 DP=1 holding every parameter's fp32 master and
    Adam moments bit for bit.  So it does from the torch format with megatron-core's own MLA / MTP
    modules (``--mla-keys mcore``) at TP=2, loading the weights strictly (the down-projections
    split over TP); the files megatron-core then saves (its own keys, read without the switch)
    convert to that layout byte for byte.  MindSpeed-LLM's MLA / MTP modules (the default), whose
    order is unknown, are refused in one line."""
    hf = _hf(tmp_path / "hf", layers=2, kv_heads=4)
    src = str(tmp_path / "src")
    F.make_torch_dist_checkpoint(
        src,
        hf,
        tp=2,
        dp=2,
        bf16=True,
        optim_sharding="dp_reshardable",
        fill_optimizer=True,
        mla=MLA,
        mtp_layers=1,
    )
    assert any(".bucket_idx_3." in k for k in read_metadata(os.path.join(src, IT)).tensors)
    out = str(tmp_path / "td")
    args = ["--to", "mcore", "--ckpt-format", "torch_dist", "--norm-names", "local"]
    assert cli_main(["convert", src, out, *args, "--quiet"]) == 0
    resumed = str(tmp_path / "resumed")
    F.resume_torch_dist_checkpoint(resumed, hf, out, tp=1, pp=1, dp=1, mla=MLA, mtp_layers=1)
    _assert_resumed_with_source_state(src, resumed, pp=1, layers=2)
    loaded = torch.load(os.path.join(resumed, "ground_truth", "mp_rank_00.pt"), weights_only=False)
    assert "mtp.layers.0.transformer_layer.self_attention.linear_q_down_proj.weight" in loaded["params"]
    torch_out = str(tmp_path / "torch")
    to_tp2 = ["--to", "mcore", "--tp", "2", "--target-dp", "1", "--quiet"]
    assert cli_main(["convert", src, torch_out, *to_tp2, "--mla-keys", "mcore"]) == 0
    resumed = str(tmp_path / "resumed_torch")
    F.resume_distopt_checkpoint(resumed, hf, torch_out, tp=2, dp=1, mla=MLA, mtp_layers=1)
    _assert_resumed_with_source_state(src, resumed, pp=1, layers=2, tp=2)
    again = str(tmp_path / "again")
    assert cli_main(["convert", resumed, again, "--to", "mcore", "--tp", "2", "--quiet"]) == 0
    for rank in ("mp_rank_00", "mp_rank_01"):
        want = torch.load(os.path.join(resumed, IT, rank, "distrib_optim.pt"))
        got = torch.load(os.path.join(again, IT, rank, "distrib_optim.pt"))
        ((dtypes, w),) = want[0].items()
        assert list(got[0]) == [dtypes] and got[0][dtypes]["numel_unpadded"] == w["numel_unpadded"]
        assert all(torch.equal(got[0][dtypes][f], w[f]) for f in ("param", "exp_avg", "exp_avg_sq"))
        want = torch.load(os.path.join(resumed, IT, rank, "model_optim_rng.pt"), weights_only=False)["model"]
        got = torch.load(os.path.join(again, IT, rank, "model_optim_rng.pt"), weights_only=False)["model"]
        tensors = {k for k, v in want.items() if isinstance(v, torch.Tensor)}
        assert tensors == {k for k, v in got.items() if isinstance(v, torch.Tensor)}
        assert all(torch.equal(got[k], want[k]) for k in tensors)
    capsys.readouterr()
    assert cli_main(["convert", src, str(tmp_path / "mindspeed"), *to_tp2]) == 1
    err = capsys.readouterr().err
    assert "--mla-keys mcore" in err and "--no-optimizer" in err and err.count("\n") == 1
    # what dp_reshardable reading does not cover yet is refused in one line, naming it
    common = os.path.join(src, IT, "common.pt")
    state = torch.load(common, weights_only=False)
    state["args"].context_parallel_size = 2
    torch.save(state, common)
    assert cli_main(["convert", src, str(tmp_path / "cp"), *args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "context parallelism is not supported yet" in err and err.count("\n") == 1


def test_mtp_dp_reshardable_state_resumes_at_another_tp(work, hf72, tmp_path):
    """A GPT with a multi-token-prediction layer saved dp_reshardable at TP=2 DP=2 (random optimizer
    state, see above): the MTP layer's state (eh_proj split over TP like megatron-core's column-
    parallel linear) lies after the final norm; converted to torch_dist, megatron-core resumes
    it at TP=1 with the source's state bit for bit."""
    src = str(tmp_path / "src")
    F.make_torch_dist_checkpoint(
        src, hf72, tp=2, dp=2, bf16=True, optim_sharding="dp_reshardable", fill_optimizer=True, mtp_layers=1
    )
    out = str(tmp_path / "td")
    assert cli_main(["convert", src, out, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    resumed = str(tmp_path / "resumed")
    F.resume_torch_dist_checkpoint(resumed, hf72, out, tp=1, pp=1, dp=1, mtp_layers=1)
    _assert_resumed_with_source_state(src, resumed, pp=1)


def test_run_saved_without_optimizer_state_converts_to_megatron(tp1pp1, hf72, tmp_path):
    """Megatron names the distributed optimizer's sharding type in ``content_metadata`` also when
    the run saved no optimizer state (``--no-save-optim``): the checkpoint converts to a Megatron
    target like a model-only one (weights only, no ``distrib_optim.pt``), not refused."""
    src = str(tmp_path / "no_optim")
    shutil.copytree(tp1pp1, src)
    common = os.path.join(src, "iter_0000001", "common.pt")
    state = torch.load(common, weights_only=False)
    state["content_metadata"]["distrib_optim_sharding_type"] = "dp_reshardable"
    torch.save(state, common)
    out, plain = str(tmp_path / "m"), str(tmp_path / "plain")
    for source, dst in ((src, out), (tp1pp1, plain)):
        assert cli_main(["convert", source, dst, "--to", "mcore", "--hf-config", hf72, "--quiet"]) == 0
    ranks = sorted(p for p in os.listdir(os.path.join(out, "iter_0000001")))
    assert ranks == ["mp_rank_00"]
    assert os.listdir(os.path.join(out, "iter_0000001", "mp_rank_00")) == ["model_optim_rng.pt"]
    got, want = (
        torch.load(os.path.join(d, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)[
            "model"
        ]
        for d in (out, plain)
    )
    assert got.keys() == want.keys() and all(
        torch.equal(got[k], want[k]) for k in want if torch.is_tensor(want[k])
    )


def test_unreadable_optimizer_layout_is_refused_but_weights_convert(work, hf72, tmp_path, capsys):
    out = str(work / "dp_zero")
    F.make_torch_dist_checkpoint(
        out, hf72, tp=1, pp=1, dp=2, steps=1, bf16=True, init="hf", optim_sharding="dp_zero_gather_scatter"
    )
    with pytest.raises(FormatError, match="fully-reshardable"):
        ck.load(out, hf_config=_cfg(hf72), optimizer=True)
    capsys.readouterr()
    assert cli_main(["convert", out, str(tmp_path / "m"), "--to", "mcore", "--hf-config", hf72]) == 1
    err = capsys.readouterr().err
    assert "dp_zero_gather_scatter" in err and err.count("\n") == 1 and "Traceback" not in err
    _to_hf(out, hf72, str(tmp_path / "hf"))  # HF needs no optimizer state
    assert (
        cli_main(
            [
                "convert",
                out,
                str(tmp_path / "m2"),
                "--to",
                "mcore",
                "--hf-config",
                hf72,
                "--no-optimizer",
                "--quiet",
            ]
        )
        == 0
    )


def test_convert_to_mcore_torch_format_reads_back_bit_exact(tp2pp2, hf72, tmp_path):
    mc = str(tmp_path / "mcore")
    assert (
        cli_main(["convert", tp2pp2, mc, "--to", "mcore", "--tp", "2", "--hf-config", hf72, "--quiet"]) == 0
    )
    assert detect(mc) == "mcore"
    back = ck.load(mc, hf_config=_cfg(hf72))
    assert back.layout.tp == 2
    direct = _to_hf(tp2pp2, hf72, str(tmp_path / "direct"))
    via = _to_hf(mc, hf72, str(tmp_path / "via"))
    assert set(direct) == set(via)
    for k in direct:
        assert torch.equal(direct[k], via[k]), k


def test_optimizer_state_carries_to_mcore(trained, hf72, tmp_path):
    mc = str(tmp_path / "mcore")
    assert (
        cli_main(["convert", trained, mc, "--to", "mcore", "--tp", "2", "--hf-config", hf72, "--quiet"]) == 0
    )
    back = ck.load(mc, hf_config=_cfg(hf72), optimizer=True)
    assert set(back.states) == {"param", "exp_avg", "exp_avg_sq"}
    back = ck.run(back, ck.derive_pipeline(back, ck.Target(to="mcore")))
    src = ck.load(trained, hf_config=_cfg(hf72), optimizer=True)
    for which in ("param", "exp_avg_sq"):
        a, b = _evaluate_all(src.states[which]), _evaluate_all(back.states[which])
        for k in a:  # rows past the vocabulary are padding, re-made for the target's padding
            n = 200 if k in ("embed.weight", "lm_head.weight") else None
            assert torch.equal(a[k][:n], b[k][:n]), (which, k)


# ---------------------------------------------------------------------------------------------
# broken and hostile inputs


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _fails_cleanly(capsys, src: str, hf_dir: str, tmp_path, *words: str) -> str:
    assert cli_main(["convert", src, str(tmp_path / "out"), "--to", "hf", "--hf-config", hf_dir]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not os.path.exists(tmp_path / "out")
    return err


def test_truncated_distcp_is_a_clear_error(tp1pp1, hf72, tmp_path, capsys):
    bad = _copy(tp1pp1, tmp_path / "bad")
    it = os.path.join(bad, IT)
    victim = max(
        (f for f in os.listdir(it) if f.endswith(".distcp")),
        key=lambda f: os.path.getsize(os.path.join(it, f)),
    )
    with open(os.path.join(it, victim), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(it, victim)) // 2)
    _fails_cleanly(capsys, bad, hf72, tmp_path, victim, "truncated")


def test_missing_metadata_is_a_clear_error(tp1pp1, hf72, tmp_path, capsys):
    bad = _copy(tp1pp1, tmp_path / "bad")
    os.remove(os.path.join(bad, IT, ".metadata"))
    _fails_cleanly(capsys, bad, hf72, tmp_path, ".metadata")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_pickle_runs_nothing(tp1pp1, hf72, tmp_path, capsys):
    bad = _copy(tp1pp1, tmp_path / "bad")
    marker = tmp_path / "pwned"
    with open(os.path.join(bad, IT, ".metadata"), "wb") as fh:
        pickle.dump({"state_dict_metadata": _Evil(str(marker))}, fh)
    with pytest.raises(FormatError, match="refusing to unpickle"):
        read_metadata(os.path.join(bad, IT))
    _fails_cleanly(capsys, bad, hf72, tmp_path, ".metadata", "refusing")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# mixture of experts (synthetic: megatron-core's GPT fixtures are dense)


def _restack_to_torch_dist(
    mcore_dir: str,
    out: str,
    stack_layers: bool,
    common_in_dcp: bool = False,
    extra=None,
    common_extra: dict | None = None,
) -> None:
    """Write the TP=1 ``torch``-format checkpoint ``mcore_dir`` as a torch_dist one: decoder keys
    stacked on a layer axis (or kept as ``decoder.layers.<i>.``), experts on the next axis, one
    chunk per tensor (plain ``torch.distributed.checkpoint.save``, no process group)."""
    import re
    import warnings

    import torch.distributed.checkpoint as dcp

    blob = torch.load(os.path.join(mcore_dir, IT, "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    model = {
        k: v for k, v in blob["model"].items() if isinstance(v, torch.Tensor) and "_extra_state" not in k
    }
    grouped: dict = {}
    for k, v in model.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", k)
        if not m:
            grouped[k] = v
            continue
        i, rest = int(m.group(1)), m.group(2)
        e = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$", rest)
        if e:
            rest = f"mlp.experts.experts.{e.group(2)}"
            grouped.setdefault((i, rest), {})[int(e.group(1))] = v
        else:
            grouped[(i, rest)] = v
    layered: dict = {}
    for k, v in grouped.items():
        if isinstance(k, str):
            layered[k] = v
            continue
        i, rest = k
        v = torch.stack([v[e] for e in sorted(v)]) if isinstance(v, dict) else v
        layered.setdefault(rest, {})[i] = v
    sd = {}
    for k, v in layered.items():
        if not isinstance(v, dict):
            sd[k] = v
        elif stack_layers:
            sd[f"decoder.layers.{k}"] = torch.stack([v[i] for i in sorted(v)]).contiguous()
        else:
            sd.update({f"decoder.layers.{i}.{k}": t for i, t in v.items()})
    it = os.path.join(out, IT)
    os.makedirs(it)
    common = {"args": blob["args"], "iteration": 1, "checkpoint_version": 3.0, **(common_extra or {})}
    if extra is not None:  # more entries computed from the model's stored tensors
        sd.update(extra(sd))
    if (
        common_in_dcp
    ):  # Megatron-Core 0.19+: no common.pt, the common state is a bytes entry torch.save([state])
        import io

        buf = io.BytesIO()
        torch.save([common], buf)
        buf.seek(0)
        sd["common_state/shard_0_1"] = buf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=it, no_dist=True)
    if not common_in_dcp:
        torch.save(common, os.path.join(it, "common.pt"))
    with open(os.path.join(it, "metadata.json"), "w") as fh:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, fh)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("1")


@pytest.mark.parametrize("stack_layers", [True, False])
def test_moe_experts_stacked_on_layer_and_expert_axes(work, tmp_path, stack_layers):
    from tests.test_moe import build_moe

    hf = build_moe(str(tmp_path / "hf"), "mixtral")
    mc = str(tmp_path / "mcore")
    assert cli_main(["convert", hf, mc, "--to", "mcore", "--quiet"]) == 0
    td = str(tmp_path / "td")
    _restack_to_torch_dist(mc, td, stack_layers)
    keys = read_metadata(os.path.join(td, IT)).tensors
    if stack_layers:
        assert list(keys["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape)[:2] == [2, 4]
    got = _to_hf(td, hf, str(tmp_path / "back"))
    want = load_file(os.path.join(hf, "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fully_reshardable_state_resumes_in_megatron_after_conversion(trained, hf72, tmp_path):
    """torch_dist (TP=2, DP=2, fully reshardable) -> legacy torch format TP=1 PP=2 DP=1 with
    distrib_optim.pt: megatron-core resumes from it and holds the optimizer's own state (the
    vocabulary's padding rows excepted: they are padded afresh).  torch_dist names the norms the
    Transformer-Engine way for every layer spec, so the local-spec target asks for local names."""
    out = str(tmp_path / "tp1pp2")
    assert (
        cli_main(
            [
                "convert",
                trained,
                out,
                "--to",
                "mcore",
                "--pp",
                "2",
                "--target-dp",
                "1",
                "--make-vocab-size-divisible-by",
                "128",
                "--norm-names",
                "local",
                "--hf-config",
                hf72,
                "--quiet",
            ]
        )
        == 0
    )
    resumed = str(tmp_path / "resumed")
    F.resume_distopt_checkpoint(resumed, hf72, out, tp=1, pp=2, dp=1, bucket_size=None)
    _assert_resumed_with_source_state(trained, resumed)


def test_a_local_spec_run_converts_to_the_torch_format_under_its_own_names_and_order(trained, hf72, tmp_path):
    """torch_dist names the norms the Transformer-Engine way whatever the layer spec (megatron-core's
    local spec maps its keys so); the run's args (``transformer_impl='local'``) say which modules it
    built.  With no --norm-names the torch-format output has the local spec's names and args and
    its distributed-optimizer state in that spec's parameter order: megatron-core's local-spec
    model loads it strictly and resumes holding the source optimizer's own state."""
    assert ck.load(trained).meta["args"]["transformer_impl"] == "local"
    out = str(tmp_path / "tp1pp2")
    flags = ["--pp", "2", "--target-dp", "1", "--hf-config", hf72, "--quiet"]
    assert cli_main(["convert", trained, out, "--to", "mcore", *flags]) == 0
    for stage in (0, 1):
        blob = torch.load(
            os.path.join(out, IT, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt"), weights_only=False
        )
        assert blob["args"].transformer_impl == "local"
        layer_keys = [k for k in blob["model"] if k.startswith("decoder.layers.")]
        assert [k for k in layer_keys if "layer_norm_" in k] == []
        assert {
            "decoder.layers.0.input_layernorm.weight",
            "decoder.layers.0.pre_mlp_layernorm.weight",
        } <= set(layer_keys)
    resumed = str(tmp_path / "resumed")
    F.resume_distopt_checkpoint(resumed, hf72, out, tp=1, pp=2, dp=1, bucket_size=None)
    _assert_resumed_with_source_state(trained, resumed)


@pytest.mark.parametrize("spec", ["local", "te"])
def test_the_runs_transformer_impl_decides_the_norm_names_read_from_torch_dist(hf72, tmp_path, spec):
    """Both torch_dist checkpoints store the norms under Transformer-Engine names; their args'
    transformer_impl ('local' / 'transformer_engine') decides the naming lifted and written on."""
    src = str(tmp_path / "td")
    assert (
        cli_main(["convert", hf72, src, "--to", "mcore", "--ckpt-format", "torch_dist", "--norm-names", spec])
        == 0
    )
    stored = read_metadata(os.path.join(src, IT)).tensors
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in stored
    assert ck.load(src).layout.norm_names == spec
    out = str(tmp_path / "torch")
    assert cli_main(["convert", src, out, "--to", "mcore", "--quiet"]) == 0
    blob = torch.load(os.path.join(out, IT, "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert blob["args"].transformer_impl == ("local" if spec == "local" else "transformer_engine")
    qkv_norm = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert (qkv_norm in blob["model"]) == (spec == "te")
    assert ("decoder.layers.0.input_layernorm.weight" in blob["model"]) == (spec == "local")


def test_megatron_019_common_state_inside_dcp(tmp_path):
    """Megatron-Core 0.19+ writes no common.pt: args and the rest live in the DCP bytes entry
    ``common_state``; plain Megatron-LM args there need no --hf-config either."""
    from tests.conftest import build_hf
    from tests.test_family_inference import plain_args

    hf = build_hf(str(tmp_path / "hf"), "qwen2", layers=2)
    mc = str(tmp_path / "mcore")
    assert cli_main(["convert", hf, mc, "--to", "mcore", "--quiet"]) == 0
    plain_args(mc)
    td = str(tmp_path / "td")
    _restack_to_torch_dist(mc, td, True, common_in_dcp=True)
    assert not os.path.exists(os.path.join(td, IT, "common.pt"))
    src = ck.load(td)
    assert src.spec.family == "qwen2" and src.spec.qkv_bias and "common_state" not in " ".join(src.dropped)
    back = str(tmp_path / "back")
    assert cli_main(["convert", td, back, "--to", "hf", "--quiet"]) == 0
    got, want = (
        load_file(os.path.join(back, "model.safetensors")),
        load_file(os.path.join(hf, "model.safetensors")),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_megatron_014_fully_sharded_model_space_optimizer_state(tmp_path):
    """Megatron-Core 0.8-0.14's default torch_dist optimizer layout: ``optimizer.state.
    {fp32_param,exp_avg,exp_avg_sq}.<model key>`` stored *reformulated* -- the model-shaped tensor
    cut into a grid of equal blocks (one per layer and TP shard), each flattened along a last axis
    -- with the model shape in ``.metadata``'s ``mcore_data[key]['nd_reformulated_orig_global_shape']``.
    Built here from those format facts with plain torch.distributed.checkpoint."""
    import pickle

    from tests.conftest import build_hf
    from tests.test_family_inference import plain_args

    hf = build_hf(str(tmp_path / "hf"), "llama", layers=2)
    mc = str(tmp_path / "mcore")
    assert cli_main(["convert", hf, mc, "--to", "mcore", "--quiet"]) == 0
    plain_args(mc)
    truth, shapes = {}, {}
    gen = torch.Generator().manual_seed(3)

    def reformulated(model_sd):
        out = {}
        for key, t in model_sd.items():
            stacked = key.startswith("decoder.layers.")
            grid = ((t.shape[0],) if stacked else ()) + tuple(
                2 if n % 2 == 0 and i == 0 else 1 for i, n in enumerate(t.shape[int(stacked) :])
            )
            block = tuple(n // g for n, g in zip(t.shape, grid))
            for stored, which in (
                ("fp32_param", "param"),
                ("exp_avg", "exp_avg"),
                ("exp_avg_sq", "exp_avg_sq"),
            ):
                g = torch.randn(t.shape, generator=gen)
                truth[(which, key)] = g
                r = torch.empty(grid + (math.prod(block),))
                for idx in __import__("itertools").product(*map(range, grid)):
                    r[idx] = g[tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))].reshape(-1)
                out[f"optimizer.state.{stored}.{key}"] = r
                shapes[f"optimizer.state.{stored}.{key}"] = tuple(t.shape)
        return out

    import math

    td = str(tmp_path / "td")
    param_groups = [{"lr": 0.01, "step": 7, "betas": (0.9, 0.95)}]
    _restack_to_torch_dist(
        mc,
        td,
        True,
        extra=reformulated,
        common_extra={
            "optimizer": {
                "optimizer": {"param_groups": param_groups},
                "param_state_sharding_type": "fully_sharded_model_space",
            }
        },
    )
    meta_path = os.path.join(td, IT, ".metadata")
    with open(meta_path, "rb") as fh:
        md = pickle.load(fh)
    md.mcore_data = {k: {"nd_reformulated_orig_global_shape": s} for k, s in shapes.items()}
    with open(meta_path, "wb") as fh:
        pickle.dump(md, fh)
    src = ck.load(td, optimizer=True)
    got = {w: _evaluate_all(nodes) for w, nodes in src.states.items()}
    assert set(got) == {"param", "exp_avg", "exp_avg_sq"}
    roles = {
        "decoder.layers.self_attention.linear_qkv.weight": "attn.qkv.weight",
        "decoder.layers.mlp.linear_fc1.weight": "mlp.gate_up.weight",
        "decoder.layers.input_layernorm.weight": "attn_norm.weight",
    }
    for (which, key), g in truth.items():
        if key == "embedding.word_embeddings.weight":
            assert torch.equal(got[which]["embed.weight"], g)
        elif key in roles:
            for i in range(2):
                assert torch.equal(got[which][f"layers.{i}.{roles[key]}"], g[i]), (which, key, i)
    assert src.meta["optimizer"]["optimizer"]["optimizer"]["param_groups"] == param_groups


def _assert_resumed_with_source_state(
    src: str, resumed: str, pp: int = 2, layers: int = 4, tp: int = 1
) -> None:
    """megatron-core resumed at ``tp`` and ``pp`` stages (``resumed``) holds the TP=2 PP=1 source
    run's own optimizer state (its ground truth), except the vocabulary's padding rows (padded
    afresh)."""
    from tests.test_distopt_reshard import STATES, _global, _truth

    optim = [
        torch.load(os.path.join(src, "ground_truth", f"mp_rank_{r:02d}.pt"), weights_only=False)["optim"]
        for r in (0, 1)
    ]
    source = {(0, name): {r: optim[r]["params"][name] for r in (0, 1)} for name in optim[0]["params"]}
    loaded = _truth(resumed, tp, pp)
    for field in STATES:
        want, got = _global(source, layers, field), _global(loaded, layers // pp, field)
        assert want.keys() == got.keys()
        for key in want:
            rows = 200 if key.endswith(("word_embeddings.weight", "output_layer.weight")) else None
            assert torch.equal(got[key][:rows], want[key][:rows]), (field, key)
