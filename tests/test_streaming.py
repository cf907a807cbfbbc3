"""Streaming execution: parallel writers and torchrun produce byte-identical output, memory stays
bounded by the largest tensor rather than the model, and the budget is enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from tests.conftest import files_of

LAYERS, HIDDEN, FFN, VOCAB = 48, 256, 1024, 1000


def synthetic_llama(path: str, layers: int = LAYERS) -> int:
    """A llama-shaped fp32 checkpoint of random values in several shards; returns its size."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
                p + "self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (FFN, HIDDEN),
                p + "mlp.up_proj.weight": (FFN, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, FFN),
            }
        )
    names = list(shapes)
    weight_map, total = {}, 0
    for k in range(4):
        part = names[k::4]
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        save_file(
            {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in part},
            os.path.join(path, fname),
            metadata={"format": "pt"},
        )
        weight_map.update({n: fname for n in part})
        total += os.path.getsize(os.path.join(path, fname))
    json.dump(
        {"weight_map": weight_map, "metadata": {"total_size": total}},
        open(os.path.join(path, "model.safetensors.index.json"), "w"),
    )
    json.dump(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "num_hidden_layers": layers,
            "vocab_size": VOCAB,
            "rms_norm_eps": 1e-5,
            "dtype": "float32",
            "tie_word_embeddings": False,
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return total


def run_measured(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run ckpt-ir in a fresh process started from a small parent; returns its peak RSS in bytes."""
    code = (
        "import os,subprocess,sys,json;"
        "p=subprocess.Popen(sys.argv[1:],stderr=subprocess.PIPE);"
        "_,st,ru=os.wait4(p.pid,0);err=p.stderr.read().decode();"
        "print(json.dumps([os.waitstatus_to_exitcode(st),ru.ru_maxrss*1024,err]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "ckpt_ir", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    rc, rss, err = json.loads(out.stdout)
    return subprocess.CompletedProcess(args, rc, "", err), rss


def test_workers_give_byte_identical_output(hf_cache, tmp_path):
    src = hf_cache("qwen2")
    outs = []
    for w in ("1", "2", "3"):
        dst = str(tmp_path / f"w{w}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ckpt_ir",
                "convert",
                src,
                dst,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--workers",
                w,
                "--quiet",
            ],
            check=True,
        )
        outs.append(files_of(dst))
    assert (
        outs[0] == outs[1] == outs[2] and len([n for n in outs[0] if not n.startswith("hf/")]) == 5
    )  # + HF side files


def test_one_large_hf_file_is_written_by_several_workers_identically(tmp_path):
    """Fewer output files than workers: the safetensors file is split into parts written at their
    planned offsets in parallel; the bytes are the same as one writer's."""
    src, mc = str(tmp_path / "src"), str(tmp_path / "mc")
    synthetic_llama(src, layers=4)
    subprocess.run(
        [sys.executable, "-m", "ckpt_ir", "convert", src, mc, "--to", "mcore", "--tp", "2", "--quiet"],
        check=True,
    )
    outs = []
    for w in ("1", "2"):
        dst = str(tmp_path / f"hf{w}")
        subprocess.run(
            [sys.executable, "-m", "ckpt_ir", "convert", mc, dst, "--to", "hf", "--workers", w, "--quiet"],
            check=True,
        )
        outs.append(files_of(dst))
    assert outs[0] == outs[1] and "model.safetensors" in outs[0]
    src_files = files_of(src)
    assert len(outs[0]["model.safetensors"]) > 0.9 * sum(
        len(v) for k, v in src_files.items() if k.endswith(".safetensors")
    )


def test_torchrun_output_is_byte_identical_to_single_process(hf_cache, tmp_path):
    src = hf_cache("llama")
    single, dist = str(tmp_path / "single"), str(tmp_path / "dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            src,
            single,
            "--to",
            "mcore",
            "--tp",
            "2",
            "--pp",
            "2",
            "--quiet",
        ],
        check=True,
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "ckpt_ir",
            "convert",
            src,
            dist,
            "--to",
            "mcore",
            "--tp",
            "2",
            "--pp",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert files_of(single) == files_of(dist)
    assert not [n for n in os.listdir(tmp_path) if "ckpt-ir-tmp" in n]


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """A model ~10x the budget converts under it; peak RSS is about that of a model 1/8 the size."""
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    synthetic_llama(small, layers=6)
    size = synthetic_llama(big, layers=LAYERS)
    budget = 16 * 1024**2
    rss = {}
    for name, src in (("small", small), ("big", big)):
        r, rss[name] = run_measured(
            "convert",
            src,
            str(tmp_path / f"out-{name}"),
            "--to",
            "mcore",
            "--tp",
            "2",
            "--pp",
            "2",
            "--max-memory",
            str(budget),
            "--workers",
            "1",
            "--quiet",
        )
        assert r.returncode == 0, r.stderr
    assert size > 150 * 1024**2
    # the big run holds no more than the small one plus a few tensors' worth of slack
    assert rss["big"] < rss["small"] + budget, rss
    assert rss["big"] < size / 2, rss


def test_memory_budget_below_one_tensor_is_refused_before_writing(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = tmp_path / "o"
    r = subprocess.run(
        [sys.executable, "-m", "ckpt_ir", "convert", src, str(dst), "--to", "hf", "--max-memory", "1KB"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "raise --max-memory" in r.stderr and "tensor " in r.stderr
    assert not dst.exists()


def test_writeback_is_started_as_bytes_are_written(tmp_path, monkeypatch):
    """The disk is asked to write each run of WRITEBACK_BYTES as soon as it is written (so the
    final fsync does not wait for a whole model's flush): consecutive, non-overlapping ranges of
    every output file, zip record headers in between included, up to its last partial run."""
    from ckpt_ir import api
    from ckpt_ir.io import atomic

    src = str(tmp_path / "src")
    synthetic_llama(src, layers=8)
    runs: dict[str, list[tuple[int, int]]] = {}

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        runs.setdefault(os.path.join(*path.split(os.sep)[-2:]), []).append((offset, nbytes))
        return 0

    threshold = 1 << 20
    monkeypatch.setattr(atomic, "_SYNC_FILE_RANGE", record)
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", threshold)
    dst = tmp_path / "mc"
    # bf16: computed tensors, written in row blocks; 1 MiB of fp32 rows per cast block at most
    api.convert(src, str(dst), api.Target(to="mcore", tp=2, dtype="bf16"), workers=1, max_memory=4 << 20)
    rank_files = sorted(dst.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    assert len(rank_files) == 2 and len(runs) == 2
    for f in rank_files:
        got = runs[os.path.join(f.parent.name, f.name)]
        assert got[0][0] < 1 << 16 and all(n >= threshold for _, n in got)  # from the first record on
        assert all(a + n <= b for (a, n), (b, _) in zip(got, got[1:]))  # in order, never twice
        largest_record = max(HIDDEN * VOCAB, HIDDEN * FFN) * 2 // 2  # bf16, split over TP2
        assert got[-1][0] + got[-1][1] >= f.stat().st_size - threshold - largest_record - (1 << 16)
