"""Which HF family computes what a plain Megatron-LM GPT computes, from its ``args`` alone.

Megatron-LM's args do not name a model family; they switch features on (``add_qkv_bias``,
``qk_layernorm``, ``num_experts``, ``multi_latent_attention``, ...).  :data:`FEATURES` says which
args turn each feature on, a :class:`Base` the settings a kind of model always has (:data:`LLAMA`:
SwiGLU, RMSNorm, rotary, no biases; :data:`GPT`: GELU, LayerNorm, learned positions, biases), and
:data:`RULES` which base and features each family always has and which it may have.  The first
rule whose base and features match is the family; the HF config that family needs is then built
from the args and
checked by reading it back through the family's own table (a family that cannot express the
args, e.g. Mixtral with ``moe_ffn_hidden_size != ffn_hidden_size``, is refused, not bent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ckpt_ir.errors import CkptIrError, FormatError, setting
from ckpt_ir.families import Family, by_name
from ckpt_ir.families.args_only import MEGATRON
from ckpt_ir.ir.blocks import from_pattern
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron.args import Args, spec_values


class NoFamily(FormatError):
    """No HF family computes the model the args describe (the args alone still describe it);
    ``detail`` names the args that decide it."""

    def __init__(self, where: str, detail: str, hint: str) -> None:
        super().__init__(f"{where}: no supported HF family computes this Megatron model ({detail}); {hint}")
        self.detail = detail


@attrs.frozen
class Feature:
    name: str
    args: str  # the args that decide it (for messages)
    on: Callable[[Args], bool]


FEATURES = (
    Feature("qkv_bias", "add_qkv_bias", lambda a: bool(a["add_qkv_bias"])),
    # with multi-latent attention qk_layernorm means the q_a / kv_a norms, part of MLA itself
    Feature("qk_norm", "qk_layernorm", lambda a: bool(a["qk_layernorm"]) and not a["multi_latent_attention"]),
    Feature("moe", "num_experts", lambda a: bool(a["num_experts"])),
    Feature(
        "shared_experts",
        "moe_shared_expert_intermediate_size",
        lambda a: bool(a["num_experts"] and a["moe_shared_expert_intermediate_size"]),
    ),
    Feature(
        "shared_expert_gate",
        "moe_shared_expert_gate",
        lambda a: bool(a["num_experts"] and a["moe_shared_expert_gate"]),
    ),
    Feature("dense_layers", "moe_layer_freq", lambda a: bool(a["num_experts"] and a.dense_layers())),
    Feature(
        "router_pre_softmax",
        "moe_router_pre_softmax",
        lambda a: bool(a["num_experts"] and a["moe_router_pre_softmax"]),
    ),
    Feature(
        "sigmoid_router",
        "moe_router_score_function",
        lambda a: bool(a["num_experts"]) and a["moe_router_score_function"] == "sigmoid",
    ),
    Feature(
        "router_bias",
        "moe_router_enable_expert_bias",
        lambda a: bool(a["num_experts"] and a["moe_router_enable_expert_bias"]),
    ),
    Feature("mla", "multi_latent_attention", lambda a: bool(a["multi_latent_attention"])),
    Feature("mtp", "mtp_num_layers", lambda a: bool(a["mtp_num_layers"])),
    Feature("rope_scaling", "use_rope_scaling", lambda a: bool(a["use_rope_scaling"])),
)


@attrs.frozen
class Base:
    """The Megatron-LM settings a kind of model always has (``settings``: (arg, value) pairs;
    ``words``: how the one-line reason names them)."""

    words: str
    settings: tuple[tuple[str, Any], ...]

    def mismatches(self, a: Args) -> list[tuple[str, Any, Any]]:
        """(arg, value in the args, value needed) for every setting the args do not have."""
        have = {"position_embedding_type": a.position_embedding()}
        return [(k, have.get(k, a[k]), want) for k, want in self.settings if have.get(k, a[k]) != want]


# Llama's shape (SwiGLU, RMSNorm, rotary, no biases): every family inferred from args but GPT-2
LLAMA = Base(
    "swiglu, RMSNorm, rope",
    (
        ("swiglu", True),
        ("normalization", "RMSNorm"),
        ("position_embedding_type", "rope"),
        ("add_bias_linear", False),
        ("apply_layernorm_1p", False),
        ("rotary_interleaved", False),
        ("rotary_percent", 1.0),
        ("squared_relu", False),
        ("apply_residual_connection_post_layernorm", False),
    ),
)
# GPT-2's shape, Megatron-LM's defaults: GELU MLP, LayerNorm, learned absolute positions, biases
GPT = Base(
    "GELU, LayerNorm, learned positions, add_bias_linear",
    (
        ("swiglu", False),
        ("normalization", "LayerNorm"),
        ("position_embedding_type", "learned_absolute"),
        ("add_bias_linear", True),
        ("apply_layernorm_1p", False),
        ("squared_relu", False),
        ("apply_residual_connection_post_layernorm", False),
    ),
)


def _qwen_moe_keys(a: Args, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "mlp_only_layers": list(spec["dense_layers"]),
        "decoder_sparse_step": 1,
        "norm_topk_prob": not a["moe_router_pre_softmax"],
    }


def _deepseek_keys(a: Args, spec: dict[str, Any]) -> dict[str, Any]:
    dense = spec["dense_layers"]
    shared = spec["shared_ffn_hidden_size"]
    cfg = {
        "first_k_dense_replace": len(dense),
        "moe_layer_freq": 1,
        "n_shared_experts": shared // spec["moe_ffn_hidden_size"] if shared else 0,
        "num_nextn_predict_layers": a["mtp_num_layers"] or 0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": a["moe_router_topk_scaling_factor"] or 1.0,
        "n_group": a["moe_router_num_groups"] or 1,
        "topk_group": a["moe_router_group_topk"] or 1,
    }
    # MLA runs YaRN unless rope_type is "rope" (megatron-core's MLATransformerConfig default)
    if a["rope_type"] != "rope" and (a["rope_type"] == "yarn" or a["rotary_scaling_factor"]):
        cfg["rope_scaling"] = {
            "type": "yarn",
            "factor": a["rotary_scaling_factor"] or 40,
            "original_max_position_embeddings": a["original_max_position_embeddings"] or 4096,
            "beta_fast": a["beta_fast"] or 32,
            "beta_slow": a["beta_slow"] or 1,
            "mscale": a["mscale"] or 1.0,
            "mscale_all_dim": a["mscale_all_dim"] or 0.0,
        }
    return cfg


def _llama3_rope(a: Args, spec: dict[str, Any]) -> dict[str, Any]:
    if not a["use_rope_scaling"]:
        return {}
    # Megatron-LM's --use-rope-scaling is Llama-3.1's scaling with its fixed frequency factors
    return {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(a["rope_scaling_factor"] or 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    }


@attrs.frozen
class Rule:
    """``family`` computes a Megatron GPT of shape ``base`` with every feature in ``has``, possibly
    some in ``may``, and none other; ``hf_keys`` gives the HF config keys its table derives (not
    one per field)."""

    family: str
    has: frozenset[str] = frozenset()
    may: frozenset[str] = frozenset()
    hf_keys: Callable[[Args, dict[str, Any]], dict[str, Any]] | None = None
    base: Base = LLAMA

    def distance(self, features: frozenset[str]) -> int:
        return len(self.has - features) + len(features - self.has - self.may)


def _rule(family: str, has: str = "", may: str = "", hf_keys=None, base: Base = LLAMA) -> Rule:
    return Rule(family, frozenset(has.split()), frozenset(may.split()), hf_keys, base)


# first match wins: llama before mistral (the same function), so mistral/phi3 are never inferred
RULES = (
    _rule("llama", may="rope_scaling", hf_keys=_llama3_rope),
    _rule("qwen2", "qkv_bias"),
    _rule("qwen3", "qk_norm"),
    _rule("mixtral", "moe"),
    _rule(
        "qwen2_moe",
        "moe qkv_bias shared_experts shared_expert_gate",
        "dense_layers router_pre_softmax",
        _qwen_moe_keys,
    ),
    _rule("qwen3_moe", "moe qk_norm", "dense_layers router_pre_softmax", _qwen_moe_keys),
    _rule(
        "deepseek_v3", "moe mla sigmoid_router router_bias", "shared_experts dense_layers mtp", _deepseek_keys
    ),
    # a plain Megatron-LM GPT (its examples' GPT-2 shape); Megatron-LM turns add_qkv_bias on with
    # add_bias_linear, and GPT-2's table derives the QKV bias from the shape alone
    _rule("gpt2", may="qkv_bias", base=GPT),
)


def hf_config(family: Family, args: dict[str, Any], rule: Rule | None = None) -> dict[str, Any]:
    """The HF config ``family`` needs for the model ``args`` describe, checked by reading it back."""
    a = Args(args)
    values = spec_values(a)
    theta = a["rotary_base"]
    cfg: dict[str, Any] = {
        "model_type": family.model_types[0],
        "architectures": [family.architecture],
        "max_position_embeddings": a["max_position_embeddings"] or a["seq_length"] or 4096,
        "dtype": "bfloat16" if a["bf16"] else "float16" if a["fp16"] else "float32",
    }
    if a.position_embedding() == "rope":
        cfg["rope_theta"] = theta
    for key in family.config:
        if key.hf and values.get(key.field) is not None:
            value = values[key.field]
            cfg[key.hf] = list(value) if isinstance(value, tuple) else value
    rule = rule or _HYBRID_RULES.get(family.name) or next((r for r in RULES if r.family == family.name), None)
    if rule is not None and rule.hf_keys is not None:
        cfg.update(rule.hf_keys(a, values))
    spec = family.spec_from_config(cfg, where=f"the {family.name} config built from args")
    wrong = [(f, v, getattr(spec, f)) for f, v in values.items() if getattr(spec, f) != v]
    if wrong:
        f, want, got = wrong[0]
        raise FormatError(
            f"the {family.name} family cannot express these args ({f}: args give {want!r}, "
            f"{family.name} gives {got!r})"
        )
    return cfg


def infer(args: dict[str, Any], where: str) -> tuple[Family, dict[str, Any], str]:
    """(family, HF config, one line saying why) for plain Megatron-LM ``args``; a FormatError
    naming the args when no family computes that model."""
    a = Args(args, where)
    hint = (
        f"pass {setting('hf_config', metavar='DIR')} (the model's HF config.json) or "
        f"{setting('family', metavar='NAME')} to choose a family"
    )
    if a.hybrid:
        return _infer_hybrid(a, where, hint)
    missing = [
        k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if not args.get(k)
    ]
    if missing:
        raise FormatError(
            f"{where}: args lack {', '.join(missing)}; cannot tell the model's shape (pass "
            f"{setting('hf_config', metavar='DIR')})"
        )
    bases = list(dict.fromkeys(r.base for r in RULES))
    bad = {b: b.mismatches(a) for b in bases}
    fits = [b for b in bases if not bad[b]]
    if not fits:  # the settings of the nearest shape the args miss
        nearest = min(bases, key=lambda b: len(bad[b]))
        shown = ", ".join(f"args.{k}={v!r} (needs {w!r})" for k, v, w in bad[nearest])
        raise NoFamily(where, shown, hint)
    rules = [r for r in RULES if r.base in fits]
    on = [f for f in FEATURES if f.on(a)]
    features = frozenset(f.name for f in on)
    for rule in rules:
        if rule.has <= features <= rule.has | rule.may:
            why = ", ".join(
                [rule.base.words]
                + [f.args for f in on]
                + (
                    ["untied output layer"]
                    if args.get("untie_embeddings_and_output_weights")
                    else ["tied embeddings"]
                )
            )
            family = by_name(rule.family)
            try:
                cfg = hf_config(family, args, rule)
            except FormatError as e:
                raise NoFamily(where, f"the args look like {rule.family} but {e}", hint) from None
            return family, cfg, f"inferred family {rule.family} from args ({why})"
    best = min(r.distance(features) for r in rules)
    names = {f.name: f.args for f in FEATURES}

    def differs(r: Rule) -> str:
        return " and ".join(
            [f"needs {names[n]}" for n in sorted(r.has - features)]
            + [f"has no {names[n]}" for n in sorted(features - r.has - r.may)]
        )

    near = "; ".join(f"{r.family} {differs(r)}" for r in rules if r.distance(features) == best)
    detail = f"args turn on: {', '.join(f.args for f in on) or 'nothing beyond a dense GPT'}; nearest: {near}"
    raise NoFamily(where, detail, hint)


def _hybrid_mismatches(a: Args, blocks: set[str]) -> list[tuple[str, Any, Any]]:
    """(arg, value in the args, value needed) for every setting of a Megatron hybrid model that
    Nemotron-H's and Mamba-2's HF modeling cannot compute, for the blocks its pattern has: RMSNorm
    everywhere; no biases, rotary or q/k norms in attention (Nemotron-H's attention has no
    position embedding); non-gated MLPs (Nemotron-H: up / down projections only); DeepSeek-style
    routing with a score-correction bias and shared experts; and the layer norms' epsilon
    megatron-core's Mamba mixer hard-codes for its gated norm (HF uses one epsilon for both)."""
    out: list[tuple[str, Any, Any]] = []

    def need(arg: str, want: Any, have: Any = None) -> None:
        have = a[arg] if have is None else have
        if have != want:
            out.append((arg, have, want))

    need("normalization", "RMSNorm")
    need("apply_layernorm_1p", False)
    position = a.position_embedding()
    if position == "learned_absolute" or ("attention" in blocks and position != "none"):
        out.append(("position_embedding_type", position, "none"))
    if "mamba" in blocks:
        need("norm_epsilon", 1e-5)
    if blocks & {"attention", "mlp", "moe"}:
        need("add_bias_linear", False)
    if "attention" in blocks:
        for arg in ("add_qkv_bias", "qk_layernorm", "multi_latent_attention"):
            need(arg, False)
    if blocks & {"mlp", "moe"}:
        need("swiglu", False)
    if "moe" in blocks:
        need("moe_router_score_function", "sigmoid")
        need("moe_router_enable_expert_bias", True)
        need("moe_shared_expert_gate", False)
        if not a["moe_shared_expert_intermediate_size"]:
            out.append(("moe_shared_expert_intermediate_size", None, "shared experts"))
    return out


def _nemotron_h_keys(a: Args, spec: dict[str, Any]) -> dict[str, Any]:
    """Nemotron-H's config keys beyond its table's for a hybrid pattern: the pattern under the
    name released configs use, and sizes of blocks the pattern lacks (the HF config needs them;
    no tensor has them)."""
    hidden, heads = a["hidden_size"], a["num_attention_heads"] or 1
    cfg = {
        "hybrid_override_pattern": a.hybrid_pattern(),
        "num_hidden_layers": len(a.hybrid_pattern()),
        "num_attention_heads": heads,
        "num_key_value_heads": a["num_query_groups"] if a["group_query_attention"] else heads,
        "head_dim": a["kv_channels"] or hidden // heads,
        "intermediate_size": a["ffn_hidden_size"] or 4 * hidden,
        "mlp_hidden_act": spec.get("activation", "relu2"),
        "attention_bias": False,
        "mlp_bias": False,
        "use_bias": False,
        "use_conv_bias": True,
        "num_nextn_predict_layers": 0,
    }
    if spec.get("num_experts"):
        cfg.update(
            {
                "n_routed_experts": spec["num_experts"],
                "norm_topk_prob": True,  # megatron-core normalises sigmoid top-k scores (topk > 1)
                "routed_scaling_factor": a["moe_router_topk_scaling_factor"] or 1.0,
                "n_group": a["moe_router_num_groups"] or 1,
                "topk_group": a["moe_router_group_topk"] or 1,
            }
        )
    return cfg


def _mamba2_keys(a: Args, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "expand": spec["mamba_heads"] * spec["mamba_head_dim"] // a["hidden_size"],
        "use_bias": False,
        "use_conv_bias": True,
    }


_HYBRID_RULES = {
    "mamba2": Rule("mamba2", hf_keys=_mamba2_keys),
    "nemotron_h": Rule("nemotron_h", hf_keys=_nemotron_h_keys),
}


def _infer_hybrid(a: Args, where: str, hint: str) -> tuple[Family, dict[str, Any], str]:
    """A Megatron hybrid model (megatron-core's MambaModel, Megatron-LM's HybridModel): mamba2 when
    every layer is a Mamba mixer (Mamba2ForCausalLM computes exactly that stack, and it ties
    embeddings when asked; its config needs d_inner = expand x hidden), else nemotron_h (one
    mixer, attention, MLP or MoE block per layer, as the pattern says; untied)."""
    if not a["hidden_size"]:
        raise FormatError(f"{where}: args lack hidden_size; cannot tell the model's shape")
    pattern = a.hybrid_pattern()
    blocks = {b for layer in from_pattern(pattern, where) for b in layer}
    bad = _hybrid_mismatches(a, blocks)
    if bad:
        shown = ", ".join(f"args.{k}={v!r} (needs {w!r})" for k, v, w in bad)
        raise NoFamily(where, f"hybrid pattern {pattern!r}: {shown}", hint)
    if blocks - {"mamba", "attention", "mlp", "moe"}:
        raise NoFamily(where, f"hybrid pattern {pattern!r} has gated-delta-net layers (G)", hint)
    values = spec_values(a)
    inner = values["mamba_heads"] * values["mamba_head_dim"]
    tied = not a["untie_embeddings_and_output_weights"]
    if blocks == {"mamba"} and inner % a["hidden_size"] == 0:
        rule, why = _HYBRID_RULES["mamba2"], "Mamba layers only"
    elif tied:
        raise NoFamily(
            where,
            f"hybrid pattern {pattern!r} with tied embeddings: nemotron_h has an untied output layer, "
            "and mamba2 needs Mamba layers only with d_inner a multiple of hidden_size",
            hint,
        )
    else:
        rule, why = _HYBRID_RULES["nemotron_h"], "Mamba, attention, MLP and MoE layers"
    family = by_name(rule.family)
    try:
        cfg = hf_config(family, a.args, rule)
    except FormatError as e:
        raise NoFamily(where, f"the args look like {rule.family} but {e}", hint) from None
    return family, cfg, f"inferred family {rule.family} from args (hybrid pattern {pattern!r}: {why})"


def hf_config_for(family: Family, args: dict[str, Any], where: str) -> dict[str, Any]:
    """The HF config of an explicitly chosen family (``--model-type-hf``) for plain args."""
    try:
        return hf_config(family, args)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def megatron_spec(args: dict[str, Any], where: str) -> ModelSpec:
    """The :data:`MEGATRON` family's spec of the model plain Megatron-LM ``args`` describe: shapes
    from :func:`spec_values`, and the switches that decide which tensors exist (biases, LayerNorm,
    gated MLP, learned positions) from the args themselves."""
    a = Args(args)
    missing = [
        k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if not args.get(k)
    ]
    if missing or not (a["vocab_size"] or a["padded_vocab_size"]):
        raise FormatError(
            f"{where}: args lack {', '.join(missing) or 'vocab_size'}; cannot tell the model's shape"
        )
    values = spec_values(a)
    learned = a.position_embedding() == "learned_absolute"
    if learned and not values["position_embeddings"]:
        raise FormatError(f"{where}: learned absolute positions but args lack max_position_embeddings")
    dtype = "BF16" if a["bf16"] else "F16" if a["fp16"] else "F32"
    try:
        return ModelSpec(family=MEGATRON.name, dtype=dtype, **values)
    except (TypeError, ValueError, CkptIrError) as e:
        raise FormatError(f"{where}: the args do not describe a model ckpt-ir can lay out ({e})") from None


def args_only(detail: str) -> str:
    """The line saying a model is resharded from its args alone, and why (``detail``: the args)."""
    return f"no HF family computes this Megatron model ({detail}): family megatron, Megatron targets only"


def require_hf(spec: ModelSpec, source: str, why: str | None) -> None:
    """Refuse an HF target for a model only its Megatron args describe, in one line naming them."""
    if spec.family == MEGATRON.name:
        raise FormatError(
            f"{source}: no HF checkpoint (or transformers model) for it: "
            f"{why or args_only(setting('family', 'megatron'))}; convert it {setting('to', 'mcore')}, or pass "
            f"{setting('hf_config', metavar='DIR')} / {setting('family', metavar='NAME')} to choose a family"
        )
