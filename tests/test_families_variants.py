"""Issue 31's families whose layers need a block variant the others lack (Apertus' xIELU MLP):
tiny random models built and saved by transformers (``tests/family_models.py``) convert HF ->
Megatron-Core -> HF bit-exactly with equal transformers logits, and the Megatron rank files they
go through hold what the format facts say (rows and keys worked out here from the HF tensors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

CONFIGS = {
    # attention_bias on q, k, v and o; llama3 rope (Apertus' default) with its factor
    "apertus": dict(DENSE, attention_bias=True),
    # Gemma 4: sliding layers 0, 2 (head_dim 16, 2 KV heads) and global layers 1, 3 (head_dim 32,
    # 2 KV heads, keys as values); layers 2 and 3 share the keys / values of layers 0 and 1, with
    # MLPs twice as wide; per-layer inputs of 8; a window (4) shorter than the prompt (12)
    "gemma4_text": dict(
        DENSE,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128,
        final_logit_softcapping=30.0,
    ),
    # Gemma 4's MoE model (26B-A4B's shape): every layer a dense MLP and a MoE beside it (4
    # stacked experts of 32, top 2); sliding layers 0, 2 and global layers 1, 3 (keys as values);
    # no per-layer inputs, no shared keys / values
    "gemma4_moe": dict(
        DENSE,
        model_type="gemma4_text",
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
    ),
    # MiMo-V2-Flash: layers 0, 2 sliding (4 key / value heads, sinks), 1, 3 full (2 heads); q / k
    # heads of 24, v heads of 16; q / k / v biases; layer 0 dense, 1-3 MoE (4 experts, top 2)
    "mimo_v2_flash": dict(
        DENSE,
        head_dim=24,
        v_head_dim=16,
        attention_bias=True,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
    ),
    # HY-V4: MLA (q-LoRA) with the DSA indexer in layers 0, 1 (2, 3 share their top-k: index_topk 4
    # below the prompt's 12), output gate, sinks; 2 hyper-connection streams; layer 0 dense, 1-3
    # MoE (4 stacked experts, top 2, one shared)
    "hy_v4": dict(
        DENSE,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        hc_mult=2,
    ),
}
# the family of a case named otherwise
FAMILY = {"gemma4_moe": "gemma4_text"}
# buffers the checkpoint stores that transformers initialises to constants (given random values,
# so that carrying them is checked)
BUFFERS = {"gemma4_text": ("layer_scalar",), "gemma4_moe": ("layer_scalar",)}
# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "apertus": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "gemma4_text": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "gemma4_moe": (dict(tp=2, ep=2), dict(pp=2, ep=2, num_layer_list=(1, 3))),
    "mimo_v2_flash": (dict(tp=2, ep=2, grouped_gemm=True), dict(pp=2, ep=2, num_layer_list=(1, 3))),
    "hy_v4": (dict(tp=2, ep=2, grouped_gemm=True), dict(pp=2, ep=2, num_layer_list=(1, 3))),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:  # a case of another model_type than its name says so
            cfg = dict(CONFIGS[model_type])
            hf_type = cfg.pop("model_type", model_type)
            path = build(str(root / model_type), hf_type, configs={hf_type: cfg})
            _randomize(path, BUFFERS.get(model_type, ()))
            cache[model_type] = path
        return cache[model_type]

    return get


def _randomize(path: str, buffers: tuple[str, ...]) -> None:
    if not buffers:
        return
    f = f"{path}/model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(3)
    for k in sd:
        if k.endswith(buffers):
            sd[k] = torch.randn(sd[k].shape, generator=g)
    save_file(sd, f, metadata={"format": "pt"})


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    src = models(family)
    assert_round_trip(src, tmp_path, FAMILY.get(family, family), LAYOUTS[family][layout])
    if layout == 0:  # the rank files of the first layout hold what the format facts say
        RANK_FACTS[family](hf_state(src), json.load(open(f"{src}/config.json")), str(tmp_path / "mid"))


def _apertus(hf: dict, cfg: dict, mid: str) -> None:
    """Megatron-Bridge's Apertus keys: each layer's xIELU gains under mlp.activation_func, whole on
    every TP rank, and no beta / eps (Megatron's xIELU holds them as floats); linear_fc1 is
    up_proj alone (no gate), its rows split over TP; the args name the activation (xielu)."""
    first_stage = 1  # --num-layer-list 1,3: HF layer 1 is stage 1's local layer 0
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_001")["model"]
        d, h = "decoder.layers.0.", f"model.layers.{first_stage}."
        for p in ("alpha_p", "alpha_n"):
            assert torch.equal(sd[d + f"mlp.activation_func.{p}"], hf[h + f"mlp.act_fn.{p}"])
        assert not [k for k in sd if k.endswith((".beta", ".eps"))]
        up = hf[h + "mlp.up_proj.weight"]
        assert torch.equal(sd[d + "mlp.linear_fc1.weight"], up.chunk(2)[t])
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    assert (args["xielu"], args["swiglu"], args["qk_layernorm"]) == (True, False, True)
    assert (args["use_rope_scaling"], args["rope_scaling_factor"]) == (
        True,
        cfg["rope_parameters"]["factor"],
    )


def _bridge_qkv(hf: dict, cfg: dict, layer: int, case: str) -> tuple[list[tuple[torch.Tensor, int]], int]:
    """Megatron-Bridge's linear_qkv parts of HF ``layer`` (gemma4_bridge.py
    maybe_modify_loaded_hf_weight, 393-437 at 067f987), as (tensor, rows per query group), and its
    query groups: zero k and v where the layer has neither (402-426; head size q rows / heads, the
    global layers' num_global_key_value_heads), v a copy of k where it has no v_proj (428-435); a
    full-attention layer's groups are num_global_query_groups (modeling_gemma4.py:307-311)."""
    h = f"model.layers.{layer}.self_attn."
    q, k, v = (hf.get(h + f"{p}_proj.weight") for p in "qkv")
    heads = cfg["num_attention_heads"]
    full = cfg["layer_types"][layer] == "full_attention"
    # the saved config keeps the global sizes as per_layer_config overrides: the test's own value
    groups = CONFIGS[case]["num_global_key_value_heads"] if full else cfg["num_key_value_heads"]
    d = q.shape[0] // heads
    if k is None and v is None:
        k = v = torch.zeros(groups * d, q.shape[1], dtype=q.dtype)
    elif v is None:
        v = k
    return [(q, heads // groups * d), (k, d), (v, d)], groups


def _gemma4(hf: dict, cfg: dict, mid: str) -> None:
    """Megatron-Bridge's Gemma 4 names; linear_qkv per query group [q heads; k; v] of the layer's
    own sizes, padded as the Bridge pads it: HF layer 1 (global, keys as values: v = k), HF layers
    2, 3 (kv-shared, sliding and global: zero k and v); the per-layer embedding split by
    vocabulary rows, the per-layer gate / projection / norm and layer_scalar whole on every rank."""
    for t in range(2):
        first = rank(mid, f"mp_rank_0{t}_000")["model"]
        assert torch.equal(
            first["per_layer_embedding.weight"], hf["model.embed_tokens_per_layer.weight"].chunk(2)[t]
        )
        assert torch.equal(
            first["per_layer_model_proj.weight"], hf["model.per_layer_model_projection.weight"].chunk(2)[t]
        )
        sd = rank(mid, f"mp_rank_0{t}_001")["model"]  # HF layers 1, 2, 3 as local layers 0, 1, 2
        for local, layer in enumerate((1, 2, 3)):
            parts, groups = _bridge_qkv(hf, cfg, layer, "gemma4_text")
            want = _qkv_rank(parts, groups, t)
            assert torch.equal(sd[f"decoder.layers.{local}.self_attention.linear_qkv.weight"], want), layer
        # the kv-shared layers' k_layernorm: the Bridge's model builds one of the layer's head size
        # and never loads it (no HF k_norm there), so it holds the ones it starts with
        # (modeling_gemma4.py:125)
        for local, layer in ((1, 2), (2, 3)):
            d = _bridge_qkv(hf, cfg, layer, "gemma4_text")[0][1][1]
            like = hf[f"model.layers.{layer}.self_attn.q_norm.weight"]
            k_norm = sd[f"decoder.layers.{local}.self_attention.k_layernorm.weight"]
            assert torch.equal(k_norm, torch.ones(d, dtype=like.dtype)), layer
        for local, layer in ((0, 1), (2, 3)):
            for m, h in (
                ("post_self_attn_layernorm.weight", "post_attention_layernorm.weight"),
                ("per_layer_input_gate.weight", "per_layer_input_gate.weight"),
                ("per_layer_projection.weight", "per_layer_projection.weight"),
                ("post_per_layer_input_norm.weight", "post_per_layer_input_norm.weight"),
                ("layer_scalar", "layer_scalar"),
            ):
                assert torch.equal(sd[f"decoder.layers.{local}.{m}"], hf[f"model.layers.{layer}.{h}"]), m
    _, groups = _bridge_qkv(hf, cfg, 1, "gemma4_text")
    d = hf["model.layers.1.self_attn.k_proj.weight"].shape[0] // groups
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    sliding = [int(t == "sliding_attention") for t in cfg["layer_types"]]
    assert (args["global_kv_channels"], args["num_global_query_groups"]) == (d, groups)
    assert (args["attention_k_eq_v"], args["num_kv_shared_layers"]) == (True, cfg["num_kv_shared_layers"])
    assert (args["window_attn_skip_freq"], args["softmax_scale"]) == (sliding, 1.0)


def _qkv_rank(parts: list[tuple[torch.Tensor, int]], groups: int, rank: int, tp: int = 2) -> torch.Tensor:
    """TP rank ``rank``'s rows of Megatron's linear_qkv: for each of its query groups, each part's
    rows of that group in turn (``parts``: (HF tensor, rows per group))."""
    mine = range(rank * groups // tp, (rank + 1) * groups // tp)
    return torch.cat([t[g * n : (g + 1) * n] for g in mine for t, n in parts])


def _mimo(hf: dict, cfg: dict, mid: str) -> None:
    """Megatron-Bridge's MiMo-V2-Flash layout at TP2 x EP2: a sliding layer's linear_qkv (and bias)
    per group [q heads of 24; k of 24; v of 16] over twice the config's groups, a full layer's over
    the config's groups; the sinks (softmax_offset) split with the heads in sliding layers only."""
    heads, kv, d, vd = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["v_head_dim"],
    )
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        for layer, groups in ((0, 2 * kv), (1, kv)):
            h = f"model.layers.{layer}.self_attn."
            for kind in ("weight", "bias"):
                q, k, v = (hf[h + f"{x}_proj.{kind}"] for x in "qkv")
                want = _qkv_rank([(q, heads // groups * d), (k, d), (v, vd)], groups, t)
                assert torch.equal(sd[f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"], want)
        sinks = hf["model.layers.0.self_attn.attention_sink_bias"]
        assert torch.equal(
            sd["decoder.layers.0.self_attention.core_attention.softmax_offset"], sinks.chunk(2)[t]
        )
        assert "decoder.layers.1.self_attention.core_attention.softmax_offset" not in sd
        assert torch.equal(
            sd["decoder.layers.1.mlp.router.expert_bias"],
            hf["model.layers.1.mlp.gate.e_score_correction_bias"],
        )
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    assert (args["num_query_groups"], args["swa_num_query_groups"], args["v_head_dim"]) == (kv, 2 * kv, vd)
    assert args["hybrid_attention_pattern"] == [int(t == "sliding_attention") for t in cfg["layer_types"]]


def _hy_v4(hf: dict, cfg: dict, mid: str) -> None:
    """At TP2 x EP2: MindSpeed-LLM's MLA (linear_qkv = [q_a_proj; kv_a_proj_with_mqa] whole on
    every rank), the sinks and the output gate's rows split with the heads, the hyper-connection
    mixers (attn_mhc / mlp_mhc: fn [2 x streams, streams x hidden], base, scale [2]) and the head
    mixer whole, and no indexer in the layers whose top-k is shared (2, 3)."""
    h = "model.layers.1."
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_000")["model"]
        d = "decoder.layers.1."
        qkv = torch.cat([hf[h + "self_attn.q_a_proj.weight"], hf[h + "self_attn.kv_a_proj_with_mqa.weight"]])
        assert torch.equal(sd[d + "self_attention.linear_qkv.weight"], qkv)
        for m, x in (
            ("core_attention.softmax_offset", "learnable_sink_param"),
            ("linear_gate.weight", "linear_gate.weight"),
        ):
            assert torch.equal(sd[d + f"self_attention.{m}"], hf[h + f"self_attn.{x}"].chunk(2)[t]), m
        for m, x in (("attn_mhc", "hc_attn_layer"), ("mlp_mhc", "hc_mlp_layer")):
            for k, y in (("hc_fn.weight", "hc_fn"), ("hc_base", "hc_base"), ("hc_scale", "hc_scale")):
                assert torch.equal(sd[d + f"{m}.{k}"], hf[h + f"hc_pre.{x}.{y}"]), k
        assert torch.equal(sd["hc_head.hc_fn.weight"], hf["model.hc_pre.hc_head.hc_head_fn"])
        assert not [
            k for k in sd if k.startswith(("decoder.layers.2.", "decoder.layers.3.")) and ".dsa_indexer." in k
        ]


def _gemma4_moe(hf: dict, cfg: dict, mid: str) -> None:
    """At TP2 x EP2, Megatron-Bridge's MoE-path names (gemma4_bridge.py _moe_mapping_registry): the
    dense MLP as mlp.shared_experts (fc1 = [gate; up] rows of the TP rank, fc2 its columns) after
    pre_shared_expert_layernorm, the experts' pre-norm pre_mlp_layernorm, the post norms and the
    router's scales whole on every rank; EP rank r holds experts 2r, 2r + 1 ([gate; up] rows and
    down columns of the TP rank, expert TP = TP); the global layers' linear_qkv with v = k, as the
    Bridge pads it (_bridge_qkv)."""
    f = cfg["moe_intermediate_size"]
    for t in range(2):
        for r in range(2):
            sd = rank(mid, f"mp_rank_0{t}_00{r}")["model"]
            for i in range(cfg["num_hidden_layers"]):
                h, d = f"model.layers.{i}.", f"decoder.layers.{i}."
                for m, n in (
                    ("pre_shared_expert_layernorm.weight", "pre_feedforward_layernorm.weight"),
                    ("pre_mlp_layernorm.weight", "pre_feedforward_layernorm_2.weight"),
                    ("self_attention.linear_proj.post_layernorm.weight", "post_attention_layernorm.weight"),
                    ("mlp.post_shared_expert_layernorm.weight", "post_feedforward_layernorm_1.weight"),
                    ("mlp.post_moe_layernorm.weight", "post_feedforward_layernorm_2.weight"),
                    ("post_ffn_layernorm.weight", "post_feedforward_layernorm.weight"),
                    ("mlp.router.weight", "router.proj.weight"),
                    ("mlp.router.scale", "router.scale"),
                    ("mlp.router.per_expert_scale", "router.per_expert_scale"),
                    ("layer_scalar", "layer_scalar"),
                ):
                    assert torch.equal(sd[d + m], hf[h + n]), m
                gate, up = hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]
                fc1 = torch.cat([gate.chunk(2)[t], up.chunk(2)[t]])
                assert torch.equal(sd[d + "mlp.shared_experts.linear_fc1.weight"], fc1)
                down = hf[h + "mlp.down_proj.weight"].chunk(2, dim=1)[t]
                assert torch.equal(sd[d + "mlp.shared_experts.linear_fc2.weight"], down)
                for j in range(2):
                    e = 2 * r + j
                    g, u = hf[h + "experts.gate_up_proj"][e].split(f)
                    x = d + f"mlp.experts.local_experts.{j}."
                    assert torch.equal(sd[x + "linear_fc1.weight"], torch.cat([g.chunk(2)[t], u.chunk(2)[t]]))
                    assert torch.equal(
                        sd[x + "linear_fc2.weight"], hf[h + "experts.down_proj"][e].chunk(2, dim=1)[t]
                    )
                assert not any(k.startswith(d + "mlp.linear_fc") for k in sd)
                parts, groups = _bridge_qkv(hf, cfg, i, "gemma4_moe")
                assert torch.equal(sd[d + "self_attention.linear_qkv.weight"], _qkv_rank(parts, groups, t)), i
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    assert (args["num_experts"], args["moe_router_topk"], args["moe_ffn_hidden_size"]) == (4, 2, f)


RANK_FACTS = {
    "apertus": _apertus,
    "gemma4_text": _gemma4,
    "gemma4_moe": _gemma4_moe,
    "mimo_v2_flash": _mimo,
    "hy_v4": _hy_v4,
}


def test_apertus_xielu_constants_other_than_megatrons_are_refused(models, tmp_path):
    """Megatron stores no beta / eps: a checkpoint whose beta is not the 0.5 Megatron's xIELU
    computes with cannot go to Megatron without changing the model (one line, before writing)."""
    src = str(tmp_path / "src")
    build(src, "apertus", layers=2, configs=CONFIGS)
    f = f"{src}/model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.act_fn.beta"] = torch.tensor(0.25)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CkptIrError, match=r"layers\.1\.mlp\.act\.beta differs from 0\.5"):
        convert(src, str(tmp_path / "mid"), ck.Target(to="mcore", tp=2))


def test_gemma4_bridge_padding_back_to_hf(models, tmp_path):
    """The way back from the Bridge's padded linear_qkv: the v rows of a keys-as-values layer are
    left out whatever they hold (the Bridge's model never reads them: modeling_gemma4.py:430, 1643,
    so training moves them off k) and HF comes back bit-exact; a kv-shared layer's k / v rows must
    be the zeros the Bridge writes and its k_layernorm the ones, else the conversion is refused
    (one line, before writing)."""
    src = models("gemma4_text")
    cfg, hf = json.load(open(f"{src}/config.json")), hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore"))
    path = f"{mid}/iter_0000001/mp_rank_00/model_optim_rng.pt"
    sd = torch.load(path, weights_only=False)
    for layer, part in ((1, 2), (2, 1)):  # layer 1's first v rows, then layer 2's first k rows
        parts, _ = _bridge_qkv(hf, cfg, layer, "gemma4_text")
        start = sum(n for _, n in parts[:part])
        key = f"decoder.layers.{layer}.self_attention.linear_qkv.weight"
        sd["model"][key][start : start + parts[part][1]] += 1.0
        torch.save(sd, path)
        back = str(tmp_path / f"back{layer}")
        if layer == 1:
            convert(mid, back, ck.Target(to="hf"))
            assert_same_tensors(src, back)
        else:
            with pytest.raises(
                CkptIrError, match=r"layers\.2\.attn\.qkv\.weight rows of k differs from zeros"
            ):
                convert(mid, back, ck.Target(to="hf"))
            sd["model"][key][start : start + parts[part][1]] -= 1.0
    sd["model"]["decoder.layers.3.self_attention.k_layernorm.weight"][0] = 2.0
    torch.save(sd, path)
    with pytest.raises(CkptIrError, match=r"layers\.3\.attn\.k_norm\.weight differs from ones"):
        convert(mid, str(tmp_path / "back3"), ck.Target(to="hf"))
