"""What a megatron-core model in memory says about itself (:mod:`ckpt_ir.live` reads a training
job's model chunks through it): the Megatron-LM ``args`` its ``TransformerConfig`` and ``GPTModel``
stand for, so its family and shapes are found exactly as for a run's args
(:func:`~ckpt_ir.megatron.lift.spec_from_args`, :mod:`~ckpt_ir.megatron.infer`); where its layers
sit; and where its state dict differs from a ``torch``-format rank file.

Nothing here imports megatron-core: the model, its config and its layers are read by attribute.
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_ir.errors import LayoutError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.rules import mla_rule
from ckpt_ir.ir.spec import ModelSpec

# TransformerConfig fields whose Megatron-LM arg has another name (the rest share theirs)
CONFIG_ARGS = (
    ("num_moe_experts", "num_experts"),
    ("layernorm_epsilon", "norm_epsilon"),
    ("layernorm_zero_centered_gamma", "apply_layernorm_1p"),
)
# GPTModel attributes that are Megatron-LM args (they are the model's, not its config's)
MODEL_ARGS = (
    ("vocab_size", "padded_vocab_size"),  # the embedding's rows: the vocabulary with Megatron's padding
    ("max_sequence_length", "max_position_embeddings"),
    ("position_embedding_type", "position_embedding_type"),
    ("rotary_base", "rotary_base"),
    ("rotary_percent", "rotary_percent"),
    ("rotary_scaling", "use_rope_scaling"),
)
_PLAIN = (int, float, str, bool, list, tuple)


def unwrap(module: Any) -> Any:
    """The model inside megatron-core's wrappers (``DistributedDataParallel``, ``Float16Module``
    and the like keep it as ``.module``)."""
    while hasattr(module, "module") and hasattr(module.module, "state_dict"):
        module = module.module
    return module


def args_from_model(model: Any) -> dict[str, Any]:
    """The Megatron-LM args a ``GPTModel`` (any model chunk) stands for: its config's plain
    fields (most keep their arg's name, :data:`CONFIG_ARGS` rename the others), the model's own
    :data:`MODEL_ARGS`, and the switches Megatron-LM derives the config from (``swiglu``,
    ``squared_relu``, ``group_query_attention``, tied embeddings)."""
    config = model.config
    args: dict[str, Any] = {
        k: v for k, v in vars(config).items() if isinstance(v, _PLAIN) and not k.startswith("_")
    }
    args.update({arg: getattr(config, field, None) for field, arg in CONFIG_ARGS})
    args.update({arg: getattr(model, attr, None) for attr, arg in MODEL_ARGS})
    activation = getattr(config.activation_func, "__name__", "")
    gated = bool(config.gated_linear_unit)
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    args.update(
        swiglu=gated and activation == "silu",
        squared_relu=not gated and activation == "squared_relu",
        num_query_groups=groups,
        group_query_attention=groups != heads,
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
        mtp_num_layers=config.mtp_num_layers or 0,  # the model's, whatever an HF config says
    )
    return args


def chunk_layers(model: Any) -> list[int]:
    """The model layers (0-based) of a model chunk's decoder, in order (megatron-core numbers its
    ``TransformerLayer``s from 1 across the whole model)."""
    decoder = getattr(model, "decoder", None)
    return [layer.layer_number - 1 for layer in getattr(decoder, "layers", ())]


def placement(layers: dict[tuple[int, int], list[int]], pp: int, chunks: int) -> dict[str, Any]:
    """The Layout fields (``vpp_layers``, ``num_layer_list``) of the layers each (stage, chunk)
    holds; a placement no Megatron layout describes (unequal virtual stages, layers out of order)
    is a LayoutError."""
    counts = {k: len(v) for k, v in layers.items()}
    order = [layers[(p, c)] for c in range(chunks) for p in range(pp)]
    if [i for chunk in order for i in chunk] != list(range(sum(counts.values()))):
        raise LayoutError(
            f"the model chunks hold layers {order} by (virtual) stage: not one contiguous run per stage, "
            f"which no Megatron layout describes"
        )
    if chunks > 1:
        if len(set(counts.values())) != 1:
            raise LayoutError(
                f"the virtual pipeline stages hold {sorted(counts.items())} layers; ckpt-ir lays out "
                f"virtual stages of equal size only"
            )
        return {"vpp_layers": next(iter(counts.values())), "num_layer_list": None}
    per_stage = tuple(counts[(p, 0)] for p in range(pp))
    even = len(set(per_stage)) == 1
    return {"vpp_layers": None, "num_layer_list": None if even else per_stage}


# megatron-core's multi-latent attention keeps its two down-projections apart, where a torch-format
# rank file holds MindSpeed-LLM's fused linear_qkv ([q (or q_a); kv_a], ir.rules.mla_rule); with
# the local spec they are ColumnParallelLinear (their rows cut over TP), with Transformer Engine
# replicated
_MLA_DOWN = re.compile(
    r"^(.*\.self_attention\.)(linear_q_down_proj|linear_q_proj|linear_kv_down_proj)\.weight$"
)
_FUSED = "linear_qkv.weight"


def _mla_parts(spec: ModelSpec) -> tuple[str, str]:
    return ("linear_q_down_proj" if spec.q_lora_rank else "linear_q_proj", "linear_kv_down_proj")


def fuse_mla(
    ranks: dict[tuple[int, int, int], list[dict[str, E.Expr]]], spec: ModelSpec
) -> dict[tuple[int, int, int], list[dict[str, E.Expr]]]:
    """Model state dicts (per (TP rank, stage, EP rank), per chunk) as torch-format rank files
    hold them: each MLA layer's down-projections fused into ``linear_qkv``, whole (the rows of
    every TP rank where the model cuts them)."""
    if not spec.mla:
        return ranks
    rule = mla_rule(spec)
    out = {k: [dict(sd) for sd in chunks] for k, chunks in ranks.items()}
    for (t, p, e), chunks in ranks.items():
        for v, sd in enumerate(chunks):
            for prefix in sorted({m.group(1) for k in sd if (m := _MLA_DOWN.match(k))}):
                parts = {}
                for part, module in zip(("q", "kv_a"), _mla_parts(spec)):
                    name = f"{prefix}{module}.weight"
                    x = sd[name]
                    if x.shape[0] != rule.sizes()[part]:  # cut over TP: every TP rank's rows
                        peers: dict[int, E.Expr] = {}
                        for (t2, p2, _), other in sorted(ranks.items()):
                            if p2 == p:
                                peers.setdefault(t2, other[v][name])
                        x = E.simplify(E.Concat(tuple(peers[r] for r in sorted(peers)), 0))
                    parts[part] = x
                    del out[(t, p, e)][v][name]
                out[(t, p, e)][v][prefix + _FUSED] = rule.fuse(parts)
    return out


def split_mla(
    state_dict: dict[str, E.Expr], spec: ModelSpec, shapes: dict[str, tuple[int, ...]], tp: int, rank: int
) -> dict[str, E.Expr]:
    """Inverse of :func:`fuse_mla` for one rank: a torch-format state dict's fused ``linear_qkv``
    as the model's down-projections (TP rank ``rank``'s rows where the model, whose parameter
    shapes are ``shapes``, cuts them)."""
    if not spec.mla:
        return state_dict
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".self_attention." + _FUSED)]:
        prefix = key[: -len(_FUSED)]
        parts = mla_rule(spec).split(out.pop(key))
        for part, module in zip(("q", "kv_a"), _mla_parts(spec)):
            x, name = parts[part], f"{prefix}{module}.weight"
            rows = shapes.get(name, x.shape)[0]
            if rows * tp == x.shape[0] and tp > 1:
                x = E.simplify(E.Slice(x, 0, rank * rows, (rank + 1) * rows))
            out[name] = x
    return out


def is_expert_key(key: str) -> bool:
    """Whether a state-dict key is a routed expert's (``mlp.experts.local_experts.<j>.*`` or the
    grouped-GEMM ``mlp.experts.weight1`` / ``weight2``): held by one EP rank, not replicated."""
    return ".mlp.experts." in key
