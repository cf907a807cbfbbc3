"""``ckpt_ir.live`` on real megatron-core ``GPTModel``s built in 2 gloo processes on CPU
(``tests/live_harness.py``, one job for every case): ``export_hf`` yields exactly the HF checkpoint
the chunks were loaded from, on every rank, and ``load_hf`` fills freshly built chunks exactly as
ckpt-ir's own rank files do.

Each case is a tiny random HF model built by transformers, converted by ckpt-ir to rank files of
the case's layout; the harness loads those files into megatron-core chunks (the reference), exports
them, and loads the HF model into a second build, from its directory and from (name, tensor) pairs.
The oracles are the transformers checkpoint (export, bit for bit; torch's cast with ``dtype``) and
the rank files megatron-core loaded (load, bit for bit).

Cases: llama TP2 (the family inferred from the TransformerConfig alone, untied; the memory bound,
and the docs/live.md example); qwen2 PP2 x VPP2 (qkv bias, tied embeddings across stages, a padded
vocabulary); mixtral EP2 with grouped-GEMM experts (dense tensors replicated over EP); DeepSeek-V3
TP2 (MLA, its down-projections cut over TP by the local spec; MoE experts split over TP, shared
expert, router score bias, a dense first layer).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from ckpt_ir.commands.cli import main as cli_main
from tests.family_models import DENSE, build
from tests.mcore_harness import run_job
from tests.test_megatron_mla_oracle import MODELS as MLA_MODELS
from tests.test_megatron_mla_oracle import _mla_config
from tests.test_megatron_mla_oracle import _moe_config as _mla_moe_config

WORLD = 2
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "live.md")
HARNESS = os.path.join(os.path.dirname(__file__), "live_harness.py")
MEMORY_BUCKET = 1 << 15  # the llama model is 20x this


def _example() -> str:
    return re.findall(r"```python\n(.*?)```", open(DOCS).read(), flags=re.S)[0]


def _hf(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)


def _convert(src: str, dst: str, args: list[str]) -> dict:
    assert cli_main(["convert", src, dst, "--to", "mcore", "--quiet", *args]) == 0
    import torch

    it = os.path.join(dst, "iter_0000001")
    first = os.path.join(it, sorted(os.listdir(it))[0], "model_optim_rng.pt")
    return vars(torch.load(first, weights_only=False)["args"])


@pytest.fixture(scope="module")
def live(tmp_path_factory, hf_cache):
    root = tmp_path_factory.mktemp("live")
    mixtral = dict(DENSE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    sources = {
        "llama-tp2": (hf_cache("llama"), ["--tp", "2"]),
        "qwen2-pp2vpp2": (
            hf_cache("qwen2", tied=True, vocab=100),
            ["--pp", "2", "--vpp-layers", "1", "--make-vocab-size-divisible-by", "8"],
        ),
        "mixtral-ep2-grouped": (
            build(str(root / "mixtral"), "mixtral", 2, seed=5, configs={"mixtral": mixtral}),
            ["--ep", "2", "--moe-grouped-gemm"],
        ),
        "deepseek_v3-tp2": (
            build(
                str(root / "deepseek_v3"), "deepseek_v3", 2, seed=6, configs=dict([MLA_MODELS["deepseek_v3"]])
            ),
            ["--tp", "2"],
        ),
    }
    job = []
    for name, (src, conversion) in sources.items():
        ckpt = str(root / "mcore" / name)
        args = _convert(src, ckpt, conversion)
        hf = _hf(src)
        family = hf["model_type"]
        case = {
            "name": name,
            "ckpt": ckpt,
            "hf_dir": src,
            "hf_config": hf,
            "export_config": None if name == "llama-tp2" else hf,
            "tp": args["tensor_model_parallel_size"],
            "pp": args["pipeline_model_parallel_size"],
            "vpp": args.get("virtual_pipeline_model_parallel_size"),
            "ep": args.get("expert_model_parallel_size", 1),
            "etp": args.get("expert_tensor_parallel_size"),
            "padded_vocab": args["padded_vocab_size"],
            "tied": bool(hf.get("tie_word_embeddings")),
            "qkv_bias": family == "qwen2",
            "qk_norm": family == "deepseek_v3",
            "out": str(root / "reports" / name),
            "load_only": True,  # no logits: the reports are the result
        }
        if family == "mixtral":
            case["moe"] = {
                "num_experts": 4,
                "topk": 2,
                "ffn_hidden_size": hf["intermediate_size"],
                "grouped_gemm": True,
            }
        if family == "deepseek_v3":
            case["mla"] = _mla_config(hf)
            case["moe"] = {**_mla_moe_config("deepseek_v3", hf), "grouped_gemm": False}
        if name == "llama-tp2":
            lora = {"rank": 4, "alpha": 8.0, "ckpt": str(root / "lora-mcore")}
            errors = {
                "other_dir": sources["qwen2-pp2vpp2"][0],
                "missing": "model.layers.3.mlp.down_proj.weight",
            }
            case.update(memory=MEMORY_BUCKET, dtype="bf16", example=_example(), lora=lora, errors=errors)
        job.append(case)
    os.makedirs(root / "reports")
    results = run_job(str(root), job, WORLD, script=HARNESS)
    return {c["name"]: {"case": c, "reports": reports} for c, (_, reports) in zip(job, results)}


CASES = ["llama-tp2", "qwen2-pp2vpp2", "mixtral-ep2-grouped", "deepseek_v3-tp2"]


@pytest.mark.parametrize("case", CASES)
def test_export_hf_yields_the_hf_checkpoint_on_every_rank(live, case):
    """Every rank yields every tensor of the HF checkpoint once, under its HF name, bit for bit
    (dtype too), in the same order on every rank."""
    reports = live[case]["reports"]
    for rep in reports:
        assert sorted(rep["names"]) == rep["hf_names"], rep["rank"]
        assert len(rep["names"]) == len(set(rep["names"]))
        assert rep["wrong"] == [], rep["rank"]
        assert rep["names"] == reports[0]["names"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", ["dir", "pairs"])
def test_load_hf_fills_the_chunks_as_the_rank_files_do(live, case, source):
    """A fresh build of the chunks (every value NaN first), filled by load_hf from the HF
    directory or from (name, tensor) pairs, equals the chunks loaded from ckpt-ir's rank files,
    every parameter and buffer, bit for bit, on every rank."""
    for rep in live[case]["reports"]:
        assert rep[f"load_{source}_wrong"] == [], rep["rank"]


def test_export_hf_casts_as_torch_does(live):
    for rep in live["llama-tp2"]["reports"]:
        assert rep["cast_wrong"] == []


def test_export_hf_memory_stays_within_a_bucket(live):
    """Peak tensor memory allocated during export_hf (every storage made since it started and
    still alive, sampled after every torch operation) stays within bucket_bytes plus the model's
    largest single tensor (HF or Megatron: the whole fused fc1), on a model 20 times the bucket."""
    for rep in live["llama-tp2"]["reports"]:
        m = rep["memory"]
        assert m["model_bytes"] > 20 * m["bucket"]
        assert m["peak"] <= m["bucket"] + m["largest"], m


@pytest.mark.parametrize("to", ["hf", "peft"])
def test_export_hf_merges_lora_or_yields_peft_tensors_as_the_file_conversion_does(live, to, tmp_path):
    """Chunks with LoRA adapters (the same weights also saved as rank files by the harness):
    export_hf merged (and with merge_lora=False: the PEFT adapter's tensors) yields on every rank
    what ckpt-ir's conversion of those rank files writes, names and bytes."""
    import torch
    from safetensors.torch import load_file

    case = live["llama-tp2"]["case"]
    out = str(tmp_path / to)
    assert cli_main(["convert", case["lora"]["ckpt"], out, "--to", to, "--quiet"]) == 0
    name = "model.safetensors" if to == "hf" else "adapter_model.safetensors"
    want = load_file(os.path.join(out, name))
    assert any("lora" in k for k in want) == (to == "peft")
    for rank in range(WORLD):
        got = load_file(f"{case['out']}.rank{rank}.{'merged' if to == 'hf' else 'peft'}.safetensors")
        assert sorted(got) == sorted(want)
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want), rank


def test_the_docs_example_syncs_the_weights(live):
    """docs/live.md's loop, run on the llama chunks: after two steps that halve every parameter,
    its engine holds every HF tensor times 0.25, on every rank."""
    for rep in live["llama-tp2"]["reports"]:
        assert rep["example_wrong"] == []


def test_what_does_not_fit_is_named(live):
    """On every rank: for load_hf, another model's checkpoint names a chunk key it has no tensor
    for; pairs lacking a tensor name it (its HF name) and the key waiting for it; a pair whose
    name the family does not have is named (FormatErrors); export_hf of chunks with a parameter
    no table names refuses to drop it (a CoverageError naming it).  Each one line."""
    for rep in live["llama-tp2"]["reports"]:
        errors = rep["errors"]
        assert all(e is not None and "\n" not in e[1] for e in errors.values()), errors
        assert errors.pop("unknown_module") == [
            "CoverageError",
            "the model chunks: 2 tensor(s) have no known Megatron meaning and would be lost: extra_scale "
            "(TP 0, stage 0, EP 0, chunk 0), extra_scale (TP 1, stage 0, EP 0, chunk 0); ckpt-ir has no table "
            "for these modules (docs/live.md lists the megatron-core modules it reads)",
        ]
        kind, msg = errors.pop("vision_model")
        assert kind == "UsageError" and "qwen2_5_vl is a vision-language model" in msg, msg
        assert all(e[0] == "FormatError" for e in errors.values()), errors
        assert "output_layer.weight has no tensor in the HF checkpoint" in errors["other_model"][1]
        assert "(qwen2)" in errors["other_model"][1]
        msg = errors["missing_pair"][1]
        assert "decoder.layers.3.mlp.linear_fc2.weight needs model.layers.3.mlp.down_proj.weight" in msg
        assert errors["unknown_pair"][1].startswith("model.foo.weight: no tensor of a llama model")


def test_bad_calls_are_usage_errors():
    """Without a model or with a bucket of no bytes: a UsageError (exit code 2) naming the
    setting, before megatron-core is asked anything."""
    from ckpt_ir.errors import UsageError
    from ckpt_ir.live import export_hf, load_hf

    with pytest.raises(UsageError, match=r"bucket_bytes=0: give a positive number of bytes"):
        export_hf([], bucket_bytes=0)
    for call in (lambda: export_hf("model"), lambda: load_hf([], "dir")):
        with pytest.raises(UsageError, match=r"^models: give this rank's megatron-core model chunks"):
            call()
    assert UsageError.exit_code == 2
