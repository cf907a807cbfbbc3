"""Distributed-optimizer state follows a reshard: checkpoints trained and saved by megatron-core's
DistributedOptimizer are converted by ckpt-ir to another TP/PP/DP layout, then megatron-core itself
resumes from the result (``optimizer.load_state_dict`` + ``load_parameter_state``, as
``megatron.training`` does) and the state it loaded is compared with the source's, gathered by the
sharding rules written out below (not by ckpt-ir)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from tests import distopt_fixtures as F

STATES = ("param", "exp_avg", "exp_avg_sq")


def _truth(out: str, tp: int, pp: int, ep: int = 1, experts: int = 0, grouped: tuple | None = None) -> dict:
    """{(stage, local key): {tp rank: per-parameter truth}} from a fixture's ground truth; local
    experts are renamed to their global index (EP rank x experts per rank + local index).
    ``grouped`` = (hidden, expert ffn) of a GroupedMLP run: its weight1 / weight2 truth is split
    into the sequential experts' tensors first (:func:`distopt_fixtures.per_expert`)."""
    truth: dict = {}
    for stage in range(pp):
        for rank in range(tp):
            for ep_rank in range(ep):
                path = os.path.join(out, "ground_truth", F.mp_dir_name(rank, stage, pp, ep_rank, ep) + ".pt")
                if not os.path.exists(path):
                    continue
                gt = torch.load(path, weights_only=False)
                if grouped:
                    split = {}
                    for key, p in gt["params"].items():
                        parts = {f: F.per_expert(key, p[f], *grouped) for f in (*STATES, "model_param")}
                        for n, (name, _) in enumerate(parts["param"]):
                            split[name] = {f: parts[f][n][1] for f in parts}
                    gt["params"] = split
                for key, p in gt["params"].items():
                    m = re.match(r"(.*\.local_experts\.)(\d+)(\..*)", key)
                    if m:
                        key = f"{m.group(1)}{ep_rank * (experts // ep) + int(m.group(2))}{m.group(3)}"
                    have = truth.setdefault((stage, key), {})
                    if rank in have:  # a dense parameter again in another EP rank's directory
                        assert all(torch.equal(have[rank][f], p[f]) for f in STATES), key
                    else:
                        have[rank] = p
    return truth


def _global(truth: dict, layers_per_stage: int, field: str) -> dict:
    """Whole (TP=1) tensors keyed by global Megatron names, gathered by Megatron's sharding rules:
    column-parallel weights join on dim 0 (fc1 keeps [all gate; all up]), row-parallel on dim 1,
    everything else is replicated."""
    out = {}
    for (stage, key), ranks in truth.items():
        parts = [ranks[r][field] for r in sorted(ranks)]
        if key.startswith("decoder.layers."):
            _, _, local, rest = key.split(".", 3)
            key = f"decoder.layers.{stage * layers_per_stage + int(local)}.{rest}"
        if len(parts) == 1 or not any(
            key.endswith(s)
            for s in (
                "linear_qkv.weight",
                "linear_fc1.weight",
                "linear_proj.weight",
                "linear_fc2.weight",
                "word_embeddings.weight",
                "output_layer.weight",
                "eh_proj.weight",  # multi-token prediction: column-parallel
                # megatron-core's MLA with the local spec: every projection is column-parallel
                "linear_q_down_proj.weight",
                "linear_q_up_proj.weight",
                "linear_kv_down_proj.weight",
                "linear_kv_up_proj.weight",
            )
        ):
            assert all(torch.equal(p, parts[0]) for p in parts), f"replicas of {key} differ"
            full = parts[0]
        elif key.endswith("linear_fc1.weight"):
            half = parts[0].shape[0] // 2
            full = torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            full = torch.cat(parts, dim=1)
        else:
            full = torch.cat(parts)
        if key in out:  # the tied output layer on the last stage: the same state as the embedding
            assert torch.equal(out[key], full), key
        out[key] = full
    return out


def _assert_same_state(a: dict, b: dict, dtype=torch.float32) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == dtype
        assert torch.equal(a[key], b[key]), key


def assert_same_training_state(source: dict, source_layers: int, loaded: dict, loaded_layers: int) -> None:
    """Two truths (:func:`_truth`, with their layers per stage) hold the same fp32 masters and Adam
    moments and the same bf16 weights, whole tensor by whole tensor."""
    for field in (*STATES, "model_param"):
        _assert_same_state(
            _global(source, source_layers, field),
            _global(loaded, loaded_layers, field),
            torch.bfloat16 if field == "model_param" else torch.float32,
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_tp2pp2dp2):
    """TP=2, PP=2, DP=2, bf16 with fp32 masters, hidden 72 (parameters not multiples of 64), DDP
    buckets of 4096 elements (several per stage 0), two Adam steps (tests/conftest.py); tests
    write their outputs under ``root``."""
    hf, src = trained_tp2pp2dp2
    with open(os.path.join(src, "fixture.json")) as fh:
        info = json.load(fh)
    assert max(len(b["buckets"]) for r in info["ranks"] for b in r["buffers"]) > 1
    return tmp_path_factory.mktemp("distopt"), hf, src


def test_tp2_pp2_dp2_to_tp1_pp4_dp1_and_back_is_bit_exact(trained):
    root, hf, src = trained
    pp4 = str(root / "pp4")
    # plain Megatron-LM args, no --hf-config: the family (llama) is inferred from the args
    assert (
        cli_main(
            ["convert", src, pp4, "--to", "mcore", "--tp", "1", "--pp", "4", "--target-dp", "1", "--quiet"]
        )
        == 0
    )
    # megatron-core resumes TP=1 PP=4 DP=1 from it and holds exactly the source's state
    resumed = str(root / "resumed_pp4")
    F.resume_distopt_checkpoint(resumed, hf, pp4, tp=1, pp=4, dp=1, bucket_size=4096)
    source = _truth(src, 2, 2)
    loaded = _truth(resumed, 1, 4)
    for field in STATES:
        _assert_same_state(_global(source, 2, field), _global(loaded, 1, field))
    _assert_same_state(_global(source, 2, "model_param"), _global(loaded, 1, "model_param"), torch.bfloat16)

    # ... and back to TP=2 PP=2 DP=2: the very files megatron-core wrote
    back = str(root / "back")
    assert (
        cli_main(
            [
                "convert",
                pp4,
                back,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--target-dp",
                "2",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    for stage in range(2):
        for rank in range(2):
            d = F.mp_dir_name(rank, stage, 2)
            want = torch.load(os.path.join(src, "iter_0000002", d, "distrib_optim.pt"))
            got = torch.load(
                os.path.join(back, "iter_0000002", d, "distrib_optim.pt")
            )  # weights_only, as megatron
            assert list(got) == list(want) == ["buckets_coalesced", 0]
            ((key, w),) = want[0].items()
            assert list(got[0]) == [key] == [(torch.bfloat16, torch.float32)]
            assert got[0][key]["numel_unpadded"] == w["numel_unpadded"]
            for field in STATES:
                assert torch.equal(got[0][key][field], w[field]), (d, field)
            m_want = torch.load(
                os.path.join(src, "iter_0000002", d, "model_optim_rng.pt"), weights_only=False
            )
            m_got = torch.load(
                os.path.join(back, "iter_0000002", d, "model_optim_rng.pt"), weights_only=False
            )
            assert m_got["optimizer"] == m_want["optimizer"]
            assert m_got["opt_param_scheduler"] == m_want["opt_param_scheduler"]
            for k, v in m_want["model"].items():
                if not k.endswith("_extra_state"):
                    assert torch.equal(m_got["model"][k], v), k
            assert m_got["args"].data_parallel_size == 2 and m_got["args"].use_distributed_optimizer
    resumed_back = str(root / "resumed_back")
    F.resume_distopt_checkpoint(resumed_back, hf, back, tp=2, pp=2, dp=2, bucket_size=4096)
    again = _truth(resumed_back, 2, 2)
    for (stage, key), ranks in source.items():
        for rank, p in ranks.items():
            for field in STATES:
                assert torch.equal(again[(stage, key)][rank][field], p[field]), (stage, key, rank, field)


def test_training_resumes_after_a_reshard(trained):
    """Megatron-core takes further Adam steps from the converted state (nothing missing or NaN)."""
    root, hf, src = trained
    tp1 = str(root / "tp1pp2")
    assert (
        cli_main(
            [
                "convert",
                src,
                tp1,
                "--to",
                "mcore",
                "--tp",
                "1",
                "--pp",
                "2",
                "--target-dp",
                "1",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    info = F.resume_distopt_checkpoint(
        str(root / "stepped"), hf, tp1, tp=1, pp=2, dp=1, bucket_size=4096, steps=1
    )
    losses = [x for r in info["ranks"] for x in r["losses"] if x is not None]
    assert losses and all(x == x and abs(x) < 1e4 for x in losses)
    stepped = _truth(str(root / "stepped"), 1, 2)
    start = _global(_truth(src, 2, 2), 2, "exp_avg")
    after = _global(stepped, 2, "exp_avg")
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], start[k]) for k in start)  # it really stepped


def test_tied_embeddings_to_another_dp_size(tmp_path):
    """Tied embeddings: with PP > 1 DDP gives the embedding (first stage) and the output layer (last
    stage) buckets of their own; DP=3 aligns buckets to lcm(3, 128) = 384 elements."""
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_llama(hf, hidden=72, layers=2, heads=4, kv_heads=2, ffn=120, vocab=200, tied=True)
    src = str(tmp_path / "src")
    F.make_distopt_checkpoint(
        src, hf, tp=2, pp=1, dp=2, bucket_size=4096, steps=1, bf16=True, init="hf", vocab_divisible_by=8
    )
    out = str(tmp_path / "pp2dp3")
    assert (
        cli_main(
            [
                "convert",
                src,
                out,
                "--to",
                "mcore",
                "--tp",
                "1",
                "--pp",
                "2",
                "--target-dp",
                "3",
                "--make-vocab-size-divisible-by",
                "8",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    resumed = str(tmp_path / "resumed")
    F.resume_distopt_checkpoint(resumed, hf, out, tp=1, pp=2, dp=3, bucket_size=4096, vocab_divisible_by=8)
    source = _truth(src, 2, 1)
    loaded = _truth(resumed, 1, 2)
    for field in STATES:
        want, got = _global(source, 2, field), _global(loaded, 1, field)
        # vocab 200 is padded to 208 rows at TP=2 (a multiple of 8*2), to 200 at TP=1
        assert want["embedding.word_embeddings.weight"].shape[0] == 208
        want["embedding.word_embeddings.weight"] = want["embedding.word_embeddings.weight"][:200]
        # PP > 1 keeps a copy of the tied embedding as the last stage's output layer, state included
        assert torch.equal(got.pop("output_layer.weight"), want["embedding.word_embeddings.weight"])
        _assert_same_state(want, got)


def _distopt_files(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        if "distrib_optim.pt" in files:
            out[os.path.relpath(dirpath, root)] = torch.load(os.path.join(dirpath, "distrib_optim.pt"))
    return out


def test_vpp_chunks_and_cast_round_trip(trained):
    """Through a virtual-pipeline layout (one buffer per model chunk) and a bf16 -> fp16 cast of
    the weights and back: the optimizer state stays fp32 and returns bit-exact."""
    root, hf, src = trained
    vpp = str(root / "vpp")
    assert (
        cli_main(
            [
                "convert",
                src,
                vpp,
                "--to",
                "mcore",
                "--tp",
                "1",
                "--pp",
                "2",
                "--vpp-layers",
                "1",
                "--dtype",
                "fp16",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    files = _distopt_files(vpp)
    assert set(files) == {"iter_0000002/mp_rank_00_000", "iter_0000002/mp_rank_00_001"}
    for state in files.values():
        assert list(state) == ["buckets_coalesced", 0, 1]  # one entry per model chunk
        for chunk in (0, 1):
            ((key, group),) = state[chunk].items()
            assert key == (torch.float16, torch.float32)
            assert all(group[k].dtype == torch.float32 for k in STATES)
    back = str(root / "vpp_back")
    assert (
        cli_main(
            [
                "convert",
                vpp,
                back,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--dtype",
                "bf16",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    want, got = _distopt_files(src), _distopt_files(back)
    assert want.keys() == got.keys()
    for d in want:
        ((key, w),) = want[d][0].items()
        for field in STATES:
            assert torch.equal(got[d][0][key][field], w[field]), (d, field)


def test_vocab_padding_rows_get_zero_moments(trained):
    root, hf, src = trained
    import ckpt_ir.api as ck
    from ckpt_ir.ir import expr as E

    out = str(root / "padded")
    assert (
        cli_main(
            [
                "convert",
                src,
                out,
                "--to",
                "mcore",
                "--make-vocab-size-divisible-by",
                "192",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    ckpt = ck.load(
        out, optimizer=True, hf_config=__import__("json").load(open(os.path.join(hf, "config.json")))
    )
    with E.Reader() as reader:
        emb = {k: E.evaluate(ckpt.states[k]["embed.weight"].expr, reader) for k in STATES}
    assert emb["param"].shape[0] == 384
    assert torch.equal(emb["param"][256:], emb["param"][255:256].expand(128, -1))  # like the weights
    assert not emb["exp_avg"][256:].any() and not emb["exp_avg_sq"][256:].any()
    source = _global(_truth(src, 2, 2), 2, "exp_avg")["embedding.word_embeddings.weight"]
    assert torch.equal(emb["exp_avg"][:256], source)


def test_optimizer_can_be_left_out_and_is_reported_for_hf(trained, capsys):
    root, hf, src = trained
    out = str(root / "weights_only")
    assert (
        cli_main(
            [
                "convert",
                src,
                out,
                "--to",
                "mcore",
                "--tp",
                "1",
                "--no-optimizer",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    assert not _distopt_files(out)
    m = torch.load(os.path.join(out, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert "optimizer" not in m  # the training state besides the optimizer's is kept
    want = torch.load(
        os.path.join(src, "iter_0000002", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )
    assert m["opt_param_scheduler"] == want["opt_param_scheduler"]
    assert cli_main(["convert", src, str(root / "hf_out"), "--to", "hf", "--hf-config", hf, "--dry-run"]) == 0
    assert "distrib_optim.pt" in capsys.readouterr().out  # listed as dropped, with the reason
    assert (
        cli_main(["convert", src, str(root / "x"), "--to", "hf", "--target-dp", "2", "--hf-config", hf]) == 2
    )


def test_mindspeed_load_model_type_optim(trained):
    root, hf, src = trained
    out = str(root / "ms_optim")
    assert (
        cli_main(
            [
                "convert-ckpt",
                "--load-model-type",
                "optim",
                "--save-model-type",
                "mg",
                "--load-dir",
                src,
                "--save-dir",
                out,
                "--target-tensor-parallel-size",
                "1",
                "--target-pipeline-parallel-size",
                "4",
                "--target-data-parallel-size",
                "1",
                "--hf-cfg-dir",
                hf,
            ]
        )
        == 0
    )
    ref = str(root / "pp4_ref")
    assert (
        cli_main(
            [
                "convert",
                src,
                ref,
                "--to",
                "mcore",
                "--pp",
                "4",
                "--target-dp",
                "1",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    a, b = _distopt_files(out), _distopt_files(ref)
    assert a.keys() == b.keys() and len(a) == 4
    for d in a:
        ((key, x),) = a[d][0].items()
        assert all(torch.equal(x[f], b[d][0][key][f]) for f in STATES)
    assert (
        cli_main(
            [
                "convert-ckpt",
                "--load-model-type",
                "optim",
                "--save-model-type",
                "hf",
                "--load-dir",
                src,
                "--save-dir",
                str(root / "ms_hf"),
            ]
        )
        == 2
    )


def _encode_older(gt: dict, dp: int, generation: str) -> dict:
    """An independent writer of the older distrib_optim.pt layouts, from the documented rules
    (reference notes A3/A4): parameters in reverse registration order with no alignment, a bucket
    closing once it holds ``bucket_size`` elements; 0.7 concatenates the buckets without their end
    padding, 0.5/0.6 keep a list of buckets each padded to a multiple of DP (0.5 keys the group
    by the gradient dtype alone)."""
    buckets, current, pos = [], [], 0
    for name in reversed(gt["param_order"]):
        current.append((name, pos))
        pos += gt["params"][name]["param"].numel()
        if gt["bucket_size"] is not None and pos >= gt["bucket_size"]:
            buckets.append((current, pos))
            current, pos = [], 0
    if current:
        buckets.append((current, pos))
    group: dict = {}
    for field in STATES:
        tensors = []
        for names, unpadded in buckets:
            size = unpadded if generation == "0.7" else -(-unpadded // dp) * dp
            t = torch.zeros(size)
            for name, at in names:
                v = gt["params"][name][field].reshape(-1)
                t[at : at + v.numel()] = v
            tensors.append(t)
        group[field] = torch.cat(tensors) if generation == "0.7" else tensors
    key = (torch.bfloat16, torch.float32)
    if generation == "0.7":
        return {"buckets_coalesced": True, 0: {key: {**group, "numel_unpadded": sum(n for _, n in buckets)}}}
    if generation == "0.5":
        key = torch.float32
    return {
        "per_bucket_numel": [{key: [t.numel() for t in group["param"]]}],
        "per_bucket_numel_unpadded": [{key: [n for _, n in buckets]}],
        0: {key: group},
    }


@pytest.mark.parametrize("generation", ["0.7", "0.6", "0.5"])
def test_older_megatron_layouts_are_read(trained, generation):
    """Optimizer files in the layouts of Megatron-Core 0.5-0.7 (no 64-element alignment; 0.5/0.6
    per-bucket lists padded to DP) are read and rewritten in the current layout, equal to the
    file megatron-core 0.16 wrote for the same state."""
    import shutil

    root, hf, src = trained
    old = str(root / f"old-{generation}")
    shutil.copytree(src, old)
    for stage in range(2):
        for rank in range(2):
            d = F.mp_dir_name(rank, stage, 2)
            gt = torch.load(os.path.join(src, "ground_truth", d + ".pt"), weights_only=False)
            torch.save(
                _encode_older(gt, 2, generation), os.path.join(old, "iter_0000002", d, "distrib_optim.pt")
            )
    out = str(root / f"new-{generation}")
    assert (
        cli_main(
            ["convert", old, out, "--to", "mcore", "--tp", "2", "--pp", "2", "--hf-config", hf, "--quiet"]
        )
        == 0
    )
    want, got = _distopt_files(src), _distopt_files(out)
    assert want.keys() == got.keys()
    for d in want:
        ((key, w),) = want[d][0].items()
        for field in STATES:
            assert torch.equal(got[d][0][key][field], w[field]), (d, field)


def _fabricated_states(ckpt):
    """Distinct fp32 state per tensor set (scaled copies of the weights) and the Megatron args a
    distributed optimizer with several buckets and DP=2 would record."""
    import attrs

    from ckpt_ir.ir import expr as E

    states = {
        which: {n: t.map(lambda e, f=f: E.Scale(e, f)) for n, t in ckpt.tensors.items()}
        for which, f in zip(STATES, (1.0, 0.5, -0.25))
    }
    meta = {
        **ckpt.meta,
        "optimizer": {
            "args": {"data_parallel_size": 2, "overlap_grad_reduce": True, "ddp_bucket_size": 3000},
            "dtype_key": None,
        },
    }
    return attrs.evolve(ckpt, states=states, meta=meta)


def _gathered_states(path: str) -> dict:
    import ckpt_ir.api as ck
    from ckpt_ir.ir import expr as E

    src = ck.load(path, optimizer=True)
    # the canonical form, keeping the state (an HF target itself would drop it)
    steps = [p for p in ck.derive_pipeline(src, ck.Target(to="hf")) if p.name != "drop-optimizer-state"]
    whole = ck.run(src, steps)
    with E.Reader() as reader:
        return {
            which: {n: E.evaluate(t.expr, reader) for n, t in s.items()} for which, s in whole.states.items()
        }


@pytest.mark.parametrize(
    "family,layouts",
    [
        ("mixtral", [dict(tp=2, ep=2, etp=1), dict(tp=1, pp=2, ep=4, grouped_gemm=True), dict(tp=2, ep=2)]),
        (
            "llama",
            [
                dict(tp=2, pp=2, vpp_layers=1),
                dict(num_layer_list=(1, 3), pp=2),
                dict(tp=2, pp=2, noop_layers=(2, 5), vocab_divisible_by=48),
            ],
        ),
    ],
)
def test_state_round_trips_through_layouts(hf_cache, tmp_path, family, layouts):
    """Optimizer state written for one layout reads back (and rewrites for the next) unchanged:
    dense and MoE models, expert parallelism with expert TP 1 or TP, grouped GEMM, VPP, uneven
    stages and no-op layers; MoE files hold [dense, expert] and only EP rank 0 has the dense state."""
    import ckpt_ir.api as ck
    from ckpt_ir.ir import expr as E

    if family == "mixtral":
        from tests.test_moe import build_moe

        hf = build_moe(str(tmp_path / "hf"), "mixtral", layers=4)
    else:
        hf = hf_cache(family, layers=4)
    src = _fabricated_states(ck.load(hf))
    with E.Reader() as reader:
        want = {w: {n: E.evaluate(t.expr, reader) for n, t in s.items()} for w, s in src.states.items()}
    current = src
    for i, lay in enumerate(layouts):
        target = ck.Target(to="mcore", dp=2 + i, **lay)
        out = str(tmp_path / f"hop{i}")
        ck.save(ck.run(current, ck.derive_pipeline(current, target)), out, target)
        files = _distopt_files(out)
        assert files and len(files) == len(os.listdir(os.path.join(out, "iter_0000001")))
        for d, state in files.items():
            if family == "mixtral":
                assert isinstance(state, list) and len(state) == 2
                parts = os.path.basename(d).split("_")[2:]  # mp_rank_TT[_PPP][_EEE]
                tp, ep = int(parts[0]), int(parts[-1]) if lay["ep"] > 1 else 0
                writer = tp % (lay.get("etp") or lay["tp"]) + (lay.get("etp") or lay["tp"]) * ep
                assert (state[0] is None) == (writer >= lay["tp"]), d
        got = _gathered_states(out)
        for which in STATES:
            assert got[which].keys() == want[which].keys()
            for n in want[which]:
                assert torch.equal(got[which][n], want[which][n]), (lay, which, n)
        current = ck.load(out, optimizer=True)


def assert_moe_resumes(hf: str, src: str, out: str, resumed: str) -> None:
    """megatron-core resumes ``out`` (a 2-layer, 4-expert Mixtral converted to TP2 PP2 EP2 expert-TP 1
    DP1) into ``resumed`` holding the TP1 PP1 EP2 source run's state and weights bit for bit."""
    F.resume_distopt_checkpoint(resumed, hf, out, tp=2, pp=2, dp=1, ep=2, etp=1, bucket_size=4096)
    source = _truth(src, 1, 1, ep=2, experts=4)
    loaded = _truth(resumed, 2, 2, ep=2, experts=4)
    assert any(".local_experts.3." in k for _, k in loaded)
    assert_same_training_state(source, 2, loaded, 1)


def test_moe_expert_optimizer_reshards(tmp_path):
    """Mixtral trained by megatron-core with EP=2 and DP=4 (so expert DP = 2): a dense and an expert
    optimizer, [dense, expert] files, None where the saving rank has no dense state.  Converted to
    TP=2 PP=2 EP=2 with expert TP 1 and DP=1, megatron-core resumes from it holding the same state;
    converted back, the files equal megatron-core's own.  (The source has TP=1: megatron-core on CPU
    runs MoE with TP > 1 without sequence parallelism here, and its TP replicas of the router and
    norms drift apart, so they would not be one state to carry.)"""
    hf = str(tmp_path / "hf")
    F.make_tiny_hf_mixtral(
        hf, hidden=72, layers=2, heads=4, kv_heads=2, ffn=100, experts=4, topk=2, vocab=256
    )
    src = str(tmp_path / "src")
    F.make_distopt_checkpoint(
        src, hf, tp=1, pp=1, dp=4, ep=2, bucket_size=4096, steps=2, bf16=True, init="hf"
    )
    out = str(tmp_path / "tp2pp2")
    # plain Megatron-LM args, no --hf-config: the family (mixtral) is inferred from the args
    assert (
        cli_main(
            [
                "convert",
                src,
                out,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--ep",
                "2",
                "--etp",
                "1",
                "--target-dp",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert_moe_resumes(hf, src, out, str(tmp_path / "resumed"))
    back = str(tmp_path / "back")
    assert (
        cli_main(
            [
                "convert",
                out,
                back,
                "--to",
                "mcore",
                "--ep",
                "2",
                "--target-dp",
                "4",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    want, got = _distopt_files(src), _distopt_files(back)
    assert want.keys() == got.keys() and len(want) == 2
    for d in want:
        assert [x is None for x in got[d]] == [x is None for x in want[d]], d
        for g, w in zip(got[d], want[d]):
            if w is None:
                continue
            ((key, wg),) = w[0].items()
            assert list(g[0]) == [key] and g[0][key]["numel_unpadded"] == wg["numel_unpadded"]
            for field in STATES:
                assert torch.equal(g[0][key][field], wg[field]), (d, field)


def test_layout_assumptions_can_be_corrected(trained):
    """Args that misstate the DDP bucket size stop the conversion with an error naming the options;
    giving the true values converts to the same state.  (The data-parallel size only moves bucket
    starts, which the coalesced file strips, so a wrong DP goes unnoticed and does no harm.)"""
    import shutil
    import subprocess
    import sys

    root, hf, src = trained
    wrong = str(root / "wrong_args")
    shutil.copytree(src, wrong)
    for stage in range(2):
        for rank in range(2):
            path = os.path.join(wrong, "iter_0000002", F.mp_dir_name(rank, stage, 2), "model_optim_rng.pt")
            blob = torch.load(path, weights_only=False)
            assert blob["args"].ddp_bucket_size == 4096
            blob["args"].ddp_bucket_size = 8192
            blob["args"].data_parallel_size = 3
            torch.save(blob, path)
    cmd = [
        sys.executable,
        "-m",
        "ckpt_ir",
        "convert",
        wrong,
        str(root / "x"),
        "--to",
        "mcore",
        "--hf-config",
        hf,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "--source-bucket-size" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(str(root / "x"))
    fixed = str(root / "fixed")
    assert (
        cli_main(
            [
                "convert",
                wrong,
                fixed,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--source-dp",
                "2",
                "--source-bucket-size",
                "4096",
                "--target-dp",
                "2",
                "--source-param-align",
                "64",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    want, got = _distopt_files(src), _distopt_files(fixed)
    for d in want:
        ((key, w),) = want[d][0].items()
        assert all(torch.equal(got[d][0][key][f], w[f]) for f in STATES), d
    assert (
        cli_main(
            [
                "convert",
                wrong,
                str(root / "y"),
                "--to",
                "mcore",
                "--source-dp",
                "2",
                "--source-bucket-size",
                "0",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 1
    )  # stage 0 really had several buckets


def test_inspect_lists_optimizer_state(trained, capsys):
    import json

    root, hf, src = trained
    assert cli_main(["inspect", src, "--hf-config", hf, "--optimizer"]) == 0
    out = capsys.readouterr().out
    assert "// optimizer state: param, exp_avg, exp_avg_sq" in out
    assert "exp_avg_sq:layers.3.mlp.down.weight" in out and "distrib_optim.pt" in out
    assert cli_main(["inspect", src, "--hf-config", hf, "--optimizer", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {k: [t["name"] for t in v] for k, v in doc["states"].items()} == {
        k: [t["name"] for t in doc["tensors"]] for k in STATES
    }


def test_rng_state_is_carried_on_the_same_rank_grid(trained):
    """A DP-only change keeps each rank's RNG state (numpy arrays and tensors written back); another
    TP/PP grid drops it, with a note to resume with --no-load-rng."""
    import numpy as np

    root, hf, src = trained
    same = str(root / "same_grid")
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
                "--pp",
                "2",
                "--target-dp",
                "1",
                "--hf-config",
                hf,
                "--quiet",
            ]
        )
        == 0
    )
    for stage in range(2):
        for rank in range(2):
            d = os.path.join("iter_0000002", F.mp_dir_name(rank, stage, 2), "model_optim_rng.pt")
            want = torch.load(os.path.join(src, d), weights_only=False)["rng_state"][0]
            got = torch.load(os.path.join(same, d), weights_only=False)["rng_state"][0]
            assert got["random_rng_state"] == want["random_rng_state"]
            assert all(np.array_equal(a, b) for a, b in zip(got["np_rng_state"], want["np_rng_state"]))
            assert torch.equal(got["torch_rng_state"], want["torch_rng_state"])
            assert all(
                torch.equal(got["rng_tracker_states"][k], v) for k, v in want["rng_tracker_states"].items()
            )
    other = str(root / "other_grid")
    assert cli_main(["convert", src, other, "--to", "mcore", "--tp", "1", "--hf-config", hf, "--quiet"]) == 0
    assert "rng_state" not in torch.load(
        os.path.join(other, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), weights_only=False
    )


def test_a_layer_mixing_mindspeed_and_megatron_core_mla_modules_is_refused_by_name():
    """Each key alone has a known place, together they have none: MindSpeed-LLM's fused MLA
    linear_qkv is not a module of megatron-core's MLASelfAttention, whose linear_kv_up_proj
    decides the layer's order.  The error names the key, not an IndexError."""
    from ckpt_ir.errors import VerifyError
    from ckpt_ir.ir import expr as E
    from ckpt_ir.megatron.distopt import flat_state

    keys = (
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_kv_up_proj.weight",
    )
    params = [(k, E.Load("rank.pt", k, (4, 2), "F32", 0, "torch")) for k in keys]
    for one in params:
        assert flat_state([one], None, 1).shape == (8,)  # alone, each has its place
    with pytest.raises(VerifyError) as err:
        flat_state(params, None, 1)
    msg = str(err.value)
    assert f"order for {keys[0]} (in a layer with megatron-core's MLA module {keys[1]})" in msg
    assert "\n" not in msg and msg.endswith("convert with optimizer=False")
