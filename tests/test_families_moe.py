"""Mixture-of-experts families of ``ckpt_ir/families/moe.py`` (mixtral, qwen2_moe and qwen3_moe are
in ``test_hf_roundtrip.py`` and ``test_moe.py``): tiny random models built and saved by
transformers (``tests/family_models.py``) convert HF -> Megatron-Core (TP2 with a PP layout, TP2 x
EP2, grouped GEMM) -> HF bit-exactly, and transformers' logits on the result equal the original's.
The Megatron tensors are checked against the HF ones with slicing written here from the format
facts (gpt-oss's interleaved [E, H, 2F] gate_up_proj, Megatron-Bridge's per-expert [gate; up]
fc1, MindSpeed-LLM's MTP and router keys), not with ckpt-ir's own rules."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import FormatError, LayoutError, VerifyError
from tests.family_models import (
    CONFIGS,
    DENSE,
    append_mtp_layer,
    assert_lora_merge_equals_peft,
    assert_round_trip,
    listed_families,
    model_cache,
    rank,
)
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "glm4_moe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "hunyuan_v1_moe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "phimoe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True, norm_names="te")),
    "minimax_m2": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "hy_v3": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "olmoe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    # megatron-core builds expert biases only with expert TP 1
    "gpt_oss": (dict(tp=2, pp=2, etp=1), dict(tp=2, ep=2, etp=1), dict(ckpt_format="torch_dist")),
    # issue 31's families: one conversion each through TP2 x EP2 x PP2 with an uneven layer list
    # (megatron-core's logits on their rank files: test_megatron_moe_oracle.py)
    "dots1": (dict(tp=2, pp=2, ep=2, num_layer_list=(1, 3), grouped_gemm=True),),
    "ernie4_5_moe": (dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1)),),
    "exaone_moe": (dict(tp=2, pp=2, ep=2, num_layer_list=(1, 3)),),
    "granitemoe": (dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1), norm_names="te"),),
    "granitemoeshared": (dict(tp=2, pp=2, ep=2, num_layer_list=(1, 3), grouped_gemm=True),),
    "llama4_text": (dict(tp=2, pp=2, ep=2, num_layer_list=(3, 1)),),
    "afmoe": (dict(tp=2, pp=2, ep=2, num_layer_list=(1, 3)),),
    "cohere2_moe": (dict(tp=2, ep=2), dict(pp=2, ep=2, num_layer_list=(1, 3))),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "moe")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


def test_phimoe_biases_are_carried_under_megatron_names(models, tmp_path):
    """Every LayerNorm bias, o_proj.bias and lm_head.bias reaches the rank files (MindSpeed-LLM's
    phi3.5-moe converter drops them): norm and row-parallel biases whole on each TP rank, the
    output-layer bias split by vocabulary rows like its weight."""
    src = models("phimoe")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    v = hf["lm_head.bias"].shape[0] // 2
    for t in range(2):
        sd = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)["model"]
        assert torch.equal(
            sd["decoder.layers.1.input_layernorm.bias"], hf["model.layers.1.input_layernorm.bias"]
        )
        assert torch.equal(
            sd["decoder.layers.1.pre_mlp_layernorm.bias"], hf["model.layers.1.post_attention_layernorm.bias"]
        )
        assert torch.equal(
            sd["decoder.layers.1.self_attention.linear_proj.bias"], hf["model.layers.1.self_attn.o_proj.bias"]
        )
        assert torch.equal(sd["decoder.final_layernorm.bias"], hf["model.norm.bias"])
        assert torch.equal(sd["output_layer.bias"], hf["lm_head.bias"][t * v : (t + 1) * v])


def test_minimax_full_width_qk_norm_is_whole_on_every_rank(models, tmp_path):
    """MiniMax-M2's q_norm [heads*head_dim] / k_norm [kv_heads*head_dim] normalise the whole
    projection; MindSpeed-LLM's converter writes them whole on every TP rank under the
    q_layernorm / k_layernorm keys (compared bit for bit by bench/peers/mindspeed_v2.py)."""
    src = models("minimax_m2")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    q, k = hf["model.layers.0.self_attn.q_norm.weight"], hf["model.layers.0.self_attn.k_norm.weight"]
    assert q.shape == (4 * 32,) and k.shape == (2 * 32,)
    for t in range(2):
        sd = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)["model"]
        assert torch.equal(sd["decoder.layers.0.self_attention.q_layernorm.weight"], q)
        assert torch.equal(sd["decoder.layers.0.self_attention.k_layernorm.weight"], k)
        assert torch.equal(
            sd["decoder.layers.0.mlp.router.expert_bias"],
            hf["model.layers.0.block_sparse_moe.e_score_correction_bias"],
        )


def test_glm4_moe_mtp_layer_round_trips(models, tmp_path):
    """GLM-4.5's released checkpoints carry MTP layers as model.layers.{num_hidden_layers}.* (a MoE
    decoder layer plus enorm, hnorm, eh_proj, shared_head.norm and copies of the embedding and
    head); transformers saves none, so one is written here the way the release stores it."""
    import shutil

    src = str(tmp_path / "hf")
    shutil.copytree(models("glm4_moe"), src)
    _, sd = append_mtp_layer(src, CONFIGS["glm4_moe"]["hidden_size"])
    n = 4  # the MTP layer's HF index
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, grouped_gemm=True))
    assert ck.load(mid).spec.mtp_layers == 1
    last = torch.load(f"{mid}/iter_0000001/mp_rank_01_001_001/model_optim_rng.pt", weights_only=False)[
        "model"
    ]
    assert torch.equal(last["mtp.layers.0.enorm.weight"], sd[f"model.layers.{n}.enorm.weight"])
    assert torch.equal(
        last["mtp.layers.0.transformer_layer.mlp.router.expert_bias"],
        sd[f"model.layers.{n}.mlp.gate.e_score_correction_bias"],
    )
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2, pp=2, ep=2, grouped_gemm=True), dict(tp=2, ep=2)],
    ids=["tp2pp2ep2-grouped", "tp2ep2"],
)
def test_hy_v3_mtp_layer_round_trips(models, tmp_path, layout):
    """A Hunyuan V3 MTP layer as the release stores it (model.layers.{num_hidden_layers}.*: a MoE
    decoder layer, enorm, hnorm, eh_proj, final_layernorm; no embedding / head copies, no MTP count
    in the config) goes to MindSpeed-LLM's mtp.layers.0.* (Megatron-Core's MTP keys; with PP the
    last stage gets the embedding, as Megatron's MTP needs it there) and back unchanged."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("hy_v3"), src)
    _, sd = append_mtp_layer(src, DENSE["hidden_size"], hunyuan=True)
    n, pp = 4, layout.get("pp", 1)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    assert ck.load(mid).spec.mtp_layers == 1
    last = rank(mid, "mp_rank_01_001_001" if pp == 2 else "mp_rank_01_001")["model"]
    mtp = {
        "mtp.layers.0.enorm.weight": sd[f"model.layers.{n}.enorm.weight"],
        "mtp.layers.0.hnorm.weight": sd[f"model.layers.{n}.hnorm.weight"],
        "mtp.layers.0.eh_proj.weight": sd[f"model.layers.{n}.eh_proj.weight"].chunk(2)[1],  # TP rank 1
        "mtp.final_layernorms.0.weight": sd[f"model.layers.{n}.final_layernorm.weight"],
        "mtp.layers.0.transformer_layer.mlp.router.expert_bias": sd[f"model.layers.{n}.mlp.expert_bias"],
        "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight": sd[
            f"model.layers.{n}.self_attn.q_norm.weight"
        ],
        "final_layernorm.weight": sd["model.norm.weight"],
    }
    for k, v in mtp.items():
        assert torch.equal(last[k], v), k
    # PP 1: the main embedding; PP 2: the last stage's copy for the MTP layer
    assert torch.equal(last["embedding.word_embeddings.weight"], sd["model.embed_tokens.weight"].chunk(2)[1])
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_hy_v3_router_and_shared_experts_under_megatron_names(models, tmp_path):
    """HYV3's router (mlp.router.gate), score bias (mlp.expert_bias) and shared_mlp reach the
    MindSpeed keys; layer 0 (mlp_layer_types "dense") is a dense MLP."""
    src = models("hy_v3")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    sd = rank(mid, "mp_rank_00")["model"]
    assert torch.equal(sd["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.router.gate.weight"])
    assert torch.equal(sd["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.expert_bias"])
    f = hf["model.layers.1.mlp.shared_mlp.gate_proj.weight"].shape[0] // 2
    assert torch.equal(
        sd["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"],
        torch.cat(
            [
                hf["model.layers.1.mlp.shared_mlp.gate_proj.weight"][:f],
                hf["model.layers.1.mlp.shared_mlp.up_proj.weight"][:f],
            ]
        ),
    )
    assert "decoder.layers.0.mlp.router.weight" not in sd and "decoder.layers.0.mlp.linear_fc1.weight" in sd


def test_gpt_oss_experts_follow_megatron_bridge(models, tmp_path):
    """HF gate_up_proj[e] is [H, 2F] with gate in the even columns and up in the odd ones; expert
    e's Megatron fc1 is [gate; up] as [out, in] rows (Megatron-Bridge), its bias likewise; fc2 is
    down_proj[e] transposed; with TP2 x EP2 and expert TP 1 the rank files are (t, ep) = (0, 0)
    and (1, 1), each holding whole experts of its EP rank; the sinks (softmax_offset) are split
    over TP with the heads; the router's own bias is mlp.router.bias."""
    src = models("gpt_oss")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2, etp=1))
    gu, gub = (
        hf["model.layers.1.mlp.experts.gate_up_proj"],
        hf["model.layers.1.mlp.experts.gate_up_proj_bias"],
    )
    down, downb = hf["model.layers.1.mlp.experts.down_proj"], hf["model.layers.1.mlp.experts.down_proj_bias"]
    for t, ep in ((0, 0), (1, 1)):
        sd = rank(mid, f"mp_rank_0{t}_00{ep}")["model"]
        for local in range(2):
            e = ep * 2 + local
            key = f"decoder.layers.1.mlp.experts.local_experts.{local}."
            assert torch.equal(sd[key + "linear_fc1.weight"], torch.cat([gu[e][:, 0::2].T, gu[e][:, 1::2].T]))
            assert torch.equal(sd[key + "linear_fc1.bias"], torch.cat([gub[e][0::2], gub[e][1::2]]))
            assert torch.equal(sd[key + "linear_fc2.weight"], down[e].T)
            assert torch.equal(sd[key + "linear_fc2.bias"], downb[e])
        sinks = hf["model.layers.1.self_attn.sinks"]
        assert torch.equal(
            sd["decoder.layers.1.self_attention.core_attention.softmax_offset"], sinks[t * 2 : t * 2 + 2]
        )
        assert torch.equal(sd["decoder.layers.1.mlp.router.bias"], hf["model.layers.1.mlp.router.bias"])
        assert torch.equal(
            sd["decoder.layers.1.self_attention.linear_proj.bias"], hf["model.layers.1.self_attn.o_proj.bias"]
        )
    args = rank(mid, "mp_rank_00_000")["args"]
    assert (args.softmax_type, args.add_bias_linear, args.window_size, args.window_attn_skip_freq) == (
        "learnable",
        True,
        [3, 0],
        2,
    )
    assert (args.glu_linear_offset, args.activation_func_clamp_value) == (1.0, 7.0)


def test_gpt_oss_expert_tp_and_grouped_gemm_are_refused_with_the_reason(models, tmp_path):
    """megatron-core builds expert biases only with expert TP 1, and the legacy grouped-GEMM
    weight1/weight2 format has no place for them: both are refused before anything is written."""
    src = models("gpt_oss")
    with pytest.raises(
        LayoutError, match="expert biases .* only with expert tensor parallel size 1, got 2; pass etp=1"
    ):
        convert(src, str(tmp_path / "a"), ck.Target(to="mcore", tp=2))
    with pytest.raises(VerifyError, match="grouped-GEMM expert format .* has no expert biases"):
        convert(src, str(tmp_path / "b"), ck.Target(to="mcore", ep=2, grouped_gemm=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "change,names",
    [
        # config says 3 experts, the stacked tensors hold 4
        (lambda cfg: cfg.update(num_local_experts=3), ("mlp.experts.", "3 experts")),
        # config says a wider expert FFN than gate_up_proj's columns hold
        (lambda cfg: cfg.update(intermediate_size=64), ("gate_up_proj (shape [4, 64, 192])", "gate.weight")),
    ],
    ids=["expert-count", "ffn-width"],
)
def test_gpt_oss_stacked_experts_that_do_not_match_the_config_are_one_line_errors(
    models, tmp_path, change, names
):
    import shutil

    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert

    src = tmp_path / "src"
    shutil.copytree(models("gpt_oss"), src)
    cfg = json.load(open(src / "config.json"))
    change(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    assert_clean_error(cli_convert(src, dst, "--ep", "2"), dst, names=("model.safetensors", *names))


def test_gpt_oss_bf16_round_trip_is_bit_exact(models, tmp_path):
    """The bf16 form (as the hub's dequantized gpt-oss checkpoints store it) through TP2 x PP2 x
    EP2 and back: every byte equal, the config's dtype kept."""
    from transformers import AutoModelForCausalLM

    src, mid, back = (str(tmp_path / n) for n in ("bf16", "mid", "back"))
    AutoModelForCausalLM.from_pretrained(models("gpt_oss"), dtype=torch.bfloat16).save_pretrained(src)
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, ep=2, etp=1))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert hf_state(back)["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert json.load(open(f"{back}/config.json"))["dtype"] == "bfloat16"


def test_gpt_oss_attention_lora_merges_like_peft_and_expert_lora_is_refused(models, tmp_path):
    """A peft adapter on gpt-oss's biased q/k/v/o merges (through Megatron TP2 x EP2) to exactly
    peft's merge_and_unload.  LoRA on the stacked experts (target_parameters) is refused in one
    line: its [E, H, 2F] interleaved layout is not the one ckpt-ir's fused-expert LoRA split reads."""
    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert
    from tests.test_lora_variants import assert_equal_files, make_adapter, peft_merged

    base = models("gpt_oss")
    adapter, mid, out = (str(tmp_path / n) for n in ("adapter", "mid", "out"))
    make_adapter(base, adapter, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    want = peft_merged(base, adapter, str(tmp_path / "peft"))
    assert (
        cli_convert(base, mid, "--tp", "2", "--ep", "2", "--etp", "1", "--lora-load", adapter).returncode == 0
    )
    assert cli_convert(mid, out, to="hf").returncode == 0
    assert_equal_files(out, want)

    experts = str(tmp_path / "experts")
    make_adapter(base, experts, target_parameters=["mlp.experts.gate_up_proj"])
    dst = tmp_path / "refused"
    assert_clean_error(
        cli_convert(base, dst, "--lora-load", experts, to="hf"),
        dst,
        names=("stacked experts", "merge_and_unload"),
    )


def _mxfp4_gpt_oss(base: str, dst: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A gpt-oss checkpoint in the hub's form: each layer's stacked experts as MXFP4 ``*_blocks``
    [experts, out, in / 32, 16] (two e2m1 values per byte) and e8m0 ``*_scales`` [experts, out,
    in / 32] (random codes), ``quantization_config`` as the releases carry it; the rest as ``base``.
    Returns the (blocks, scales) pairs by tensor name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dst)
    g = torch.Generator().manual_seed(7)
    pairs = {}
    for f in sorted(os.listdir(dst)):
        if not f.endswith(".safetensors"):
            continue
        sd = load_file(os.path.join(dst, f))
        for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            experts, rows_in, out = sd.pop(name).shape  # HF stores [E, in, out]
            blocks = torch.randint(0, 256, (experts, out, rows_in // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 132, (experts, out, rows_in // 32), dtype=torch.uint8, generator=g)
            sd[name + "_blocks"], sd[name + "_scales"] = blocks, scales
            pairs[name] = (blocks, scales)
        save_file(sd, os.path.join(dst, f), metadata={"format": "pt"})
    index = os.path.join(dst, "model.safetensors.index.json")
    if os.path.exists(index):  # the shard map names the stored tensors
        idx = json.load(open(index))
        for name in pairs:
            shard = idx["weight_map"].pop(name)
            idx["weight_map"].update({name + "_blocks": shard, name + "_scales": shard})
        json.dump(idx, open(index, "w"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return pairs


def test_gpt_oss_mxfp4_checkpoint_dequantizes_like_transformers(models, tmp_path):
    """The hub's MXFP4 gpt-oss: ckpt-ir's bf16 HF output holds, for every layer's stacked experts,
    transformers' own dequantization (convert_moe_packed_tensors) bit for bit, and the rest of the
    model unchanged; through Megatron (TP2 x EP2, expert TP 1) and back the same bytes; and
    transformers' dequantizing MXFP4 loader computes the same logits as the converted model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base = models("gpt_oss")
    mx = str(tmp_path / "mxfp4")
    pairs = _mxfp4_gpt_oss(base, mx)
    assert len(pairs) == 2 * 4  # gate_up and down of each of the 4 layers
    out, mid, back = str(tmp_path / "bf16"), str(tmp_path / "mid"), str(tmp_path / "back")
    convert(mx, out, ck.Target(to="hf", dtype="bf16"))
    got, src = hf_state(out), hf_state(base)
    assert "quantization_config" not in json.load(open(f"{out}/config.json"))
    for name, (blocks, scales) in pairs.items():
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want), name
    for name, t in src.items():
        if name not in pairs:
            assert torch.equal(got[name], t.to(torch.bfloat16)), name
    convert(mx, mid, ck.Target(to="mcore", tp=2, ep=2, etp=1, dtype="bf16"))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(out, back)
    from transformers import AutoModelForCausalLM, Mxfp4Config

    ref = AutoModelForCausalLM.from_pretrained(
        mx, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)


def test_ernie_score_bias_layer_schedule_and_rotary(models, tmp_path):
    """ERNIE 4.5 stores each MoE layer's score bias as mlp.moe_statics.e_score_correction_bias
    [1, E]; Megatron-Bridge's router.expert_bias is that row, [E].  MoE layers are those with
    (i + 1) % moe_layer_interval == 0 from moe_layer_start_index on (1 and 3 here), the others a
    dense MLP; the rotary rotates interleaved pairs (Megatron's rotary_interleaved); embeddings
    tied (no output_layer)."""
    src = models("ernie4_5_moe")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    r = rank(mid, "mp_rank_01")
    sd = r["model"]
    for i in (1, 3):
        bias = hf[f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias"]
        assert bias.shape == (1, 4)
        assert torch.equal(sd[f"decoder.layers.{i}.mlp.router.expert_bias"], bias[0])
    for i in (0, 2):
        assert f"decoder.layers.{i}.mlp.router.weight" not in sd
        f = hf[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0] // 2
        assert torch.equal(
            sd[f"decoder.layers.{i}.mlp.linear_fc1.weight"],
            torch.cat(
                [
                    hf[f"model.layers.{i}.mlp.gate_proj.weight"][f:],
                    hf[f"model.layers.{i}.mlp.up_proj.weight"][f:],
                ]
            ),
        )
    assert "output_layer.weight" not in sd
    args = r["args"]
    assert (args.rotary_interleaved, args.moe_router_score_function, args.moe_layer_freq) == (
        True,
        "softmax",
        [0, 1, 0, 1],
    )


def test_afmoe_gate_sandwich_norms_and_sliding_layers(models, tmp_path):
    """AFMoE's output gate (gate_proj [heads * head_dim, hidden], one row block per head) is split
    over TP with the heads under self_attention.linear_gate; its four norms go to input_layernorm,
    post_attn_norm, pre_mlp_layernorm and post_mlp_layernorm (gemma2 / glm4's keys); the router's
    score bias to router.expert_bias.  The args: sigmoid routing scaled by route_scale, a window
    and rotary on the sliding layers only (every global_attn_every_n_layers-th is global), the
    muP embedding scale."""
    src = models("afmoe")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    q = hf["model.layers.0.self_attn.q_proj.weight"].shape[0]
    for t in range(2):
        r = rank(mid, f"mp_rank_0{t}")
        sd = r["model"]
        for i in (0, 1):
            gate = hf[f"model.layers.{i}.self_attn.gate_proj.weight"]
            assert torch.equal(
                sd[f"decoder.layers.{i}.self_attention.linear_gate.weight"],
                gate[t * q // 2 : (t + 1) * q // 2],
            )
            for key, name in (
                ("input_layernorm", "input_layernorm"),
                ("post_attn_norm", "post_attention_layernorm"),
                ("pre_mlp_layernorm", "pre_mlp_layernorm"),
                ("post_mlp_layernorm", "post_mlp_layernorm"),
            ):
                assert torch.equal(
                    sd[f"decoder.layers.{i}.{key}.weight"], hf[f"model.layers.{i}.{name}.weight"]
                )
        assert torch.equal(
            sd["decoder.layers.1.mlp.router.expert_bias"], hf["model.layers.1.mlp.expert_bias"]
        )
        assert "decoder.layers.0.mlp.router.weight" not in sd
    args = r["args"]
    assert (args.moe_router_score_function, args.moe_router_topk_scaling_factor) == ("sigmoid", 2.0)
    assert (args.window_size, args.window_attn_skip_freq, args.no_rope_freq) == (
        [3, 0],
        [1, 0, 1, 0],
        [0, 1, 0, 1],
    )
    assert args.apply_embedding_scaling is True and args.post_norm is True


@pytest.mark.parametrize(
    "family,change,names",
    [
        # the score bias stored [E] instead of ERNIE's [1, E]
        (
            "ernie4_5_moe",
            lambda sd, cfg: sd.update(
                {
                    k: v[0]
                    for k, v in sd.items()
                    if k.endswith("moe_statics.e_score_correction_bias") and ".layers.1." in k
                }
            ),
            ("model.layers.1.mlp.moe_statics.e_score_correction_bias", "[4]", "[1, 4]"),
        ),
        # config says 3 experts, Granite's stacked input_linear holds 4
        (
            "granitemoe",
            lambda sd, cfg: cfg.update(num_local_experts=3),
            ("block_sparse_moe.", "3 experts", "rows"),
        ),
    ],
    ids=["ernie-bias-shape", "granite-expert-count"],
)
def test_reshaped_and_stacked_tensors_that_do_not_match_the_config_are_one_line_errors(
    models, tmp_path, family, change, names
):
    """Refused when the checkpoint is read (a FormatError: exit 1), in one line naming the file,
    the tensor and what the config implies."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(models(family), src)
    sd, cfg = load_file(src / "model.safetensors"), json.load(open(src / "config.json"))
    change(sd, cfg)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError) as err:
        ck.load(str(src))
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in (str(src / "model.safetensors"), *names)), msg


def test_models_lists_the_moe_families_with_their_mindspeed_names(capsys):
    lines = listed_families(capsys)
    want = {
        "glm4_moe": "glm45-moe,glm45,glm45-air",
        "hunyuan_v1_moe": "hunyuan",
        "minimax_m2": "minimax_m2",
        "phimoe": "phi3.5-moe",
        "hy_v3": "HYV3",
    }
    for family, names in want.items():
        assert f"--model-type-hf {names}" in lines[family], lines.get(family)
    assert {"olmoe", "gpt_oss"} <= set(lines)
    # issue 31's: neither MindSpeed-LLM's model_cfg.json nor its --model-type-hf choices name them
    assert {"dots1", "ernie4_5_moe", "exaone_moe", "granitemoe", "granitemoeshared", "llama4_text"} <= set(
        lines
    )


@pytest.mark.parametrize("family", ["phimoe"])
def test_peft_adapter_merge_equals_peft_merge_and_unload(models, tmp_path, family):
    """LoRA on the family's attention merges to exactly what peft's merge_and_unload gives."""
    assert_lora_merge_equals_peft(models(family), tmp_path, family)


def test_cohere2_moe_rotary_and_experts_in_rank_files(models, tmp_path):
    """Cohere 2 MoE rotates in its sliding layers and, with prefix_dense_sliding_window_pattern 1, in
    its dense layers whatever their attention (modeling_cohere2_moe.py force_rope): no_rope_freq
    0 for layers 0 (dense, full), 1, 3 (sliding), 1 for layer 2 (MoE, full); the shared expert is
    mlp.shared_experts.linear_fc1 = [gate; up] rows of the TP rank, and EP rank 1 holds experts 2, 3."""
    src = models("cohere2_moe")
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2))
    hf = hf_state(src)
    sd = rank(mid, "mp_rank_01_001")["model"]
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    assert args["no_rope_freq"] == [0, 0, 1, 0]
    h = "model.layers.1.mlp."
    gate, up = hf[h + "shared_experts.gate_proj.weight"], hf[h + "shared_experts.up_proj.weight"]
    fc1 = torch.cat([gate.chunk(2)[1], up.chunk(2)[1]])
    assert torch.equal(sd["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"], fc1)
    down = hf[h + "experts.3.down_proj.weight"].chunk(2, dim=1)[1]
    assert torch.equal(sd["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"], down)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in sd and "decoder.layers.0.mlp.router.weight" not in sd
