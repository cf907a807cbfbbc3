"""Block-quantized HF checkpoints: FP8 (block-scaled, fp32 or ue8m0 scales) and MXFP4 weights are
read as lazy dequantize expressions and written as ordinary bf16/fp32 checkpoints.  The oracle is
transformers' own dequantization (``Fp8Dequantize``, ``convert_moe_packed_tensors``) and its
``FineGrainedFP8Config(dequantize=True)`` loader."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from ckpt_ir.ir import expr as E
from ckpt_ir.quant import dequantize_tensors

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _skip_fp8(key: str, t: torch.Tensor) -> bool:
    """What the released FP8 checkpoints keep unquantized: embeddings, norms, lm_head, router gates."""
    return (
        t.ndim != 2
        or "embed" in key
        or "norm" in key
        or key.startswith("lm_head")
        or key.endswith("mlp.gate.weight")
    )


def fp8_quantize(w: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-block absmax quantization written from the format facts (edge blocks may be partial):
    only an input for the readers; the oracle is the dequantization."""
    rows, cols = w.shape
    b0, b1 = block
    pr, pc = -rows % b0, -cols % b1
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    tiles = padded.reshape((rows + pr) // b0, b0, (cols + pc) // b1, b1)
    inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    if ue8m0:
        inv = torch.exp2(torch.ceil(torch.log2(inv)))
    q = (tiles / inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(rows + pr, cols + pc)[:rows, :cols].contiguous()
    return q, inv.to(torch.float8_e8m0fnu) if ue8m0 else inv


def make_fp8(src: str, dst: str, block: tuple[int, int] = (128, 128), ue8m0: bool = False) -> str:
    """An FP8 release of the HF checkpoint ``src``: quantized linears + weight_scale_inv + config."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if not name.endswith(".safetensors"):
            continue
        f = os.path.join(dst, name)
        sd = load_file(f)
        out = {}
        for k, t in sd.items():
            if _skip_fp8(k, t):
                out[k] = t
                continue
            out[k], out[k + "_scale_inv"] = fp8_quantize(t, block, ue8m0)
        save_file(out, f, metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
        **({"scale_fmt": "ue8m0"} if ue8m0 else {}),
        "modules_to_not_convert": ["lm_head"],
    }
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    return dst


def transformers_dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """transformers' Fp8Dequantize on the weight padded to whole blocks (it refuses partial edge
    blocks; padding with zeros changes no kept element), cropped back."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    rows, cols = q.shape
    pr, pc = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(q.view(torch.uint8), (0, pc, 0, pr)).view(torch.float8_e4m3fn)
    out = Fp8Dequantize(None)._dequantize_one(padded, s, output_dtype=dtype)
    return out[:rows, :cols]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def convert(src: str, dst: str, target: ck.Target) -> ck.Checkpoint:
    c = ck.load(src)
    out = ck.run(c, ck.derive_pipeline(c, target))
    ck.save(out, dst, target)
    return out


def check_against_transformers(fp8_dir: str, out_dir: str, dtype=torch.bfloat16) -> int:
    """Every tensor of ``out_dir`` equals the FP8 source dequantized by transformers (bit for bit),
    or the source tensor itself where it was not quantized.  Returns how many were dequantized."""
    cfg = json.load(open(os.path.join(fp8_dir, "config.json")))
    block = tuple(cfg["quantization_config"]["weight_block_size"])
    src: dict[str, torch.Tensor] = {}
    for n in os.listdir(fp8_dir):
        if n.endswith(".safetensors"):
            src.update(load_file(os.path.join(fp8_dir, n)))
    got: dict[str, torch.Tensor] = {}
    for n in os.listdir(out_dir):
        if n.endswith(".safetensors"):
            got.update(load_file(os.path.join(out_dir, n)))
    assert not any(k.endswith("_scale_inv") for k in got)
    want_keys = {k for k in src if not k.endswith("_scale_inv")}
    assert set(got) == want_keys
    n = 0
    for k, t in got.items():
        if k + "_scale_inv" in src:
            want = transformers_dequantize(src[k], src[k + "_scale_inv"], block, dtype)
            n += 1
        else:
            want = src[k].to(dtype)
        assert t.dtype == want.dtype and t.shape == want.shape, k
        assert torch.equal(bits(t), bits(want)), k
    out_cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert "quantization_config" not in out_cfg
    return n


def transformers_load(path: str, fp8: bool = False) -> dict[str, torch.Tensor]:
    """The state dict transformers loads (bf16); an FP8 release with FineGrainedFP8Config(dequantize=True).
    Comparing two loads compares checkpoints through the same loader conversions (fused experts,
    DeepSeek's rope permutations)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    kw = {"quantization_config": FineGrainedFP8Config(dequantize=True)} if fp8 else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).state_dict()


def assert_same_load(out_dir: str, fp8_dir: str) -> None:
    got, want = transformers_load(out_dir), transformers_load(fp8_dir, fp8=True)
    assert set(got) == set(want)
    for k, t in got.items():
        assert torch.equal(bits(t), bits(want[k])), k


def read_all(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n in sorted(os.listdir(path)):
        if n.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, n)))
    return out


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    from tests.conftest import build_hf

    return build_hf(str(tmp_path_factory.mktemp("q") / "llama"), "llama", layers=2, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def deepseek_bf16(tmp_path_factory):
    from tests.test_deepseek import build_deepseek

    src = build_deepseek(str(tmp_path_factory.mktemp("q") / "ds"), mtp=False)
    out = str(tmp_path_factory.mktemp("q") / "ds-bf16")
    # every tensor bf16: a plain cast (--dtype would keep the router in fp32, as transformers loads it)
    ck.save(ck.run(ck.load(src), "cast{dtype=bf16}"), out, ck.Target(to="hf", dtype="bf16"))
    return out


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("model, block", [("llama_bf16", (32, 16)), ("deepseek_bf16", (4, 4))])
def test_fp8_equals_transformers_dequantizing_loader(model, block, ue8m0, request, tmp_path):
    """Dense and MoE, fp32 and ue8m0 scales: the bf16 output is what transformers loads from the
    FP8 release with FineGrainedFP8Config(dequantize=True), bit for bit.  The blocks divide every
    weight: transformers' loader derives the block from the scale grid, so it spreads partial edge
    blocks evenly (wrong for them; test_fp8_partial_edge_blocks covers those)."""
    fp8 = make_fp8(request.getfixturevalue(model), str(tmp_path / "fp8"), block=block, ue8m0=ue8m0)
    pipe = ck.derive_pipeline(ck.load(fp8), ck.Target(to="hf"))
    assert str(pipe).startswith("dequantize")
    convert(fp8, str(tmp_path / "out"), ck.Target(to="hf"))
    assert check_against_transformers(fp8, str(tmp_path / "out")) > 0
    assert_same_load(str(tmp_path / "out"), fp8)


@pytest.mark.parametrize("block", [(48, 40), (128, 128), (7, 96)])
def test_fp8_partial_edge_blocks(llama_bf16, block, tmp_path):
    """Blocks that do not divide the weights (the last row/column blocks are partial) and blocks
    larger than the weights; checked against Fp8Dequantize on the zero-padded weight."""
    fp8 = make_fp8(llama_bf16, str(tmp_path / "fp8"), block=block)
    convert(fp8, str(tmp_path / "out"), ck.Target(to="hf"))
    assert check_against_transformers(fp8, str(tmp_path / "out")) == 14


def test_fp8_to_fp32(llama_bf16, tmp_path):
    fp8 = make_fp8(llama_bf16, str(tmp_path / "fp8"), block=(32, 32))
    convert(fp8, str(tmp_path / "out"), ck.Target(to="hf", dtype="fp32"))
    assert check_against_transformers(fp8, str(tmp_path / "out"), dtype=torch.float32) == 14
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "float32"


def test_fp8_to_megatron_and_back_is_the_dequantized_model(deepseek_bf16, tmp_path):
    """FP8 HF -> Megatron TP2 x EP2 -> HF gives the dequantized bf16 weights bit-exact; the rank
    files hold ordinary bf16 weights."""
    fp8 = make_fp8(deepseek_bf16, str(tmp_path / "fp8"), block=(4, 4), ue8m0=True)
    mc = str(tmp_path / "mcore")
    convert(fp8, mc, ck.Target(to="mcore", tp=2, ep=2))
    ranks = [os.path.join(r, f) for r, _, fs in os.walk(mc) for f in fs if f == "model_optim_rng.pt"]
    assert len(ranks) == 4
    sd = torch.load(ranks[0], weights_only=False)["model"]
    assert {v.dtype for v in sd.values() if isinstance(v, torch.Tensor)} == {torch.bfloat16}
    convert(mc, str(tmp_path / "back"), ck.Target(to="hf"))
    assert check_against_transformers(fp8, str(tmp_path / "back")) > 0
    assert_same_load(str(tmp_path / "back"), fp8)


def test_row_blocks_of_a_dequantized_weight(tmp_path):
    """Any row range of a dequantize expression simplifies to reads of whole scale blocks and
    evaluates to the same values as the whole tensor (the writers' row-block evaluation)."""
    w = torch.randn(150, 70)
    q, s = fp8_quantize(w, (32, 16), ue8m0=False)
    f = str(tmp_path / "m.safetensors")
    save_file({"x.weight": q, "x.weight_scale_inv": s}, f)
    from ckpt_ir.io.safetensors import read_header

    raw = read_header(f)[0]
    deq = dequantize_tensors(
        raw, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 16]}}, "cfg"
    )
    e = E.Cast(deq["x.weight"], "BF16")
    with E.Reader() as r:
        whole = E.evaluate(E.simplify(e), r)
        assert torch.equal(bits(whole), bits(transformers_dequantize(q, s, (32, 16), torch.bfloat16)))
        for a, b in [(0, 1), (5, 37), (31, 33), (64, 96), (140, 150), (0, 150)]:
            part = E.simplify(E.Slice(e, 0, a, b))
            lds = E.loads(part)
            assert max(ld.shape[0] for ld in lds if ld.key == "x.weight") <= b - a + 2 * 32
            assert torch.equal(bits(E.evaluate(part, r)), bits(whole[a:b])), (a, b)


def _write_fp8(tmp_path, tensors: dict[str, torch.Tensor]) -> str:
    from tests.conftest import build_hf

    d = build_hf(str(tmp_path / "m"), "llama", layers=1, dtype=torch.bfloat16)
    fp8 = make_fp8(d, str(tmp_path / "fp8"), block=(32, 32))
    f = os.path.join(fp8, "model.safetensors")
    sd = load_file(f)
    sd.update(tensors)
    for k in [k for k, v in tensors.items() if v is None]:
        del sd[k]
    save_file({k: v for k, v in sd.items() if v is not None}, f)
    return fp8


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"model.layers.0.mlp.up_proj.weight_scale_inv": None},
            "has no model.layers.0.mlp.up_proj.weight_scale_inv",
        ),
        (
            {"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(3, 2)},
            "scale tensor model.layers.0.mlp.up_proj.weight_scale_inv does not fit",
        ),
        (
            {"model.layers.0.mlp.up_proj.weight": None},
            "scale tensor model.layers.0.mlp.up_proj.weight_scale_inv has no weight",
        ),
    ],
)
def test_bad_scales_are_one_line_errors(tmp_path, change, message):
    fp8 = _write_fp8(tmp_path, change)
    with pytest.raises(CkptIrError) as err:
        ck.load(fp8)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mxfp4_equals_transformers_conversion(tmp_path):
    """gpt-oss stores experts as MXFP4 ``*_blocks`` [experts, out, groups, 16] and e8m0
    ``*_scales`` [experts, out, groups]; the dequantized [experts, in, out] bf16 tensor equals
    transformers' convert_moe_packed_tensors, whole and by row blocks."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 40, 4), dtype=torch.uint8, generator=g)
    f = str(tmp_path / "m.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    save_file({name + "_blocks": blocks, name + "_scales": scales, "other": torch.ones(2)}, f)
    from ckpt_ir.io.safetensors import read_header

    lifted = dequantize_tensors(read_header(f)[0], {"quantization_config": {"quant_method": "mxfp4"}}, "cfg")
    assert set(lifted) == {name, "other"}
    e = E.Cast(lifted[name], "BF16")
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert e.shape == tuple(want.shape) == (3, 128, 40)
    with E.Reader() as r:
        assert torch.equal(bits(E.evaluate(E.simplify(e), r)), bits(want))
        for a, b in [(0, 1), (1, 3)]:
            assert torch.equal(bits(E.evaluate(E.simplify(E.Slice(e, 0, a, b)), r)), bits(want[a:b]))


def fp8_quantize_transformers(t: torch.Tensor, block: int, fmt: str) -> dict[str, torch.Tensor]:
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qcfg = SimpleNamespace(weight_block_size=(block, block), scale_fmt=fmt)
    return Fp8Quantize(SimpleNamespace(quantization_config=qcfg)).convert({"w.weight": t})


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_quantize_equals_transformers_fp8_quantize(llama_bf16, fmt, tmp_path):
    """``--quantize fp8`` from a bf16 model: every linear but embeddings and lm_head, weights and
    scales byte for byte as transformers' Fp8Quantize; transformers loads the result back (to the
    values its own dequantization gives)."""
    out = str(tmp_path / "q")
    convert(llama_bf16, out, ck.Target(to="hf", quantize="fp8", quant_block_size=32, quant_scale_fmt=fmt))
    got, src = read_all(out), read_all(llama_bf16)
    quantized = {k for k in src if k + "_scale_inv" in got}
    assert quantized == {k for k in src if k.endswith("proj.weight")}  # 7 linears x 2 layers
    assert len(quantized) == 14
    for k in quantized:
        want = fp8_quantize_transformers(src[k], 32, fmt)
        assert got[k].dtype == torch.float8_e4m3fn and torch.equal(bits(got[k]), bits(want["w.weight"])), k
        scale = got[k + "_scale_inv"]
        assert scale.dtype == want["w.weight_scale_inv"].dtype and torch.equal(
            bits(scale), bits(want["w.weight_scale_inv"])
        ), k
    qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert (
        qcfg["quant_method"] == "fp8" and qcfg["weight_block_size"] == [32, 32] and qcfg["scale_fmt"] == fmt
    )
    convert(out, str(tmp_path / "deq"), ck.Target(to="hf"))  # and back: our reading agrees with transformers'
    assert check_against_transformers(out, str(tmp_path / "deq")) == 14
    assert_same_load(str(tmp_path / "deq"), out)


def test_quantize_partial_edge_blocks_streams_in_row_blocks(llama_bf16, tmp_path):
    """A block that does not divide the weights (partial edge tiles, as DeepSeek's kernels
    allow): dequantizing what was written gives the weight back within FP8 precision, and the
    scale tensor computed in row steps equals the one computed whole."""
    out = str(tmp_path / "q")
    convert(llama_bf16, out, ck.Target(to="hf", quantize="fp8", quant_block_size=48))
    got, src = read_all(out), read_all(llama_bf16)
    k = "model.layers.0.mlp.down_proj.weight"  # 64 x 128: 2 x 3 tiles, the last ones partial
    assert got[k + "_scale_inv"].shape == (2, 3)
    back = transformers_dequantize(got[k], got[k + "_scale_inv"], (48, 48), torch.float32)
    assert torch.allclose(back, src[k].float(), rtol=0.07, atol=1e-6)
    e = E.Quantize(E.Load("x", "x", (100, 40), "F32", 0), (16, 16), "float", "scale")
    for a, b in [(0, 1), (2, 7)]:
        part = E.simplify(E.Slice(e, 0, a, b))
        assert isinstance(part, E.Quantize) and part.x.shape == (min(b * 16, 100) - a * 16, 40)


def test_fp8_release_round_trips_byte_for_byte(deepseek_bf16, tmp_path):
    """An FP8 release written again with its own tile and scale format is the same bytes, the
    same modules quantized (the release's choice, not the default rule)."""
    fp8 = make_fp8(deepseek_bf16, str(tmp_path / "fp8"), block=(16, 16), ue8m0=True)
    out = str(tmp_path / "out")
    convert(fp8, out, ck.Target(to="hf", quantize="fp8", quant_block_size=16, quant_scale_fmt="ue8m0"))
    got, src = read_all(out), read_all(fp8)
    assert set(got) == set(src)
    for k, t in src.items():
        assert torch.equal(bits(got[k]), bits(t)), k


def test_cli_dry_run_reports_both_forms_and_bad_scale_exits(llama_bf16, tmp_path):
    """``convert --dry-run`` of an FP8 release: the bytes read are the stored tensors (fp8 +
    scales + unquantized), the bytes written the bf16 model; a bad scale is one line, exit 1."""
    import re

    from tests.cli_contract import cli

    fp8 = make_fp8(llama_bf16, str(tmp_path / "fp8"), block=(32, 32))
    r = cli("convert", fp8, tmp_path / "out", "--to", "hf", "--dry-run")
    assert r.returncode == 0, r.stderr
    m = re.search(r"total: (\d+) bytes to write, (\d+) bytes to read", r.stdout)
    assert m, r.stdout
    stored = read_all(fp8)
    assert int(m[2]) == sum(t.numel() * t.element_size() for t in stored.values())
    bf16 = sum(t.numel() * 2 for k, t in stored.items() if not k.endswith("_scale_inv"))
    assert bf16 < int(m[1]) < bf16 + 10_000  # the tensors plus config.json and the index
    assert "dequantize" in r.stdout
    sd = load_file(os.path.join(fp8, "model.safetensors"))
    sd["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(sd, os.path.join(fp8, "model.safetensors"))
    r = cli("convert", fp8, tmp_path / "out", "--to", "hf")
    assert r.returncode != 0 and not (tmp_path / "out").exists()
    assert (
        "model.layers.1.self_attn.o_proj.weight_scale_inv" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )
    r = cli("convert", "--help")
    assert "--quantize" in r.stdout and "--quant-scale-fmt" in r.stdout


def test_megatron_to_fp8_quantizes_what_a_release_quantizes(deepseek_bf16, tmp_path):
    """From a Megatron checkpoint (no quantization left): ``--quantize fp8`` picks every linear but
    embeddings, norms, lm_head and the router gates, the modules a DeepSeek release quantizes,
    and transformers loads the result."""
    fp8 = make_fp8(deepseek_bf16, str(tmp_path / "fp8"), block=(4, 4))
    convert(fp8, str(tmp_path / "mc"), ck.Target(to="mcore", tp=2, ep=2))
    out = str(tmp_path / "out")
    convert(str(tmp_path / "mc"), out, ck.Target(to="hf", quantize="fp8", quant_block_size=4))
    got, release = read_all(out), read_all(fp8)
    assert {k for k in got if k.endswith("_scale_inv")} == {k for k in release if k.endswith("_scale_inv")}
    assert {k: (t.dtype, t.shape) for k, t in got.items()} == {
        k: (t.dtype, t.shape) for k, t in release.items()
    }
    assert len(transformers_load(out, fp8=True)) == len(transformers_load(fp8, fp8=True))


def test_megatron_core_computes_the_dequantized_models_logits(tmp_path):
    """FP8 HF -> Megatron TP2 x PP2 holds ordinary weights: megatron-core's GPTModel, loaded from
    the rank files, computes the logits transformers computes on the same FP8 checkpoint loaded
    with FineGrainedFP8Config(dequantize=True) (fp32 throughout on both sides)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from ckpt_ir.commands.cli import main as cli_main
    from tests.mcore_harness import run_job
    from tests.test_megatron_oracle import INPUT_IDS, WORLD, _build_hf

    m = _build_hf(str(tmp_path / "llama"), "llama", 4, False, 128, 500000.0, seed=5)
    fp8 = make_fp8(m["dir"], str(tmp_path / "fp8"), block=(16, 16))
    ref = AutoModelForCausalLM.from_pretrained(
        fp8, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = ref(torch.tensor(INPUT_IDS)).logits
    assert (want - m["logits"]).abs().max() > 1e-3  # quantization changed the model: a real check
    mc = str(tmp_path / "mc")
    args = ["convert", fp8, mc, "--to", "mcore", "--tp", "2", "--pp", "2", "--dtype", "fp32", "--quiet"]
    assert cli_main(args) == 0
    case = {
        "name": "fp8-llama-tp2pp2",
        "ckpt": mc,
        "tp": 2,
        "pp": 2,
        "vpp": None,
        "hf_config": m["config"],
        "padded_vocab": 128,
        "tied": False,
        "qkv_bias": False,
        "qk_norm": False,
        "rotary_interleaved": False,
        "rotary_percent": m["rotary_percent"],
        "input_ids": INPUT_IDS,
        "out": str(tmp_path / "logits.pt"),
    }
    ((got, reports),) = run_job(str(tmp_path), [case], WORLD)
    for r in reports:  # every parameter of every rank's model came from the checkpoint
        for chunk in r["chunks"]:
            assert [k for k in chunk["missing"] if not k.endswith("._extra_state")] == [], chunk
            assert chunk["unexpected"] == [], chunk
    torch.testing.assert_close(got[..., :128], want, atol=1e-4, rtol=1e-5)


def test_fp8_one_scale_per_weight_equals_transformers(tmp_path):
    """Ministral 3's releases: each language-model linear float8_e4m3fn with one fp32 inverse scale
    (no weight_block_size) and a static activation scale for W8A8 inference.  Read as transformers'
    Fp8Dequantize computes it (fp32, one rounding), bit for bit, the activation scales left out, to
    HF and through Megatron TP2; a scale of another shape is a one-line error."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from tests.test_families_vlm_more import build

    src = build(str(tmp_path / "bf16"), "mistral3")
    fp8 = str(tmp_path / "fp8")
    shutil.copytree(src, fp8)
    f = os.path.join(fp8, "model.safetensors")
    stored = {}
    for k, t in load_file(f).items():
        if not k.startswith("language_model.") or _skip_fp8(k, t):
            stored[k] = t
            continue
        s = (t.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
        stored[k] = (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        stored[k + "_scale_inv"] = s
        stored[k[: -len("weight")] + "activation_scale"] = torch.tensor(0.5)
    save_file(stored, f, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(fp8, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    json.dump(cfg, open(os.path.join(fp8, "config.json"), "w"))

    out, mid, back = (str(tmp_path / n) for n in ("out", "mid", "back"))
    convert(fp8, out, ck.Target(to="hf", dtype="bf16"))
    got = read_all(out)
    assert set(got) == {k for k in stored if not k.endswith(("_scale_inv", "activation_scale"))}
    n = 0
    for k, t in got.items():
        if k + "_scale_inv" in stored:
            want = Fp8Dequantize(None)._dequantize_one(stored[k], stored[k + "_scale_inv"], torch.bfloat16)
            n += 1
        else:
            want = stored[k].to(torch.bfloat16)
        assert torch.equal(bits(t), bits(want)), k
    assert n > 0 and "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    convert(fp8, mid, ck.Target(to="mcore", tp=2, dtype="bf16"))
    convert(mid, back, ck.Target(to="hf"))
    assert all(torch.equal(bits(t), bits(got[k])) for k, t in read_all(back).items())

    key = next(k for k in stored if k.endswith("_scale_inv"))
    stored[key] = torch.ones(2)
    save_file(stored, f, metadata={"format": "pt"})
    with pytest.raises(CkptIrError, match=r"has shape \[2\], but the config has no weight_block_size"):
        convert(fp8, str(tmp_path / "bad"), ck.Target(to="hf"))
