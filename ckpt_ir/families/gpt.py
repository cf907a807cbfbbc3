"""Classic GPT decoders: LayerNorm with biases, a plain (not gated) GELU MLP, biases on the linear
layers, learned absolute positions or rotary (gpt2).  One table entry each.

HF names and config keys are transformers 5's (``models/<family>/modeling_*.py`` and
``configuration_*.py``).  MindSpeed-LLM's ``configs/checkpoint/model_cfg.json`` has none of these
families and Megatron-Bridge no bridge for them, so their Megatron keys are megatron-core's own
``GPTModel`` names (``ckpt_ir/megatron/keys.py``) and their args the two-way field table
(``ckpt_ir/megatron/args.py``).
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, Family, Packed, Tested, register
from ckpt_ir.families.blocks import LLAMA_BIAS_CONFIG, LLAMA_TENSORS, config_with, default_kv_heads

# GPT-2 (transformers models/gpt2): Conv1D layers store their weight [in, out] (x @ W + b);
# c_attn is [q; k; v] along its output dim, weight and bias; wpe holds learned absolute positions.
H = "transformer.h.{i}."
C = "layers.{i}."
GPT2_TENSORS = (
    ("transformer.wte.weight", "embed.weight"),
    ("transformer.wpe.weight", "pos_embed.weight"),
    *((H + f"ln_1.{w}", C + f"attn_norm.{w}") for w in ("weight", "bias")),
    *((H + f"attn.c_proj.{w}", C + f"attn.o.{w}") for w in ("weight", "bias")),
    *((H + f"ln_2.{w}", C + f"mlp_norm.{w}") for w in ("weight", "bias")),
    *((H + f"mlp.c_fc.{w}", C + f"mlp.fc1.{w}") for w in ("weight", "bias")),
    *((H + f"mlp.c_proj.{w}", C + f"mlp.down.{w}") for w in ("weight", "bias")),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
)
GPT2_QKV = tuple(
    Packed(
        H + f"attn.c_attn.{w}",
        (C + f"attn.q.{w}", C + f"attn.k.{w}", C + f"attn.v.{w}"),
        ("q_size", "kv_size", "kv_size"),
    )
    for w in ("weight", "bias")
)


def _gpt2_hidden(cfg: dict) -> int:
    return cfg.get("n_embd") or cfg["hidden_size"]


def _gpt2_heads(cfg: dict) -> int:
    return cfg.get("n_head") or cfg["num_attention_heads"]


def _gpt2_names(key: str, num_layers: int, to_hf: bool) -> str:
    """GPT-2 as OpenAI released it (openai-community/gpt2 on the Hub) stores the bare GPT2Model's
    names (``h.0.attn.c_attn.weight``, ``wte.weight``); transformers saves a GPT2LMHeadModel's
    under ``transformer.``.  Read both; write transformers' own."""
    if to_hf or key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


register(
    Family(
        name="gpt2",
        model_types=("gpt2",),
        architecture="GPT2LMHeadModel",
        tensors=GPT2_TENSORS,
        packed=GPT2_QKV,
        transposed=(
            H + "attn.c_attn.weight",
            H + "attn.c_proj.weight",
            H + "mlp.c_fc.weight",
            H + "mlp.c_proj.weight",
        ),
        hf_rename=_gpt2_names,
        config=(
            ConfigKey("num_layers", "n_layer", aliases=("num_hidden_layers",)),
            ConfigKey("hidden_size", "n_embd", aliases=("hidden_size",)),
            # n_inner null: 4 x hidden (GPT2MLP)
            ConfigKey("ffn_hidden_size", "n_inner", lambda cfg: 4 * _gpt2_hidden(cfg)),
            ConfigKey("num_heads", "n_head", aliases=("num_attention_heads",)),
            ConfigKey("num_kv_heads", None, _gpt2_heads),
            ConfigKey("head_dim", None, lambda cfg: _gpt2_hidden(cfg) // _gpt2_heads(cfg)),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("position_embeddings", "n_positions", aliases=("max_position_embeddings",)),
            ConfigKey("norm_eps", "layer_norm_epsilon", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            # gelu_new is the tanh approximation, which Megatron-LM's fused bias-GELU computes
            ConfigKey("activation", "activation_function", "gelu_new"),
        ),
        constants=(
            ("norm_bias", True),
            ("qkv_bias", True),
            ("o_bias", True),
            ("mlp_bias", True),
            ("gated_mlp", False),
        ),
        tested=Tested(round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",), mcore_logits=("--tp 2 --pp 2",)),
    )
)

# StarCoder2 (models/starcoder2): Llama's names with LayerNorm (weights and biases), biases on
# every linear layer when use_bias, and a plain GELU MLP c_fc -> c_proj (tanh approximation:
# Megatron-LM's default fused bias-GELU); tied by default; a sliding window when the config sets
# one (StarCoder2-3B).  Megatron-Bridge has a StarCoder2 provider but no bridge (its
# Starcoder2ModelProvider: LayerNorm, F.gelu with bias_activation_fusion, add_bias_linear).
L = "model.layers.{i}."
STARCODER2_TENSORS = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("model.norm.bias", "final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    (L + "input_layernorm.bias", C + "attn_norm.bias"),
    *((L + f"self_attn.{p}_proj.{w}", C + f"attn.{p}.{w}") for p in "qkvo" for w in ("weight", "bias")),
    (L + "post_attention_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_attention_layernorm.bias", C + "mlp_norm.bias"),
    *((L + f"mlp.c_fc.{w}", C + f"mlp.fc1.{w}") for w in ("weight", "bias")),
    *((L + f"mlp.c_proj.{w}", C + f"mlp.down.{w}") for w in ("weight", "bias")),
)


def _window(cfg: dict) -> dict:
    """HF's sliding window counts the query's own position: Megatron's (left, right) is
    (window - 1, 0), as for Gemma 3."""
    return {"window_size": [cfg["sliding_window"] - 1, 0]} if cfg.get("sliding_window") else {}


register(
    Family(
        name="starcoder2",
        model_types=("starcoder2",),
        architecture="Starcoder2ForCausalLM",
        tensors=STARCODER2_TENSORS,
        config=config_with(
            ConfigKey("norm_eps", "norm_epsilon", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("activation", "hidden_act", "gelu_pytorch_tanh"),
            ConfigKey("qkv_bias", "use_bias", True),
            ConfigKey("o_bias", "use_bias", True),
            ConfigKey("mlp_bias", "use_bias", True),
        ),
        constants=(("norm_bias", True), ("gated_mlp", False)),
        megatron_args=_window,
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1 --norm-names te",),
            mcore_logits=("--tp 2 --pp 2",),
        ),
    )
)

# StableLM (models/stablelm; StableLM-3B-4E1T, StableLM 2 1.6B): Llama's gated SiLU MLP with
# LayerNorms (weights and biases), q/k/v biases when use_qkv_bias, rotary on the first quarter
# of each head (partial_rotary_factor, rotate-half order).  use_parallel_residual (StableLM 2
# 12B): attention and MLP read the input norm and add to the residual together, no
# post_attention_layernorm (ModelSpec.parallel_attn_mlp).  StableLM 2 12B's per-head q/k
# LayerNorms (qk_layernorm: one LayerNorm per head, q_layernorm.norms.<h>) have no role: their
# tensors are reported as not understood.
register(
    Family(
        name="stablelm",
        model_types=("stablelm",),
        architecture="StableLmForCausalLM",
        tensors=LLAMA_TENSORS
        + (
            ("model.norm.bias", "final_norm.bias"),
            (L + "input_layernorm.bias", C + "attn_norm.bias"),
            (L + "post_attention_layernorm.bias", C + "mlp_norm.bias"),
        ),
        config=config_with(
            ConfigKey("norm_eps", "layer_norm_eps", 1e-5),
            ConfigKey("qkv_bias", "use_qkv_bias", False),
            ConfigKey("parallel_attn_mlp", "use_parallel_residual", False),
        ),
        constants=(("norm_bias", True),),
        tested=Tested(round_trip=("--tp 2 --pp 2",), mcore_logits=("--tp 2",)),
    )
)

# GPT-NeoX (models/gpt_neox; Pythia, GPT-NeoX-20B): query_key_value packs [q; k; v] head by head
# (transformers views its rows as [heads, 3, head_dim], BLOOM's packing, Megatron's per-group
# linear_qkv order with one head per group), LayerNorms with biases, a plain exact-GELU MLP with
# biases, rotary on the first quarter of each head; the output layer is embed_out (transformers 5
# renames it lm_head in memory and back on save).  use_parallel_residual (Pythia's default) adds
# attention and MLP, each after its own norm of the layer input, to one residual: the same
# tensors, computed in parallel (carried in the HF config; megatron-core has no such layer).
N = "gpt_neox.layers.{i}."
GPT_NEOX_QKV = tuple(
    Packed(
        N + "attention.query_key_value." + w,
        (C + "attn.q." + w, C + "attn.k." + w, C + "attn.v." + w),
        ("q_size", "kv_size", "kv_size"),
        groups="num_heads",
    )
    for w in ("weight", "bias")
)
GPT_NEOX_TENSORS = (
    ("gpt_neox.embed_in.weight", "embed.weight"),
    *((N + f"input_layernorm.{w}", C + f"attn_norm.{w}") for w in ("weight", "bias")),
    *((N + f"attention.dense.{w}", C + f"attn.o.{w}") for w in ("weight", "bias")),
    *((N + f"post_attention_layernorm.{w}", C + f"mlp_norm.{w}") for w in ("weight", "bias")),
    *((N + f"mlp.dense_h_to_4h.{w}", C + f"mlp.fc1.{w}") for w in ("weight", "bias")),
    *((N + f"mlp.dense_4h_to_h.{w}", C + f"mlp.down.{w}") for w in ("weight", "bias")),
    ("gpt_neox.final_layer_norm.weight", "final_norm.weight"),
    ("gpt_neox.final_layer_norm.bias", "final_norm.bias"),
    ("embed_out.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),  # read as well (written as embed_out)
)


def _neox_rotary(cfg: dict) -> dict:
    """Rotary settings of configs older than transformers 5 (rotary_pct, rotary_emb_base);
    transformers 5 keeps them in rope_parameters, which the Megatron args read already."""
    out = {}
    if cfg.get("rotary_pct") is not None:
        out["rotary_percent"] = cfg["rotary_pct"]
    if cfg.get("rotary_emb_base") is not None:
        out["rotary_base"] = cfg["rotary_emb_base"]
    return out


register(
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        architecture="GPTNeoXForCausalLM",
        tensors=GPT_NEOX_TENSORS,
        packed=GPT_NEOX_QKV,
        config=config_with(
            ConfigKey("num_kv_heads", None, default_kv_heads),
            ConfigKey("norm_eps", "layer_norm_eps", 1e-5),
            ConfigKey("activation", "hidden_act", "gelu"),
            ConfigKey("qkv_bias", "attention_bias", True),
            ConfigKey("o_bias", "attention_bias", True),
        ),
        constants=(("norm_bias", True), ("mlp_bias", True), ("gated_mlp", False)),
        megatron_args=_neox_rotary,
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",),
            mcore_missing="no: parallel residual (use_parallel_residual, Pythia's default): TransformerLayer "
            "adds attention and MLP one after the other",
        ),
    )
)

# Phi-2 / Phi-1.5 (models/phi): attention and MLP read one LayerNorm and add to the residual
# together (ModelSpec.parallel_attn_mlp: no post_attention_layernorm), biases on every linear
# layer and on lm_head, a plain gelu_new MLP fc1 -> fc2, rotary on the first half of each head,
# optional q/k LayerNorms (one per head width, with biases: qk_layernorm), untied
register(
    Family(
        name="phi",
        model_types=("phi",),
        architecture="PhiForCausalLM",
        tensors=(
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.final_layernorm.weight", "final_norm.weight"),
            ("model.final_layernorm.bias", "final_norm.bias"),
            ("lm_head.weight", "lm_head.weight"),
            ("lm_head.bias", "lm_head.bias"),
            *((L + f"input_layernorm.{w}", C + f"attn_norm.{w}") for w in ("weight", "bias")),
            *(
                (L + f"self_attn.{p}_proj.{w}", C + f"attn.{p}.{w}")
                for p in "qkv"
                for w in ("weight", "bias")
            ),
            *((L + f"self_attn.dense.{w}", C + f"attn.o.{w}") for w in ("weight", "bias")),
            *(
                (L + f"self_attn.{p}_layernorm.{w}", C + f"attn.{p}_norm.{w}")
                for p in "qk"
                for w in ("weight", "bias")
            ),
            *((L + f"mlp.fc1.{w}", C + f"mlp.fc1.{w}") for w in ("weight", "bias")),
            *((L + f"mlp.fc2.{w}", C + f"mlp.down.{w}") for w in ("weight", "bias")),
        ),
        config=config_with(
            ConfigKey("norm_eps", "layer_norm_eps", 1e-5),
            ConfigKey("activation", "hidden_act", "gelu_new"),
            ConfigKey("qk_norm", "qk_layernorm", False),
        ),
        constants=(
            ("norm_bias", True),
            ("qkv_bias", True),
            ("o_bias", True),
            ("mlp_bias", True),
            ("lm_head_bias", True),
            ("gated_mlp", False),
            ("parallel_attn_mlp", True),
        ),
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1 --norm-names te",),
            mcore_missing="no: attention and MLP in parallel from one norm (TransformerLayer runs them one "
            "after the other, each after its own norm)",
        ),
    )
)

# Nemotron-4 / Minitron (models/nemotron): Llama's names with LayerNorm1P (LayerNorm computing
# x_hat * (1 + w) + b, weights and biases; the final norm too), a plain up_proj -> relu2 ->
# down_proj MLP, biases on q, k, v, o when attention_bias and on the MLP when mlp_bias, rotary on
# the first half of each head (partial_rotary_factor 0.5 by default).  megatron-core's LayerNorm
# with apply_layernorm_1p (layernorm_zero_centered_gamma) computes the same (1 + w), so the stored
# w is the same on both sides (ModelSpec.zero_centred_norms: no shift, Megatron's arg set):
# Megatron-Bridge's nemotron_bridge.py maps every norm 1:1 (AutoMapping, lines 80-91) and sets
# layernorm_zero_centered_gamma (line 69), normalization LayerNorm and squared_relu (lines 61-62).
register(
    Family(
        name="nemotron",
        model_types=("nemotron",),
        architecture="NemotronForCausalLM",
        tensors=(
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.norm.weight", "final_norm.weight"),
            ("model.norm.bias", "final_norm.bias"),
            ("lm_head.weight", "lm_head.weight"),
            *((L + f"input_layernorm.{w}", C + f"attn_norm.{w}") for w in ("weight", "bias")),
            *(
                (L + f"self_attn.{p}_proj.{w}", C + f"attn.{p}.{w}")
                for p in "qkvo"
                for w in ("weight", "bias")
            ),
            *((L + f"post_attention_layernorm.{w}", C + f"mlp_norm.{w}") for w in ("weight", "bias")),
            *((L + f"mlp.up_proj.{w}", C + f"mlp.fc1.{w}") for w in ("weight", "bias")),
            *((L + f"mlp.down_proj.{w}", C + f"mlp.down.{w}") for w in ("weight", "bias")),
        ),
        config=config_with(
            ConfigKey("norm_eps", "norm_eps", 1e-5),
            ConfigKey("activation", "hidden_act", "relu2"),
            *LLAMA_BIAS_CONFIG,
        ),
        constants=(("norm_bias", True), ("gated_mlp", False), ("zero_centred_norms", True)),
        tested=Tested(round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",), mcore_logits=("--tp 2 --pp 2",)),
    )
)
