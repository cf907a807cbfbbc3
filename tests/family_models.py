"""What the family tests share (``test_families_dense.py``, ``_moe``, ``_mla``, ``_hybrid``): a
tiny random model of each family transformers implements, built and saved by transformers, and
the round trip every family goes through (HF -> Megatron-Core at a layout -> HF bit-exact, with
transformers' logits on the result equal to the original's)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state, logits

DENSE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# MLA + DSA: index_topk (4) below the prompt length (12), so the indexer's choice changes logits
DSA = dict(
    DENSE,
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# per family: config overrides (tiny sizes; head_dim != hidden / heads where the family allows it)
CONFIGS = {
    # dense
    "seed_oss": dict(DENSE, head_dim=32),
    "glm": dict(DENSE, head_dim=32, partial_rotary_factor=0.5),
    "glm4": dict(DENSE, head_dim=32, partial_rotary_factor=0.5),
    "hunyuan_v1_dense": dict(
        DENSE, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    # BLOOM's own config keys (n_layer / n_head; no intermediate size: the MLP is 4 x hidden)
    "bloom": dict(hidden_size=64, n_head=4, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # sliding window shorter than the test sequence (12), so windowed and global layers differ
    "gemma3_text": dict(
        DENSE,
        head_dim=32,
        sliding_window=4,
        layer_types=ALTERNATING,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "olmo2": dict(DENSE),
    # every bias Llama's attention_bias / mlp_bias add; multipliers away from 1
    "granite": dict(
        DENSE,
        attention_bias=True,
        mlp_bias=True,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.04,
        logits_scaling=8.0,
    ),
    "internlm3": dict(DENSE, head_dim=32, attention_bias=True, mlp_bias=True),
    "ernie4_5": dict(DENSE, head_dim=32, use_bias=True),
    # layer 3 without rotary (every 4th by default); SmolLM3's own ids are outside the vocabulary
    "smollm3": dict(DENSE, attention_bias=True, mlp_bias=True),
    # YaRN, and Llama 4's query scaling from position 8 on (original_max_position_embeddings 8)
    "ministral3": dict(
        DENSE,
        head_dim=32,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 8,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    ),
    "arcee": dict(DENSE, attention_bias=True, mlp_bias=True),
    "exaone4": dict(DENSE, sliding_window=4, layer_types=ALTERNATING),
    "olmo3": dict(
        DENSE,
        sliding_window=4,
        layer_types=ALTERNATING,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "cohere": dict(DENSE, use_qk_norm=True, attention_bias=True, logit_scale=0.5),
    "cohere2": dict(DENSE, head_dim=32, sliding_window=4, layer_types=ALTERNATING, logit_scale=0.5),
    # layer 0 dense (96 wide, rotary though full attention: force_rope), 1-3 MoE: 4 stacked experts of
    # 32 (top 2) and one shared expert, averaged with them (the default combination)
    "cohere2_moe": dict(
        DENSE,
        intermediate_size=32,
        prefix_dense_intermediate_size=96,
        head_dim=32,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        logit_scale=0.5,
    ),
    # mixture of experts
    "glm4_moe": dict(
        DENSE,
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
    ),
    "hunyuan_v1_moe": dict(
        DENSE,
        head_dim=16,
        num_experts=4,
        moe_topk=[2, 2, 1, 2],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "phimoe": dict(DENSE, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True),
    "minimax_m2": dict(
        DENSE,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "hy_v3": dict(DENSE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(DENSE, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(
        DENSE,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=ALTERNATING,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
    # routed experts of another family's shape (issue 31): DeepSeek-V3's MoE block with per-head q/k
    # norms (dots1), ERNIE 4.5's layer schedule (layers 1, 3 MoE) and [1, E] score bias, EXAONE's
    # sliding / rotary-free layers, Granite's stacked [out, in] experts and muP multipliers,
    # Llama 4's stacked [in, out] experts, dense layers of another width and rotary-free layers;
    # AFMoE below
    "dots1": dict(
        DENSE,
        head_dim=32,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "ernie4_5_moe": dict(
        DENSE,
        moe_intermediate_size=32,
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_interval=2,
        tie_word_embeddings=True,
    ),
    "exaone_moe": dict(
        DENSE,
        head_dim=32,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        sliding_window=4,
        sliding_window_pattern=2,
    ),
    "granitemoe": dict(
        DENSE,
        num_local_experts=4,
        num_experts_per_tok=2,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        logits_scaling=6.0,
    ),
    "granitemoeshared": dict(
        DENSE,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=48,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        logits_scaling=6.0,
    ),
    "llama4_text": dict(
        DENSE,
        head_dim=32,
        intermediate_size=32,
        intermediate_size_mlp=80,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_bias=True,
    ),
    # AFMoE: an attention output gate, sandwich norms, rotary and a window on the sliding layers
    # only (0 and 2), muP embedding scale, layer 0 dense
    "afmoe": dict(
        DENSE,
        head_dim=32,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        num_dense_layers=1,
        sliding_window=4,
        global_attn_every_n_layers=2,
        mup_enabled=True,
        route_scale=2.0,
    ),
    # multi-latent attention
    "deepseek_v2": dict(
        DENSE,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    "minicpm3": dict(
        DENSE,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        scale_emb=2.5,
        scale_depth=1.4,
        dim_model_base=32,
    ),
    # GLM-4.7-Flash: DeepSeek-V3's MLA in GLM-4.5's MoE layer, dense layers from mlp_layer_types
    "glm4_moe_lite": dict(
        DENSE,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        mlp_layer_types=["dense", "sparse", "dense", "sparse"],
    ),
    "deepseek_v32": DSA,
    # layers 1 and 3 reuse the previous layer's top-k and carry no indexer
    "glm_moe_dsa": dict(DSA, indexer_types=["full", "shared", "full", "shared"]),
    # classic GPT: GPT-2's own config keys (n_embd, n_head, n_inner, n_positions); tied
    "gpt2": dict(n_embd=64, n_head=4, n_inner=96, vocab_size=128, n_positions=32),
    # GQA, a sliding window shorter than the test sequence (12), tied
    "starcoder2": dict(DENSE, sliding_window=6, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    # rotary on a quarter of each head, q/k/v biases
    "stablelm": dict(DENSE, use_qkv_bias=True),
    # multi-head (GPT-NeoX has no kv heads), parallel residual (the default), rotary on a quarter
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=128),
    # parallel attention and MLP from one LayerNorm, q/k LayerNorms, lm_head bias, half rotary
    "phi": dict(DENSE, qk_layernorm=True),
    # LayerNorm1P (1 + w) with biases, relu2 MLP, every bias, rotary on half of each head (default)
    "nemotron": dict(DENSE, attention_bias=True, mlp_bias=True),
    # hybrid: layers 0-2 gated-delta-net, layer 3 gated full attention; 2 key heads, 4 value heads
    "qwen3_next": dict(
        DENSE,
        head_dim=16,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
    ),
    # LongCat-Flash: two MLA + dense MLP sublayers and a shortcut MoE per layer; 4 routed experts
    # and 2 zero-computation ones (top-2 of 6: tokens route to the identity experts too)
    "longcat_flash": dict(
        DENSE,
        num_key_value_heads=4,
        expert_ffn_hidden_size=32,
        n_routed_experts=4,
        zero_expert_num=2,
        moe_topk=2,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
    ),
}
# Qwen3.5 (text): Qwen3-Next's attention and gated-delta-net sizes with a dense MLP, or its MoE
# (every layer sparse; the router renormalises the top-k)
QWEN3_5 = {
    k: v for k, v in CONFIGS["qwen3_next"].items() if not k.startswith(("moe_", "shared_", "num_experts"))
}
CONFIGS["qwen3_5_text"] = QWEN3_5
CONFIGS["qwen3_5_moe_text"] = dict(
    QWEN3_5,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
)
# OLMo-Hybrid: gated-delta-net layers 0 and 3, OLMo 2 post-norm attention layers 1 and 2 (with
# every attention bias); q / k convs of 16 channels, v of 48, which transformers saves cut 27 / 27 / 26
CONFIGS["olmo_hybrid"] = dict(
    DENSE,
    attention_bias=True,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
)
# transformers' num_hidden_layers where a family's default (4) is not the right count: LongCat-Flash
# derives it as 2 x num_layers (its sublayers), so 6 is 3 layers
HF_LAYERS = {"longcat_flash": 6}


def build(
    path: str, model_type: str, layers: int | None = None, seed: int = 0, configs: dict | None = None
) -> str:
    """A tiny model built by transformers (config overrides from ``configs``, this module's
    CONFIGS by default; ``layers`` transformers' num_hidden_layers, 4 unless HF_LAYERS says),
    random values in every parameter and buffer the checkpoint stores (router score biases too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    layers = HF_LAYERS.get(model_type, 4) if layers is None else layers
    overrides = (CONFIGS if configs is None else configs)[model_type]
    cfg = AutoConfig.for_model(model_type, **dict(overrides, num_hidden_layers=layers))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0, 0.1)
            # a gated-delta-net norm (plain, ones-initialised) in [0.5, 2], where megatron-core's
            # zero-centred out_norm = w - 1 is exact (docs/formats.md); tests of other values make their own
            if type(m).__name__.endswith("RMSNormGated"):
                m.weight.uniform_(0.5, 2.0)
    model.save_pretrained(path)
    return path


def model_cache(tmp_path_factory, name: str, build=build):
    """A module fixture's getter: each family's tiny model (``build(path, model_type)``, this
    module's :func:`build` by default) built once."""
    root = tmp_path_factory.mktemp(name)
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            cache[model_type] = build(str(root / model_type), model_type)
        return cache[model_type]

    return get


def build_vlm(path: str, model_type: str, config: dict, side_files: dict[str, str]) -> str:
    """A tiny vision-language model built from ``config`` and saved by transformers, every
    parameter and router score bias random, with the side files ``side_files`` (name -> text)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model.save_pretrained(path)
    for name, text in side_files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def image_logits(path: str, inputs, scale: str | None = None) -> torch.Tensor:
    """transformers' logits of the model at ``path`` on ``inputs(config)`` (text + an image; the
    config as a dict); ``scale``: a parameter (its in-memory name, or its stored name under the
    model's ``model.``) multiplied by 1.5 first."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        if scale is not None:
            names = dict(model.named_parameters())
            model.get_parameter(scale if scale in names else "model." + scale).mul_(1.5)
        return model(**inputs(json.load(open(os.path.join(path, "config.json"))))).logits


def append_mtp_layer(path: str, hidden: int, hunyuan: bool = False) -> tuple[dict, dict]:
    """Give the 4-layer checkpoint at ``path`` one multi-token-prediction layer as DeepSeek-V3 /
    GLM-4.5 releases store it (transformers saves none): ``model.layers.4.*`` = a random copy of MoE
    layer 1 plus enorm, hnorm, eh_proj and shared_head.norm, with the embedding and head repeated;
    ``num_nextn_predict_layers`` = 1.  ``hunyuan``: as Hunyuan V3 stores it (MindSpeed-LLM's HYV3
    entry; transformers ignores ``model.layers.<num_hidden_layers>.*``): the head norm is
    ``final_layernorm``, no embedding / head copies, no MTP count in the config.
    Returns (config, tensors)."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    n = 4
    g = torch.Generator().manual_seed(7)
    for k in [k for k in sd if k.startswith("model.layers.1.")]:  # a MoE layer's tensors
        sd[k.replace("model.layers.1.", f"model.layers.{n}.")] = torch.randn(sd[k].shape, generator=g)
    for k, shape in {
        "enorm": (hidden,),
        "hnorm": (hidden,),
        "eh_proj": (hidden, 2 * hidden),
        "final_layernorm" if hunyuan else "shared_head.norm": (hidden,),
    }.items():
        sd[f"model.layers.{n}.{k}.weight"] = torch.randn(shape, generator=g)
    if not hunyuan:
        sd[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(path, "config.json")))
    if not hunyuan:
        cfg = dict(cfg, num_nextn_predict_layers=1)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return cfg, sd


def assert_round_trip(src: str, tmp_path, family: str, layout: dict) -> str:
    """HF (family ``family``) -> mcore at ``layout`` -> HF is bit-exact, computes the same
    transformers logits and keeps the config's model_type; returns the HF output."""
    assert ck.load(src).spec.family == family
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert torch.equal(logits(src, IDS), logits(back, IDS))
    assert (
        json.load(open(f"{back}/config.json"))["model_type"]
        == json.load(open(f"{src}/config.json"))["model_type"]
    )
    return back


def rank(mid: str, name: str) -> dict:
    """The rank file of rank directory ``name`` (e.g. ``mp_rank_01_001``) of the mcore checkpoint."""
    return torch.load(f"{mid}/iter_0000001/{name}/model_optim_rng.pt", weights_only=False)


def listed_families(capsys) -> dict[str, str]:
    """``ckpt-ir models``'s line of each family, by family name."""
    from ckpt_ir.commands.cli import main

    assert main(["models"]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}


# the HF modules a LoRA adapter targets, per family
LORA_TARGETS = {
    "glm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phimoe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # query_key_value packs q/k/v head by head: B's rows follow that packing
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def assert_lora_merge_equals_peft(base: str, tmp_path, family: str) -> None:
    """A peft adapter on the family's :data:`LORA_TARGETS` merged by ``convert --lora-load`` gives
    exactly what peft's merge_and_unload gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_lora import cli, make_peft_adapter

    adapter = str(tmp_path / "adapter")
    make_peft_adapter(base, adapter, LORA_TARGETS[family])
    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        .merge_and_unload()
        .state_dict()
    )
    out = str(tmp_path / "merged")
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    ours = hf_state(out)
    # in memory transformers 5 renames / fuses the MoE block (router, 3-D experts); on disk it is
    # per expert, so the MoE tensors are compared where the names agree and attention everywhere
    assert {k for k in ours if ".self_attn." in k or ".mlp." in k and family == "glm"} <= set(merged)
    for k in set(ours) & set(merged):
        assert torch.equal(ours[k], merged[k]), k
