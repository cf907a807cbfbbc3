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
