"""Megatron-Core as the oracle for mixture-of-experts output: ckpt-ir's ``--to mcore`` MoE
checkpoints must load into a real megatron-core ``GPTModel`` with MoE layers (local spec, CPU,
gloo) and give the same logits as transformers on the source HF model.

Models: mixtral; qwen3_moe (q/k norms, ``norm_topk_prob=false``); qwen2_moe (qkv bias, a
sigmoid-gated shared expert, a dense layer via ``mlp_only_layers``, tied embeddings); hy_v3 (q/k
norms, sigmoid routing with a random score-correction bias, renormalised and scaled top-k, an
ungated shared expert, a dense first layer); glm4_moe
(GLM-4.5: DeepSeek-V3's router -- sigmoid scores, top-k chosen on scores plus a random
score-correction bias, renormalised and scaled by ``routed_scaling_factor`` -- an ungated shared
expert, a dense first layer, q/k norms, qkv bias, rotary on half of each head); issue 31's dots1
(the same router with Qwen3's q/k norms), exaone_moe (the same router; a sliding-window layer with
rotary and a global one without), granitemoe and granitemoeshared (experts stacked [E, 2F, H], a
softmax scale of its own, an ungated shared MLP; their other muP multipliers at 1) and
llama4_text (experts stacked [E, H, 2F], top-1 sigmoid score on the expert input, a shared expert,
a dense layer of another width, interleaved rotary, a layer without rotary or L2 q/k norm).  Layouts:
expert parallelism alone (TP1 x EP2, EP4), with tensor parallelism (TP2 x EP2 with expert TP 2
and expert TP 1, TP2 x EP4 with expert TP 1, TP2 without EP), with pipeline parallelism (PP2 x EP2,
PP2 x VPP2 x EP2, TP2 x PP2 x EP2 with expert TP 1), experts stored one by one
(``SequentialMLP``) or as grouped-GEMM ``weight1``/``weight2`` (``GroupedMLP``, through the
harness's pure-torch ``grouped_gemm`` stand-in: the real extension is CUDA-only), and Megatron ->
Megatron reshards (grouped -> per expert, expert TP 1 -> 2 and 2 -> 1).

Every parameter of the tiny HF models is random (router, norms, biases, shared-expert gate too)
and the comparison is in fp32, so an expert on the wrong EP rank, local experts in the wrong
order, a mis-sharded expert or a wrong grouped-GEMM view gives O(1) differences, while a correct
conversion agrees to ~1e-5; three broken copies of correct checkpoints (EP rank files swapped,
local experts permuted, grouped ``weight1`` concatenated instead of viewed) check that.

The Megatron side is configured from the *HF* config, never from the ``args`` ckpt-ir wrote.
Routing: Mixtral (and ``norm_topk_prob=true``) renormalise the top-k of a softmax, which equals a
softmax over the top-k logits, Megatron's default; Qwen MoE with ``norm_topk_prob=false`` keeps the
top-k of the softmax over all experts, which is ``moe_router_pre_softmax=True``.  No load
balancing, no capacity factor (no token dropping), ``allgather`` dispatcher.  All cases run in one
``tests/mcore_harness.py`` subprocess with four forked gloo ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from tests.mcore_harness import run_job

assert importlib.util.find_spec("megatron.core") is not None, "install the test extra: pip install -e .[test]"

WORLD = 4
SEQ = 12
INPUT_IDS = [[(7 * i + 3) % 120 for i in range(SEQ)], [(11 * i + 5) % 120 for i in range(SEQ)]]
E = 4  # routed experts per MoE layer
TOPK = 2

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    num_experts_per_tok=TOPK,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
MODELS = {
    # experts of size intermediate_size; router renormalises its top-k
    "mixtral": dict(family="mixtral", intermediate_size=48, num_local_experts=E, tie_word_embeddings=False),
    "mixtral-4l": dict(
        family="mixtral",
        intermediate_size=48,
        num_local_experts=E,
        tie_word_embeddings=False,
        num_hidden_layers=4,
    ),
    # q/k norms, head_dim 32 != hidden / heads, top-k of the full softmax (norm_topk_prob false)
    "qwen3_moe": dict(
        family="qwen3_moe",
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=E,
        head_dim=32,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    # qkv bias, a sigmoid-gated shared expert, layer 1 dense (mlp_only_layers), tied embeddings
    "qwen2_moe": dict(
        family="qwen2_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=E,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        tie_word_embeddings=True,
    ),
    # Hunyuan V3: q/k norms, sigmoid router with a score-correction bias (random here), renormalised
    # and scaled top-k, an ungated shared expert, layer 0 dense (mlp_layer_types)
    "hy_v3": dict(
        family="hy_v3",
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=E,
        head_dim=32,
        router_scaling_factor=1.7,
        tie_word_embeddings=False,
    ),
    # GLM-4.5: sigmoid router with a score-correction bias and a routed scaling factor, one shared
    # expert, layer 0 dense (first_k_dense_replace), q/k norms, qkv bias, rotary on half of each head
    "glm4_moe": dict(
        family="glm4_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=E,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=True,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
    ),
    # issue 31's families, each configured here from its own config keys.  dots1: Qwen3's q/k
    # norms with DeepSeek-V3's router (sigmoid + random score bias, renormalised, scaled), a
    # shared expert, layer 0 dense
    "dots1": dict(
        family="dots1",
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=E,
        n_shared_experts=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        head_dim=32,
        tie_word_embeddings=False,
    ),
    # EXAONE MoE: the same router and q/k norms; layer 0 sliding (window 4 < the 12 tokens, with
    # rotary), layer 1 global without rotary (EXAONE 4's rule); layer 0 dense
    "exaone_moe": dict(
        family="exaone_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=E,
        num_shared_experts=1,
        routed_scaling_factor=1.5,
        sliding_window=4,
        sliding_window_pattern=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),
    # Granite MoE: experts stacked [E, 2F, H]; attention_multiplier (the softmax scale) not
    # 1/sqrt(head_dim); the embedding / residual / logits multipliers neutral (megatron-core has
    # none of them); granitemoeshared adds an ungated shared MLP
    "granitemoe": dict(
        family="granitemoe",
        intermediate_size=48,
        num_local_experts=E,
        attention_multiplier=0.3,
        tie_word_embeddings=False,
    ),
    "granitemoeshared": dict(
        family="granitemoeshared",
        intermediate_size=48,
        num_local_experts=E,
        shared_intermediate_size=40,
        attention_multiplier=0.3,
        tie_word_embeddings=False,
    ),
    # Llama 4's text model: experts stacked [E, H, 2F], top-1 sigmoid score scaling the expert's
    # input, a shared expert; layer 0 dense of another width (intermediate_size_mlp); rotary on
    # interleaved pairs; layer 1 without rotary and without the weightless L2 q/k norm of layer 0
    "llama4_text": dict(
        family="llama4_text",
        intermediate_size=32,
        intermediate_size_mlp=80,
        num_local_experts=E,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),
}

# case -> (model, conversion).  A conversion is CLI arguments for ``ckpt-ir convert HF OUT --to
# mcore ...``, or ("from", case, args) to convert another case's Megatron output (resharding).
CASES = {
    "mixtral-tp1ep2": ("mixtral", ["--ep", "2"]),
    "mixtral-tp1ep4": ("mixtral", ["--ep", "4"]),  # one expert per rank
    "mixtral-tp2ep2": ("mixtral", ["--tp", "2", "--ep", "2"]),  # experts split over TP too (ETP 2)
    "mixtral-tp2ep2-etp1": ("mixtral", ["--tp", "2", "--ep", "2", "--etp", "1"]),  # whole experts per rank
    "mixtral-tp1ep2-grouped": ("mixtral", ["--ep", "2", "--moe-grouped-gemm"]),
    "mixtral-tp2ep2-grouped": ("mixtral", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "mixtral-tp1pp2ep2": ("mixtral", ["--pp", "2", "--ep", "2"]),  # mp_rank_TT_PPP_EEE
    "mixtral-tp1pp2vpp2ep2": ("mixtral-4l", ["--pp", "2", "--vpp-layers", "1", "--ep", "2"]),  # model0/model1
    "mixtral-tp2ep1": ("mixtral", ["--tp", "2"]),  # experts TP-sharded, no EP: mp_rank_TT
    "mixtral-tp2ep4-etp1": ("mixtral", ["--tp", "2", "--ep", "4", "--etp", "1"]),  # EP > TP, ranks (e % 2, e)
    "mixtral-tp2pp2ep2-etp1": (
        "mixtral-4l",
        ["--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1"],
    ),  # (t, p, t)
    # Megatron -> Megatron: grouped TP2 x EP2 back to one expert per rank, ungrouped
    "mixtral-tp2ep2-grouped-to-ep4": ("mixtral", ("from", "mixtral-tp2ep2-grouped", ["--ep", "4"])),
    # ... and expert TP 1 files (only the owned (t, e) pairs exist) back to expert TP 2
    "mixtral-tp2ep4-etp1-to-tp2ep2": ("mixtral", ("from", "mixtral-tp2ep4-etp1", ["--tp", "2", "--ep", "2"])),
    "qwen3_moe-tp1ep2": ("qwen3_moe", ["--ep", "2"]),
    "qwen3_moe-tp2ep2": ("qwen3_moe", ["--tp", "2", "--ep", "2"]),
    "qwen3_moe-tp2ep2-etp1-grouped": (
        "qwen3_moe",
        ["--tp", "2", "--ep", "2", "--etp", "1", "--moe-grouped-gemm"],
    ),
    "qwen3_moe-etp1-grouped-to-tp2-grouped": (
        "qwen3_moe",
        ("from", "qwen3_moe-tp2ep2-etp1-grouped", ["--tp", "2", "--moe-grouped-gemm"]),
    ),
    "qwen2_moe-tp1ep2": ("qwen2_moe", ["--ep", "2"]),
    "qwen2_moe-tp2ep2": ("qwen2_moe", ["--tp", "2", "--ep", "2"]),
    "qwen2_moe-tp1pp2ep2": ("qwen2_moe", ["--pp", "2", "--ep", "2"]),  # dense layer 1 on stage 1, tied
    "qwen2_moe-tp2ep2-to-etp1-grouped": (
        "qwen2_moe",
        ("from", "qwen2_moe-tp2ep2", ["--tp", "2", "--ep", "2", "--etp", "1", "--moe-grouped-gemm"]),
    ),
    "hy_v3-tp2ep2-grouped": ("hy_v3", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "hy_v3-tp1pp2ep2": ("hy_v3", ["--pp", "2", "--ep", "2"]),  # dense layer 0 on stage 0
    "glm4_moe-tp2ep2-grouped": ("glm4_moe", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "glm4_moe-tp1pp2ep2": ("glm4_moe", ["--pp", "2", "--ep", "2"]),  # dense layer 0 on stage 0
    "dots1-tp2ep2-grouped": ("dots1", ["--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "exaone_moe-tp1pp2ep2": ("exaone_moe", ["--pp", "2", "--ep", "2"]),
    "granitemoe-tp2ep2": ("granitemoe", ["--tp", "2", "--ep", "2"]),
    "granitemoeshared-tp1pp2ep2": ("granitemoeshared", ["--pp", "2", "--ep", "2"]),
    "llama4_text-tp2ep2-etp1": ("llama4_text", ["--tp", "2", "--ep", "2", "--etp", "1"]),
}
# (tp, pp, vpp, ep, etp, grouped) each case must come out as
EXPECTED_LAYOUT = {
    "mixtral-tp1ep2": (1, 1, None, 2, 1, False),
    "mixtral-tp1ep4": (1, 1, None, 4, 1, False),
    "mixtral-tp2ep2": (2, 1, None, 2, 2, False),
    "mixtral-tp2ep2-etp1": (2, 1, None, 2, 1, False),
    "mixtral-tp1ep2-grouped": (1, 1, None, 2, 1, True),
    "mixtral-tp2ep2-grouped": (2, 1, None, 2, 2, True),
    "mixtral-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "mixtral-tp1pp2vpp2ep2": (1, 2, 2, 2, 1, False),
    "mixtral-tp2ep1": (2, 1, None, 1, 2, False),
    "mixtral-tp2ep4-etp1": (2, 1, None, 4, 1, False),
    "mixtral-tp2pp2ep2-etp1": (2, 2, None, 2, 1, False),
    "mixtral-tp2ep2-grouped-to-ep4": (1, 1, None, 4, 1, False),
    "mixtral-tp2ep4-etp1-to-tp2ep2": (2, 1, None, 2, 2, False),
    "qwen3_moe-tp1ep2": (1, 1, None, 2, 1, False),
    "qwen3_moe-tp2ep2": (2, 1, None, 2, 2, False),
    "qwen3_moe-tp2ep2-etp1-grouped": (2, 1, None, 2, 1, True),
    "qwen3_moe-etp1-grouped-to-tp2-grouped": (2, 1, None, 1, 2, True),
    "qwen2_moe-tp1ep2": (1, 1, None, 2, 1, False),
    "qwen2_moe-tp2ep2": (2, 1, None, 2, 2, False),
    "qwen2_moe-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "qwen2_moe-tp2ep2-to-etp1-grouped": (2, 1, None, 2, 1, True),
    "hy_v3-tp2ep2-grouped": (2, 1, None, 2, 2, True),
    "hy_v3-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "glm4_moe-tp2ep2-grouped": (2, 1, None, 2, 2, True),
    "glm4_moe-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "dots1-tp2ep2-grouped": (2, 1, None, 2, 2, True),
    "exaone_moe-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "granitemoe-tp2ep2": (2, 1, None, 2, 2, False),
    "granitemoeshared-tp1pp2ep2": (1, 2, None, 2, 1, False),
    "llama4_text-tp2ep2-etp1": (2, 1, None, 2, 1, False),
}
assert EXPECTED_LAYOUT.keys() == CASES.keys()

# broken copies of "mixtral-tp1ep2" that load without complaint but put experts in the wrong place
SWAPPED_EP = "mixtral-tp1ep2-ep-files-swapped"  # mp_rank_00_000 <-> mp_rank_00_001
PERMUTED = "mixtral-tp1ep2-local-experts-permuted"  # local_experts.0 <-> .1 in every rank file
# a broken copy of "mixtral-tp1ep2-grouped": weight1 as the experts' fc1^T concatenated along the
# columns ([H, E_loc*2F] logically) instead of Megatron's raw view of the (E_loc, H, 2F) stack
GROUPED_CAT = "mixtral-tp1ep2-grouped-weight1-concatenated"
CONTROLS = {SWAPPED_EP: "mixtral", PERMUTED: "mixtral", GROUPED_CAT: "mixtral"}


# families with DeepSeek-V3's router (sigmoid scores, top-k on scores + bias, renormalised, scaled)
DEEPSEEK_ROUTER = ("glm4_moe", "dots1", "exaone_moe")


def _build_hf(path: str, family: str, seed: int, **kw) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**COMMON, **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    choices: list[torch.Tensor] = []  # DeepSeek-V3's router: the scores it ranks (sigmoid + bias)

    def record(gate, inputs, output):
        h = inputs[0].reshape(-1, gate.weight.shape[1]).float()
        choices.append(torch.sigmoid(h @ gate.weight.float().t()) + gate.e_score_correction_bias)

    with torch.no_grad():
        for p in model.parameters():  # router, norms, biases, gates too
            p.normal_(0, 0.5)
        for m in model.modules():  # the router score-correction bias (a buffer): random too
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0, 0.1)
                if family in DEEPSEEK_ROUTER:
                    m.register_forward_hook(record)
        out = model(torch.tensor(INPUT_IDS), output_router_logits=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    return {
        "dir": path,
        "config": config,
        "logits": out.logits,
        "router_logits": out.router_logits,
        # what each MoE layer's top-k is taken over: the logits, or HYV3's sigmoid + score bias
        "choice_scores": [
            torch.sigmoid(r.float()) + b
            for r, b in zip(
                [r for r in out.router_logits if r is not None],
                [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")],
            )
        ]
        if family == "hy_v3"
        else choices  # recorded by the hook
        if family in DEEPSEEK_ROUTER
        else [r for r in out.router_logits if r is not None],
        "family": family,
    }


def _moe_config(family: str, hf: dict) -> dict:
    """Megatron MoE settings derived from the HF config alone."""
    n = hf.get("num_experts") or hf.get("n_routed_experts") or hf["num_local_experts"]
    layers = hf["num_hidden_layers"]
    if family == "hy_v3":
        return {
            "num_experts": n,
            "topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["moe_intermediate_size"],
            "pre_softmax": False,
            "layer_freq": [int(t == "sparse") for t in hf["mlp_layer_types"]],
            "shared_ffn_hidden_size": hf["moe_intermediate_size"] * hf["num_shared_experts"],
            "score_function": "sigmoid",
            "expert_bias": True,
            "scaling_factor": hf["router_scaling_factor"],
        }
    if family in DEEPSEEK_ROUTER:  # sigmoid scores, top-k on scores + bias
        types = hf.get("mlp_layer_types")  # EXAONE's; else the first first_k_dense_replace dense
        dense = hf.get("first_k_dense_replace")
        shared = hf.get("n_shared_experts") or hf.get("num_shared_experts")
        return {
            "num_experts": n,
            "topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["moe_intermediate_size"],
            "layer_freq": [int(t == "sparse") for t in types]
            if types
            else [int(i >= dense) for i in range(layers)],
            "shared_ffn_hidden_size": hf["moe_intermediate_size"] * shared,
            "score_function": "sigmoid",
            "expert_bias": True,
            "scaling_factor": hf["routed_scaling_factor"],
            "num_groups": hf["n_group"],
            "group_topk": hf["topk_group"],
        }
    if family in ("mixtral", "granitemoe", "granitemoeshared"):  # softmax over the top-k logits
        moe = {
            "num_experts": n,
            "topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["intermediate_size"],
            "pre_softmax": False,
        }
        if hf.get("shared_intermediate_size"):  # Granite's shared MLP, ungated
            moe.update(shared_ffn_hidden_size=hf["shared_intermediate_size"])
        return moe
    if family == "llama4_text":  # top-1 sigmoid score; a shared expert as wide as the experts
        moe_layers = hf["moe_layers"]
        return {
            "num_experts": n,
            "topk": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["intermediate_size"],
            "layer_freq": [int(i in moe_layers) for i in range(layers)],
            "shared_ffn_hidden_size": hf["intermediate_size"],
            "score_function": "sigmoid",
        }
    step, only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    freq = [int(i not in only and (i + 1) % step == 0) for i in range(layers)]
    moe = {
        "num_experts": n,
        "topk": hf["num_experts_per_tok"],
        "ffn_hidden_size": hf["moe_intermediate_size"],
        # renormalised top-k of a softmax == softmax of the top-k logits (Megatron's default)
        "pre_softmax": not hf.get("norm_topk_prob", False),
        "layer_freq": freq if 0 in freq else 1,
    }
    if hf.get("shared_expert_intermediate_size"):
        moe.update(shared_ffn_hidden_size=hf["shared_expert_intermediate_size"], shared_gate=True)
    return moe


def _config_extra(family: str, hf: dict) -> dict:
    """TransformerConfig fields beyond the MoE block, from the HF config alone: EXAONE's windows
    (HF keeps keys with q - k < sliding_window, Megatron's (left, 0) window q - k <= left) and
    rotary only on the sliding layers; Granite's softmax scale; Llama 4's layers without rotary
    (no_rope_layers 0), its weightless L2 q/k norm (on the rotary layers only: the harness drops
    it where there is no rotary) and its router score on the expert input, the dense MLP's width."""
    if family == "exaone_moe":
        sliding = [int(t == "sliding_attention") for t in hf["layer_types"]]
        return {
            "window_size": (hf["sliding_window"] - 1, 0),
            "window_attn_skip_freq": sliding,
            "no_rope_freq": [1 - s for s in sliding],
        }
    if family in ("granitemoe", "granitemoeshared"):
        assert hf["embedding_multiplier"] == hf["residual_multiplier"] == hf["logits_scaling"] == 1.0
        return {"softmax_scale": hf["attention_multiplier"]}
    if family == "llama4_text":
        return {
            "no_rope_freq": [1 - r for r in hf["no_rope_layers"]],
            "qk_l2_norm": hf["use_qk_norm"],
            "moe_apply_probs_on_input": True,
            "ffn_hidden_size": hf["intermediate_size_mlp"],
        }
    return {}


def _convert(src: str, dst: str, args: list[str]) -> None:
    assert cli_main(["convert", src, dst, "--to", "mcore", "--quiet", *args]) == 0


def _rank_dirs(out: str) -> list[str]:
    it_dir = os.path.join(out, "iter_0000001")
    return [os.path.join(it_dir, d) for d in sorted(os.listdir(it_dir))]


def _swap_ep_files(src: str, dst: str) -> None:
    shutil.copytree(src, dst)
    a, b = (os.path.join(dst, "iter_0000001", f"mp_rank_00_00{e}", "model_optim_rng.pt") for e in (0, 1))
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)


def _permute_local_experts(src: str, dst: str) -> None:
    shutil.copytree(src, dst)
    for d in _rank_dirs(dst):
        path = os.path.join(d, "model_optim_rng.pt")
        blob = torch.load(path, weights_only=False)
        sd = blob["model"]
        swapped = {}
        for key, value in sd.items():
            for a, b in (
                (".local_experts.0.", ".local_experts.1."),
                (".local_experts.1.", ".local_experts.0."),
            ):
                if a in key:
                    key = key.replace(a, b)
                    break
            swapped[key] = value
        assert swapped.keys() == sd.keys()
        blob["model"] = swapped
        torch.save(blob, path)


def _concat_grouped_weight1(src: str, dst: str) -> None:
    shutil.copytree(src, dst)
    for d in _rank_dirs(dst):
        path = os.path.join(d, "model_optim_rng.pt")
        blob = torch.load(path, weights_only=False)
        for key, w in blob["model"].items():
            if key.endswith("mlp.experts.weight1"):
                stack = w.view(E // 2, w.shape[0], -1)  # (E_loc, H, 2F): what GroupedMLP reads
                blob["model"][key] = torch.cat(list(stack), dim=1).clone()
        torch.save(blob, path)


def _rank_args(out: str) -> dict:
    return vars(
        torch.load(os.path.join(_rank_dirs(out)[0], "model_optim_rng.pt"), weights_only=False)["args"]
    )


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore-moe-oracle")
    for sub in ("hf", "mcore", "logits"):
        os.makedirs(root / sub)
    models = {
        name: _build_hf(str(root / "hf" / name), seed=100 + i, **spec)
        for i, (name, spec) in enumerate(MODELS.items())
    }
    cases = {}
    for case, (model, conversion) in CASES.items():
        out = str(root / "mcore" / case)
        if isinstance(conversion, tuple):
            _, src_case, args = conversion
            _convert(cases[src_case][1], out, args)
        else:
            _convert(models[model]["dir"], out, conversion)
        cases[case] = (model, out)
    base = cases["mixtral-tp1ep2"][1]
    _swap_ep_files(base, str(root / "mcore" / SWAPPED_EP))
    _permute_local_experts(base, str(root / "mcore" / PERMUTED))
    _concat_grouped_weight1(cases["mixtral-tp1ep2-grouped"][1], str(root / "mcore" / GROUPED_CAT))
    cases.update({c: (m, str(root / "mcore" / c)) for c, m in CONTROLS.items()})

    job_cases = []
    for case, (model, out) in cases.items():
        m = models[model]
        hf = m["config"]
        args = _rank_args(out)  # only the layout: the model itself is configured from the HF config
        job_cases.append(
            {
                "name": case,
                "model": model,
                "ckpt": out,
                "tp": args["tensor_model_parallel_size"],
                "pp": args["pipeline_model_parallel_size"],
                "vpp": args.get("virtual_pipeline_model_parallel_size"),
                "ep": args["expert_model_parallel_size"],
                "etp": args["expert_tensor_parallel_size"],
                "hf_config": hf,
                "padded_vocab": args["padded_vocab_size"],
                "tied": bool(hf.get("tie_word_embeddings")),
                "qkv_bias": m["family"] in ("qwen2_moe", "glm4_moe"),
                "qk_norm": m["family"] in ("qwen3_moe", "hy_v3", "dots1", "exaone_moe")
                or (m["family"] == "glm4_moe" and bool(hf.get("use_qk_norm"))),
                "rotary_percent": (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0),
                "rotary_interleaved": m["family"] == "llama4_text",
                "config_extra": _config_extra(m["family"], hf),
                "moe": {**_moe_config(m["family"], hf), "grouped_gemm": bool(args.get("moe_grouped_gemm"))},
                "input_ids": INPUT_IDS,
                "out": str(root / "logits" / f"{case}.pt"),
            }
        )
    reports = [per_rank for _, per_rank in run_job(str(root), job_cases, WORLD)]

    results = {}
    for jc, per_rank in zip(job_cases, reports):
        m = models[jc["model"]]
        results[jc["name"]] = {
            "job": jc,
            "reports": per_rank,
            "logits": torch.load(jc["out"]),
            "ref": m["logits"],
            "model": m,
            "args": _rank_args(jc["ckpt"]),
            "files": _rank_dirs(jc["ckpt"]),
        }
    return results


@pytest.mark.parametrize("model", list(MODELS))
def test_reference_routing_is_not_a_near_tie(oracle, model):
    """Guard for the comparison itself: in every MoE layer of the HF reference, the k-th and
    (k+1)-th router scores of every token are well apart, so fp32 rounding differences between
    the two implementations cannot flip an expert choice."""
    case = next(c for c, (m, _) in CASES.items() if m == model)
    routers = oracle[case]["model"]["choice_scores"]
    k = MODELS[model].get("num_experts_per_tok", TOPK)
    assert routers
    for scores in routers:
        top = scores.float().topk(k + 1, dim=-1).values
        assert (top[:, k - 1] - top[:, k]).min() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_exactly(oracle, case):
    """Every rank's file fills every parameter of its MoE GPTModel (router, local experts or
    weight1/weight2, shared expert and gate) and has no extra key; every (TP, EP) rank pair the
    process grid uses exists and was loaded by the right process."""
    r = oracle[case]
    job = r["job"]
    tp, pp, vpp, ep, etp, grouped = EXPECTED_LAYOUT[case]
    assert (
        job["tp"],
        job["pp"],
        job["vpp"],
        job["ep"],
        job["etp"],
        job["moe"]["grouped_gemm"],
    ) == EXPECTED_LAYOUT[case]
    seen = set()
    for rep in r["reports"]:
        seen.add((rep["tp_rank"], rep["pp_rank"], rep["ep_rank"]))
        assert rep["etp_rank"] == (rep["tp_rank"] if etp == tp else 0)
        assert len(rep["chunks"]) == (vpp or 1)
        for chunk in rep["chunks"]:
            assert chunk["unexpected"] == [], f"rank {rep['rank']}: keys GPTModel does not have"
            real_missing = [k for k in chunk["missing"] if not k.endswith("._extra_state")]
            assert real_missing == [], f"rank {rep['rank']}: parameters the checkpoint lacks"
            assert chunk["loaded"] == chunk["params"]  # parameters and persistent buffers
            assert chunk["buffers"] == 0 or job["moe"].get("expert_bias")  # only the router's bias
    # Megatron's rank grids (order tp-cp-ep-dp-pp): dense tp = r % TP, pp = r // (WORLD / PP);
    # experts (etp, ep) = (r % ETP, r // ETP % EP)
    want = {(r_ % tp, r_ // (WORLD // pp), r_ // etp % ep) for r_ in range(WORLD)}
    assert seen == want
    names = {os.path.basename(d) for d in r["files"]}
    assert names == {
        f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
        for t, p, e in want
    }


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_built_the_moe_layers(oracle, case):
    """The model really had MoE layers of the intended kind (and qwen2_moe's dense layer 1 a
    plain MLP), and with grouped GEMM every local expert of every rank ran on some tokens."""
    r = oracle[case]
    job = r["job"]
    experts = "GroupedMLP" if job["moe"]["grouped_gemm"] else "SequentialMLP"
    freq = job["moe"].get("layer_freq", 1)
    chunks = job["vpp"] or 1
    per_chunk = job["hf_config"]["num_hidden_layers"] // (job["pp"] * chunks)
    for rep in r["reports"]:
        for c, chunk in enumerate(rep["chunks"]):
            mods = chunk["mlp_modules"]
            layers = sorted({int(n.split(".")[2]) for n in mods})
            assert layers == list(range(per_chunk))
            for i in layers:
                global_i = (c * job["pp"] + rep["pp_rank"]) * per_chunk + i
                if freq != 1 and not freq[global_i]:
                    assert mods[f"decoder.layers.{i}.mlp"] == "MLP"
                    continue
                assert mods[f"decoder.layers.{i}.mlp"] == "MoELayer"
                assert mods[f"decoder.layers.{i}.mlp.experts"] == experts
                shared = mods.get(f"decoder.layers.{i}.mlp.shared_experts")
                assert shared == ("SharedExpertMLP" if job["moe"].get("shared_ffn_hidden_size") else None)
        if job["moe"]["grouped_gemm"]:
            calls = rep["gmm_calls"]
            assert calls and all(n > 0 for sizes in calls for n in sizes)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(oracle, case):
    r = oracle[case]
    got, ref = r["logits"], r["ref"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_args_describe_the_moe(oracle, case):
    """The MoE ``args`` Megatron-LM rebuilds the model from agree with the HF config."""
    r = oracle[case]
    job, args = r["job"], r["args"]
    moe = job["moe"]
    tp, pp, vpp, ep, etp, grouped = EXPECTED_LAYOUT[case]
    want = {
        "num_experts": moe["num_experts"],
        "moe_router_topk": moe["topk"],
        "moe_ffn_hidden_size": moe["ffn_hidden_size"],
        "moe_grouped_gemm": grouped,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "virtual_pipeline_model_parallel_size": vpp,
        "expert_tensor_parallel_size": etp,
        "transformer_impl": "local",
    }
    if moe.get("shared_ffn_hidden_size"):
        want["moe_shared_expert_intermediate_size"] = moe["shared_ffn_hidden_size"]
    assert {k: args.get(k) for k in want} == want


@pytest.mark.parametrize(
    "case",
    [
        c
        for c, (model, _) in CASES.items()
        if MODELS[model]["family"] in ("exaone_moe", "granitemoe", "granitemoeshared", "llama4_text")
    ],
)
def test_args_carry_the_settings_beyond_the_moe_block(oracle, case):
    """The windows, rotary-free layers, softmax scale, L2 q/k norm, router score on the expert
    input and interleaved rotary the oracle was configured with from the HF config are in the
    rank files' ``args`` under the same TransformerConfig names (``ffn_hidden_size``: the dense
    MLP's)."""
    r = oracle[case]
    args, job = r["args"], r["job"]
    for field, value in job["config_extra"].items():
        assert args[field] == (list(value) if isinstance(value, tuple) else value), field
    assert bool(args.get("rotary_interleaved")) == job["rotary_interleaved"]


def test_experts_sit_on_their_ep_rank(oracle):
    """Expert e of layer 0 is local expert e % 2 on EP rank e // 2 (checked against the HF tensor)."""
    from safetensors.torch import load_file

    r = oracle["mixtral-tp1ep2"]
    hf_dir = r["model"]["dir"]
    hf = {}
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors"):
            hf.update(load_file(os.path.join(hf_dir, f)))
    for e in range(E):
        ep, j = divmod(e, E // 2)
        sd = torch.load(os.path.join(r["files"][ep], "model_optim_rng.pt"), weights_only=False)["model"]
        fc2 = sd[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight"]
        # transformers 5 keeps experts fused in memory but saves Mixtral's per-expert names
        assert torch.equal(fc2, hf[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"])


@pytest.mark.parametrize("control", list(CONTROLS))
def test_wrong_expert_placement_is_caught(oracle, control):
    """Controls: the same tensors with experts on the wrong EP rank, local experts in the wrong
    order, or grouped-GEMM weight1 concatenated instead of viewed, load without a missing or
    unexpected key but give different logits."""
    r = oracle[control]
    for rep in r["reports"]:
        (chunk,) = rep["chunks"]
        assert (
            chunk["unexpected"] == []
            and [k for k in chunk["missing"] if not k.endswith("._extra_state")] == []
        )
    assert (r["logits"] - r["ref"]).abs().max() > 1.0
