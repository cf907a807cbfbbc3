"""Megatron-Core as the oracle for multi-latent attention: ckpt-ir's ``--to mcore`` (torch format)
checkpoints of DeepSeek-V2, DeepSeek-V2-Lite and DeepSeek-V3 models load into a real megatron-core
``GPTModel`` with MLA (local spec, CPU, gloo; ``tests/mcore_harness.py``) and give the same logits
as transformers on the source HF model.

Models (tiny, built and saved by transformers, every parameter random, fp32):
* ``deepseek_v2``: MLA with q-LoRA, YaRN rotary with ``mscale`` / ``mscale_all_dim`` (the
  rotary's and the softmax's scale), softmax routing not renormalised and scaled by
  ``routed_scaling_factor``, ``group_limited_greedy`` args, a shared expert, a dense first layer;
* ``deepseek_v2_lite``: MLA without q-LoRA (``q_proj``: megatron-core's ``linear_q_proj``), plain
  rotary, greedy routing over 4 experts, a shared expert, a dense first layer;
* ``deepseek_v3``: MLA with q-LoRA and YaRN, sigmoid routing with a random score-correction bias,
  a shared expert, a dense first layer;
* ``glm4_moe_lite`` (GLM-4.7-Flash): DeepSeek-V3's MLA and router, plain rotary, dense layers
  chosen by ``mlp_layer_types`` (0 and 2), at TP2 x PP2 (``--num-layer-list 1,3``) x EP2.
Layouts: TP2 x EP2 (grouped GEMM for two of them) and a PP2 layout for each.

The Megatron model is configured from the *HF* config (rotary and router settings included), and
a separate test checks that the ``args`` ckpt-ir wrote say the same, as Megatron-LM reads them
into ``MLATransformerConfig``.  DeepSeek rotates interleaved pairs of the rotary dims, which
megatron-core's MLA always does (it de-interleaves before rotating halves); a control run of the
YaRN model with plain rotary settings must differ, so the comparison sees the rotary settings.
MiniCPM3 is not here: megatron-core 0.16 cannot express it (docs/families.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ir.commands.cli import main as cli_main
from tests.family_models import DENSE, append_mtp_layer, build
from tests.family_models import rank as rank_file
from tests.mcore_harness import run_job
from tests.test_hf_roundtrip import assert_same_tensors
from tests.test_megatron_moe_oracle import INPUT_IDS, WORLD

assert importlib.util.find_spec("megatron.core") is not None, "install the test extra: pip install -e .[test]"

MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
MOE = dict(
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
}
# (transformers model_type, config overrides)
MODELS = {
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            DENSE,
            **MLA,
            # group-limited routing args (8 experts in 4 groups, 2 kept): with topk == topk_group,
            # the only case where megatron-core's group score (the sum of a group's top
            # topk / topk_group scores) is DeepSeek-V2's (its best score), grouping never changes
            # the choice, so this checks the args, not the grouping
            **dict(MOE, n_routed_experts=8),
            q_lora_rank=24,
            routed_scaling_factor=1.5,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.8),
        ),
    ),
    "deepseek_v2_lite": (
        "deepseek_v2",
        dict(DENSE, **MLA, **MOE, q_lora_rank=None, routed_scaling_factor=1.0),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            DENSE,
            **MLA,
            **MOE,
            q_lora_rank=24,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
        ),
    ),
    # GLM-4.7-Flash: DeepSeek-V3's MLA and router (sigmoid scores with a random score bias,
    # scaled), its MLP layers chosen by mlp_layer_types (layers 0 and 2 dense), plain rotary.
    # rms_norm_eps is its q_a / kv_a norms' fixed 1e-6 (the release's 1e-5 elsewhere moves
    # megatron-core's logits by ~1e-4: it has one epsilon for every norm)
    "glm4_moe_lite": (
        "glm4_moe_lite",
        dict(
            DENSE,
            **MLA,
            **{k: v for k, v in MOE.items() if k != "first_k_dense_replace"},
            q_lora_rank=24,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.8,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            rms_norm_eps=1e-6,
        ),
    ),
    # MiniCPM3 with its muP scales made neutral (embedding x 1, residual branches x
    # scale_depth / sqrt(layers) = 1, lm_head input / (hidden / dim_model_base) = 1): only its
    # rotary differs from what megatron-core's MLA computes (see the MiniCPM3 tests).  rms_norm_eps
    # is the q_a / kv_a norms' fixed 1e-6 (megatron-core has one epsilon for every norm)
    "minicpm3": (
        "minicpm3",
        dict(
            DENSE,
            **MLA,
            q_lora_rank=24,
            scale_emb=1.0,
            scale_depth=2.0,
            dim_model_base=DENSE["hidden_size"],
            rms_norm_eps=1e-6,
        ),
    ),
}
LAYERS = 4
# case -> (model, ckpt-ir convert arguments)
CASES = {
    "deepseek_v2-tp2ep2": ("deepseek_v2", ["--tp", "2", "--ep", "2"]),
    "deepseek_v2-pp2ep2": ("deepseek_v2", ["--pp", "2", "--ep", "2"]),
    "deepseek_v2_lite-tp2ep2-grouped": ("deepseek_v2_lite", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "deepseek_v2_lite-tp2pp2": ("deepseek_v2_lite", ["--tp", "2", "--pp", "2"]),
    "deepseek_v3-tp2ep2-grouped": ("deepseek_v3", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "deepseek_v3-tp2pp2": ("deepseek_v3", ["--tp", "2", "--pp", "2", "--num-layer-list", "1,3"]),
    # megatron-core's own MLA keys, loaded by its dist_checkpointing at TP2 x EP2 (no key split)
    "deepseek_v3-torch_dist-tp2ep2": ("deepseek_v3", ["--ckpt-format", "torch_dist"]),
    # megatron-core's own MLA modules in the torch format (--mla-keys mcore), loaded as they are:
    # q / kv down-projections split over TP (the local spec), linear_q_proj without q-LoRA, TP1
    "deepseek_v3-mcore-keys-tp2pp2": ("deepseek_v3", ["--tp", "2", "--pp", "2", "--mla-keys", "mcore"]),
    "deepseek_v2_lite-mcore-keys-tp2ep2": (
        "deepseek_v2_lite",
        ["--tp", "2", "--ep", "2", "--mla-keys", "mcore"],
    ),
    "deepseek_v3-mcore-keys-pp2ep2": ("deepseek_v3", ["--pp", "2", "--ep", "2", "--mla-keys", "mcore"]),
    "glm4_moe_lite-tp2pp2ep2-etp1": (
        "glm4_moe_lite",
        ["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1", "--num-layer-list", "1,3"],
    ),
}
MCORE_KEYS = [case for case in CASES if "-mcore-keys-" in case]
TORCH_DIST_LAYOUT = {"tp": 2, "pp": 1, "ep": 2, "etp": 2}
# the YaRN model's TP2 x EP2 files read with plain rotary settings (rope, factor 1, no mscale)
PLAIN_ROPE = "deepseek_v2-tp2ep2-plain-rope-control"
# MiniCPM3 as ckpt-ir writes it, and a copy with the rotary rows of q_b and kv_a re-ordered so
# that megatron-core's de-interleaving gives MiniCPM3's half-split order back
MINICPM3 = "minicpm3-tp2pp2"
MINICPM3_INTERLEAVED = "minicpm3-tp2pp2-rotary-rows-interleaved"


def _mla_config(hf: dict) -> dict:
    """MLATransformerConfig fields from the HF config: sizes, and the rotary as megatron-core's MLA
    computes it (YaRN's factor, original context, betas and both mscales, or plain rope)."""
    rope = hf.get("rope_parameters") or {}
    out = {
        "q_lora_rank": hf["q_lora_rank"],
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_head_dim": hf["qk_nope_head_dim"],
        "qk_pos_emb_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
    }
    if rope.get("rope_type") == "yarn":
        out.update(
            rope_type="yarn",
            rotary_scaling_factor=rope["factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta_fast=rope["beta_fast"],
            beta_slow=rope["beta_slow"],
            mscale=rope["mscale"],
            mscale_all_dim=rope["mscale_all_dim"],
        )
    else:
        out.update(rope_type="rope", rotary_scaling_factor=1.0)
    return out


def _moe_config(model_type: str, hf: dict) -> dict:
    """The MoE block from the HF config: DeepSeek-V2 keeps the top-k of a softmax over all experts
    (Megatron's pre-softmax), DeepSeek-V3 the top-k of sigmoid scores plus the score bias."""
    types = hf.get("mlp_layer_types")  # GLM-4.7-Flash's; else the first first_k_dense_replace dense
    dense = hf.get("first_k_dense_replace")
    moe = {
        "num_experts": hf["n_routed_experts"],
        "topk": hf["num_experts_per_tok"],
        "ffn_hidden_size": hf["moe_intermediate_size"],
        "layer_freq": [int(t == "sparse") for t in types]
        if types
        else [int(i >= dense) for i in range(hf["num_hidden_layers"])],
        "shared_ffn_hidden_size": hf["moe_intermediate_size"] * hf["n_shared_experts"],
        "scaling_factor": hf["routed_scaling_factor"],
    }
    if model_type in ("deepseek_v3", "glm4_moe_lite"):
        moe.update(
            score_function="sigmoid", expert_bias=True, num_groups=hf["n_group"], group_topk=hf["topk_group"]
        )
    else:
        moe.update(score_function="softmax", pre_softmax=True)
        if hf.get("topk_method") == "group_limited_greedy":
            moe.update(num_groups=hf["n_group"], group_topk=hf["topk_group"])
    return moe


def _rank_args(out: str) -> dict:
    it = os.path.join(out, "iter_0000001")
    if os.path.exists(os.path.join(it, "common.pt")):  # torch_dist
        return vars(torch.load(os.path.join(it, "common.pt"), weights_only=False)["args"])
    first = sorted(os.listdir(it))[0]
    return vars(torch.load(os.path.join(it, first, "model_optim_rng.pt"), weights_only=False)["args"])


def _interleave_rotary_rows(src: str, dst: str, hf: dict) -> None:
    """Copy ``src`` with the rotary rows of every q_b (each local head's last qk_rope_head_dim
    rows) and of kv_a (the fused linear_qkv's last qk_rope_head_dim rows) put in interleaved order
    ``[r0, r_d/2, r1, r_d/2+1, ...]``: megatron-core's MLA takes the even then the odd rotary dims
    and rotates halves, so it then rotates MiniCPM3's halves ``(r_j, r_d/2+j)``."""
    shutil.copytree(src, dst)
    d, nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    it = os.path.join(dst, "iter_0000001")
    for rank in os.listdir(it):
        path = os.path.join(it, rank, "model_optim_rng.pt")
        blob = torch.load(path, weights_only=False)
        for key, w in blob["model"].items():
            if key.endswith("linear_q_up_proj.weight"):
                heads = w.view(-1, nope + d, w.shape[1])
                heads[:, nope:] = heads[:, nope:][:, order].clone()
            elif key.endswith("linear_qkv.weight"):
                w[-d:] = w[-d:][order].clone()
        torch.save(blob, path)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mcore-mla-oracle")
    models = {}
    for i, (name, (model_type, overrides)) in enumerate(MODELS.items()):
        path = build(
            str(root / "hf" / name), model_type, LAYERS, seed=200 + i, configs={model_type: overrides}
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model(torch.tensor(INPUT_IDS)).logits
        with open(os.path.join(path, "config.json")) as fh:
            models[name] = {"dir": path, "type": model_type, "config": json.load(fh), "logits": ref}
    job, results = [], {}
    controls = {PLAIN_ROPE: (None, None), MINICPM3: ("minicpm3", ["--tp", "2", "--pp", "2"])}
    controls[MINICPM3_INTERLEAVED] = (None, None)
    for case, (name, conversion) in {**CASES, **controls}.items():
        if case == PLAIN_ROPE:  # reads the deepseek_v2-tp2ep2 files
            name, out = "deepseek_v2", results["deepseek_v2-tp2ep2"]["ckpt"]
        elif case == MINICPM3_INTERLEAVED:
            name, out = "minicpm3", str(root / "mcore" / case)
            _interleave_rotary_rows(results[MINICPM3]["ckpt"], out, models[name]["config"])
        else:
            out = str(root / "mcore" / case)
            assert (
                cli_main(["convert", models[name]["dir"], out, "--to", "mcore", "--quiet", *conversion]) == 0
            )
        m, args = models[name], _rank_args(out)
        hf = m["config"]
        mla = _mla_config(hf)
        if case == PLAIN_ROPE:
            mla.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        moe = _moe_config(m["type"], hf) if m["type"] != "minicpm3" else None
        torch_dist = "torch_dist" in case
        layout = (
            TORCH_DIST_LAYOUT
            if torch_dist
            else {
                "tp": args["tensor_model_parallel_size"],
                "pp": args["pipeline_model_parallel_size"],
                "ep": args.get("expert_model_parallel_size", 1),
                "etp": args.get("expert_tensor_parallel_size"),
            }
        )
        job.append(
            {
                "name": case,
                "ckpt": out,
                # only the layout comes from the args: the model is configured from the HF config
                **layout,
                "vpp": None,
                "torch_dist": torch_dist,
                "mla_keys": "mcore" if case in MCORE_KEYS else "mindspeed",
                "hf_config": hf,
                "padded_vocab": args["padded_vocab_size"],
                "tied": bool(hf.get("tie_word_embeddings")),
                "qkv_bias": False,
                "qk_norm": True,  # MLA's q_a / kv_a norms
                "mla": mla,
                "moe": moe and {**moe, "grouped_gemm": bool(args.get("moe_grouped_gemm"))},
                "config_extra": {
                    "num_layers_in_first_pipeline_stage": 1,
                    "num_layers_in_last_pipeline_stage": 3,
                }
                if "--num-layer-list" in (conversion or ())
                else {},
                "input_ids": INPUT_IDS,
                "out": str(root / "logits" / f"{case}.pt"),
            }
        )
        results[case] = {"ckpt": out, "model": m, "args": args}
    os.makedirs(root / "logits")
    for jc, (got, reports) in zip(job, run_job(str(root), job, WORLD)):
        results[jc["name"]].update(job=jc, logits=got, reports=reports)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_exactly(oracle, case):
    """Every rank's file fills every parameter of its MLA GPTModel (q / kv down- and
    up-projections, their norms, linear_proj, router, experts, shared expert) with no key left."""
    r = oracle[case]
    for rep in r["reports"]:
        for chunk in rep["chunks"]:
            assert chunk["unexpected"] == [], f"rank {rep['rank']}: keys GPTModel does not have"
            assert [k for k in chunk["missing"] if not k.endswith("._extra_state")] == []
            assert chunk["loaded"] == chunk["params"]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(oracle, case):
    r = oracle[case]
    got, ref = r["logits"], r["model"]["logits"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_plain_rope_settings_change_the_logits(oracle):
    """Control: the YaRN model's files under plain rotary settings give other logits, so the
    comparison above depends on the rotary settings being right."""
    got, ref = oracle[PLAIN_ROPE]["logits"], oracle[PLAIN_ROPE]["model"]["logits"]
    assert (got - ref).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_args_give_megatron_the_same_model(oracle, case):
    """The rank files' ``args`` carry the MLA sizes, rotary and router settings the oracle was
    configured with from the HF config (the MLATransformerConfig / TransformerConfig fields
    Megatron-LM fills from args of the same names)."""
    r = oracle[case]
    args, job = r["args"], r["job"]
    for field, value in job["mla"].items():
        assert args[field] == value, field
    assert args["multi_latent_attention"] is True
    moe = job["moe"]
    assert args["moe_router_score_function"] == moe["score_function"]
    assert bool(args["moe_router_pre_softmax"]) == moe.get("pre_softmax", False)
    assert args["moe_router_topk_scaling_factor"] == moe["scaling_factor"]
    assert bool(args.get("moe_router_enable_expert_bias")) == moe.get("expert_bias", False)
    assert args["moe_router_num_groups"] == moe.get("num_groups")
    assert args["moe_router_group_topk"] == moe.get("group_topk")


def test_minicpm3_rotary_is_not_megatron_cores_mla_rotary(oracle):
    """MiniCPM3 rotates the halves of its rotary dims; megatron-core 0.16's MLA always rotates
    interleaved pairs (DeepSeek's order; ``rotary_interleaved`` is refused with MLA).  On the files
    ckpt-ir writes (MindSpeed-LLM's rows, the HF order) megatron-core's logits differ from
    transformers' even with the muP scales neutral; with the rotary rows re-ordered they agree, so
    the rotary order is the only difference in the attention and the rest of the layout is right."""
    written, interleaved = oracle[MINICPM3], oracle[MINICPM3_INTERLEAVED]
    for r in (written, interleaved):
        for rep in r["reports"]:
            for chunk in rep["chunks"]:
                assert chunk["unexpected"] == [] and chunk["loaded"] == chunk["params"]
    ref = written["model"]["logits"]
    assert (written["logits"] - ref).abs().max() > 1e-2
    torch.testing.assert_close(interleaved["logits"], ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", MCORE_KEYS)
def test_megatron_core_keys_read_back_bit_exact(oracle, case, tmp_path):
    """Rank files with megatron-core's own MLA modules are read with no flag (the keys say which):
    they convert to HF bit for bit."""
    back = str(tmp_path / "hf")
    assert cli_main(["convert", oracle[case]["ckpt"], back, "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(oracle[case]["model"]["dir"], back)


def test_te_spec_megatron_core_keys(tmp_path, capsys):
    """``--mla-keys mcore --norm-names te``: the modules of megatron-core's Transformer-Engine layer
    spec for MLA (``get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True,
    qk_layernorm=True)``): ``input_layernorm`` a norm of its own (TENorm), the down-projections
    ``TELinear`` duplicated (whole on every TP rank), the q / kv norms fused into the
    up-projections (``TELayerNormColumnParallelLinear``: ``layer_norm_weight``), column-parallel
    up-projections, row-parallel ``linear_proj``, a MoE layer's ``pre_mlp_layernorm`` a norm of its
    own; an MTP layer's final norm inside it and the main one ``decoder.final_layernorm``
    (megatron-core's ``MultiTokenPredictionLayer``).  Transformer Engine does not run on this CPU
    machine, so the tensors are compared with the HF source's by those rules.  Read back with no
    flag, resharded to TP1 the files keep that form, and convert to HF bit for bit.  MindSpeed-LLM's
    ``te-input`` naming has no megatron-core MLA form: a usage error."""
    model_type, overrides = MODELS["deepseek_v3"]
    hf = build(
        str(tmp_path / "hf"),
        model_type,
        LAYERS,
        seed=9,
        configs={model_type: dict(overrides, first_k_dense_replace=0)},
    )
    append_mtp_layer(hf, DENSE["hidden_size"])
    sd = load_file(os.path.join(hf, "model.safetensors"))
    out = str(tmp_path / "te")
    flags = ["--to", "mcore", "--mla-keys", "mcore", "--quiet"]
    assert cli_main(["convert", hf, out, *flags, "--tp", "2", "--norm-names", "te"]) == 0

    def attention(layer: int, tp: int, r: int) -> dict:
        h = f"model.layers.{layer}."
        return {
            "input_layernorm.weight": sd[h + "input_layernorm.weight"],
            "self_attention.linear_q_down_proj.weight": sd[h + "self_attn.q_a_proj.weight"],
            "self_attention.linear_q_up_proj.layer_norm_weight": sd[h + "self_attn.q_a_layernorm.weight"],
            "self_attention.linear_q_up_proj.weight": sd[h + "self_attn.q_b_proj.weight"].chunk(tp)[r],
            "self_attention.linear_kv_down_proj.weight": sd[h + "self_attn.kv_a_proj_with_mqa.weight"],
            "self_attention.linear_kv_up_proj.layer_norm_weight": sd[h + "self_attn.kv_a_layernorm.weight"],
            "self_attention.linear_kv_up_proj.weight": sd[h + "self_attn.kv_b_proj.weight"].chunk(tp)[r],
            "self_attention.linear_proj.weight": sd[h + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
            "pre_mlp_layernorm.weight": sd[h + "post_attention_layernorm.weight"],
        }

    def check(ckpt: str, tp: int) -> None:
        for r in range(tp):
            model = rank_file(ckpt, f"mp_rank_{r:02d}")["model"]
            prefixes = {f"decoder.layers.{i}.": i for i in range(LAYERS)} | {
                "mtp.layers.0.transformer_layer.": LAYERS
            }
            for prefix, layer in prefixes.items():
                got = {
                    k[len(prefix) :]: v
                    for k, v in model.items()
                    if k.startswith(prefix) and not k[len(prefix) :].startswith("mlp.")
                }
                want = attention(layer, tp, r)
                assert got.keys() == want.keys(), prefix
                assert all(torch.equal(got[k], want[k]) for k in want), prefix
            norms = {k: v for k, v in model.items() if "final_layernorm" in k}
            assert norms.keys() == {"decoder.final_layernorm.weight", "mtp.layers.0.final_layernorm.weight"}
            assert torch.equal(norms["decoder.final_layernorm.weight"], sd["model.norm.weight"])
            want_norm = sd[f"model.layers.{LAYERS}.shared_head.norm.weight"]
            assert torch.equal(norms["mtp.layers.0.final_layernorm.weight"], want_norm)

    check(out, 2)
    tp1, back = str(tmp_path / "tp1"), str(tmp_path / "back")
    assert cli_main(["convert", out, tp1, "--to", "mcore", "--quiet"]) == 0
    check(tp1, 1)
    assert cli_main(["convert", tp1, back, "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(hf, back)
    capsys.readouterr()
    assert cli_main(["convert", hf, str(tmp_path / "bad"), *flags, "--norm-names", "te-input"]) == 2
    err = capsys.readouterr().err
    assert "--norm-names te-input" in err and "--mla-keys mcore" in err and err.count("\n") == 1
