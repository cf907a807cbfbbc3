"""Remote-code families whose Megatron form is Megatron-Bridge's (models/<x>/*_bridge.py in
NVIDIA-NeMo/Megatron-Bridge): MiMo, Step-3.5.  Neither transformers nor this repository has their
modeling code, so each checkpoint is written here from the format facts alone: the HF tensor names and
shapes the bridge's mapping table and provider give (cited beside each builder), random values,
config.json with ``auto_map`` and a ``*.py`` file that must travel unchanged.

Checks: HF -> Megatron-Core (TP2, uneven PP) -> HF is bit-exact with config.json and the remote
code back as they were; the rank files hold, tensor by tensor, what the bridge's mappings put
under its Megatron names (QKVMapping's per-group [q; k; v], GatedMLPMapping's per-rank
[gate; up], row / column TP splits, MiMo's eh_proj = input_proj with its column halves swapped;
Step-3.5's per-layer attention sizes and its g_proj gate inside linear_qkv, each head's row
repeated head_dim times, which Megatron -> HF checks).
No logits oracle: transformers has no implementation of these models.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from tests.test_hf_roundtrip import convert, hf_state

H, F, HEADS, KV, D, VOCAB, LAYERS = 64, 96, 4, 2, 16, 128, 4
REMOTE_CODE = b"# the model's remote code: ckpt-ir never runs it, it travels with the weights\n"


def _write(root: str, config: dict, sd: dict[str, torch.Tensor], module: str) -> str:
    os.makedirs(root)
    config = dict(
        config,
        auto_map={
            "AutoConfig": f"configuration_{module}.Config",
            "AutoModelForCausalLM": f"modeling_{module}.ForCausalLM",
        },
        torch_dtype="float32",
    )
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(root, f"modeling_{module}.py"), "wb") as f:
        f.write(REMOTE_CODE)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(root, "model.safetensors"))
    return root


def _qwen2_layer(g: torch.Generator, p: str) -> dict[str, torch.Tensor]:
    """A Qwen2 decoder layer's HF tensors (qwen2_bridge.py's names: q/k/v with biases, o_proj,
    gate/up/down_proj, input / post_attention layernorms)."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        p + "input_layernorm.weight": r(H),
        p + "self_attn.q_proj.weight": r(HEADS * D, H),
        p + "self_attn.q_proj.bias": r(HEADS * D),
        p + "self_attn.k_proj.weight": r(KV * D, H),
        p + "self_attn.k_proj.bias": r(KV * D),
        p + "self_attn.v_proj.weight": r(KV * D, H),
        p + "self_attn.v_proj.bias": r(KV * D),
        p + "self_attn.o_proj.weight": r(H, HEADS * D),
        p + "post_attention_layernorm.weight": r(H),
        p + "mlp.gate_proj.weight": r(F, H),
        p + "mlp.up_proj.weight": r(F, H),
        p + "mlp.down_proj.weight": r(H, F),
    }


def build_mimo(root: str) -> str:
    """MiMo-7B's layout (mimo_bridge.py): Qwen2's model plus num_nextn_predict_layers MTP layers
    model.mtp_layers.{k}.* = a Qwen2 layer + token_layernorm, hidden_layernorm [H], input_proj
    [H, 2H] (eh_proj's shape, 2H -> H), final_layernorm [H] (:52-111)."""
    g = torch.Generator().manual_seed(31)
    sd = {
        "model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
        "lm_head.weight": torch.randn(VOCAB, H, generator=g),
    }
    for i in range(LAYERS):
        sd.update(_qwen2_layer(g, f"model.layers.{i}."))
    m = "model.mtp_layers.0."
    sd.update(_qwen2_layer(g, m))
    for name, shape in (
        ("token_layernorm.weight", (H,)),
        ("hidden_layernorm.weight", (H,)),
        ("input_proj.weight", (H, 2 * H)),
        ("final_layernorm.weight", (H,)),
    ):
        sd[m + name] = torch.randn(*shape, generator=g)
    config = dict(
        model_type="mimo",
        architectures=["MiMoForCausalLM"],
        hidden_size=H,
        intermediate_size=F,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_theta=640000.0,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
    )
    return _write(root, config, sd, "mimo")


# Step-3.5 (step35_bridge.py :399-547, configuration_step35.py): 4 main layers, full / sliding
# attention alternating (sliding: attention_other_setting's 8 heads in 4 groups of head size 4;
# full: the config's 4 heads in 2 groups of 16), every layer with per-head q/k norms and a g_proj
# gate; layers 1 and 2 MoE (moe_layers_enum), 0 and 3 dense; one dense sliding MTP layer 4.
S_HEADS, S_KV, S_D, E, FE, FS = 8, 4, 4, 4, 24, 32
STEP_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
STEP_MOE = (1, 2)


def _step_sizes(i: int) -> tuple[int, int, int]:
    """(heads, query groups, head size) of Step-3.5 layer i (the MTP layer: sliding)."""
    sliding = i >= LAYERS or STEP_TYPES[i] == "sliding_attention"
    return (S_HEADS, S_KV, S_D) if sliding else (HEADS, KV, D)


def _step_layer(g: torch.Generator, i: int) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    heads, kv, d = _step_sizes(i)
    p = f"model.layers.{i}."
    sd = {
        p + "input_layernorm.weight": r(H),
        p + "post_attention_layernorm.weight": r(H),
        p + "self_attn.q_norm.weight": r(d),
        p + "self_attn.k_norm.weight": r(d),
        p + "self_attn.q_proj.weight": r(heads * d, H),
        p + "self_attn.k_proj.weight": r(kv * d, H),
        p + "self_attn.v_proj.weight": r(kv * d, H),
        p + "self_attn.g_proj.weight": r(heads, H),
        p + "self_attn.o_proj.weight": r(H, heads * d),
    }
    if i in STEP_MOE:
        sd.update(
            {
                p + "moe.gate.weight": r(E, H),
                p + "moe.router_bias": r(E),
                p + "moe.gate_proj.weight": r(E, FE, H),
                p + "moe.up_proj.weight": r(E, FE, H),
                p + "moe.down_proj.weight": r(E, H, FE),
                p + "share_expert.gate_proj.weight": r(FS, H),
                p + "share_expert.up_proj.weight": r(FS, H),
                p + "share_expert.down_proj.weight": r(H, FS),
            }
        )
    else:
        sd.update(
            {
                p + "mlp.gate_proj.weight": r(F, H),
                p + "mlp.up_proj.weight": r(F, H),
                p + "mlp.down_proj.weight": r(H, F),
            }
        )
    return sd


def build_step3p5(root: str) -> str:
    g = torch.Generator().manual_seed(35)
    head = torch.randn(VOCAB, H, generator=g)
    sd = {
        "model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
        "lm_head.weight": head,
    }
    for i in range(LAYERS + 1):
        sd.update(_step_layer(g, i))
    m = f"model.layers.{LAYERS}."
    for name, shape in (("enorm.weight", (H,)), ("hnorm.weight", (H,)), ("eh_proj.weight", (H, 2 * H))):
        sd[m + name] = torch.randn(*shape, generator=g)
    sd[m + "transformer.shared_head.norm.weight"] = torch.randn(H, generator=g)
    sd[m + "transformer.shared_head.output.weight"] = head.clone()  # a copy of lm_head (:223-257)
    config = dict(
        model_type="step3p5",
        architectures=["Step3p5ForCausalLM"],
        hidden_size=H,
        intermediate_size=F,
        num_attention_heads=HEADS,
        num_attention_groups=KV,
        head_dim=D,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        moe_intermediate_size=FE,
        moe_num_experts=E,
        moe_top_k=2,
        share_expert_dim=FS,
        moe_layers_enum=",".join(map(str, STEP_MOE)),
        layer_types=STEP_TYPES + ["sliding_attention"],
        attention_other_setting={
            "attention_type": "sliding_attention",
            "num_attention_heads": S_HEADS,
            "num_attention_groups": S_KV,
            "head_dim": S_D,
        },
        sliding_window=16,
        use_head_wise_attn_gate=True,
        use_qk_norm=True,
        zero_centered=True,
        use_moe_router_bias=True,
        moe_router_activation="sigmoid",
        partial_rotary_factors=[0.5, 1.0, 0.5, 1.0, 1.0],
        rope_theta=[5000000.0, 10000.0, 5000000.0, 10000.0, 10000.0],
        num_nextn_predict_layers=1,
        tie_word_embeddings=False,
    )
    return _write(root, config, sd, "step3p5")


BUILDERS = {"mimo": build_mimo, "step3p5": build_step3p5}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge_remote")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = BUILDERS[family](str(root / family))
        return cache[family]

    return get


LAYOUTS = {
    "mimo": (dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=2)),
    "step3p5": (dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=2, ep=2)),
}
CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact(models, tmp_path, family, layout):
    src = models(family)
    assert ck.load(src).spec.family == family
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **LAYOUTS[family][layout]))
    convert(mid, back, ck.Target(to="hf"))
    got, want = hf_state(back), hf_state(src)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    with open(os.path.join(src, "config.json")) as a, open(os.path.join(back, "config.json")) as b:
        assert json.load(b) == json.load(a)
    with open(os.path.join(back, f"modeling_{family}.py"), "rb") as f:
        assert f.read() == REMOTE_CODE


def _rank(mid: str, name: str) -> dict[str, torch.Tensor]:
    return torch.load(f"{mid}/iter_0000001/{name}/model_optim_rng.pt", weights_only=False)["model"]


def _qkv(hf: dict, p: str, what: str, tp: int, r: int) -> torch.Tensor:
    """QKVMapping's Megatron linear_qkv on TP rank r: per key/value group [its q heads; k; v],
    the groups split over the ranks."""
    q = hf[p + f"self_attn.q_proj.{what}"].reshape(KV, HEADS // KV * D, -1)
    k = hf[p + f"self_attn.k_proj.{what}"].reshape(KV, D, -1)
    v = hf[p + f"self_attn.v_proj.{what}"].reshape(KV, D, -1)
    packed = torch.cat((q, k, v), dim=1).chunk(tp)[r]
    return packed.reshape(-1, *hf[p + f"self_attn.q_proj.{what}"].shape[1:])


def _layer(hf: dict, p: str, tp: int, r: int) -> dict[str, torch.Tensor]:
    """A Qwen2 layer's Megatron tensors on TP rank r (qwen2_bridge.py / mimo_bridge.py :80-111,
    TE-fused norms): column-parallel linear_qkv / linear_fc1, row-parallel linear_proj / fc2."""
    return {
        "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
        "self_attention.linear_qkv.weight": _qkv(hf, p, "weight", tp, r),
        "self_attention.linear_qkv.bias": _qkv(hf, p, "bias", tp, r),
        "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
        "mlp.linear_fc1.layer_norm_weight": hf[p + "post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": torch.cat(
            (hf[p + "mlp.gate_proj.weight"].chunk(tp)[r], hf[p + "mlp.up_proj.weight"].chunk(tp)[r])
        ),
        "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[r],
    }


def test_mimo_rank_files_hold_the_bridge_tensors(models, tmp_path):
    """TP2 PP2 (layers 1 + 3), Megatron-Core 0.16's names with TE norms, as the bridge maps them:
    stage 1 holds decoder layers 1..3, the MTP layer (mtp.layers.0.*: enorm, hnorm, eh_proj =
    input_proj's column halves swapped and then column-split, transformer_layer.*,
    final_layernorm) and the output layer."""
    src = models("mimo")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    target = dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te", megatron_version="0.16")
    convert(src, mid, ck.Target(to="mcore", vocab_divisible_by=64, **target))
    args = torch.load(f"{mid}/iter_0000001/mp_rank_00_000/model_optim_rng.pt", weights_only=False)["args"]
    # mimo_bridge.py:39-45: add_qkv_bias, no qk_layernorm, mtp_num_layers = num_nextn_predict_layers
    assert (args.add_qkv_bias, args.qk_layernorm, args.mtp_num_layers) == (True, False, 1)
    m = "model.mtp_layers.0."
    inp = hf[m + "input_proj.weight"]
    eh = torch.cat((inp[:, H:], inp[:, :H]), dim=1)  # mimo_bridge.py:117-126
    for r in range(2):
        first, last = _rank(mid, f"mp_rank_0{r}_000"), _rank(mid, f"mp_rank_0{r}_001")
        want_first = {
            "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"].chunk(2)[r],
            **{f"decoder.layers.0.{k}": v for k, v in _layer(hf, "model.layers.0.", 2, r).items()},
        }
        want_last = {
            "decoder.final_layernorm.weight": hf["model.norm.weight"],
            "output_layer.weight": hf["lm_head.weight"].chunk(2)[r],
            # Megatron's MTP needs the embedding on the last stage: the main one, copied
            "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"].chunk(2)[r],
            "mtp.layers.0.enorm.weight": hf[m + "token_layernorm.weight"],
            "mtp.layers.0.hnorm.weight": hf[m + "hidden_layernorm.weight"],
            "mtp.layers.0.eh_proj.weight": eh.chunk(2)[r],
            "mtp.layers.0.final_layernorm.weight": hf[m + "final_layernorm.weight"],
            **{f"mtp.layers.0.transformer_layer.{k}": v for k, v in _layer(hf, m, 2, r).items()},
        }
        for j in range(3):
            for k, v in _layer(hf, f"model.layers.{j + 1}.", 2, r).items():
                want_last[f"decoder.layers.{j}.{k}"] = v
        for got, want in ((first, want_first), (last, want_last)):
            tensors = {k: v for k, v in got.items() if not k.endswith("_extra_state")}
            assert sorted(tensors) == sorted(want)
            for k, v in want.items():
                assert torch.equal(tensors[k], v), k


def _qkvg(hf: dict, p: str, heads: int, kv: int, d: int, tp: int, r: int) -> torch.Tensor:
    """merge_qkvg_weights' attention_output_gate layout (megatron-core 0.16 has no
    head_wise_attn_gate): per query group [its q heads; their g_proj rows, each repeated head_dim
    times; k; v], whole groups on each TP rank."""
    per = heads // kv
    q = hf[p + "self_attn.q_proj.weight"].reshape(kv, per * d, H)
    g = hf[p + "self_attn.g_proj.weight"].repeat_interleave(d, dim=0).reshape(kv, per * d, H)
    k = hf[p + "self_attn.k_proj.weight"].reshape(kv, d, H)
    v = hf[p + "self_attn.v_proj.weight"].reshape(kv, d, H)
    return torch.cat((q, g, k, v), dim=1).chunk(tp)[r].reshape(-1, H)


def _step_layer_keys(hf: dict, i: int, tp: int, r: int) -> dict[str, torch.Tensor]:
    """Step-3.5 layer i's Megatron tensors on TP rank r (step35_bridge.py:399-466, TE-fused input
    norm; a MoE layer's pre-MLP norm stands alone, SequentialMLP's local_experts.{e})."""
    heads, kv, d = _step_sizes(i)
    p = f"model.layers.{i}."
    out = {
        "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
        "self_attention.linear_qkv.weight": _qkvg(hf, p, heads, kv, d, tp, r),
        "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
        "self_attention.q_layernorm.weight": hf[p + "self_attn.q_norm.weight"],
        "self_attention.k_layernorm.weight": hf[p + "self_attn.k_norm.weight"],
    }
    gate_up = lambda a, b: torch.cat((a.chunk(tp)[r], b.chunk(tp)[r]))  # noqa: E731
    if i not in STEP_MOE or i >= LAYERS:
        out["mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        out["mlp.linear_fc1.weight"] = gate_up(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"])
        out["mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[r]
        return out
    out["pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    out["mlp.router.weight"] = hf[p + "moe.gate.weight"]
    out["mlp.router.expert_bias"] = hf[p + "moe.router_bias"]
    s = p + "share_expert."
    out["mlp.shared_experts.linear_fc1.weight"] = gate_up(
        hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"]
    )
    out["mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"].chunk(tp, dim=1)[r]
    for e in range(E):
        x = f"mlp.experts.local_experts.{e}."
        out[x + "linear_fc1.weight"] = gate_up(
            hf[p + "moe.gate_proj.weight"][e], hf[p + "moe.up_proj.weight"][e]
        )
        out[x + "linear_fc2.weight"] = hf[p + "moe.down_proj.weight"][e].chunk(tp, dim=1)[r]
    return out


def test_step3p5_rank_files_hold_the_bridge_tensors(models, tmp_path):
    """TP2 PP2 (layers 1 + 3): per-layer attention sizes (full 4 heads x 16, sliding 8 x 4), the
    g_proj gate inside linear_qkv, MoE / dense layers, the dense sliding MTP layer; args as the
    provider's.  Then one repeated gate row changed in a rank file: Megatron -> HF refuses, naming
    the rank file."""
    src = models("step3p5")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    target = dict(tp=2, pp=2, num_layer_list=(1, 3), norm_names="te", megatron_version="0.16")
    convert(src, mid, ck.Target(to="mcore", vocab_divisible_by=64, **target))
    args = torch.load(f"{mid}/iter_0000001/mp_rank_00_000/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.num_attention_heads, args.num_query_groups, args.kv_channels) == (HEADS, KV, D)
    assert args.sliding_attention_setting == {
        "window_size": [16, 0],
        "num_attention_heads": S_HEADS,
        "num_query_groups": S_KV,
        "kv_channels": S_D,
    }
    assert args.attention_output_gate and args.apply_layernorm_1p and args.qk_layernorm
    assert args.moe_layer_freq == [int(i in STEP_MOE) for i in range(LAYERS)] and args.mtp_num_layers == 1
    assert args.layer_types == STEP_TYPES + ["sliding_attention"]
    m = f"model.layers.{LAYERS}."
    for r in range(2):
        first, last = _rank(mid, f"mp_rank_0{r}_000"), _rank(mid, f"mp_rank_0{r}_001")
        embed = hf["model.embed_tokens.weight"].chunk(2)[r]
        want_first = {
            "embedding.word_embeddings.weight": embed,
            **{f"decoder.layers.0.{k}": v for k, v in _step_layer_keys(hf, 0, 2, r).items()},
        }
        want_last = {
            "decoder.final_layernorm.weight": hf["model.norm.weight"],
            "output_layer.weight": hf["lm_head.weight"].chunk(2)[r],
            "embedding.word_embeddings.weight": embed,
            "mtp.layers.0.enorm.weight": hf[m + "enorm.weight"],
            "mtp.layers.0.hnorm.weight": hf[m + "hnorm.weight"],
            "mtp.layers.0.eh_proj.weight": hf[m + "eh_proj.weight"].chunk(2)[r],
            "mtp.layers.0.final_layernorm.weight": hf[m + "transformer.shared_head.norm.weight"],
            **{
                f"mtp.layers.0.transformer_layer.{k}": v
                for k, v in _step_layer_keys(hf, LAYERS, 2, r).items()
            },
        }
        for j in range(3):
            for k, v in _step_layer_keys(hf, j + 1, 2, r).items():
                want_last[f"decoder.layers.{j}.{k}"] = v
        for got, want in ((first, want_first), (last, want_last)):
            tensors = {k: v for k, v in got.items() if not k.endswith("_extra_state")}
            assert sorted(tensors) == sorted(want)
            for k, v in want.items():
                assert torch.equal(tensors[k], v), k
    # a trained per-channel gate has no g_proj form: the copies of a head's gate row must agree
    path = f"{mid}/iter_0000001/mp_rank_01_000/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    per = HEADS // KV
    state["model"]["decoder.layers.0.self_attention.linear_qkv.weight"][per * D + 1] += (
        1.0  # head 0's 2nd copy
    )
    torch.save(state, path)
    with pytest.raises(
        CkptIrError,
        match=r"^mp_rank_01_000/model_optim_rng\.pt:model\.decoder\.layers\.0\..*repeated 16 times",
    ):
        convert(mid, str(tmp_path / "back"), ck.Target(to="hf"))
