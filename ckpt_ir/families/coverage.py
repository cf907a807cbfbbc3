"""Which of transformers' causal-LM model types ckpt-ir supports, and why not where it does not
(``ckpt-ir models --coverage``; docs/coverage.md is its Markdown for the transformers the tests
run).

The walk reads transformers' registry (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and each model
type's config *class* (never a model, nor a config object): a supported type is one a family
lists; the others are sorted by what the config class says (an encoder-decoder, an encoder with a
masked-LM head, vision or audio sub-configs, Mamba or linear-attention settings), then by
:data:`GAPS` (the block a decoder-only text model needs, checked against its modeling file), and
otherwise reported as a decoder-only text model with no family yet.  A model type transformers
runs with another type's class (``exaone`` as ``LlamaForCausalLM``) is not a family's: its config
keys are its own.
"""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.families import all_families

# decoder-only text models that need something ckpt-ir's model description lacks (from each
# model's modeling_*.py in transformers 5)
GAPS = {
    "gpt_neo": "needs alternating global / local (windowed) attention layers without score scaling",
    "gptj": "needs parallel attention and MLP from one LayerNorm, rotary on interleaved pairs",
    "codegen": "needs GPT-J's layer and its qkv_proj packed in 4 model-parallel blocks",
    "opt": "needs learned positions offset by 2 and the optional project_in / project_out",
    "falcon": "needs parallel attention and MLP (one or two LayerNorms), ALiBi as an option",
    "mpt": "needs ALiBi",
    "persimmon": "needs q/k LayerNorms with biases over the fused query_key_value",
    "olmo": "needs LayerNorm without weights (no tensor to carry)",
    "dbrx": "needs experts fused in one tensor per layer and clipped qkv",
    "jetmoe": "needs mixture-of-attention-heads layers",
    "bitnet": "needs BitNet's sub-norms inside attention and MLP",
    "diffllama": "needs differential attention (lambda parameters per layer)",
    "openai-gpt": "needs post-LayerNorm layers (the norm after each residual addition)",
    "ctrl": "needs sinusoidal positions (no tensor) and scaled embeddings",
    "xglm": "needs sinusoidal positions (no tensor) and scaled embeddings",
    "biogpt": "needs learned positions offset by 2 and scaled embeddings",
    "rwkv": "RWKV recurrence, no attention: not a GPTModel",
    "xlstm": "xLSTM blocks, no attention: not a GPTModel",
    "recurrent_gemma": "needs RG-LRU recurrent blocks beside local attention",
    "reformer": "needs LSH / local attention and reversible layers",
    "xlnet": "a permutation language model with two-stream attention",
    "blt": "a byte-level model: patcher, local encoder / decoder and a global transformer",
    "trocr": "the text decoder of a vision encoder-decoder model",
    "bert-generation": "BERT's post-LayerNorm layers used as a decoder",
}


@attrs.frozen
class Coverage:
    """One causal-LM model type of transformers: ``status`` is ``supported`` (``detail`` names
    the family) or what kind of model it is, ``detail`` the one-line reason."""

    model_type: str
    model_class: str
    status: str
    detail: str


def transformers_coverage() -> list[Coverage]:
    """Every causal-LM model type the installed transformers registers, in name order."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    families = {t: f.name for f in all_families() for t in f.model_types}
    out = []
    for model_type, cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if model_type in families:
            status, detail = "supported", f"family {families[model_type]}"
        else:
            status, detail = _why_not(model_type, cls, CONFIG_MAPPING[model_type], families)
            if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and status == "no family":
                status, detail = "encoder", "a bidirectional encoder (masked LM) with a causal-LM head"
        out.append(Coverage(model_type, cls, status, detail))
    return out


def _why_not(model_type: str, cls: str, config: Any, families: dict[str, str]) -> tuple[str, str]:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder", "the decoder of an encoder-decoder model"
    subs = dict(getattr(config, "sub_configs", None) or {})
    towers = sorted(k for k in subs if any(w in k for w in ("vision", "audio", "vq")))
    if towers:
        text = getattr(subs.get("text_config"), "model_type", None)
        inner = f"; its text model {text} is supported (family {families[text]})" if text in families else ""
        return "multimodal", f"vision / audio towers ({', '.join(towers)}){inner}"
    if "text_config" in subs:
        return "multimodal", "wraps another text model (text_config)"
    names = set(dir(config))
    if any("mamba" in n or n in ("state_size", "ssm_state_size") for n in names):
        return "state-space", "Mamba (state-space) layers: megatron-core's MambaModel, not a GPTModel"
    if "linear_conv_kernel_dim" in names:
        return "linear attention", "linear-attention layers (gated delta net or similar) of its own"
    if model_type in GAPS:
        return "needs a block", GAPS[model_type]
    owner = next((f for f in all_families() if f.architecture == cls), None)
    if owner is not None:
        return "no family", f"runs as {cls} in transformers, with config keys of its own"
    return "no family", "a decoder-only text model with no family yet"
