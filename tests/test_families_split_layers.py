"""Mamba hybrids whose HF layer holds a mixer AND an MLP (``ckpt_ir/families/mamba.py``: bamba,
granitemoehybrid with and without experts, falcon_h1): a tiny random model built and saved by
transformers converts HF -> Megatron-Core (TP2, PP with uneven stages, EP2 for MoE) -> HF
bit-exactly, transformers' logits on the result equal the original's, and config.json comes back
with every source value (num_hidden_layers the HF count, Falcon-H1's muP multipliers and
mamba_norm_before_gate untouched).

Format facts the rank files are held to (docs/reference/composed-blocks.md): megatron-core's
MambaModel makes each pattern symbol its own Megatron layer, numbered locally on each pipeline
stage (§2.2), so Bamba's / Granite-4's HF layer i is Megatron layers 2i (mixer: Mamba ``mixer.*`` +
``norm``, or attention ``input_layernorm`` + ``self_attention.*``) and 2i + 1 (MLP:
``pre_mlp_layernorm`` + ``mlp.linear_fc1`` = [gate; up] + ``linear_fc2``), the final norm
``decoder.final_norm``; ``--num-layer-list`` counts Megatron layers.  Falcon-H1's parallel mixers
have no MambaModel layer: its keys are Megatron-Bridge's FalconH1 model's (§3:
``norm.weight`` the shared input norm, ``mamba_mixer.*``, ``self_attention.linear_qkv`` /
``linear_proj``, ``mlp.linear_fc1.layer_norm_weight`` the pre-FF norm)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import FormatError, LayoutError, VerifyError
from ckpt_ir.families import Family, by_name
from ckpt_ir.ir.blocks import to_pattern
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

MAMBA = dict(
    mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=8
)
MAMBA_PARTS = (
    "A_log",
    "D",
    "conv1d.bias",
    "conv1d.weight",
    "dt_bias",
    "in_proj.weight",
    "norm.weight",
    "out_proj.weight",
)
# name -> (model_type, HF layers, config overrides); two HF layers: Mamba, then attention
MODELS = {
    "bamba": ("bamba", 2, dict(DENSE, **MAMBA, attn_layer_indices=[1])),
    "granitemoehybrid": (
        "granitemoehybrid",
        2,
        dict(
            DENSE,
            **MAMBA,
            layer_types=["mamba", "attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=48,
            position_embedding_type="rope",
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.04,
            logits_scaling=6.0,
        ),
    ),
    # no experts: the shared MLP is each layer's dense MLP
    "granitemoehybrid-dense": (
        "granitemoehybrid",
        2,
        dict(
            DENSE,
            **MAMBA,
            layer_types=["mamba", "attention"],
            num_local_experts=0,
            shared_intermediate_size=48,
        ),
    ),
    # muP multipliers away from 1, the mixer's gated norm (mamba_rms_norm), d_ssm != expand * hidden
    "falcon_h1": (
        "falcon_h1",
        3,
        dict(
            DENSE,
            **MAMBA,
            mamba_d_ssm=128,
            mamba_expand=1,
            head_dim=16,
            mamba_rms_norm=True,
            mamba_norm_before_gate=False,
            embedding_multiplier=2.0,
            lm_head_multiplier=0.5,
            key_multiplier=0.8,
            attention_in_multiplier=0.5,
            attention_out_multiplier=0.6,
            ssm_in_multiplier=1.3,
            ssm_out_multiplier=0.7,
            mlp_multipliers=[0.9, 1.1],
            ssm_multipliers=[1.0, 0.9, 1.1, 1.2, 0.8],
        ),
    ),
}
# (model, Megatron layout); layer lists in Megatron layers (two per Bamba / Granite-4 HF layer)
CASES = [
    # stage 0: HF layer 0's Mamba mixer only; its MLP opens stage 1
    ("bamba", dict(tp=2, pp=2, num_layer_list=(1, 3))),
    ("granitemoehybrid", dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1), norm_names="te")),
    ("bamba", dict(tp=2, norm_names="te")),
    ("granitemoehybrid-dense", dict(tp=2, pp=2, num_layer_list=(3, 1))),
    # Megatron-Bridge's FalconH1 model splits the layers evenly (no layer list, no VPP)
    ("falcon_h1", dict(tp=2, pp=3, norm_names="te")),
    ("falcon_h1", dict(tp=2)),
]
# per family: the layouts round-tripped (the support matrix reads this)
LAYOUTS: dict[str, tuple[dict, ...]] = {}
for _model, _layout in CASES:
    LAYOUTS[MODELS[_model][0]] = LAYOUTS.get(MODELS[_model][0], ()) + (_layout,)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_layers")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            model_type, layers, cfg = MODELS[name]
            cache[name] = build(str(root / name), model_type, layers, configs={model_type: cfg})
        return cache[name]

    return get


@pytest.mark.parametrize("name,layout", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits_and_config(models, tmp_path, name, layout):
    src = models(name)
    back = assert_round_trip(src, tmp_path, MODELS[name][0], layout)
    before, after = (json.load(open(f"{d}/config.json")) for d in (src, back))
    assert {k: after.get(k) for k in before} == before
    first = sorted(os.listdir(tmp_path / "mid" / "iter_0000001"))[0]  # TP, PP (and EP) rank 0
    args = rank(str(tmp_path / "mid"), first)["args"]
    hf_layers = MODELS[name][1]
    blocks = 1 if name == "falcon_h1" else 2  # Megatron layers per HF layer
    assert args.num_layers == blocks * hf_layers == sum(layout.get("num_layer_list", (args.num_layers,)))
    assert json.loads(args.ckpt_ir_hf_config)["num_hidden_layers"] == hf_layers


def test_bamba_hf_layer_is_two_megatron_layers_numbered_per_stage(models, tmp_path):
    """TP1, PP2 with stages of 1 and 3 Megatron layers (pattern M-*-): stage 0 holds HF layer 0's
    Mamba mixer alone; stage 1 holds its MLP (local layer 0), HF layer 1's attention (1) and MLP
    (2), and the final norm."""
    src = models("bamba")
    assert to_pattern(ck.load(src).spec) == "M-*-"
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", pp=2, num_layer_list=(1, 3)))
    first, last = (rank(mid, f"mp_rank_00_00{s}")["model"] for s in (0, 1))
    h = "model.layers.{}."
    want0 = {f"decoder.layers.0.mixer.{p}": hf[h.format(0) + f"mamba.{p}"] for p in MAMBA_PARTS}
    want0 |= {"decoder.layers.0.norm.weight": hf[h.format(0) + "input_layernorm.weight"]}
    want0 |= {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    want1 = {
        "decoder.final_norm.weight": hf["model.final_layernorm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }
    want1 |= {
        "decoder.layers.1.input_layernorm.weight": hf[h.format(1) + "input_layernorm.weight"],
        "decoder.layers.1.self_attention.linear_proj.weight": hf[h.format(1) + "self_attn.o_proj.weight"],
    }
    for local, layer in ((0, 0), (2, 1)):
        ff = h.format(layer) + "feed_forward."
        want1 |= {
            f"decoder.layers.{local}.pre_mlp_layernorm.weight": hf[
                h.format(layer) + "pre_ff_layernorm.weight"
            ],
            f"decoder.layers.{local}.mlp.linear_fc1.weight": torch.cat(
                [hf[ff + "gate_proj.weight"], hf[ff + "up_proj.weight"]]
            ),
            f"decoder.layers.{local}.mlp.linear_fc2.weight": hf[ff + "down_proj.weight"],
        }
    assert set(first) - {k for k in first if k.endswith("_extra_state")} == set(want0)
    qkv = {"decoder.layers.1.self_attention.linear_qkv.weight"}
    assert set(last) - {k for k in last if k.endswith("_extra_state")} == set(want1) | qkv
    for sd, want in ((first, want0), (last, want1)):
        for k, v in want.items():
            assert torch.equal(sd[k], v), k


def test_falcon_h1_layers_under_megatron_bridge_keys_without_the_mixer_norm(models, tmp_path):
    """Falcon-H1 without mamba_rms_norm (transformers' default: no gated norm in the mixer): one
    Megatron layer per HF layer under Megatron-Bridge's FalconH1 keys, the shared input norm
    ``norm.weight`` and the pre-FF norm fused into linear_fc1, and back bit-exactly."""
    model_type, _, cfg = MODELS["falcon_h1"]
    src = build(str(tmp_path / "hf"), model_type, 2, configs={model_type: dict(cfg, mamba_rms_norm=False)})
    hf = hf_state(src)
    assert not any(k.endswith("mamba.norm.weight") for k in hf)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore"))
    sd = rank(mid, "mp_rank_00")["model"]
    layer = {
        "norm.weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_ff_layernorm.weight",
        "mlp.linear_fc2.weight": "feed_forward.down_proj.weight",
        **{f"mamba_mixer.{p}": f"mamba.{p}" for p in MAMBA_PARTS if p != "norm.weight"},
    }
    fused = ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")
    keys = {k for k in sd if not k.endswith("_extra_state")}
    top = {"embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight"}
    assert keys == top | {f"decoder.layers.{i}.{m}" for i in (0, 1) for m in (*layer, *fused)}
    for i in (0, 1):
        for m, k in layer.items():
            assert torch.equal(sd[f"decoder.layers.{i}.{m}"], hf[f"model.layers.{i}.{k}"]), m
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


@pytest.mark.parametrize(
    "layout",
    [
        dict(pp=2, num_layer_list=(1, 2)),  # uneven stages
        dict(pp=2),  # 3 layers do not split evenly over 2 stages
        dict(pp=3, vpp_layers=1),
        dict(pp=2, noop_layers=(3,)),
    ],
    ids=["uneven", "indivisible", "vpp", "noop"],
)
def test_falcon_h1_pipeline_is_even_as_megatron_bridge_builds_it(models, tmp_path, layout):
    """Megatron-Bridge's FalconH1Stack gives every pipeline stage num_layers // PP layers and
    asserts no virtual pipeline (falconh1_block.py ``_select_layers_for_pipeline_parallel``): any
    other pipeline layout is a one-line error naming that model, and nothing is written."""
    with pytest.raises(LayoutError) as e:
        convert(models("falcon_h1"), str(tmp_path / "mid"), ck.Target(to="mcore", **layout))
    assert "\n" not in str(e.value) and "FalconH1" in str(e.value) and "evenly" in str(e.value)
    assert not (tmp_path / "mid").exists()


def test_sublayers_renumber_both_ways_and_refuse_a_block_in_the_wrong_sub_layer():
    """Bamba's table: HF layer i's mixer names are canonical layer 2i, its MLP names 2i + 1, keys
    outside the layers unchanged; back to HF, a tensor in the other sub-layer's canonical layer is a
    one-line error naming it; a family whose table names a layer tensor in no sub-layer is refused."""
    sub = by_name("bamba").split_layers
    pairs = {
        "model.layers.3.input_layernorm.weight": "model.layers.6.input_layernorm.weight",
        "model.layers.3.mamba.in_proj.weight": "model.layers.6.mamba.in_proj.weight",
        "model.layers.3.self_attn.q_proj.weight": "model.layers.6.self_attn.q_proj.weight",
        "model.layers.3.pre_ff_layernorm.weight": "model.layers.7.pre_ff_layernorm.weight",
        "model.layers.3.feed_forward.up_proj.weight": "model.layers.7.feed_forward.up_proj.weight",
        "model.final_layernorm.weight": "model.final_layernorm.weight",
        "model.layers.3.unknown.weight": "model.layers.3.unknown.weight",  # left for the table to report
    }
    for hf, table in pairs.items():
        assert sub.to_table(hf) == table
        if "unknown" not in hf:
            assert sub.to_hf(table) == hf
    with pytest.raises(
        VerifyError, match=r"^model\.layers\.7\.mamba\.D: canonical layer 7 is sub-layer 1 of HF layer 3"
    ):
        sub.to_hf("model.layers.7.mamba.D")
    with pytest.raises(ValueError, match=r"model\.layers\.\{i\}\.mixer\.D is in no sub-layer"):
        Family(
            name="x",
            model_types=(),
            architecture="X",
            tensors=(("model.layers.{i}.mixer.D", "layers.{i}.mamba.D"),),
            split_layers=sub,
        )


@pytest.mark.parametrize(
    "family,key",
    [("bamba", "mamba_proj_bias"), ("granitemoehybrid", "mamba_proj_bias"), ("falcon_h1", "projectors_bias")],
)
def test_mamba_biases_megatron_core_lacks_are_refused_in_one_line(family, key):
    model_type, layers, cfg = next(m for m in MODELS.values() if m[0] == family)
    cfg = dict(cfg, model_type=model_type, num_hidden_layers=layers, **{key: True})
    with pytest.raises(FormatError, match=rf"^config\.json: {key} is true") as e:
        by_name(family).spec_from_config(cfg)
    assert "\n" not in str(e.value)


def test_an_unknown_tensor_is_reported_under_its_hf_name(models, tmp_path):
    """A tensor of a sub-layer the table does not know (a Mamba in_proj bias) is named as the HF
    checkpoint names it, not renumbered, and --allow-unused matches HF names."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ckpt_ir.errors import CoverageError

    src = str(tmp_path / "hf")
    shutil.copytree(models("bamba"), src)
    sd = load_file(f"{src}/model.safetensors")
    bias = "model.layers.1.mamba.in_proj.bias"
    sd[bias] = torch.zeros(328)
    save_file(sd, f"{src}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CoverageError, match=r": model\.layers\.1\.mamba\.in_proj\.bias;"):
        ck.load(src)
    assert bias in ck.load(src, allow_unused=("model.layers.1.*.bias",)).dropped


def test_a_running_models_tensors_are_renumbered_as_the_files_are(models):
    """The runtime path (a training job's in-memory state, ``lift(runtime=...)``): Granite-4's
    tensors under its HF names give the canonical tensors the files give."""
    from ckpt_ir.frontends.hf import lift, read_config
    from ckpt_ir.io.weight_files import file_tensors

    src = models("granitemoehybrid")
    files = lift(src)
    running = lift(src, hf_config=read_config(src), runtime=file_tensors(f"{src}/model.safetensors"))
    assert list(running.tensors) == list(files.tensors)
    assert all(running.tensors[n].expr == t.expr for n, t in files.tensors.items())


def test_peft_adapter_on_both_sub_layers_merges_as_peft_and_exports_back(models, tmp_path):
    """A PEFT adapter on Bamba's attention (HF layer 1's mixer) and MLPs (HF module names, HF layer
    numbers): merged, the weights are peft's merge_and_unload; exported to PEFT again (HF base +
    adapter -> peft), the same tensors under the same names.  (LoRA on the Mamba mixer's in_proj /
    out_proj has no roles yet.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_lora import make_peft_adapter

    base, adapter = models("bamba"), str(tmp_path / "adapter")
    make_peft_adapter(base, adapter, ("q_proj", "o_proj", "gate_proj", "down_proj"))
    peft_merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        .merge_and_unload()
        .state_dict()
    )
    merged, again = str(tmp_path / "merged"), str(tmp_path / "again")
    convert(base, merged, ck.Target(to="hf", lora_load=adapter))
    ours = hf_state(merged)
    assert set(ours) == set(peft_merged)
    assert all(torch.equal(ours[k], peft_merged[k]) for k in ours)
    convert(base, again, ck.Target(to="peft", lora_load=adapter))
    assert_same_tensors_named(f"{adapter}/adapter_model.safetensors", f"{again}/adapter_model.safetensors")


def assert_same_tensors_named(a: str, b: str) -> None:
    from safetensors.torch import load_file

    sa, sb = load_file(a), load_file(b)
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_megatron_core_mamba_model_loads_the_rank_files_strictly(models, tmp_path):
    """megatron-core's MambaModel (tests/mcore_hybrid.py: built on CPU, not run) of Bamba's pattern
    M-*- at TP2 x PP2 (first stage 1 layer; MindSpeed's local norm modules) and of Granite-4's
    ME*E at TP2 x EP2 (Transformer Engine naming, SequentialMLP experts, a gated shared expert)
    has exactly the keys and shapes of ckpt-ir's rank files, but for the modules' _extra_state.
    ckpt-ir's torch_dist of each (one tensor per global layer, the mixer part by part) loads
    strictly into the same models with the stock TE spec (dist_checkpointing.load, no missing or
    unexpected key), and what Granite-4's ranks load is its TP2 x EP2 rank files, tensor for tensor."""
    from tests.mcore_hybrid import load_results, mcore_keys

    def case(name: str, layout: dict, out: str | None = None, **fields) -> dict:
        mid = str(tmp_path / (out or name))
        convert(models(name), mid, ck.Target(to="mcore", **layout))
        cfg = MODELS[name][2]
        return dict(
            kind="mamba",
            hidden=cfg["hidden_size"],
            heads=cfg["num_attention_heads"],
            groups=cfg["num_key_value_heads"],
            ffn=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            mamba_head_dim=MAMBA["mamba_d_head"],
            mamba_state_dim=MAMBA["mamba_d_state"],
            mamba_num_groups=MAMBA["mamba_n_groups"],
            ckpt=mid,
            **fields,
        )

    granite = MODELS["granitemoehybrid"][2]
    cases = [
        case(
            "bamba",
            dict(tp=2, pp=2, num_layer_list=(1, 3)),
            tp=2,
            pp=2,
            num_layers_in_first_pipeline_stage=1,
            spec="local",
            hybrid_override_pattern="M-*-",
        ),
        case(
            "granitemoehybrid",
            dict(tp=2, ep=2, norm_names="te"),
            tp=2,
            pp=1,
            ep=2,
            hybrid_override_pattern="ME*E",
            num_moe_experts=granite["num_local_experts"],
            moe_ffn_hidden_size=granite["intermediate_size"],
            moe_shared_expert_intermediate_size=granite["shared_intermediate_size"],
        ),
    ]
    dist = [{**c, "spec": "te"} for c in cases]  # torch_dist is stored under the TE names
    for c, (name, out) in zip(dist, (("bamba", "bamba_dist"), ("granitemoehybrid", "granite_dist"))):
        c["ckpt"] = case(name, dict(ckpt_format="torch_dist"), out)["ckpt"]
    dist[1]["dump"] = True
    reports = mcore_keys(cases + dist, tmp_path / "oracle")
    for r in load_results(reports[0] + reports[1]):
        # ckpt-ir writes no _extra_state from an HF source (for any family: none to carry)
        missing = [k for k in r["missing"] if not k.endswith("._extra_state")]
        assert (r["error"], missing, r["unexpected"], r["shape_mismatch"]) == (None, [], [], []), r["file"]
    for r in load_results(reports[2] + reports[3]):
        assert r["format"] == "torch_dist" and r["ok"] and r["error"] is None, r
        assert r["missing"] == r["unexpected"] == r["state_dict_missing"] == [], r
    for r in load_results(reports[3]):
        loaded = torch.load(tmp_path / "oracle" / f"case3.rank{r['rank']}.sd.pt")
        want = rank(cases[1]["ckpt"], f"mp_rank_{r['tp_rank']:02d}_{r['ep_rank']:03d}")["model"]
        assert sorted(loaded) == sorted(k for k in want if not k.endswith("._extra_state"))
        for k, v in loaded.items():
            assert torch.equal(v, want[k]), (r["rank"], k)
