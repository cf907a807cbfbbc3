"""``ckpt-ir verify``: layer-by-layer forward of two checkpoints through transformers.

The oracle for the forward itself is transformers' ordinary ``from_pretrained`` + forward; the
conversions checked are made by ``ckpt-ir convert`` and compared by verify's exit code and report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_contract import cli
from tests.conftest import build_hf
from tests.test_deepseek import build_deepseek
from tests.test_lora import make_peft_adapter
from tests.test_lora_variants import VARIANTS, make_adapter
from tests.test_moe import build_moe

PROMPT = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(11))


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def report(*args: object) -> tuple[int, dict]:
    r = cli("verify", *args, "--json")
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "mixtral", "deepseek_v3"])
def test_unit_by_unit_forward_equals_transformers_forward(tmp_path, family):
    """Materialising one unit at a time on a meta model computes exactly transformers' logits."""
    from transformers import AutoModelForCausalLM

    from ckpt_ir.commands.verify import hf_side, run_side

    path = str(tmp_path / family)
    if family == "mixtral":
        build_moe(path, family)
    elif family == "deepseek_v3":
        build_deepseek(path, mtp=False)
    else:
        build_hf(path, family)
    out, order = run_side(hf_side(path), PROMPT, torch.float32, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(PROMPT, output_hidden_states=True)
    assert torch.equal(out["logits"], ref.logits)
    layers = [n for n in order if n.startswith("layer ")]
    assert len(layers) == model.config.num_hidden_layers
    assert torch.equal(out["embeddings"], ref.hidden_states[0])
    for i in range(len(layers) - 1):  # hidden_states[i + 1] is layer i's output (the last one is normed)
        assert torch.equal(out[f"layer {i}"], ref.hidden_states[i + 1])


def test_hf_vs_mcore_tp2pp2_is_exact_and_one_changed_element_names_its_layer(hf_cache, tmp_path):
    src = hf_cache("llama")
    mc = tmp_path / "mc"
    ok(cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--pp", "2"))
    code, r = report(src, mc)
    assert code == 0 and r["ok"] and r["tolerance"] == "exact"
    assert [x["name"] for x in r["rows"]] == [
        "embeddings",
        "layer 0",
        "layer 1",
        "layer 2",
        "layer 3",
        "final norm",
        "logits",
    ]
    assert all(x["max_abs_diff"] == 0 for x in r["rows"]) and r["top1_agreement"] == r["tokens"] == 16
    # one element of layer 2's down projection, changed in a copy of the source
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = str(bad / "model.safetensors")
    sd = load_file(f)
    sd["model.layers.2.mlp.down_proj.weight"][5, 7] += 0.25
    save_file(sd, f, metadata={"format": "pt"})
    r = cli("verify", mc, bad)
    assert r.returncode == 1, r.stderr
    assert "DIVERGED: first at layer 2" in r.stdout
    lines = {ln.split("max|diff|")[0].strip(): ln for ln in r.stdout.splitlines() if "max|diff|" in ln}
    assert lines["layer 1"].endswith(" ok") and lines["layer 2"].endswith("DIVERGES")


def test_mcore_reshard_vs_mcore(hf_cache, tmp_path):
    src = hf_cache("qwen2", layers=4)
    a, b = tmp_path / "a", tmp_path / "b"
    ok(cli("convert", src, a, "--to", "mcore", "--tp", "2", "--pp", "2"))
    ok(
        cli(
            "convert",
            a,
            b,
            "--to",
            "mcore",
            "--tp",
            "1",
            "--pp",
            "4",
            "--vpp-layers",
            "1",
            "--make-vocab-size-divisible-by",
            "48",
        )
    )
    ok(cli("verify", a, b, "--tokens", "8"))


def test_moe_hf_vs_mcore_expert_parallel(tmp_path):
    src = build_moe(str(tmp_path / "hf"), "qwen2_moe")
    mc = tmp_path / "mc"
    ok(cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--ep", "2", "--moe-grouped-gemm"))
    code, r = report(mc, src, "--prompt-ids", "3,1,4,1,5,9,2,6")
    assert code == 0 and r["tokens"] == 8 and r["logits_max_abs_diff"] == 0


def test_deepseek_with_mtp_reports_mtp_as_not_compared(tmp_path):
    src = build_deepseek(str(tmp_path / "hf"))
    mc = tmp_path / "mc"
    ok(cli("convert", src, mc, "--to", "mcore", "--pp", "3", "--ep", "2"))
    r = ok(cli("verify", src, mc))
    assert "not compared: 1 multi-token-prediction layer(s)" in r.stdout


def test_cast_conversion_passes_with_the_dtype_aware_default(hf_cache, tmp_path):
    src = hf_cache("llama")
    mc = tmp_path / "mc"
    ok(cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--dtype", "bf16"))
    code, r = report(src, mc)
    assert code == 0 and r["compute_dtype"] == "F32" and "eps(BF16)" in r["tolerance"]
    assert 0 < r["logits_max_abs_diff"]  # the cast changed the weights: the comparison is not vacuous
    code, r = report(src, mc, "--atol", "0")
    assert code == 1 and r["first_divergent"] == "embeddings"


def test_lora_merged_vs_peft_applied(hf_cache, tmp_path):
    base = hf_cache("llama")
    adapter, merged = str(tmp_path / "adapter"), tmp_path / "merged"
    make_peft_adapter(base, adapter)
    ok(cli("convert", base, merged, "--to", "hf", "--lora-load", adapter))
    code, r = report(merged, base, "--lora-load", adapter)
    assert code == 0 and r["rows"][1]["max_abs_diff"] > 0  # different arithmetic, within the tolerance
    code, r = report(merged, base)  # without the adapter the base is another model
    assert code == 1 and r["first_divergent"] == "layer 0"


@pytest.mark.parametrize(
    "variant, changed, layer",
    [
        ("dora", "model.layers.1.self_attn.q_proj.weight", "layer 1"),
        ("modules_to_save", "lm_head.weight", "logits"),
        ("moe", "model.layers.1.block_sparse_moe.experts.2.w2.weight", "layer 1"),
    ],
)
def test_every_adapter_convert_merges_is_applied_by_verify(hf_cache, tmp_path, variant, changed, layer):
    """DoRA magnitudes, modules_to_save copies and LoRA on fused experts (target_parameters), made by
    peft: the merged model agrees with base + adapter, and one changed weight of it does not."""
    base = build_moe(str(tmp_path / "base"), "mixtral", layers=2) if variant == "moe" else hf_cache("llama")
    adapter, merged = str(tmp_path / "adapter"), tmp_path / "merged"
    make_adapter(base, adapter, **VARIANTS[variant])
    ok(cli("convert", base, merged, "--to", "hf", "--lora-load", adapter))
    code, r = report(merged, base, "--lora-load", adapter)
    assert code == 0 and r["ok"] and r["top1_agreement"] == r["tokens"], r
    code, r = report(merged, base)  # the adapter changes the model: the comparison is not vacuous
    assert code == 1
    f = str(merged / "model.safetensors")
    sd = load_file(f)
    sd[changed][3, 5] += 0.5
    save_file(sd, f, metadata={"format": "pt"})
    code, r = report(merged, base, "--lora-load", adapter)
    assert code == 1 and r["first_divergent"] == layer


def test_bad_requests_are_one_line_errors(hf_cache, tmp_path):
    src = hf_cache("llama")
    if not torch.cuda.is_available():
        r = cli("verify", src, src, "--device", "cuda")
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "CUDA is not available" in r.stderr
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        r = cli("verify", src, src, "--device", "npu:0")
        assert r.returncode == 2 and "torch_npu is not installed" in r.stderr and "ckpt-ir[npu]" in r.stderr
    r = cli("verify", src, src, "--device", "tpu")
    assert r.returncode == 2 and "choose cpu, cuda[:N] or npu[:N]" in r.stderr
    r = cli("verify", src, src, "--prompt-ids", "1,500")
    assert r.returncode == 2 and "500 is outside the vocabulary" in r.stderr
    r = cli("verify", src, build_moe(str(tmp_path / "moe"), "mixtral"))
    assert r.returncode == 2 and "is llama but" in r.stderr
    r = cli("verify", src, hf_cache("llama", layers=2))
    assert r.returncode == 2 and "different models (num_layers 4 vs 2)" in r.stderr
    r = cli("verify", src, src, "--lora-load", src)
    assert r.returncode == 2 and "PEFT adapters" in r.stderr


def test_npu_is_imported_only_when_asked(hf_cache, tmp_path):
    """A torch_npu on the path that records its import: convert --device cpu never touches it;
    --device npu imports it and, finding no NPU, says so in one line.  (verify's forward imports
    transformers, which itself imports an installed torch_npu; that is transformers' doing.)"""
    src = hf_cache("llama", layers=1)
    fake = tmp_path / "fake"
    fake.mkdir()
    marker = tmp_path / "imported"
    (fake / "torch_npu.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.getcwd()]))

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ckpt_ir", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = run("convert", src, tmp_path / "a", "--to", "hf", "--dtype", "bf16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    for cmd in (["convert", src, tmp_path / "b", "--to", "hf", "--dtype", "bf16"], ["verify", src, src]):
        r = run(*cmd, "--device", "npu:0")
        assert marker.exists() and r.returncode == 2, r.stderr
        assert (
            r.stderr.strip()
            == "ckpt-ir: error: --device npu:0: torch_npu found no Ascend NPU; use --device cpu"
        )
        marker.unlink()
    assert not (tmp_path / "b").exists()


def test_remote_code_families_are_refused(hf_cache):
    import attrs

    import ckpt_ir.api as ck
    from ckpt_ir.commands.verify import transformers_config
    from ckpt_ir.errors import UsageError

    c = ck.load(hf_cache("llama", layers=1))
    with pytest.raises(UsageError, match="remote code is never run"):
        transformers_config(
            attrs.evolve(c, hf_config={**c.hf_config, "auto_map": {"AutoModelForCausalLM": "x.Y"}})
        )
