"""The LoRA merge without torch (ir/sgemm.py: MKL's sgemm_ from torch's own library, the rest in
numpy) must give torch's bits: the product against ``torch.mm``, the whole merge against the
torch evaluator on random and on special values, and whole conversions byte for byte against
conversions forced onto torch (CKPT_IR_MATMUL=torch)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from ckpt_ir.ir import expr as E
from ckpt_ir.ir import sgemm
from tests.conftest import build_hf, files_of
from tests.test_blockwise import TINY_BLOCK, write
from tests.test_lora_variants import VARIANTS, make_adapter
from tests.test_moe import build_moe

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@contextlib.contextmanager
def torch_evaluator(monkeypatch):
    """Within the block: the merge computed by torch, as before the numpy path existed."""
    monkeypatch.setenv("CKPT_IR_MATMUL", "torch")
    sgemm.library.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("CKPT_IR_MATMUL")
        sgemm.library.cache_clear()


def test_the_library_is_found_where_torch_ships_mkl():
    """x86-64 Linux wheels of torch link MKL into libtorch_cpu; there the merge must not need
    torch (else every test below would compare torch with itself)."""
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert sgemm.available(), "torch's libtorch_cpu has no MKL sgemm_: the merge would import torch"
    else:  # other builds use other BLAS libraries: the merge falls back to torch
        assert not sgemm.available()


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_equals_torch_mm_bit_for_bit(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for m in (2, 3, 64, 127, 130):  # products of one row or column are left to torch (numpy_merge)
            for k in (1, 2, 8, 16, 64, 256):
                for n in (2, 7, 333, 2048):
                    b, a = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
                    out = np.empty((m, n), np.float32)
                    sgemm.matmul(b.numpy(), a.numpy(), out)
                    want = torch.mm(b, a).numpy()
                    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (m, k, n)
    finally:
        torch.set_num_threads(before)


def special_values(shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random values with zeros, signed infinities, NaNs, subnormals, values at the dtype's
    largest finite number and rounding ties sprinkled in."""
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (6, max(1, flat.numel() // 50)), generator=g)
    flat[picks[0]] = 0.0
    flat[picks[1]] = float("inf") * torch.sign(torch.randn(picks.shape[1], generator=g))
    flat[picks[2]] = float("nan")
    flat[picks[3]] = 1e-40
    flat[picks[4]] = torch.finfo(dtype).max
    flat[picks[5]] = 1.0 + 2.0**-8  # halfway between two bf16 values
    return x.to(dtype)


def merge_expr(tmp_path, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, factor: float | None) -> E.Expr:
    path = tmp_path / "tensors.bin"
    data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (w, b, a))
    path.write_bytes(data)
    names = {v: k for k, v in TORCH_DTYPES.items()}
    loads, at = [], 0
    for name, t in (("w", w), ("b", b), ("a", a)):
        loads.append(E.Load(str(path), name, tuple(t.shape), names[t.dtype], at))
        at += t.numel() * t.element_size()
    product = E.Matmul(loads[1], loads[2])
    return E.Add(loads[0], product if factor is None else E.Scale(product, factor))


@pytest.mark.parametrize("w_dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("ab_dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("factor", [None, 2.0, 0.75, 8 / 3**0.5])
def test_merge_equals_the_torch_evaluator_on_special_values(tmp_path, monkeypatch, w_dtype, ab_dtype, factor):
    g = torch.Generator().manual_seed(zlib.crc32(repr((w_dtype, ab_dtype, factor)).encode()))
    rows, cols, r = 197, 70, 5  # rows: three tiles, the last with a remainder
    w = special_values((rows, cols), TORCH_DTYPES[w_dtype], g)
    # infinities in the factors too: a product's inf plus the weight's -inf makes a NaN of the
    # CPU's own (not the input's payload), which each evaluator must round the same way
    b, a = (special_values(shape, TORCH_DTYPES[ab_dtype], g) for shape in ((rows, r), (r, cols)))
    e = merge_expr(tmp_path, w, b, a, factor)
    assert E.numpy_merge(e) is not None and not E.needs_torch(e)
    with E.Reader() as reader:
        got = E.evaluate_raw(e, reader).copy()
    with torch_evaluator(monkeypatch), E.Reader() as reader:
        assert E.numpy_merge(e) is None and E.needs_torch(e)
        want = E.evaluate_raw(e, reader)
    assert np.array_equal(got, want), int((got != want).sum())


def test_products_of_one_row_or_column_are_left_to_torch(tmp_path):
    """torch takes another BLAS call (a dot product, another order of the sum) for a 1 x 1
    result; the numpy path takes no tensor with a single row or column."""
    for rows, cols in ((1, 1), (1, 64), (64, 1)):
        w, b, a = torch.randn(rows, cols), torch.randn(rows, 4), torch.randn(4, cols)
        assert E.numpy_merge(merge_expr(tmp_path, w, b, a, 2.0)) is None
    assert (
        E.numpy_merge(merge_expr(tmp_path, *(torch.randn(s) for s in ((2, 2), (2, 4), (4, 2))), 2.0))
        is not None
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "dense": build_hf(str(root / "llama"), "llama", layers=2),
        "bf16": build_hf(str(root / "qwen2"), "qwen2", layers=2, dtype=torch.bfloat16),
        "moe": build_moe(str(root / "mixtral"), "mixtral", layers=2),
    }


# case -> (adapter variant, base model, target)
CONVERSIONS = {
    **{f"peft {v} -> hf": (v, "moe" if v == "moe" else "dense", dict(to="hf")) for v in VARIANTS},
    "peft rslora -> mcore tp2": ("rslora", "dense", dict(to="mcore", tp=2)),
    "peft patterns bf16 -> hf": ("patterns", "bf16", dict(to="hf")),
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
@pytest.mark.parametrize("block", [TINY_BLOCK, 1 << 40])
def test_conversions_are_byte_identical_to_the_torch_evaluator(tmp_path, bases, monkeypatch, case, block):
    """The suite's LoRA variants (rsLoRA, rank/alpha patterns, DoRA, modules_to_save, fused
    experts), whole and in tiny row blocks: every output file equals the one computed by torch."""
    variant, model, target = CONVERSIONS[case]
    base = bases[model]
    adapter = str(tmp_path / "adapter")
    make_adapter(base, adapter, **VARIANTS[variant])
    fast, slow = str(tmp_path / "numpy"), str(tmp_path / "torch")
    write(base, fast, block, adapter, **target)
    with torch_evaluator(monkeypatch):
        write(base, slow, block, adapter, **target)
    a, b = files_of(fast), files_of(slow)
    assert a.keys() == b.keys() and any(k.endswith((".safetensors", ".pt")) for k in a)
    for name in a:
        assert a[name] == b[name], name


def test_a_lora_merge_runs_without_importing_torch(tmp_path, bases):
    """What the numpy path is for: no torch import (3 CPU-seconds, 200 MB) in the command."""
    adapter = str(tmp_path / "adapter")
    make_adapter(bases["dense"], adapter, **VARIANTS["rslora"])
    script = (
        "import sys\n"
        "from ckpt_ir.commands.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    args = [bases["dense"], str(tmp_path / "out"), "--to", "hf", "--lora-load", adapter, "--quiet"]
    r = subprocess.run(
        [sys.executable, "-c", script, "convert", *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == str(not sgemm.available()), r.stderr
    assert os.path.exists(os.path.join(tmp_path, "out", "model.safetensors"))
