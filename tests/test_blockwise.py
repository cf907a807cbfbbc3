"""Computed tensors (casts, LoRA merges, vocabulary padding) are evaluated and written in row
blocks of bounded memory: the bytes are those of whole-tensor evaluation, and a computed tensor
larger than --max-memory is written within it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.backends.execute import Progress, write_files
from ckpt_ir.backends.plan import row_blocks, row_ranges
from ckpt_ir.ir import expr as E
from tests.conftest import files_of
from tests.test_lora import make_peft_adapter
from tests.test_streaming import run_measured

TINY_BLOCK = 2048  # bytes of working memory per block: every computed tensor of the tiny models splits


def write(src: str, dst: str, block_bytes: int, lora: str | None = None, **target) -> list[E.Expr]:
    """Convert in-process with computed tensors in row blocks of ``block_bytes``; returns the
    expressions that were split into several blocks."""
    ckpt = ck.load(src)
    if lora:
        ckpt = ck.attach_lora(ckpt, lora)
    tgt = ck.Target(**target)
    plan = ck.plan(ck.run(ckpt, ck.derive_pipeline(ckpt, tgt)), tgt)
    write_files(list(plan.files), dst, Progress(0, 0, False), 1, block_bytes)
    return [e for f in plan.files for _, e in f.tensors if len(row_blocks(e, block_bytes)) > 1]


def computes(e: E.Expr) -> bool:
    return any(isinstance(n, (E.Cast, E.Add, E.PadRows)) for n in E.walk(e))


CASES = {
    "cast bf16 -> fp32": (dict(family="llama", dtype=torch.bfloat16), dict(to="hf", dtype="fp32"), None),
    "cast fp32 -> bf16": (dict(family="qwen2"), dict(to="hf", dtype="bf16"), None),
    "lora merge fp32": (dict(family="llama"), dict(to="hf"), "lora"),
    "lora merge bf16": (dict(family="qwen2", dtype=torch.bfloat16), dict(to="hf"), "lora"),
    "lora merge into mcore tp2": (dict(family="llama"), dict(to="mcore", tp=2), "lora"),
    "pad vocab tp2 fp32": (
        dict(family="llama", dtype=torch.bfloat16, vocab=130),
        dict(to="mcore", tp=2, dtype="fp32", vocab_divisible_by=128),
        None,
    ),
    "pad vocab tp2 pp2 (a shard of padding only)": (
        dict(family="qwen2", vocab=130),
        dict(to="mcore", tp=2, pp=2, vocab_divisible_by=256),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_row_blocks_write_the_bytes_of_whole_tensor_evaluation(hf_cache, tmp_path, case):
    model, target, lora = CASES[case]
    src = hf_cache(**model)
    adapter = None
    if lora:
        adapter = str(tmp_path / "adapter")
        make_peft_adapter(src, adapter)
    whole, blocked = str(tmp_path / "whole"), str(tmp_path / "blocked")
    assert not write(src, whole, 1 << 40, adapter, **target)  # one block per tensor: whole-tensor evaluation
    split = write(src, blocked, TINY_BLOCK, adapter, **target)
    assert any(computes(e) for e in split), "no computed tensor was split: the test would prove nothing"
    a, b = files_of(whole), files_of(blocked)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_blocked_padding_and_cast_match_torch(hf_cache, tmp_path):
    """An oracle written from Megatron's rule: rank r of TP2 holds rows [r*P/2, (r+1)*P/2) of the
    fp32 embedding padded to P rows with copies of the last row."""
    src = hf_cache("llama", dtype=torch.bfloat16, vocab=130)
    dst = str(tmp_path / "out")
    write(src, dst, TINY_BLOCK, to="mcore", tp=2, dtype="fp32", vocab_divisible_by=128)
    w = load_file(os.path.join(src, "model.safetensors"))["model.embed_tokens.weight"].float()
    padded = torch.cat([w, w[-1:].expand(256 - 130, -1)])
    for rank in range(2):
        sd = torch.load(
            os.path.join(dst, f"iter_0000001/mp_rank_0{rank}/model_optim_rng.pt"), weights_only=False
        )
        got = sd["model"]["embedding.word_embeddings.weight"]
        assert got.dtype == torch.float32 and torch.equal(got, padded[rank * 128 : (rank + 1) * 128])


@pytest.mark.parametrize("rows", [64, 130, 1027, 5003])
def test_matmul_row_blocks_are_bit_identical_to_the_whole_product(tmp_path, rows):
    """The LoRA product is blocked by rows of B; each block's rows must get the same sums as in
    the whole product (BLAS computes a lone block of 1-3 rows with another kernel: row_ranges
    aligns the blocks and gives the remainder to the last one)."""
    torch.manual_seed(rows)
    for cols, r in ((333, 16), (4096, 8), (64, 64)):
        b, a = torch.randn(rows, r), torch.randn(r, cols)
        path = tmp_path / f"{cols}-{r}.bin"
        path.write_bytes(b.numpy().tobytes() + a.numpy().tobytes())
        e = E.Matmul(
            E.Load(str(path), "b", (rows, r), "F32", 0), E.Load(str(path), "a", (r, cols), "F32", b.nbytes)
        )
        with E.Reader() as reader:
            whole = E.evaluate(e, reader)
            assert torch.equal(whole, b @ a)
            for block_bytes in (2048, 300 * cols * 4):
                ranges = row_ranges(e, block_bytes)
                assert ranges[0][0] == 0 and ranges[-1][1] == rows
                assert len(ranges) > 1 or rows < 128 or block_bytes > 2048
                assert all(lo % 64 == 0 and hi - lo >= min(rows, 64) for lo, hi in ranges)
                for lo, hi in ranges:
                    assert torch.equal(E.evaluate(E.simplify(E.Slice(e, 0, lo, hi)), reader), whole[lo:hi]), (
                        lo,
                        hi,
                    )


@pytest.mark.parametrize("src", ["F32", "BF16", "F16"])
def test_numpy_casts_equal_torch_bit_for_bit(src):
    """Casts run in numpy (no torch import); every 16-bit value and random fp32 bit patterns
    (plus infinities, NaN payloads, subnormals, rounding ties, overflow) cast as torch casts them."""
    from ckpt_ir.ir import casts
    from ckpt_ir.ir.dtypes import to_torch

    if src == "F32":
        rng = np.random.default_rng(0)
        special = [
            0,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7F800001,
            0xFFC00123,
            0x7FA00000,
            1,
            0x007FFFFF,
            0x33800000,
            0x477FF000,
            0x477FEFFF,
            0x477FF001,
            0x3F808000,
            0x3F818000,
            0x7F7FFFFF,
            0x387FFFFF,
        ]
        raw = np.concatenate(
            [rng.integers(0, 2**32, 1 << 21, dtype=np.uint64).astype(np.uint32), np.array(special, np.uint32)]
        ).view(np.int32)
    else:
        raw = np.arange(-(2**15), 2**15, dtype=np.int16)
    for dst in casts.FLOATS:
        if dst == src:
            continue
        x = E.to_torch_tensor(raw.copy(), src)
        y = x.to(to_torch(dst))
        want = E.from_torch_tensor(y, dst)
        out = np.empty(raw.shape, E.raw_dtype(dst))
        overflow = casts.cast(raw, src, dst, out)
        assert np.array_equal(out, want), (src, dst, int((out != want).sum()))
        # the overflow it reports: the finite values torch's cast made infinite, and their largest |x|
        inf = torch.isfinite(x) & torch.isinf(y)
        assert overflow == (int(inf.sum()), float(x[inf].abs().max()) if inf.any() else 0.0), (src, dst)
        narrowing = {("F32", "F16"), ("F32", "BF16"), ("BF16", "F16")}
        assert (overflow[0] > 0) == ((src, dst) in narrowing), (src, dst)


@pytest.mark.parametrize("path", ["torch", "device"])
def test_torch_casts_count_overflow(tmp_path, monkeypatch, path):
    """Casts numpy does not run (from fp64 here; on --device all of them) count their overflow
    the same way: finite values that became infinite, the largest |x|; an inf of the source is none."""
    from ckpt_ir.io.safetensors import read_header

    x = np.array([[1.0, 1e6, -7e4], [np.inf, 65519.0, 3e39]])
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    load = read_header(str(tmp_path / "x.safetensors"))[0]["x"]
    if path == "device":  # the --device code path, run on the CPU
        monkeypatch.setattr(E, "MATH_DEVICE", torch.device("cpu"))
    for dst, want in (
        ("F16", E.Overflow(3, 3e39)),
        ("F32", E.Overflow(1, 3e39)),
        ("BF16", E.Overflow(1, 3e39)),
    ):
        with E.Reader() as reader:
            out = E.evaluate(E.Cast(load, dst), reader)
        assert torch.equal(out, torch.from_numpy(x).to(out.dtype)) and reader.overflow == want, dst


def wide_model(path: str, vocab: int, hidden: int = 512) -> None:
    """A 1-layer llama with a wide fp32 vocabulary (the embedding dominates)."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    ffn, shapes = (
        2 * hidden,
        {
            "model.embed_tokens.weight": (vocab, hidden),
            "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
        },
    )
    p = "model.layers.0."
    shapes.update(
        {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        }
    )
    save_file(
        {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    json.dump(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "num_hidden_layers": 1,
            "vocab_size": vocab,
            "rms_norm_eps": 1e-5,
            "dtype": "float32",
            "tie_word_embeddings": False,
        },
        open(os.path.join(path, "config.json"), "w"),
    )


def test_computed_tensor_larger_than_the_budget_is_written_within_it(tmp_path):
    """A 64 MB bf16 embedding cast and padded from a 128 MB fp32 one, under --max-memory 32MB:
    peak RSS is that of a model with a 1000-row vocabulary, plus less than the budget."""
    budget = 32 << 20
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    wide_model(small, 1000)
    wide_model(big, 65000)
    rss = {}
    for name, src in (("small", small), ("big", big)):
        dst = str(tmp_path / f"out-{name}")
        args = (
            "convert",
            src,
            dst,
            "--to",
            "mcore",
            "--dtype",
            "bf16",
            "--make-vocab-size-divisible-by",
            "128",
            "--max-memory",
            str(budget),
            "--workers",
            "1",
            "--quiet",
        )
        r, rss[name] = run_measured(*args)
        assert r.returncode == 0, r.stderr
    emb = torch.load(
        os.path.join(tmp_path / "out-big", "iter_0000001/mp_rank_00/model_optim_rng.pt"),
        weights_only=False,
        mmap=True,
    )["model"]["embedding.word_embeddings.weight"]
    assert emb.dtype == torch.bfloat16 and emb.shape == (65024, 512) and emb.nbytes > 1.9 * budget
    w = load_file(os.path.join(big, "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb[:65000], w.to(torch.bfloat16)) and torch.equal(emb[-1], emb[64999])
    assert rss["big"] < rss["small"] + budget, rss


def test_dry_run_reports_the_bound_for_computed_tensors(tmp_path):
    src = str(tmp_path / "m")
    wide_model(src, 65000)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            src,
            str(tmp_path / "o"),
            "--to",
            "mcore",
            "--dtype",
            "bf16",
            "--max-memory",
            "32MB",
            "--workers",
            "1",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = out.strip().splitlines()[-1]
    peak = int(line.split("estimated peak memory ")[1].split()[0])
    assert "row blocks of 16000000 bytes" in line and 0 < peak <= 32_000_000, line
