"""PEFT adapter frontend: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)
lifted as canonical LoRA tensors that attach to a base checkpoint of the same family."""

from __future__ import annotations

import json
import os
import re

from ckpt_ir.errors import CoverageError, FormatError
from ckpt_ir.families import Family
from ckpt_ir.frontends.hf import _file_tensors, names_for
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import TensorNode
from ckpt_ir.ir.spec import ModelSpec

PREFIX = "base_model.model."
KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$")


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def read_config(path: str) -> dict:
    try:
        cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}/adapter_config.json: cannot read ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{path}: adapter type {cfg.get('peft_type')!r} is not LoRA")
    for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised LoRA"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(flag):
            raise FormatError(f"{path}: {what} adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise FormatError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    return cfg


def lift_adapter(path: str, family: Family, spec: ModelSpec) -> tuple[dict[str, TensorNode], int, float | None]:
    """Canonical LoRA tensors of a PEFT adapter, its rank and alpha."""
    cfg = read_config(path)
    files = [os.path.join(path, n) for n in ("adapter_model.safetensors", "adapter_model.bin")
             if os.path.isfile(os.path.join(path, n))]
    if not files:
        raise FormatError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    raw = _file_tensors(files[0])
    names = family.names
    out: dict[str, TensorNode] = {}
    unknown = []
    for key, load in raw.items():
        m = KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else key)
        if not m:
            unknown.append(key)
            continue
        module, which = m.group(1), m.group(2)
        suffix = ".lora_a.weight" if which == "A" else ".lora_b.weight"
        canon = names.to_canonical(module + ".weight")
        if canon is not None:
            out[canon[: -len(".weight")] + suffix] = TensorNode.whole(canon[: -len(".weight")] + suffix, load)
            continue
        for p in family.packed:  # e.g. Phi-3 qkv_proj: A shared by the parts, B stacked like the weight
            mm = names_for(p.hf).match(module + ".weight")
            if not mm:
                continue
            pos = 0
            for part, n in zip(p.parts, p.row_counts(spec)):
                name = part.format(**mm.groupdict())[: -len(".weight")] + suffix
                expr = load if which == "A" else E.simplify(E.Slice(load, 0, pos, pos + n))
                out[name] = TensorNode.whole(name, expr)
                pos += n
            break
        else:
            unknown.append(key)
    if unknown:
        raise CoverageError(f"{files[0]}: {len(unknown)} adapter tensor(s) not understood and would be lost: "
                            f"{', '.join(unknown[:5])}")
    ranks = {t.shape[0] for n, t in out.items() if n.endswith(".lora_a.weight")}
    if len(ranks) != 1:
        raise FormatError(f"{path}: LoRA A matrices have ranks {sorted(ranks)}; expected one rank")
    r = ranks.pop()
    if cfg.get("r") not in (None, r):
        raise FormatError(f"{path}: adapter_config.json says r={cfg['r']} but the tensors have rank {r}")
    alpha = cfg.get("lora_alpha")
    return out, r, float(alpha) if alpha is not None else None
