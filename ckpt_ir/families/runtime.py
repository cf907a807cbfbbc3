"""The names a family's tensors have inside a running transformers model, and the HF checkpoint
names they come from.  This module registers no family.

A training job that saves its model's own state dict (MindSpeed-LLM's FSDP2 backend does, with
torch.distributed.checkpoint) stores the in-memory names, which differ from the HF checkpoint's:

* transformers 5 loads a checkpoint through its conversion mapping
  (``transformers/conversion_mapping.py``): a few families' modules are renamed (:data:`RENAMES`),
  and each MoE layer's experts become one module with two 3-D parameters,
  ``<stem>.experts.gate_up_proj`` ``[E, 2F, H]`` (expert e's ``[gate; up]`` rows) and
  ``<stem>.experts.down_proj`` ``[E, H, F]``;
* MindSpeed-LLM's grouped-GEMM expert modules (``moe_grouped_gemm``: ``Qwen3MoeExperts`` in
  ``mindspeed_llm/fsdp2/models/qwen3/qwen3_moe.py``, Qwen3-Next's and MiniMax-M2's alike, loaded
  through its ``GroupedGemmFlattenRule``: transpose, then flatten) keep the same two names with
  each expert's matrix transposed and the experts flattened into the rows:
  ``gate_up_proj`` ``[E*H, 2F]`` (the ``[E, H, 2F]`` view), ``down_proj`` ``[E*F, H]``;
* otherwise (transformers 4, remote code, MindSpeed's per-expert modules) a tensor's in-memory name
  is its HF name, renamed as above.

Families whose HF checkpoint already stacks the experts (gpt-oss) keep those tensors as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ckpt_ir.errors import FormatError
from ckpt_ir.families import Family
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.names import NameTable, template_pattern
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec

# transformers 5's WeightRenaming entries (conversion_mapping.py) of the families that have any:
# (HF substring, in-memory substring), applied in order
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".block_sparse_moe.", ".mlp."),),
    "minimax_m2": ((".block_sparse_moe.", ".mlp."),),
    "phimoe": ((".block_sparse_moe.", ".mlp."), (".mlp.gate.weight", ".mlp.router.weight")),
    "hy_v3": (
        ("mlp.router.gate.weight", "mlp.gate.weight"),
        ("mlp.expert_bias", "mlp.e_score_correction_bias"),
        ("mlp.shared_mlp.", "mlp.shared_experts."),
    ),
    # Granite MoE's experts are stacked in the checkpoint already ([E, 2F, H], [E, H, F]): renamed only
    # (granitemoehybrid: transformers' conversion_mapping.py maps it to granitemoe's)
    **dict.fromkeys(
        ("granitemoe", "granitemoeshared", "granitemoehybrid"),
        (
            (".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
            (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
            (".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight"),
        ),
    ),
    "ernie4_5_moe": (
        ("mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias"),
    ),
    "exaone_moe": (("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),),
    # saved under backbone., held under model. (conversion_mapping.py)
    **dict.fromkeys(("mamba2", "nemotron_h"), (("backbone.", "model."),)),
}
# the fused experts' parameters: name -> the per-expert roles stacked in each expert's rows; gated
# experts, or plain ones (Nemotron-H's squared-ReLU experts: up_proj [E, F, H], down_proj [E, H, F])
FUSED_EXPERTS = (
    (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))),
    (("up_proj", ("fc1",)), ("down_proj", ("down",))),
)


def runtime_name(family: Family, hf_name: str) -> str:
    """The in-memory name of the HF tensor ``hf_name`` (a name or a table template), unfused."""
    for old, new in RENAMES.get(family.name, ()):
        hf_name = hf_name.replace(old, new)
    return hf_name


def to_hf_names(
    family: Family, spec: ModelSpec, tensors: Mapping[str, E.Expr], where: str
) -> dict[str, E.Expr]:
    """``tensors`` (in-memory names, see the module) under the HF checkpoint's names, fused experts
    split into each expert's tensors.  A name the family does not know is kept as it is (the
    family's table then reports it)."""
    names = NameTable((runtime_name(family, hf), hf) for hf, _ in family.tensors)
    fused = _fused_experts(family)
    out: dict[str, E.Expr] = {}
    for key, x in tensors.items():
        found = next(((m, parts, down) for pat, parts, down in fused if (m := pat.match(key))), None)
        if found is None:
            parts = {names.to_canonical(key) or key: x}
        else:
            m, templates, down = found
            parts = _split_experts(x, templates, down, m.groupdict(), spec, f"{where}: tensor {key}")
        for name, expr in parts.items():
            if name in out:
                raise FormatError(f"{where}: tensor {name} is stored twice (the second time as {key})")
            out[name] = expr
    return out


def _fused_experts(family: Family) -> list[tuple[re.Pattern[str], tuple[str, ...], bool]]:
    """(pattern of a fused parameter's in-memory name, the HF templates of the expert tensors it
    stacks) for the family's per-expert tensors; none when it has none."""
    hf = {c: h for h, c in family.tensors}
    for params in FUSED_EXPERTS:
        out = []
        for param, roles in params:
            templates = tuple(hf.get(f"layers.{{i}}.mlp.experts.{{e}}.{r}.weight", "") for r in roles)
            if not all(templates):
                break
            stem = runtime_name(family, templates[0].split("{e}.", 1)[0])
            out.append((template_pattern(stem + param), templates, roles == ("down",)))
        else:
            return out
    return []


def _split_experts(
    x: E.Expr, templates: tuple[str, ...], down: bool, groups: dict[str, str], spec: ModelSpec, what: str
) -> dict[str, E.Expr]:
    """Each expert's tensors (``templates``, stacked in that order in each expert's rows) from a
    fused parameter, 3-D ``[E, out, in]`` or flattened ``[E*in, out]``."""
    n, h, f = spec.num_experts, spec.hidden_size, spec.moe_ffn_hidden_size
    out_rows, width = (h, f) if down else (len(templates) * f, h)
    if x.shape == (n, out_rows, width):
        rows = _rows(x, out_rows)
        experts: list[E.Expr] = [E.Slice(rows, 0, e * out_rows, (e + 1) * out_rows) for e in range(n)]
    elif x.shape == (n * width, out_rows):
        experts = [E.Transpose(E.Slice(x, 0, e * width, (e + 1) * width), 0, 1) for e in range(n)]
    else:
        raise FormatError(
            f"{what} has shape {list(x.shape)}; {n} experts stack as [{n}, {out_rows}, {width}] "
            f"(transformers) or [{n * width}, {out_rows}] (MindSpeed-LLM's grouped GEMM), as the config "
            f"implies"
        )
    rule = Stack.of((t, out_rows // len(templates)) for t in templates)
    return {
        t.format(e=e, **groups): E.simplify(part)
        for e, matrix in enumerate(experts)
        for t, part in rule.split(matrix).items()
    }


def _rows(x: E.Expr, k: int) -> E.Expr:
    """``x`` ``[n, k, w]`` as ``[n*k, w]``, where a range of rows reads only those rows: a load, or
    loads joined along dim 0 (the chunks of several ranks), is read as one of that shape."""
    if isinstance(x, E.Load):
        rows = None if x.rows is None else (x.rows[0] * k, x.rows[1] * k)
        shape = (x.full_shape[0] * k, *x.full_shape[2:])
        return E.Load(x.path, x.key, shape, x.load_dtype, x.offset, x.fmt, rows)
    if isinstance(x, E.Concat) and x.dim == 0:
        return E.Concat(tuple(_rows(p, k) for p in x.xs), 0)
    return E.Reshape(x, (x.shape[0] * k, *x.shape[2:]))
