"""PEFT backend: a LoRA-only adapter that ``peft.PeftModel.from_pretrained`` loads onto the HF base.

Megatron's fused LoRA becomes per-projection LoRA first (``unfuse-qkv``/``unfuse-gate-up``: q, k
and v share A and take their rows of B), so the adapter targets HF module names."""

from __future__ import annotations

import json

from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import UsageError, VerifyError
from ckpt_ir.families import by_name
from ckpt_ir.frontends.hf import names_for
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import is_lora, lora_target
from ckpt_ir.ir.roles import canonical_order

PREFIX = "base_model.model."


def plan(ckpt: Checkpoint) -> Plan:
    spec, layout = ckpt.spec, ckpt.layout
    if layout.tp != 1 or layout.fused_qkv or layout.fused_gate_up:
        raise VerifyError("PEFT output needs whole, unfused tensors; the pipeline must run gather, unfuse-qkv, "
                          "unfuse-gate-up")
    lora = {n: t for n, t in ckpt.tensors.items() if is_lora(n)}
    if not lora:
        raise UsageError("--to peft writes a LoRA adapter, but the checkpoint has no LoRA tensors; pass --lora-load")
    if spec.lora_alpha is None:
        raise UsageError("the checkpoint does not record lora_alpha; pass --lora-alpha")
    family = by_name(spec.family)
    names = family.names
    entries: list[tuple[tuple, str, E.Expr]] = []
    packed_done: set[str] = set()
    modules: set[str] = set()
    for name in sorted(lora, key=canonical_order):
        if name in packed_done:
            continue
        target = lora_target(name)
        which = "A" if name.endswith(".lora_a.weight") else "B"
        hf = names.from_canonical(target)
        if hf is not None:
            module = hf[: -len(".weight")]
            expr = lora[name].expr
        else:  # a packed HF module (Phi-3 qkv_proj): A shared, B stacked
            module, expr = _packed(family, ckpt, target, which, packed_done)
        modules.add(module.rsplit(".", 1)[-1])
        entries.append((canonical_order(name), f"{PREFIX}{module}.lora_{which}.weight", expr))
    entries.sort(key=lambda e: (e[0], e[1]))
    tensors = tuple((k, e) for _, k, e in entries)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.lora_rank,
        "lora_alpha": int(spec.lora_alpha) if float(spec.lora_alpha).is_integer() else spec.lora_alpha,
        "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
        "base_model_name_or_path": (ckpt.hf_config or {}).get("_name_or_path") or None,
    }
    dropped = dict(ckpt.dropped)
    dropped.update({n: "base weight: not part of a LoRA adapter" for n in ckpt.tensors if not is_lora(n)})
    return Plan((OutputFile("adapter_model.safetensors", "safetensors", tensors, metadata={"format": "pt"}),
                 OutputFile("adapter_config.json", "text", text=json.dumps(cfg, indent=2) + "\n")), dropped)


def _packed(family, ckpt: Checkpoint, target: str, which: str, done: set[str]) -> tuple[str, E.Expr]:
    for p in family.packed:
        for part in p.parts:
            m = names_for(part).match(target)
            if not m:
                continue
            groups = m.groupdict()
            parts = [q.format(**groups)[: -len(".weight")] + (".lora_a.weight" if which == "A" else ".lora_b.weight")
                     for q in p.parts]
            exprs = [ckpt.tensors[q].expr for q in parts]
            done.update(parts)
            module = p.hf.format(**groups)[: -len(".weight")]
            if which == "A":
                if any(e != exprs[0] for e in exprs[1:]):
                    raise VerifyError(f"{module}: parts have different LoRA A matrices; merge instead")
                return module, exprs[0]
            return module, E.simplify(E.Concat(tuple(exprs), 0))
    raise VerifyError(f"{target}: the {family.name} family has no HF name for this LoRA target")
