"""Megatron-Core itself as the oracle: ckpt-ir's ``--to mcore`` output must load into a real
megatron-core ``GPTModel`` (local layer spec, CPU, gloo) and give the same logits as transformers
on the source HF model.

Every parameter of the tiny HF models is random (norms and biases too) and the comparison is in
fp32, so a wrong QKV interleaving, a swapped norm, a mis-split bias or a wrong TP/PP/VPP shard gives
logits that differ by O(1), while a correct conversion agrees to ~1e-5.  The Megatron side runs as
one subprocess (``tests/mcore_harness.py``) that forks four gloo ranks and works through all cases
below, each with its own TP/PP(/VPP) layout (ranks beyond TP*PP are data-parallel replicas).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from conftest import FAMILY_CONFIGS

from ckpt_ir.commands.cli import main as cli_main
from tests.family_models import CONFIGS
from tests.family_models import build as build_family
from tests.mcore_harness import run_job

# megatron-core is a declared test dependency (the ``test`` extra): a missing one is an error, not a
# skip.  Only the harness subprocess imports it (importing it here too would cost seconds).
assert importlib.util.find_spec("megatron.core") is not None, "install the test extra: pip install -e .[test]"

WORLD = 4
SEQ = 12
# fixed token ids, batch 2 (two microbatches of one under PP); vocab >= 120 in every model
INPUT_IDS = [[(7 * i + 3) % 120 for i in range(SEQ)], [(11 * i + 5) % 120 for i in range(SEQ)]]

# HF models: family, layers, tied embeddings, vocab, rope theta (not Megatron's default 10000), and
# the config (FAMILY_CONFIGS' by default; the issue-31 families take tests/family_models.py's, with
# every bias, head_dim != hidden / heads, ...)
MODELS = {
    "llama": dict(family="llama", layers=2, tied=False, vocab=128, theta=500000.0),
    "qwen2": dict(family="qwen2", layers=2, tied=True, vocab=128, theta=1000000.0),
    "qwen3": dict(family="qwen3", layers=2, tied=False, vocab=128, theta=1000000.0),
    "llama-v120": dict(family="llama", layers=2, tied=False, vocab=120, theta=500000.0),
    "llama-4l": dict(family="llama", layers=4, tied=False, vocab=128, theta=500000.0),
    "qwen2-4l": dict(family="qwen2", layers=4, tied=True, vocab=128, theta=1000000.0),
    "qwen3-4l": dict(family="qwen3", layers=4, tied=True, vocab=128, theta=1000000.0),
    "seed_oss": dict(family="seed_oss", layers=2, tied=False, vocab=128, theta=10000000.0),
    "glm": dict(family="glm", layers=2, tied=False, vocab=128, theta=10000.0),
    # q, k, v, o and MLP biases (Megatron's add_qkv_bias and add_bias_linear)
    "internlm3": dict(
        family="internlm3", layers=4, tied=False, vocab=128, theta=50000.0, config=CONFIGS["internlm3"]
    ),
    # + rotary on interleaved pairs over the whole head, tied
    "ernie4_5": dict(
        family="ernie4_5", layers=2, tied=True, vocab=128, theta=500000.0, config=CONFIGS["ernie4_5"]
    ),
    # non-gated squared-ReLU MLP with biases
    "arcee": dict(family="arcee", layers=2, tied=False, vocab=128, theta=10000.0, config=CONFIGS["arcee"]),
    # layer 3 without rotary
    "smollm3": dict(
        family="smollm3", layers=4, tied=True, vocab=128, theta=2000000.0, config=CONFIGS["smollm3"]
    ),
    # YaRN; Llama 4's position scaling starts at original_max_position_embeddings, past the prompt
    "ministral3": dict(
        family="ministral3",
        layers=2,
        tied=False,
        vocab=128,
        theta=1000000.0,
        config=dict(
            CONFIGS["ministral3"],
            rope_parameters=dict(
                CONFIGS["ministral3"]["rope_parameters"], original_max_position_embeddings=16384
            ),
        ),
    ),
}

# case -> (model, conversion).  A conversion is CLI arguments for ``ckpt-ir convert HF OUT --to
# mcore ...``, or ("from", case, args) to convert another case's Megatron output (resharding).
CASES = {
    "llama-tp1pp1": ("llama", ["--tp", "1"]),
    "qwen2-tp1pp1": ("qwen2", ["--tp", "1"]),  # qkv bias, tied embeddings
    "qwen3-tp1pp1": ("qwen3", ["--tp", "1"]),  # q/k layernorm, head_dim 32 != hidden / heads
    "llama-tp2pp1": ("llama", ["--tp", "2"]),
    "qwen2-tp2pp1": ("qwen2", ["--tp", "2"]),
    "qwen3-tp2pp1": ("qwen3", ["--tp", "2"]),
    "seed_oss-tp2pp1": ("seed_oss", ["--tp", "2"]),  # qkv bias, head_dim 32 != hidden / heads
    # packed HF gate_up_proj, qkv bias, rotary on half of each head's dims in interleaved pairs
    "glm-tp2pp1": ("glm", ["--tp", "2"]),
    "llama-tp2-padded-vocab": ("llama-v120", ["--tp", "2", "--make-vocab-size-divisible-by", "64"]),
    "llama-tp2pp2": ("llama-4l", ["--tp", "2", "--pp", "2"]),
    "qwen2-tp2pp2-tied": ("qwen2-4l", ["--tp", "2", "--pp", "2"]),  # output_layer copy on last stage
    "qwen3-tp1pp2-tied": ("qwen3-4l", ["--pp", "2"]),
    # Megatron -> Megatron: reshard the TP2/PP2 output to PP2 with two virtual stages per rank
    "llama-tp2pp2-to-pp2vpp2": ("llama-4l", ("from", "llama-tp2pp2", ["--pp", "2", "--vpp-layers", "1"])),
    "internlm3-tp2pp2-uneven": ("internlm3", ["--tp", "2", "--pp", "2", "--num-layer-list", "1,3"]),
    "ernie4_5-tp2-tied": ("ernie4_5", ["--tp", "2"]),
    "arcee-tp2": ("arcee", ["--tp", "2"]),
    "smollm3-pp2-uneven": ("smollm3", ["--pp", "2", "--num-layer-list", "3,1"]),
    "ministral3-tp2": ("ministral3", ["--tp", "2"]),
}
# families with config keys of their own (models from tests/family_models.py): case -> family,
# conversion, the harness case's settings (see mcore_harness._arch), its HF config's sizes under
# the Llama keys the harness reads, and args the rank files must carry (None: absent)
FAMILY_CASES = {
    # GPT-2: learned positions, LayerNorm, biases, Conv1D weights stored [in, out], tied; gelu_new
    # is the tanh approximation, which megatron-core's fused bias-GELU computes (Megatron-LM's
    # default with biases: no bias_gelu_fusion arg needed)
    "gpt2-tp2pp2": dict(
        family="gpt2",
        convert=["--tp", "2", "--pp", "2"],
        harness={"gpt": True, "arch": {"bias_activation_fusion": True}, "qkv_bias": True, "tied": True},
        sizes=lambda c: dict(
            num_hidden_layers=c["n_layer"],
            hidden_size=c["n_embd"],
            num_attention_heads=c["n_head"],
            intermediate_size=c["n_inner"],
            rms_norm_eps=c["layer_norm_epsilon"],
            max_position_embeddings=c["n_positions"],
        ),
        args=dict(
            position_embedding_type="learned_absolute",
            max_position_embeddings=32,
            normalization="LayerNorm",
            swiglu=False,
            add_bias_linear=True,
            add_qkv_bias=True,
            bias_gelu_fusion=None,
            untie_embeddings_and_output_weights=False,
        ),
    ),
    # StarCoder2: LayerNorm, biases everywhere, tanh GELU (fused bias-GELU), GQA, tied, a sliding
    # window of 6 (< the 12 tokens): Megatron's window (5, 0)
    "starcoder2-tp2pp2": dict(
        family="starcoder2",
        convert=["--tp", "2", "--pp", "2"],
        harness={
            "gpt": True,
            "arch": {
                "bias_activation_fusion": True,
                "position_embedding_type": "rope",
                "window_size": [5, 0],
            },
            "qkv_bias": True,
            "tied": True,
        },
        sizes=lambda c: dict(c, rms_norm_eps=c["norm_epsilon"]),
        args=dict(
            normalization="LayerNorm",
            swiglu=False,
            add_bias_linear=True,
            add_qkv_bias=True,
            bias_gelu_fusion=None,
            position_embedding_type="rope",
            window_size=[5, 0],
            untie_embeddings_and_output_weights=False,
        ),
    ),
    # StableLM: LayerNorm with SwiGLU, q/k/v biases only, rotary on a quarter of each head, untied
    "stablelm-tp2": dict(
        family="stablelm",
        convert=["--tp", "2"],
        harness={"arch": {"normalization": "LayerNorm"}, "qkv_bias": True, "rotary_percent": 0.25},
        sizes=lambda c: dict(c, rms_norm_eps=c["layer_norm_eps"]),
        args=dict(
            normalization="LayerNorm",
            swiglu=True,
            add_bias_linear=False,
            add_qkv_bias=True,
            rotary_percent=0.25,
            untie_embeddings_and_output_weights=True,
        ),
    ),
    # Nemotron: LayerNorm1P (x_hat * (1 + w) + b) = megatron-core's LayerNorm with
    # layernorm_zero_centered_gamma (apply_layernorm_1p) on the same stored w; squared-ReLU MLP,
    # every bias, rotary on half of each head, untied
    "nemotron-tp2pp2": dict(
        family="nemotron",
        convert=["--tp", "2", "--pp", "2"],
        harness={
            "arch": {"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True},
            "activation": "squared_relu",
            "bias_linear": True,
            "qkv_bias": True,
            "rotary_percent": 0.5,
        },
        sizes=lambda c: dict(c, rms_norm_eps=c["norm_eps"]),
        args=dict(
            normalization="LayerNorm",
            apply_layernorm_1p=True,
            squared_relu=True,
            swiglu=False,
            add_bias_linear=True,
            add_qkv_bias=True,
            rotary_percent=0.5,
            untie_embeddings_and_output_weights=True,
        ),
    ),
}
# a deliberately broken copy of llama-tp1pp1: linear_qkv rows regrouped as [all q; all k; all v]
# (the HF/"unfused" order) instead of Megatron's per-query-group [q_g; k_g; v_g]; must NOT match
BROKEN = "llama-tp1pp1-wrong-qkv-layout"


def _build_hf(
    path: str,
    family: str,
    layers: int,
    tied: bool,
    vocab: int,
    theta: float,
    seed: int,
    config: dict | None = None,
) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": theta})
    kw.update(FAMILY_CONFIGS[family] if config is None else config)
    kw.update(
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=tied
    )
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too: nothing may hide behind 1s and 0s
            p.normal_(0, 0.5)
        logits = model(torch.tensor(INPUT_IDS)).logits
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    return {
        "dir": path,
        "config": config,
        "logits": logits,
        "tied": tied,
        "vocab": vocab,
        **_features(family, config),
    }


def _features(family: str, config: dict) -> dict:
    """What the GPTModel must compute for the HF model (transformers' modeling files: Llama's
    attention_bias is on q, k, v and o, mlp_bias on its MLP; ERNIE 4.5's use_bias on every linear
    layer and its rotary over interleaved pairs; Arcee's relu2 MLP has no gate; SmolLM3's
    no_rope_layers holds 1 where a layer rotates)."""
    rope = config.get("rope_parameters") or {}
    biased = family in ("internlm3", "ernie4_5", "arcee", "smollm3") and bool(
        config.get("attention_bias") or config.get("use_bias")
    )
    if biased:
        assert config.get("mlp_bias") or config.get("use_bias"), "megatron-core: one switch for o and MLP"
    return {
        "qkv_bias": family in ("qwen2", "seed_oss", "glm") or biased,
        "bias_linear": biased,
        "rotary_interleaved": family in ("glm", "ernie4_5"),
        "rotary_percent": _rotary_fraction(config),
        "qk_norm": family == "qwen3",
        "activation": "squared_relu" if config.get("hidden_act") == "relu2" else None,
        "no_rope_freq": [1 - r for r in config["no_rope_layers"]] if family == "smollm3" else None,
        "yarn": {
            "rotary_scaling_factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta_fast": rope["beta_fast"],
            "beta_slow": rope["beta_slow"],
            "mscale": rope["mscale"],
            "mscale_all_dim": rope["mscale_all_dim"],
            "correction_range_round_to_int": True,  # HF's yarn truncates by default
        }
        if rope.get("rope_type") == "yarn"
        else None,
    }


def _rotary_fraction(config: dict) -> float:
    """The fraction of each head's dims that rotate (GLM: partial_rotary_factor, top level or in
    transformers 5's rope_parameters)."""
    rope = config.get("rope_parameters") or {}
    return float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)


def _convert(src: str, dst: str, args: list[str]) -> None:
    assert cli_main(["convert", src, dst, "--to", "mcore", "--quiet", *args]) == 0


def _regroup_qkv_wrongly(src: str, dst: str, hf_config: dict) -> None:
    """Copy a TP1/PP1 checkpoint with every linear_qkv in HF order instead of Megatron's."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    blob = torch.load(path, weights_only=False)
    heads, groups = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    d = hf_config["hidden_size"] // heads
    for key, w in blob["model"].items():
        if key.endswith("linear_qkv.weight"):
            per = w.view(groups, (heads // groups + 2) * d, -1)
            q, k, v = per.split([heads // groups * d, d, d], dim=1)
            blob["model"][key] = torch.cat([t.reshape(-1, w.shape[1]) for t in (q, k, v)]).clone()
    torch.save(blob, path)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Build the HF models, convert them with ckpt-ir, run every case through megatron-core once."""
    root = tmp_path_factory.mktemp("mcore-oracle")
    for sub in ("hf", "mcore", "logits"):
        os.makedirs(root / sub)
    models = {
        name: _build_hf(str(root / "hf" / name), seed=i, **spec)
        for i, (name, spec) in enumerate(MODELS.items())
    }
    cases = []
    for case, (model, conversion) in CASES.items():
        out = str(root / "mcore" / case)
        if isinstance(conversion, tuple):
            _, src_case, args = conversion
            _convert(str(root / "mcore" / src_case), out, args)
        else:
            _convert(models[model]["dir"], out, conversion)
        cases.append((case, model, out))
    _regroup_qkv_wrongly(
        str(root / "mcore" / "llama-tp1pp1"), str(root / "mcore" / BROKEN), models["llama"]["config"]
    )
    cases.append((BROKEN, "llama", str(root / "mcore" / BROKEN)))

    job_cases = []
    for case, model, out in cases:
        m = models[model]
        tp, pp, vpp = _layout(out)
        job_cases.append(
            {
                "name": case,
                "ckpt": out,
                "tp": tp,
                "pp": pp,
                "vpp": vpp,
                "hf_config": m["config"],
                "padded_vocab": _padded_vocab(out),
                "tied": m["tied"],
                "qkv_bias": m["qkv_bias"],
                "qk_norm": m["qk_norm"],
                "rotary_interleaved": m["rotary_interleaved"],
                "rotary_percent": m["rotary_percent"],
                "bias_linear": m["bias_linear"],
                "activation": m["activation"],
                "yarn": m["yarn"],
                "config_extra": {
                    **({"no_rope_freq": m["no_rope_freq"]} if m["no_rope_freq"] else {}),
                    **_stage_layers(CASES[case][1] if case in CASES else ()),
                },
                "input_ids": INPUT_IDS,
                "out": str(root / "logits" / f"{case}.pt"),
            }
        )
    refs = {c: (models[_model_of(c)]["logits"], models[_model_of(c)]["vocab"]) for c, _, _ in cases}
    for i, (case, fc) in enumerate(FAMILY_CASES.items()):
        hf = build_family(str(root / "hf" / case), fc["family"], layers=2, seed=100 + i)
        out = str(root / "mcore" / case)
        _convert(hf, out, fc["convert"])
        with open(os.path.join(hf, "config.json")) as fh:
            config = json.load(fh)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            refs[case] = (model(torch.tensor(INPUT_IDS)).logits, config["vocab_size"])
        tp, pp, vpp = _layout(out)
        job_cases.append(
            {
                "name": case,
                "ckpt": out,
                "tp": tp,
                "pp": pp,
                "vpp": vpp,
                "hf_config": fc["sizes"](config),
                "padded_vocab": _padded_vocab(out),
                "tied": False,
                "qkv_bias": False,
                "qk_norm": False,
                **fc["harness"],
                "input_ids": INPUT_IDS,
                "out": str(root / "logits" / f"{case}.pt"),
            }
        )
    reports = [per_rank for _, per_rank in run_job(str(root), job_cases, WORLD)]

    results = {}
    for jc, per_rank in zip(job_cases, reports):
        ref, vocab = refs[jc["name"]]
        results[jc["name"]] = {
            "job": jc,
            "reports": per_rank,
            "logits": torch.load(jc["out"]),
            "ref": ref,
            "vocab": vocab,
        }
    return results


def _stage_layers(conversion) -> dict:
    """megatron-core's first / last stage sizes of a two-stage ``--num-layer-list`` conversion."""
    if "--num-layer-list" not in conversion:
        return {}
    first, last = map(int, conversion[list(conversion).index("--num-layer-list") + 1].split(","))
    return {"num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}


def _model_of(case: str) -> str:
    return "llama" if case == BROKEN else CASES[case][0]


def _rank_args(out: str):
    it_dir = os.path.join(out, "iter_0000001")
    first = sorted(os.listdir(it_dir))[0]
    return vars(torch.load(os.path.join(it_dir, first, "model_optim_rng.pt"), weights_only=False)["args"])


def _layout(out: str) -> tuple[int, int, int | None]:
    args = _rank_args(out)
    return (
        args["tensor_model_parallel_size"],
        args["pipeline_model_parallel_size"],
        args.get("virtual_pipeline_model_parallel_size"),
    )


def _padded_vocab(out: str) -> int:
    return _rank_args(out)["padded_vocab_size"]


EXPECTED_LAYOUT = {
    "llama-tp1pp1": (1, 1, None),
    "qwen2-tp1pp1": (1, 1, None),
    "qwen3-tp1pp1": (1, 1, None),
    "llama-tp2pp1": (2, 1, None),
    "qwen2-tp2pp1": (2, 1, None),
    "qwen3-tp2pp1": (2, 1, None),
    "llama-tp2-padded-vocab": (2, 1, None),
    "llama-tp2pp2": (2, 2, None),
    "qwen2-tp2pp2-tied": (2, 2, None),
    "qwen3-tp1pp2-tied": (1, 2, None),
    "llama-tp2pp2-to-pp2vpp2": (1, 2, 2),
    "seed_oss-tp2pp1": (2, 1, None),
    "glm-tp2pp1": (2, 1, None),
    "internlm3-tp2pp2-uneven": (2, 2, None),
    "ernie4_5-tp2-tied": (2, 1, None),
    "arcee-tp2": (2, 1, None),
    "smollm3-pp2-uneven": (1, 2, None),
    "ministral3-tp2": (2, 1, None),
    "gpt2-tp2pp2": (2, 2, None),
    "starcoder2-tp2pp2": (2, 2, None),
    "stablelm-tp2": (2, 1, None),
    "nemotron-tp2pp2": (2, 2, None),
}


@pytest.mark.parametrize("case", [*CASES, *FAMILY_CASES])
def test_checkpoint_loads_exactly(oracle, case):
    """Every rank's state dict fills every parameter of its GPTModel stage and has no extra key."""
    r = oracle[case]
    job = r["job"]
    assert (job["tp"], job["pp"], job["vpp"]) == EXPECTED_LAYOUT[case]
    seen = set()
    for rep in r["reports"]:
        seen.add((rep["tp_rank"], rep["pp_rank"]))
        assert len(rep["chunks"]) == (job["vpp"] or 1)
        for chunk in rep["chunks"]:
            assert chunk["unexpected"] == [], f"rank {rep['rank']}: keys GPTModel does not have"
            real_missing = [k for k in chunk["missing"] if not k.endswith("._extra_state")]
            assert real_missing == [], f"rank {rep['rank']}: parameters the checkpoint lacks"
            assert chunk["loaded"] == chunk["params"]
    assert seen == {(t, p) for t in range(job["tp"]) for p in range(job["pp"])}


@pytest.mark.parametrize("case", [*CASES, *FAMILY_CASES])
def test_logits_match_transformers(oracle, case):
    r = oracle[case]
    got, ref, vocab = r["logits"], r["ref"], r["vocab"]
    assert got.shape == (len(INPUT_IDS), SEQ, r["job"]["padded_vocab"])
    assert r["job"]["padded_vocab"] >= vocab
    torch.testing.assert_close(got[..., :vocab], ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_args_describe_the_model(oracle, case):
    """The ``args`` Megatron-LM rebuilds the model from agree with the HF config the oracle used."""
    r = oracle[case]
    hf, job = r["job"]["hf_config"], r["job"]
    want = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf["num_key_value_heads"],
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "norm_epsilon": hf["rms_norm_eps"],
        "add_qkv_bias": job["qkv_bias"],
        "qk_layernorm": job["qk_norm"],
        "untie_embeddings_and_output_weights": not job["tied"],
        "padded_vocab_size": job["padded_vocab"],
        "tensor_model_parallel_size": job["tp"],
        "pipeline_model_parallel_size": job["pp"],
        "transformer_impl": "local",
        "rotary_base": (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta")),
        "add_bias_linear": job["bias_linear"],
        "rotary_interleaved": job["rotary_interleaved"] or None,
        "swiglu": job["activation"] is None,
        "squared_relu": job["activation"] == "squared_relu" or None,
        "no_rope_freq": job["config_extra"].get("no_rope_freq"),
        "num_layer_list": "{num_layers_in_first_pipeline_stage},{num_layers_in_last_pipeline_stage}".format(
            **job["config_extra"]
        )
        if "num_layers_in_first_pipeline_stage" in job["config_extra"]
        else None,
        "position_embedding_type": "yarn" if job["yarn"] else "rope",
        **{f"yarn_{k}": v for k, v in (job["yarn"] or {}).items()},
    }
    if job["name"].startswith("glm"):  # GLM's args do not name its interleaved rotary (not changed here)
        want.pop("rotary_interleaved")
    for rep in r["reports"]:
        assert {k: rep["args"].get(k) for k in want} == want


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_args_describe_the_model(oracle, case):
    want, args = FAMILY_CASES[case]["args"], _rank_args(oracle[case]["job"]["ckpt"])
    assert {k: args.get(k) for k in want} == want


def test_padded_vocab_is_really_padded(oracle):
    r = oracle["llama-tp2-padded-vocab"]
    assert (r["vocab"], r["job"]["padded_vocab"]) == (120, 128)
    # ckpt-ir's documented padding copies the last real row, so padded logits repeat token 119's
    got = r["logits"]
    assert torch.equal(got[..., 120:], got[..., 119:120].expand(-1, -1, 8))


def test_wrong_qkv_layout_is_caught(oracle):
    """Control: the same weights with QKV rows in HF order load fine but give different logits,
    so the comparison above really checks the layout."""
    r = oracle[BROKEN]
    assert all(c["unexpected"] == [] for rep in r["reports"] for c in rep["chunks"])
    assert (r["logits"] - r["ref"]).abs().max() > 1.0
