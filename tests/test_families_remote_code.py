"""Remote-code families (HF modeling code in the model repository, no transformers class):
InternLM2, Baichuan/Baichuan2, ChatGLM2/3, Qwen (v1), MiniCPM and MiniCPM-MoE, Ling 2.0, PLM.

No modeling code can run here, so each checkpoint is written by the test in the family's
published form: a random transformers model of the equivalent architecture (Llama, Qwen2, GLM,
Mixtral) is saved, and its tensors are renamed and packed the way the family's published
modeling file lays them out (the ``pack_*`` functions below, one per family, each citing the
fact it relies on).  That gives three independent checks:

* round trip: remote HF -> Megatron-Core (TP2 with PP, VPP, uneven stages, EP) -> remote HF is
  bit-exact, config.json comes back identical (``auto_map`` included) and the ``*.py`` files are
  copied byte for byte, so the output loads with ``trust_remote_code=True``;
* rank files: Megatron's ``linear_qkv`` / ``linear_fc1`` / expert tensors hold exactly the rows
  the Megatron format facts say (per-query-group ``[q heads; k; v]``, per-rank ``[gate_t; up_t]``);
* logits: megatron-core's GPTModel, loaded from ckpt-ir's rank files, gives the transformers
  logits of the equivalent model (InternLM2, Baichuan and Qwen as plain GPTs, ChatGLM with GLM's
  half-width interleaved rotary), so a wrong unpacking of ``wqkv`` / ``W_pack`` / ``c_attn`` /
  ``query_key_value`` / ``dense_h_to_4h`` or a swapped ``w1``/``w2`` gives O(1) differences.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from tests.mcore_harness import run_job
from tests.test_hf_roundtrip import convert, hf_state
from tests.test_megatron_moe_oracle import _moe_config
from tests.test_megatron_oracle import INPUT_IDS, WORLD

LAYERS, H, F, HEADS, VOCAB = 4, 64, 96, 4, 128
BASE = dict(
    hidden_size=H,
    intermediate_size=F,
    num_attention_heads=HEADS,
    vocab_size=VOCAB,
    num_hidden_layers=LAYERS,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
)
# remote family -> (transformers model_type of the equivalent architecture, its config overrides)
REFERENCE = {
    "internlm2": ("llama", dict(num_key_value_heads=2)),
    "baichuan": ("llama", dict(num_key_value_heads=HEADS)),
    "chatglm": (
        "glm",
        dict(
            num_key_value_heads=2,
            head_dim=32,
            partial_rotary_factor=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 20000.0},  # ChatGLM rope_ratio 2
        ),
    ),
    "qwen": (
        "qwen2",
        dict(num_key_value_heads=HEADS, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "minicpm": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "minicpm-moe": (
        "mixtral",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    ),
    # GLM-4.5's MoE model has Ling 2.0's architecture: GQA, per-head q/k norm, partial rotary,
    # DeepSeek-V3's MoE block with first dense layers, shared experts and a router score bias
    "bailing_moe_v2": (
        "glm4_moe",
        dict(
            num_key_value_heads=2,
            head_dim=32,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            use_qk_norm=True,
            attention_bias=True,
            partial_rotary_factor=0.5,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
        ),
    ),
    # PLM's attention is DeepSeek-V2-Lite's (MLA without q-LoRA); every layer dense.  Its MLP
    # (up_proj -> relu2 -> down_proj) has no transformers equivalent: the packing drops gate_proj,
    # so this reference's logits are not PLM's and no logits check uses them
    "plm": (
        "deepseek_v2",
        dict(
            num_key_value_heads=HEADS,
            first_k_dense_replace=LAYERS,
            n_routed_experts=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            tie_word_embeddings=True,
        ),
    ),
}


def per_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows regrouped per key/value head g as [q heads of g; k_g; v_g].  It is both InternLM2's
    ``wqkv`` layout ('(h gs d)' with gs = heads/groups + 2 in modeling_internlm2.py) and
    Megatron's ``linear_qkv`` layout (its per-query-group interleave)."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _remote_config(model_type: str, arch: str, module: str, **values) -> dict:
    return dict(
        values,
        model_type=model_type,
        architectures=[arch],
        auto_map={
            "AutoConfig": f"configuration_{module}.Config",
            "AutoModelForCausalLM": f"modeling_{module}.ForCausalLM",
        },
        torch_dtype="float32",
    )


def _layer_items(sd: dict, i: int, prefix: str = "model.layers.{i}.") -> dict:
    p = prefix.format(i=i)
    return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}


def pack_internlm2(sd: dict, c: dict) -> tuple[dict, dict]:
    """InternLM2: tok_embeddings / output / attention_norm / ffn_norm, wqkv per key/value head,
    feed_forward w1 (gate), w3 (up), w2 (down)."""
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        t, p = _layer_items(sd, i), f"model.layers.{i}."
        a = [t[f"self_attn.{x}_proj.weight"] for x in "qkv"]
        out[p + "attention.wqkv.weight"] = per_group(*a, c["num_key_value_heads"])
        out[p + "attention.wo.weight"] = t["self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = t["input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = t["post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[p + f"feed_forward.{ours}.weight"] = t[f"mlp.{theirs}_proj.weight"]
    cfg = _remote_config(
        "internlm2",
        "InternLM2ForCausalLM",
        "internlm2",
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        num_hidden_layers=LAYERS,
        num_key_value_heads=c["num_key_value_heads"],
        rms_norm_eps=c["rms_norm_eps"],
        hidden_act="silu",
        bias=False,
        rope_theta=10000,
        tie_word_embeddings=False,
    )
    return out, cfg


def pack_baichuan(sd: dict, c: dict) -> tuple[dict, dict]:
    """Baichuan2: llama's names, self_attn.W_pack = [q; k; v] (multi-head)."""
    out = {}
    for k, v in sd.items():
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            qkv = [sd[k.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            out[k.replace("q_proj", "W_pack")] = torch.cat(qkv)
        else:
            out[k] = v
    cfg = _remote_config(
        "baichuan",
        "BaichuanForCausalLM",
        "baichuan",
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        num_hidden_layers=LAYERS,
        rms_norm_eps=c["rms_norm_eps"],
        hidden_act="silu",
        model_max_length=128,
        tie_word_embeddings=False,
    )
    return out, cfg


def pack_chatglm(sd: dict, c: dict) -> tuple[dict, dict]:
    """ChatGLM3: transformer.embedding / encoder.layers / output_layer; query_key_value =
    [q; k; v] with a bias (split [heads*d, groups*d, groups*d] in modeling_chatglm.py);
    dense_h_to_4h = [gate; up] (GLM's gate_up_proj is the same stack); the saved
    rotary_pos_emb.inv_freq buffer is added as the release stores it."""
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    d = c["head_dim"]
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (
        torch.arange(0, d // 2, 2).float() / (d // 2)
    )
    for i in range(LAYERS):
        t, p = _layer_items(sd, i), f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [t[f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[p + f"self_attention.query_key_value.{kind}"] = torch.cat(qkv)
        out[p + "self_attention.dense.weight"] = t["self_attn.o_proj.weight"]
        out[p + "input_layernorm.weight"] = t["input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = t["post_attention_layernorm.weight"]
        out[p + "mlp.dense_h_to_4h.weight"] = t["mlp.gate_up_proj.weight"]
        out[p + "mlp.dense_4h_to_h.weight"] = t["mlp.down_proj.weight"]
    cfg = _remote_config(
        "chatglm",
        "ChatGLMModel",
        "chatglm",
        num_layers=LAYERS,
        hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"],
        kv_channels=d,
        num_attention_heads=c["num_attention_heads"],
        multi_query_attention=True,
        multi_query_group_num=c["num_key_value_heads"],
        padded_vocab_size=c["vocab_size"],
        layernorm_epsilon=c["rms_norm_eps"],
        add_qkv_bias=True,
        add_bias_linear=False,
        rmsnorm=True,
        seq_length=128,
        rope_ratio=c["rope_parameters"]["rope_theta"] / 10000,
    )
    return out, cfg


def pack_qwen(sd: dict, c: dict) -> tuple[dict, dict]:
    """Qwen (v1): transformer.wte / h.N / ln_f; c_attn = [q; k; v] with a bias; the MLP is
    w1(x) * silu(w2(x)): w2 is the gate, w1 the up projection; intermediate_size = 2 x width."""
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        t, p = _layer_items(sd, i), f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[p + f"attn.c_attn.{kind}"] = torch.cat([t[f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[p + "attn.c_proj.weight"] = t["self_attn.o_proj.weight"]
        out[p + "ln_1.weight"] = t["input_layernorm.weight"]
        out[p + "ln_2.weight"] = t["post_attention_layernorm.weight"]
        out[p + "mlp.w2.weight"] = t["mlp.gate_proj.weight"]
        out[p + "mlp.w1.weight"] = t["mlp.up_proj.weight"]
        out[p + "mlp.c_proj.weight"] = t["mlp.down_proj.weight"]
    cfg = _remote_config(
        "qwen",
        "QWenLMHeadModel",
        "qwen",
        hidden_size=c["hidden_size"],
        intermediate_size=2 * c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"],
        num_hidden_layers=LAYERS,
        kv_channels=c["hidden_size"] // c["num_attention_heads"],
        layer_norm_epsilon=c["rms_norm_eps"],
        vocab_size=c["vocab_size"],
        no_bias=True,
        rotary_emb_base=c["rope_parameters"]["rope_theta"],
        tie_word_embeddings=False,
    )
    return out, cfg


def pack_minicpm(sd: dict, c: dict) -> tuple[dict, dict]:
    """MiniCPM: llama's names (tied embeddings); MiniCPM-MoE: router mlp.gate and experts
    mlp.experts.E.{w1, w2, w3} (Mixtral keeps the same tensors under block_sparse_moe)."""
    out = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in sd.items()}
    moe = (
        {"num_experts": c["num_local_experts"], "num_experts_per_tok": 2} if "num_local_experts" in c else {}
    )
    cfg = _remote_config(
        "minicpm",
        "MiniCPMForCausalLM",
        "minicpm",
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        num_hidden_layers=LAYERS,
        num_key_value_heads=c["num_key_value_heads"],
        rms_norm_eps=c["rms_norm_eps"],
        hidden_act="silu",
        tie_word_embeddings=True,
        scale_emb=12,
        scale_depth=1.4,
        dim_model_base=256,
        **moe,
    )
    return out, cfg


def pack_bailing(sd: dict, c: dict) -> tuple[dict, dict]:
    """Ling 2.0: model.word_embeddings; attention.query_key_value = [q; k; v] (+ bias with
    use_qkv_bias), attention.query_layernorm / key_layernorm, attention.dense; the router's score
    bias is mlp.gate.expert_bias; the rest is DeepSeek-V3's MoE names."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.embed_tokens.", "model.word_embeddings.").replace(
            "e_score_correction_bias", "expert_bias"
        )
        if ".self_attn.q_proj." in k:
            qkv = [sd[k.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            out[k.replace("self_attn.q_proj", "attention.query_key_value")] = torch.cat(qkv)
        elif ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k:
            for theirs, ours in (
                ("q_norm", "query_layernorm"),
                ("k_norm", "key_layernorm"),
                ("o_proj", "dense"),
            ):
                k = k.replace(f"self_attn.{theirs}.", f"attention.{ours}.")
            out[k] = v
    cfg = _remote_config(
        "bailing_moe",
        "BailingMoeV2ForCausalLM",
        "bailing_moe_v2",
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        num_hidden_layers=LAYERS,
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        rms_norm_eps=c["rms_norm_eps"],
        hidden_act="silu",
        use_qkv_bias=True,
        use_bias=False,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        num_experts=c["n_routed_experts"],
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=c["moe_intermediate_size"],
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=c["routed_scaling_factor"],
        score_function="sigmoid",
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
    )
    return out, cfg


def pack_plm(sd: dict, c: dict) -> tuple[dict, dict]:
    """PLM-1.8B: DeepSeek-V2-Lite's attention names (q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj, o_proj), a non-gated MLP mlp.up_proj / mlp.down_proj (squared ReLU; the released
    checkpoint's names, as MindSpeed-LLM's "plm" entry and the PLM team's vLLM loader read them),
    tied embeddings (no lm_head)."""
    out = {k: v for k, v in sd.items() if ".mlp.gate_proj." not in k}
    cfg = _remote_config(
        "plm",
        "PLMForCausalLM",
        "plm",
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        **{k: c[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
        num_hidden_layers=LAYERS,
        num_key_value_heads=c["num_attention_heads"],
        q_lora_rank=None,
        hidden_act="relu2",
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=100000.0,
        attention_bias=False,
        tie_word_embeddings=True,
    )
    return out, cfg


PACK = {
    "internlm2": pack_internlm2,
    "baichuan": pack_baichuan,
    "chatglm": pack_chatglm,
    "qwen": pack_qwen,
    "minicpm": pack_minicpm,
    "minicpm-moe": pack_minicpm,
    "bailing_moe_v2": pack_bailing,
    "plm": pack_plm,
}
FAMILY = {"minicpm-moe": "minicpm"}  # the ckpt-ir family of each case (else the case name)


def build(root: str, case: str, seed: int) -> dict:
    """The reference transformers model (saved, with its logits) and the remote checkpoint
    packed from the same tensors, with stand-in remote-code files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = REFERENCE[case]
    cfg = AutoConfig.for_model(model_type, **dict(BASE, **overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too
            p.normal_(0, 0.5)
        for mod in model.modules():  # the router score bias is a buffer
            if isinstance(getattr(mod, "e_score_correction_bias", None), torch.Tensor):
                mod.e_score_correction_bias.normal_(0, 0.1)
        ref_logits = model(torch.tensor(INPUT_IDS)).logits
    ref = os.path.join(root, f"{case}-reference")
    model.save_pretrained(ref)
    with open(os.path.join(ref, "config.json")) as fh:
        ref_cfg = json.load(fh)
    tensors, remote_cfg = PACK[case](load_file(os.path.join(ref, "model.safetensors")), ref_cfg)
    src = os.path.join(root, case)
    os.makedirs(src)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json"), "w") as fh:
        json.dump(remote_cfg, fh, indent=2)
    module = remote_cfg["auto_map"]["AutoConfig"].split(".")[0].removeprefix("configuration_")
    for name in (f"configuration_{module}.py", f"modeling_{module}.py"):
        with open(os.path.join(src, name), "w") as fh:  # stand-ins: copied, never run
            fh.write(f"# {case} remote code stand-in: {name}\nraise RuntimeError('not run by ckpt-ir')\n")
    return {"src": src, "ref_cfg": ref_cfg, "ref_logits": ref_logits, "tensors": tensors}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("remote"))
    cache: dict[str, dict] = {}

    def get(case: str) -> dict:
        if case not in cache:
            cache[case] = build(root, case, seed=len(cache))
        return cache[case]

    return get


LAYOUTS = {
    "internlm2": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3))),
    "baichuan": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    "chatglm": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(3, 1))),
    "qwen": (dict(tp=2, pp=2), dict(tp=1, pp=2, vpp_layers=1)),
    "minicpm": (dict(tp=2, pp=2), dict(tp=2, pp=2, noop_layers=(2, 5))),
    "minicpm-moe": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True), dict(tp=2, ep=2, pp=2)),
    "bailing_moe_v2": (dict(tp=2, pp=2), dict(tp=2, ep=2, grouped_gemm=True)),
    "plm": (dict(tp=2, pp=2), dict(tp=2, pp=2, num_layer_list=(1, 3)), dict(tp=1, pp=2, vpp_layers=1)),
}
CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]
# tensors the family recomputes and ckpt-ir drops (reported), so they are absent from the output
RECOMPUTED = {"transformer.rotary_pos_emb.inv_freq"}


@pytest.mark.parametrize("case,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_remote_hf_to_mcore_to_hf_bit_exact(models, tmp_path, case, layout):
    m = models(case)
    src = m["src"]
    c = ck.load(src)
    assert c.spec.family == FAMILY.get(case, case)
    assert c.spec.num_experts == (4 if case in ("minicpm-moe", "bailing_moe_v2") else 0)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **LAYOUTS[case][layout]))
    convert(mid, back, ck.Target(to="hf"))
    got, want = hf_state(back), {k: v for k, v in hf_state(src).items() if k not in RECOMPUTED}
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    with open(os.path.join(src, "config.json")) as a, open(os.path.join(back, "config.json")) as b:
        assert json.load(b) == json.load(a)  # auto_map and every remote key, unchanged
    for name in os.listdir(src):
        if name.endswith(".py"):
            with open(os.path.join(src, name), "rb") as a, open(os.path.join(back, name), "rb") as b:
                assert a.read() == b.read(), name


def test_family_is_read_from_config_without_running_code(models, tmp_path, capsys):
    """The stand-in modeling files raise if imported: detection and conversion never run them,
    and the ChatGLM release's inv_freq buffer is reported as dropped, not silently lost."""
    src = models("chatglm")["src"]
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert cli_main(["convert", src, out, "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert "transformer.rotary_pos_emb.inv_freq" in err and "recomputed" in err
    assert sorted(hf_state(out)) == sorted(set(models("chatglm")["tensors"]) - RECOMPUTED)


def _rank(mid: str, t: int, e: int | None = None) -> dict:
    name = f"mp_rank_0{t}" + ("" if e is None else f"_00{e}")
    return torch.load(f"{mid}/iter_0000001/{name}/model_optim_rng.pt", weights_only=False)["model"]


# per family: HF -> the (q, k, v) weights, (q, k, v) biases or None, (gate, up) of layer i
def _split_contiguous(w: torch.Tensor, q: int, kv: int) -> tuple[torch.Tensor, ...]:
    return w[:q], w[q : q + kv], w[q + kv :]


@pytest.mark.parametrize("case", ["internlm2", "baichuan", "chatglm", "qwen"])
def test_rank_files_hold_megatron_qkv_and_fc1(models, tmp_path, case):
    """TP2 rank t: linear_qkv = per-query-group [q heads; k; v] of its groups, linear_fc1 =
    [gate rows of t; up rows of t] (Megatron format facts), built here from the HF tensors."""
    m = models(case)
    sd, rc = m["tensors"], m["ref_cfg"]
    mid = str(tmp_path / "mid")
    convert(m["src"], mid, ck.Target(to="mcore", tp=2))
    d = rc.get("head_dim") or H // HEADS
    groups = rc["num_key_value_heads"]
    q, kv = HEADS * d, groups * d
    i = 1
    if case == "internlm2":
        w = sd[f"model.layers.{i}.attention.wqkv.weight"]
        qkv = per_group(*_split_internlm2(w, groups), groups)  # == w: the same layout
        assert torch.equal(qkv, w)
        bias = None
        gate, up = (sd[f"model.layers.{i}.feed_forward.{x}.weight"] for x in ("w1", "w3"))
    elif case == "baichuan":
        qkv = per_group(*_split_contiguous(sd[f"model.layers.{i}.self_attn.W_pack.weight"], q, kv), groups)
        bias = None
        gate, up = (sd[f"model.layers.{i}.mlp.{x}_proj.weight"] for x in ("gate", "up"))
    elif case == "chatglm":
        p = f"transformer.encoder.layers.{i}.self_attention.query_key_value."
        qkv = per_group(*_split_contiguous(sd[p + "weight"], q, kv), groups)
        bias = per_group(*_split_contiguous(sd[p + "bias"], q, kv), groups)
        fc1 = sd[f"transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight"]
        gate, up = fc1[:F], fc1[F:]
    else:
        p = f"transformer.h.{i}.attn.c_attn."
        qkv = per_group(*_split_contiguous(sd[p + "weight"], q, kv), groups)
        bias = per_group(*_split_contiguous(sd[p + "bias"], q, kv), groups)
        gate, up = sd[f"transformer.h.{i}.mlp.w2.weight"], sd[f"transformer.h.{i}.mlp.w1.weight"]
    rows, half = qkv.shape[0] // 2, F // 2
    for t in range(2):
        r = _rank(mid, t)
        key = f"decoder.layers.{i}."
        assert torch.equal(r[key + "self_attention.linear_qkv.weight"], qkv[t * rows : (t + 1) * rows])
        if bias is not None:
            assert torch.equal(r[key + "self_attention.linear_qkv.bias"], bias[t * rows : (t + 1) * rows])
        else:
            assert key + "self_attention.linear_qkv.bias" not in r
        want_fc1 = torch.cat([gate[t * half : (t + 1) * half], up[t * half : (t + 1) * half]])
        assert torch.equal(r[key + "mlp.linear_fc1.weight"], want_fc1)


def _split_internlm2(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """q, k, v from InternLM2's wqkv as modeling_internlm2.py reads them: view as
    (groups, heads/groups + 2, d, hidden); q = [:, :-2], k = [:, -2], v = [:, -1]."""
    d = H // HEADS
    x = w.view(groups, -1, d, w.shape[1])
    return (
        x[:, :-2].reshape(-1, w.shape[1]),
        x[:, -2].reshape(-1, w.shape[1]),
        x[:, -1].reshape(-1, w.shape[1]),
    )


def test_minicpm_moe_experts_sit_on_their_ep_rank(models, tmp_path):
    """TP2 x EP2, 4 experts: EP rank r holds experts 2r, 2r+1 as local 0, 1; expert TP is the TP
    size (Megatron's default), so TP rank t holds linear_fc1 = [w1 rows of t; w3 rows of t]
    (gate; up) and linear_fc2 = w2's columns of t; the router is mlp.gate, whole; embeddings
    tied (no output_layer)."""
    m = models("minicpm-moe")
    sd = m["tensors"]
    mid = str(tmp_path / "mid")
    convert(m["src"], mid, ck.Target(to="mcore", tp=2, ep=2))
    for t in range(2):
        for r in range(2):
            rank = _rank(mid, t, r)
            assert "output_layer.weight" not in rank
            assert torch.equal(
                rank["decoder.layers.0.mlp.router.weight"], sd["model.layers.0.mlp.gate.weight"]
            )
            for j in range(2):
                e, key = 2 * r + j, f"decoder.layers.0.mlp.experts.local_experts.{j}."
                hf = f"model.layers.0.mlp.experts.{e}."
                rows = slice(t * F // 2, (t + 1) * F // 2)
                fc1 = torch.cat([sd[hf + "w1.weight"][rows], sd[hf + "w3.weight"][rows]])
                assert torch.equal(rank[key + "linear_fc1.weight"], fc1)
                assert torch.equal(rank[key + "linear_fc2.weight"], sd[hf + "w2.weight"][:, rows])


def test_models_lists_the_remote_families(capsys):
    assert cli_main(["models"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    want = {
        "internlm2": ("internlm2", "internlm2"),
        "baichuan": ("baichuan", "baichuan2,baichuan"),
        "chatglm": ("chatglm", "chatglm3"),
        "qwen": ("qwen", "qwen"),
        "minicpm": ("minicpm", "minicpm,minicpm-moe"),
        "bailing_moe_v2": ("bailing_moe_v2,bailing_moe", "bailing_mini"),
        "plm": ("plm", "plm"),
    }
    for family, (model_type, names) in want.items():
        assert f"model_type {model_type} " in lines[family], lines.get(family)
        assert f"--model-type-hf {names}" in lines[family], lines[family]


# megatron-core oracle: (case, conversion args); the GPTModel is configured from the *reference*
# transformers config, never from ckpt-ir's args
ORACLE = {
    "internlm2": ["--tp", "2"],
    "baichuan": ["--tp", "2", "--pp", "2"],
    "chatglm": ["--tp", "2"],
    "qwen": ["--tp", "2"],
    # Ling 2.0 as GLM-4.5's MoE model: per-head q/k norm, qkv bias, half rotary, DeepSeek-V3's
    # sigmoid router with a random score bias, shared expert, dense layer 0; experts on EP ranks
    "bailing_moe_v2": ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"],
}


@pytest.fixture(scope="module")
def oracle(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-oracle")
    cases = []
    for case, args in ORACLE.items():
        m = models(case)
        out = str(root / case)
        assert cli_main(["convert", m["src"], out, "--to", "mcore", "--quiet", *args]) == 0
        ref_type, rc = REFERENCE[case][0], m["ref_cfg"]
        glm = ref_type == "glm"
        # only the layout comes from the rank files; the model is configured from the reference
        layout = vars(
            torch.load(
                f"{out}/iter_0000001/{os.listdir(f'{out}/iter_0000001')[0]}/model_optim_rng.pt",
                weights_only=False,
            )["args"]
        )
        moe = ref_type == "glm4_moe"
        cases.append(
            {
                "name": case,
                "ckpt": out,
                "tp": layout["tensor_model_parallel_size"],
                "pp": layout["pipeline_model_parallel_size"],
                "vpp": None,
                "ep": layout["expert_model_parallel_size"],
                "etp": layout.get("expert_tensor_parallel_size"),
                "hf_config": rc,
                "padded_vocab": VOCAB,
                "tied": False,
                "qkv_bias": case in ("chatglm", "qwen") or bool(rc.get("attention_bias")),
                "qk_norm": bool(rc.get("use_qk_norm")),
                "rotary_interleaved": glm,  # GLM / ChatGLM rotate interleaved pairs of half of each head
                "rotary_percent": 0.5
                if glm
                else (rc.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0),
                **(
                    {
                        "moe": {
                            **_moe_config("glm4_moe", rc),
                            "grouped_gemm": bool(layout.get("moe_grouped_gemm")),
                        }
                    }
                    if moe
                    else {}
                ),
                "input_ids": INPUT_IDS,
                "out": str(root / f"{case}.pt"),
            }
        )
    results = {
        c["name"]: (logits, models(c["name"])["ref_logits"], reports)
        for c, (logits, reports) in zip(cases, run_job(str(root), cases, WORLD))
    }
    shutil.rmtree(root, ignore_errors=True)
    return results


@pytest.mark.parametrize("case", list(ORACLE))
def test_megatron_logits_equal_the_reference_model(oracle, case):
    logits, ref, reports = oracle[case]
    for r in reports:  # every parameter of every rank's model came from the checkpoint
        for chunk in r["chunks"]:
            assert [k for k in chunk["missing"] if not k.endswith("._extra_state")] == [], chunk
            assert chunk["unexpected"] == [], chunk
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)


def test_bailing_rank_files(models, tmp_path):
    """Ling 2.0, TP2: layer 0 (dense) linear_qkv / bias = per-group [q heads; k; v] of the
    contiguous query_key_value and linear_fc1 = [gate_t; up_t]; per-head q/k layernorms whole on
    each rank; layer 1 (MoE): router weight and expert_bias whole, shared experts split like a
    dense MLP."""
    m = models("bailing_moe_v2")
    sd = m["tensors"]
    mid = str(tmp_path / "mid")
    convert(m["src"], mid, ck.Target(to="mcore", tp=2))
    q, kv, groups = HEADS * 32, 2 * 32, 2
    p0, p1 = "model.layers.0.", "model.layers.1."
    qkv = per_group(*_split_contiguous(sd[p0 + "attention.query_key_value.weight"], q, kv), groups)
    bias = per_group(*_split_contiguous(sd[p0 + "attention.query_key_value.bias"], q, kv), groups)
    rows, half, shared = qkv.shape[0] // 2, F // 2, 16
    for t in range(2):
        r = _rank(mid, t)
        assert torch.equal(
            r["decoder.layers.0.self_attention.linear_qkv.weight"], qkv[t * rows : (t + 1) * rows]
        )
        assert torch.equal(
            r["decoder.layers.0.self_attention.linear_qkv.bias"], bias[t * rows : (t + 1) * rows]
        )
        assert torch.equal(
            r["decoder.layers.0.self_attention.q_layernorm.weight"],
            sd[p0 + "attention.query_layernorm.weight"],
        )
        assert torch.equal(
            r["decoder.layers.0.self_attention.k_layernorm.weight"], sd[p0 + "attention.key_layernorm.weight"]
        )
        fc1 = torch.cat([sd[p0 + f"mlp.{x}_proj.weight"][t * half : (t + 1) * half] for x in ("gate", "up")])
        assert torch.equal(r["decoder.layers.0.mlp.linear_fc1.weight"], fc1)
        assert torch.equal(r["decoder.layers.1.mlp.router.weight"], sd[p1 + "mlp.gate.weight"])
        assert torch.equal(r["decoder.layers.1.mlp.router.expert_bias"], sd[p1 + "mlp.gate.expert_bias"])
        fc1 = torch.cat(
            [
                sd[p1 + f"mlp.shared_experts.{x}_proj.weight"][t * shared : (t + 1) * shared]
                for x in ("gate", "up")
            ]
        )
        assert torch.equal(r["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"], fc1)


@pytest.mark.parametrize(
    "case,edit,message",
    [
        # Ling v1 (BailingMoeForCausalLM) has no router score bias: refused, not misread
        ("bailing_moe_v2", lambda sd: {k: v for k, v in sd.items() if "expert_bias" not in k}, "router.bias"),
        # InternLM2 with bias=true has wqkv / wo biases this table does not carry: refused by name
        (
            "internlm2",
            lambda sd: dict(sd, **{"model.layers.0.attention.wqkv.bias": torch.zeros(2 * H)}),
            "model.layers.0.attention.wqkv.bias",
        ),
        # PLM in the unmerged transformers port's naming (PLMMLP = CLIPMLP: mlp.fc1 / mlp.fc2): no
        # published checkpoint has it; refused by name, not guessed
        (
            "plm",
            lambda sd: {
                k.replace("mlp.up_proj", "mlp.fc1").replace("mlp.down_proj", "mlp.fc2"): v
                for k, v in sd.items()
            },
            "mlp.fc1",
        ),
    ],
    ids=["ling-v1", "internlm2-bias", "plm-fc1-fc2"],
)
def test_unsupported_variants_are_refused_in_one_line(models, tmp_path, capsys, case, edit, message):
    src = str(tmp_path / "src")
    shutil.copytree(models(case)["src"], src)
    f = os.path.join(src, "model.safetensors")
    save_file(edit(load_file(f)), f)
    capsys.readouterr()
    assert cli_main(["convert", src, str(tmp_path / "out"), "--to", "mcore", "--tp", "2", "--quiet"]) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ckpt-ir: error")]
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "case,want",
    [
        # ChatGLM: interleaved pairs of half of each head, base 10000 x rope_ratio; 2 kv groups of 32
        (
            "chatglm",
            dict(
                rotary_percent=0.5,
                rotary_interleaved=True,
                rotary_base=20000.0,
                num_query_groups=2,
                kv_channels=32,
                add_qkv_bias=True,
                ffn_hidden_size=F,
                untie_embeddings_and_output_weights=True,
            ),
        ),
        # Qwen v1: rotary_emb_base; the MLP width is half of intermediate_size; multi-head
        ("qwen", dict(rotary_base=1e6, ffn_hidden_size=F, num_query_groups=HEADS, add_qkv_bias=True)),
        # InternLM2: grouped-query, no biases
        ("internlm2", dict(num_query_groups=2, add_qkv_bias=False, ffn_hidden_size=F, swiglu=True)),
        # Ling 2.0: DeepSeek-V3 routing, q/k layernorm, half rotary, one shared expert, first layer dense
        (
            "bailing_moe_v2",
            dict(
                moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True,
                qk_layernorm=True,
                rotary_percent=0.5,
                moe_shared_expert_intermediate_size=32,
                moe_layer_freq=[0, 1, 1, 1],
            ),
        ),
        # PLM: MLA without q-LoRA, squared-ReLU MLP without gating, tied embeddings
        (
            "plm",
            dict(
                multi_latent_attention=True,
                q_lora_rank=None,
                kv_lora_rank=16,
                qk_head_dim=8,
                qk_pos_emb_head_dim=4,
                v_head_dim=8,
                swiglu=False,
                squared_relu=True,
                ffn_hidden_size=F,
                untie_embeddings_and_output_weights=False,
                rotary_base=100000.0,
            ),
        ),
    ],
)
def test_megatron_args_describe_the_model(models, tmp_path, case, want):
    mid = str(tmp_path / "mid")
    convert(models(case)["src"], mid, ck.Target(to="mcore", tp=2))
    args = vars(torch.load(f"{mid}/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"])
    assert {k: args.get(k) for k in want} == want


def test_plm_rank_files(models, tmp_path):
    """PLM, TP2 (Megatron / MindSpeed-LLM's MLA and non-gated MLP layout): linear_qkv =
    [q_proj; kv_a_proj_with_mqa] whole on each rank (the down-projections are not split),
    kv_layernorm whole, no q_layernorm (no q-LoRA), linear_kv_up_proj = kv_b_proj rows of rank t,
    linear_proj = o_proj columns of t, linear_fc1 = up_proj rows of t (no [gate; up] stacking),
    linear_fc2 = down_proj columns of t; tied: no output_layer."""
    m = models("plm")
    sd = m["tensors"]
    mid = str(tmp_path / "mid")
    convert(m["src"], mid, ck.Target(to="mcore", tp=2))

    def rows(w: torch.Tensor, t: int, dim: int = 0) -> torch.Tensor:
        return w.chunk(2, dim=dim)[t]

    for t in range(2):
        r = _rank(mid, t)
        assert "output_layer.weight" not in r
        assert torch.equal(r["embedding.word_embeddings.weight"], rows(sd["model.embed_tokens.weight"], t))
        for i in range(LAYERS):
            p, key = f"model.layers.{i}.", f"decoder.layers.{i}."
            qkv = torch.cat(
                [sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.kv_a_proj_with_mqa.weight"]]
            )
            want = {
                "self_attention.linear_qkv.weight": qkv,
                "self_attention.kv_layernorm.weight": sd[p + "self_attn.kv_a_layernorm.weight"],
                "self_attention.linear_kv_up_proj.weight": rows(sd[p + "self_attn.kv_b_proj.weight"], t),
                "self_attention.linear_proj.weight": rows(sd[p + "self_attn.o_proj.weight"], t, 1),
                "mlp.linear_fc1.weight": rows(sd[p + "mlp.up_proj.weight"], t),
                "mlp.linear_fc2.weight": rows(sd[p + "mlp.down_proj.weight"], t, 1),
                "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                "pre_mlp_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
            }
            got = {k[len(key) :]: v for k, v in r.items() if k.startswith(key) and "_extra_state" not in k}
            assert sorted(got) == sorted(want), i
            for k, v in want.items():
                assert torch.equal(got[k], v), (i, k)
