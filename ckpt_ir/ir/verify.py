"""The IR verifier: run after every pass; raises VerifyError naming the tensor and the pass."""

from __future__ import annotations

import re

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import layout as L
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import is_lora, role_of, split_layer, split_stack, split_sub
from ckpt_ir.ir.roles import expected_names, expected_shape, tp_of
from ckpt_ir.ir.roles import role as role_row

SEPARATE_GATE_UP = re.compile(r"^mlp\.(?:experts\.\d+\.|shared\.)?(?:gate|up)\.")
SEPARATE_GDN = re.compile(r"^attn\.gdn\.[qkvzba]\.weight$")  # a gated-delta-net projection


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def verify(ckpt: Checkpoint, after: str = "") -> None:
    where = f" (after pass {after!r})" if after else ""
    spec, layout = ckpt.spec, ckpt.layout
    L.validate(spec, layout)  # LayoutError: the user asked for an impossible layout
    for name, t in ckpt.tensors.items():
        if t.name != name:
            raise VerifyError(f"tensor stored under {name!r} is named {t.name!r}{where}")
        row = role_row(name)
        if row is None:
            raise VerifyError(f"{name}: unknown tensor role {role_of(name)!r}{where}")
        stack, inner = split_stack(name)  # a stack's (vision tower's) tensors by its own spec and layout
        sspec, slay = spec.stack_spec(stack), layout.for_stack(stack)
        layer, rest = split_layer(inner)
        if layer is not None and not 0 <= layer < sspec.total_layers:
            raise VerifyError(f"{name}: layer {layer} outside the model's {sspec.total_layers} layers{where}")
        rest = split_sub(rest)[1]  # a sublayer's tensors are checked as a layer's
        fused_qkv = rest.startswith(("attn.qkv.", "attn.qkv_a.", "attn.gdn.in_"))
        fused_fc1 = ".gate_up." in "." + rest
        if (fused_qkv and not slay.fused_qkv) or (fused_fc1 and not slay.fused_gate_up):
            raise VerifyError(f"{name}: fused tensor in a layout that says unfused{where}")
        separate = rest.startswith(("attn.q.", "attn.k.", "attn.v.", "attn.q_a.", "attn.kv_a."))
        # MindSpeed-LLM's layout keeps gated attention's q / k / v apart
        kept = sspec.attn_gate and slay.gdn_keys == "mindspeed"
        if (separate and not kept or SEPARATE_GDN.match(rest)) and slay.fused_qkv:
            raise VerifyError(f"{name}: separate q/k/v tensor in a layout with fused QKV{where}")
        if SEPARATE_GATE_UP.match(rest) and slay.fused_gate_up:
            raise VerifyError(f"{name}: separate gate/up tensor in a layout with fused gate/up{where}")
        rank = (
            t.shape[0]
            if name.endswith(".lora_a.weight")
            else t.shape[1]
            if name.endswith(".lora_b.weight")
            else None
        )
        want = expected_shape(spec, layout, name, rank)
        if want is not None and t.shape != want:
            raise VerifyError(f"{name}: shape {list(t.shape)} but the spec implies {list(want)}{where}")
        split = row.split
        tp = tp_of(name, layout)
        if t.tp > 1 and (split is None or t.tp != tp):
            raise VerifyError(f"{name}: {t.tp} shards in a layout with tp={tp}{where}")
        if split is not None and t.tp == 1 and tp > 1:
            raise VerifyError(f"{name}: not sharded in a layout with tp={tp}{where}")
        if is_lora(name) and spec.lora_rank is None:
            raise VerifyError(f"{name}: LoRA tensor but the spec has no LoRA rank{where}")
    for target, _ in spec.lora_alphas:
        if target[: -len(".weight")] + ".lora_a.weight" not in ckpt.tensors:
            raise VerifyError(f"the spec has a LoRA alpha for {target}, which carries no LoRA{where}")
    weights = {n for n in ckpt.tensors if not is_lora(n)}
    if weights and spec.total_layers > len(weights):  # cheap test before listing every expected name
        raise VerifyError(
            f"checkpoint is incomplete: the spec has {spec.total_layers} layers but there are only "
            f"{len(weights)} tensors{where}"
        )
    if weights:  # a LoRA-only checkpoint has no base weights to check
        missing = sorted(expected_names(spec, layout) - weights, key=_natural)
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise VerifyError(
                f"checkpoint is incomplete: {', '.join(missing[:3])}{more} missing for a "
                f"{spec.family} model with {spec.num_layers} layers{where}"
            )
    if spec.tied_embeddings and "lm_head.weight" in ckpt.tensors:
        raise VerifyError(f"lm_head.weight present but embeddings are tied{where}")
    for set_name, state in ckpt.states.items():
        _verify_state(ckpt, set_name, state, where)


def _verify_state(ckpt: Checkpoint, set_name: str, state: dict, where: str) -> None:
    """An optimizer-state tensor set must mirror the weights: same names, full shapes and split."""
    # the MoE router's bias is a buffer in Megatron (no optimizer state)
    missing = [n for n in ckpt.tensors if n not in state and not n.endswith(".mlp.router.bias")]
    extra = [n for n in state if n not in ckpt.tensors]
    if missing or extra:
        which, names = ("has no state for", missing) if missing else ("has state for unknown", extra)
        raise VerifyError(f"optimizer state {set_name!r} {which} {', '.join(sorted(names)[:3])}{where}")
    for name, t in state.items():
        w = ckpt.tensors[name]
        if t.shape != w.shape or t.tp != w.tp:
            raise VerifyError(
                f"optimizer state {set_name!r} of {name}: shape {list(t.shape)} in {t.tp} shard(s) "
                f"but the weight is {list(w.shape)} in {w.tp}{where}"
            )
