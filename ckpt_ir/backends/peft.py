"""PEFT backend: a LoRA-only adapter that ``peft.PeftModel.from_pretrained`` loads onto the HF base.

Megatron's fused LoRA becomes per-projection LoRA first (``unfuse-qkv``/``unfuse-gate-up``: q, k
and v share A and take their rows of B), so the adapter targets HF module names.  The LoRA data of
the IR is written back as peft's options: ranks and alphas that differ from the default as exact
``rank_pattern`` / ``alpha_pattern`` entries, ``use_rslora``, DoRA magnitudes with ``use_dora``,
saved full tensors as ``modules_to_save``, and MoE expert LoRA in transformers 5's fused-expert
form (``target_parameters``), the only form a transformers-5 MoE model can load."""

from __future__ import annotations

import json
import re
from typing import Any

from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import UsageError, VerifyError, setting
from ckpt_ir.families import by_name
from ckpt_ir.frontends.peft import PREFIX
from ckpt_ir.io.side_files import side_file_name
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import SAVED, expert_of, is_lora, lora_target, split_layer, template_pattern
from ckpt_ir.ir.roles import canonical_order

PEFT_KEY = {
    ".lora_a.weight": "lora_A.weight",
    ".lora_b.weight": "lora_B.weight",
    ".lora_magnitude.weight": "lora_magnitude_vector",
}
# transformers 5's fused experts: parameter -> the per-expert parts stacked in its rows, in the
# order the experts module declares them (peft nests its ParamWrappers in that order, the first
# innermost); see ckpt_ir.frontends.peft.FUSED_EXPERTS
FUSED_PARAMS = (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",)))


def plan(ckpt: Checkpoint) -> Plan:
    spec, layout = ckpt.spec, ckpt.layout
    if layout.tp != 1 or layout.fused_qkv or layout.fused_gate_up:
        raise VerifyError(
            "PEFT output needs whole, unfused tensors; the pipeline must run gather, unfuse-qkv, "
            "unfuse-gate-up"
        )
    lora = {n: t for n, t in ckpt.tensors.items() if is_lora(n)}
    if not lora:
        raise UsageError(
            f"{setting('to', 'peft')} writes a LoRA adapter, but the checkpoint has no LoRA tensors; pass "
            f"{setting('lora_load', metavar='DIR')}"
        )
    family = by_name(spec.family)
    if family.peft_refused:
        raise UsageError(
            f"{setting('to', 'peft')}: a PEFT adapter of {family.name} cannot be written "
            f"({family.peft_refused}); write the merged model ({setting('to', 'hf')}) or keep the "
            f"Megatron LoRA checkpoint"
        )
    if spec.lora_alpha is None:
        raise UsageError(
            f"the checkpoint does not record lora_alpha; pass {setting('lora_alpha', metavar='ALPHA')}"
        )
    names = family.names
    entries: list[tuple[tuple, str, E.Expr]] = []
    done: set[str] = set()
    modules: set[str] = set()
    saved: set[str] = set()
    params: set[str] = set()
    stacked: set[str] = set()  # a multi-stack model's modules carrying LoRA, full names
    factors: dict[str, tuple[int, float]] = {}  # HF module (or fused parameter) -> (rank, alpha)
    dora: dict[str, bool] = {}
    for name in sorted(lora, key=canonical_order):
        if name in done:
            continue
        target = lora_target(name)
        if SAVED in name:  # modules_to_save: the full tensor under its own HF name
            hf = names.from_canonical(target)
            if hf is None:
                raise VerifyError(f"{name}: no HF name for this saved tensor in the {family.name} family")
            hf = family.table_key(hf, spec, True) if family.renames() else hf
            saved.add(hf.rsplit(".", 1)[0])
            entries.append((canonical_order(name), PREFIX + hf, family.as_stored(hf, lora[name].expr)))
            continue
        suffix = name[len(target) - len(".weight") :]
        if expert_of(name) is not None:
            layer = split_layer(name)[0]
            assert layer is not None
            for param, key, expr, names_used in _fused_experts(ckpt, layer, suffix, done):
                params.add(f"mlp.experts.{param}")
                module = f"model.layers.{layer}.mlp.experts.{param}"
                if suffix == ".lora_a.weight":
                    a0 = ckpt.tensors[names_used[0]]
                    factors[module] = (a0.shape[0], _alpha(spec, lora_target(names_used[0])))
                    dora[module] = False
                entries.append((canonical_order(name), key, expr))
            continue
        hf = names.from_canonical(target)
        if hf is not None:
            module, expr = hf[: -len(".weight")], lora[name].expr
        else:  # a packed HF module (Phi-3 qkv_proj): A shared, B and m stacked
            module, expr = _packed(family, ckpt, target, suffix, done)
        if family.renames():  # the table's name as the HF checkpoint's (Family.table_key)
            module = family.table_key(module + ".weight", spec, True)[: -len(".weight")]
        module = family.memory_name(module)  # as peft names it: the model transformers builds
        if suffix == ".lora_a.weight":
            factors[module] = (lora[name].shape[0], _alpha(spec, target))
            dora[module] = target[: -len(".weight")] + ".lora_magnitude.weight" in ckpt.tensors
        if spec.vision is None:
            modules.add(module.rsplit(".", 1)[-1])
        else:
            stacked.add(module)
        entries.append((canonical_order(name), f"{PREFIX}{module}.{PEFT_KEY[suffix]}", expr))
    if stacked:
        modules |= _stack_targets(ckpt, stacked)
    if len(set(dora.values())) > 1:
        raise VerifyError(
            "DoRA magnitudes on some LoRA targets but not on others: one adapter_config.json cannot "
            "say that (peft's use_dora applies to all); merge instead"
        )
    entries.sort(key=lambda e: (e[0], e[1]))
    tensors = tuple((k, e) for _, k, e in entries)
    r, alpha = spec.lora_rank, _number(spec.lora_alpha)
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(family.transposed),  # as peft sets it for GPT-2's Conv1D layers
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted(saved) or None,
        "use_rslora": spec.lora_rslora,
        "use_dora": any(dora.values()),
        "layers_to_transform": None,
        "layers_pattern": None,
        "target_parameters": sorted(params) or None,
        # exact module names (escaped) so that peft's regex lookup picks out one module each
        "rank_pattern": {re.escape(m): rank for m, (rank, _) in sorted(factors.items()) if rank != r},
        "alpha_pattern": {
            re.escape(m): _number(a) for m, (_, a) in sorted(factors.items()) if a != spec.lora_alpha
        },
        "revision": None,
        "base_model_name_or_path": (ckpt.hf_config or {}).get("_name_or_path") or None,
    }
    dropped = dict(ckpt.dropped)
    dropped.update({n: "base weight: not part of a LoRA adapter" for n in ckpt.tensors if not is_lora(n)})
    if ckpt.aux_files:  # the base model's, as its weights
        dropped[", ".join(sorted(side_file_name(f) for f in ckpt.aux_files))] = (
            "HF side files of the base model: a PEFT adapter holds the adapter alone; load them "
            "with the base model"
        )
    return Plan(
        (
            OutputFile("adapter_model.safetensors", "safetensors", tensors, metadata={"format": "pt"}),
            OutputFile("adapter_config.json", "text", text=json.dumps(cfg, indent=2) + "\n"),
        ),
        dropped,
    )


def _stack_targets(ckpt: Checkpoint, stacked: set[str]) -> set[str]:
    """target_modules entries for the LoRA modules of a model with a stack (a vision tower), full
    names as peft's model names them: each module's shortest dotted tail that matches (peft's
    rule: the name, or its end after a dot) no module of the model without LoRA.  A tower reuses
    its language model's leaf names (``proj`` is Qwen2.5-VL's patch convolution too, ``q_proj``
    Gemma 3's language model's and SigLIP's), and peft wraps every module a name matches."""
    family, spec = by_name(ckpt.spec.family), ckpt.spec
    base = [n for n in ckpt.tensors if not is_lora(n) and n.endswith(".weight")]
    every = set()
    for hf, _, _ in family.hf_form(spec, base):
        if family.renames():
            hf = family.table_key(hf, spec, True)
        every.add(family.memory_name(hf).rsplit(".", 1)[0])
    plain = every - stacked
    out = set()
    for module in stacked:
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(m == tail or m.endswith("." + tail) for m in plain):
                break
        out.add(tail)
    return out


def _alpha(spec, target: str) -> float:
    return dict(spec.lora_alphas).get(target, spec.lora_alpha)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _fused_experts(ckpt: Checkpoint, layer: int, suffix: str, done: set[str]):
    """The fused-expert LoRA factor ``suffix`` (A or B) of every experts parameter of ``layer``
    that carries LoRA: (parameter, key, expression, per-expert names used).  A stacks the
    experts' A on rows; B puts expert e's columns at e, e+E, ... (peft's einsum layout)."""
    spec = ckpt.spec
    if suffix == ".lora_magnitude.weight":
        raise VerifyError(
            f"layer {layer}: DoRA on MoE experts cannot be written for peft (its fused-expert "
            f"LoRA has no DoRA); merge instead"
        )
    present = []
    for param, parts in FUSED_PARAMS:
        stems = [[f"layers.{layer}.mlp.experts.{e}.{p}" for e in range(spec.num_experts)] for p in parts]
        have = [s + suffix in ckpt.tensors for group in stems for s in group]
        if not any(have):
            continue
        if not all(have):
            raise VerifyError(
                f"layer {layer}: LoRA on some experts' {'/'.join(parts)} but not all; peft's "
                f"fused-expert LoRA covers every expert: merge instead"
            )
        present.append((param, parts, stems))
    out = []
    for depth, (param, parts, stems) in enumerate(present):
        key = (
            f"{PREFIX}model.layers.{layer}.mlp.experts"
            + ".base_layer" * (len(present) - 1 - depth)
            + (".lora_A.weight" if suffix == ".lora_a.weight" else ".lora_B.weight")
        )
        used = [s + suffix for group in stems for s in group]
        done.update(used)
        exprs = {n: ckpt.tensors[n].expr for n in used}
        if suffix == ".lora_a.weight":
            per_expert = []
            for e in range(spec.num_experts):
                shared = {exprs[group[e] + suffix] for group in stems}
                if len(shared) != 1:
                    raise VerifyError(
                        f"{stems[0][e]}: {'/'.join(parts)} have different LoRA A matrices; peft's "
                        f"fused {param} shares one: merge instead"
                    )
                per_expert.append(shared.pop())
            expr: E.Expr = E.simplify(E.Concat(tuple(per_expert), 0))
        else:
            cols = []
            for e in range(spec.num_experts):
                b = E.Concat(tuple(exprs[group[e] + suffix] for group in stems), 0)
                cols.append(E.Reshape(b, b.shape + (1,)))
            stacked = E.Concat(tuple(cols), 2)
            expr = E.Reshape(stacked, (stacked.shape[0], stacked.shape[1] * stacked.shape[2]))
        out.append((param, key, expr, used))
    return out


def _packed(family, ckpt: Checkpoint, target: str, suffix: str, done: set[str]) -> tuple[str, E.Expr]:
    for p in family.packed:
        for part in p.parts:
            m = template_pattern(part).match(target)
            if not m:
                continue
            groups = m.groupdict()
            parts = [q.format(**groups)[: -len(".weight")] + suffix for q in p.parts]
            exprs = [ckpt.tensors[q].expr for q in parts]
            done.update(parts)
            module = p.hf.format(**groups)[: -len(".weight")]
            if suffix == ".lora_a.weight":
                if any(e != exprs[0] for e in exprs[1:]):
                    raise VerifyError(f"{module}: parts have different LoRA A matrices; merge instead")
                return module, exprs[0]
            return module, p.rule(ckpt.spec).fuse(dict(zip(p.parts, exprs)))
    raise VerifyError(f"{target}: the {family.name} family has no HF name for this LoRA target")
