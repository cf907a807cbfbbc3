"""lora-merge: fold LoRA adapters into their base weights, W' = W + s * B @ A.

s is each target's scale (``ModelSpec.lora_scale``: alpha / r or, rank-stabilised, alpha / sqrt(r),
with the target's own rank and alpha).  With a DoRA magnitude m the merged rows are rescaled to
it, W' = (m / ||W + s*B@A||_row) * (W + s*B@A), in peft's operation order.  A full tensor saved
with the adapter (modules_to_save) replaces its base tensor.  All arithmetic runs in fp32 and the
result is rounded once to W's dtype (a bf16 model stays bf16 without an fp16 detour).  Fused
targets need no special case: a fused QKV's B (and magnitude) is interleaved exactly like its
weight, and a fused gate/up's B is [B_gate; B_up] like [gate; up].
"""

from __future__ import annotations

import attrs

from ckpt_ir.errors import FormatError, UsageError, VerifyError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.names import (
    is_lora,
    is_lora_factor,
    lora_target,
    role_of,
    saved_name,
    split_layer,
    split_stack,
    template_pattern,
)
from ckpt_ir.passes.manager import (
    HAS_LORA,
    UNFUSED,
    WHOLE,
    Pass,
    Requirement,
    at_least,
    option,
    register_pass,
)

# Module names --lora-target-modules takes (Megatron or HF) -> the canonical targets that carry
# their LoRA, fused or not (q_proj's LoRA lives in linear_qkv's once fused); Megatron's and
# transformers-4's expert linears take the same names as the dense ones
_FC1 = (
    "mlp.gate_up",
    "mlp.gate",
    "mlp.up",
    "mlp.experts.{e}.gate_up",
    "mlp.experts.{e}.gate",
    "mlp.experts.{e}.up",
    "mlp.shared.gate_up",
    "mlp.shared.gate",
    "mlp.shared.up",
)
MCORE_TARGETS = {
    "linear_qkv": ("attn.qkv", "attn.q", "attn.k", "attn.v"),
    "linear_proj": ("attn.o",),
    "linear_fc1": _FC1,
    "linear_fc2": ("mlp.down", "mlp.experts.{e}.down", "mlp.shared.down"),
}
HF_TARGETS = {
    "q_proj": ("attn.q", "attn.qkv"),
    "k_proj": ("attn.k", "attn.qkv"),
    "v_proj": ("attn.v", "attn.qkv"),
    "o_proj": ("attn.o",),
    "gate_proj": (
        "mlp.gate",
        "mlp.gate_up",
        "mlp.experts.{e}.gate",
        "mlp.experts.{e}.gate_up",
        "mlp.shared.gate",
        "mlp.shared.gate_up",
    ),
    "up_proj": (
        "mlp.up",
        "mlp.gate_up",
        "mlp.experts.{e}.up",
        "mlp.experts.{e}.gate_up",
        "mlp.shared.up",
        "mlp.shared.gate_up",
    ),
    "down_proj": ("mlp.down", "mlp.experts.{e}.down", "mlp.shared.down"),
    "qkv_proj": ("attn.q", "attn.k", "attn.v", "attn.qkv"),
    "gate_up_proj": _FC1,
    "w1": ("mlp.experts.{e}.gate", "mlp.experts.{e}.gate_up"),
    "w3": ("mlp.experts.{e}.up", "mlp.experts.{e}.gate_up"),
    "w2": ("mlp.experts.{e}.down",),
}


def lora_modules(ckpt: Checkpoint) -> set[str]:
    """Canonical target roles (``attn.qkv``, ``mlp.experts.{e}.down``...) that carry LoRA tensors;
    a stack's (a vision tower's) with its prefix (``vision.attn.qkv``)."""
    out = set()
    for name in ckpt.tensors:
        if is_lora_factor(name):
            stack, inner = split_stack(lora_target(name))
            role = role_of(inner).removeprefix("layers.{i}.")[: -len(".weight")]  # a tower's merger: no layer
            out.add(role if stack is None else f"{stack}.{role}")
    return out


def _stack_modules(ckpt: Checkpoint) -> dict[str, set[str]]:
    """A stack's LoRA roles (``vision.attn.qkv``) -> the HF modules holding them, as the checkpoint
    stores them and as transformers' model names them (``visual.blocks.0.attn.qkv``,
    ``model.visual.blocks.0.attn.qkv``); a fused role's by its parts (q, k, v; gate, up)."""
    from ckpt_ir.families import by_name

    family, spec = by_name(ckpt.spec.family), ckpt.spec
    parts = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}
    out: dict[str, set[str]] = {}
    for name in ckpt.tensors:
        if not name.endswith(".lora_a.weight") or split_stack(name)[0] is None:
            continue
        target = lora_target(name)
        stack, inner = split_stack(target)
        layer, rest = split_layer(inner)
        role = rest[: -len(".weight")]
        hf = []
        where = (
            f"{stack}." if layer is None else f"{stack}.layers.{layer}."
        )  # the tower's own blocks: no layer
        for held in (f"{where}{p}.weight" for p in parts.get(role, (role,))):
            hits = [m for p in family.packed for q in p.parts if (m := template_pattern(q).match(held))]
            packs = [p for p in family.packed for q in p.parts if template_pattern(q).match(held)]
            if packs:  # a part of a packed HF tensor (the tower's qkv): that tensor's module
                hf.append(packs[0].hf.format(**hits[0].groupdict()))
                continue
            try:
                hf.extend(h for h, _, _ in family.hf_form(spec, [held]))
            except FormatError:  # no HF name: only Megatron's names can list it
                continue
        for h in hf:
            if family.renames():  # the table's name as the HF checkpoint's (Qwen3-VL's DeepStack list)
                h = family.table_key(h, spec, True)
            module = h.rsplit(".", 1)[0]
            out.setdefault(f"{stack}.{role}", set()).update({module, family.memory_name(module)})
    return out


def _peft_match(t: str, module: str) -> bool:
    """peft's rule for a target_modules entry: the module's name, or its end after a dot."""
    return module == t or module.endswith("." + t)


def check_targets(ckpt: Checkpoint, targets: tuple[str, ...]) -> None:
    """Every listed module (Megatron or HF name) must carry LoRA, and every module carrying LoRA
    must be listed.  The Megatron names cover a vision tower's modules too (MindSpeed-MM names
    them so); an HF name covers a tower's module where it matches its HF name as peft matches
    ``target_modules`` (``qkv``, ``attn.proj``, ``fc1``, ``self_attn.out_proj``)."""
    present = lora_modules(ckpt)
    tower = _stack_modules(ckpt) if any(split_stack(r)[0] for r in present) else {}
    covered: set[str] = set()
    absent = []
    for t in targets:
        roles = MCORE_TARGETS.get(t) or HF_TARGETS.get(t) or ()
        stacked = {r for r in present if split_stack(r)[0] is not None}
        hit = present.intersection(roles)
        hit |= {r for r in stacked if split_stack(r)[1] in MCORE_TARGETS.get(t, ())}
        hit |= {r for r in stacked if any(_peft_match(t, m) for m in tower.get(r, ()))}
        if not roles and not hit and not tower:
            raise UsageError(
                f"{setting('lora_targets')}: unknown module {t!r}; use Megatron names "
                f"({', '.join(MCORE_TARGETS)}), HF names ({', '.join(HF_TARGETS)}) or a vision "
                f"tower's HF module names (e.g. qkv, attn.proj, fc1)"
            )
        if not hit:
            absent.append(t)
        covered |= hit
    parts = []
    if absent:
        parts.append(f"no LoRA tensors for {', '.join(absent)}")
    if present - covered:
        names: dict[str, str] = {}
        for table in (MCORE_TARGETS, HF_TARGETS):
            for module, roles in table.items():
                names.setdefault(roles[0], module)
        parts.append(
            "LoRA tensors for "
            + ", ".join(names.get(r, r) for r in sorted(present - covered))
            + " not in the list"
        )
    if parts:
        raise UsageError(
            f"{setting('lora_targets')} {' '.join(targets)} does not match the checkpoint: "
            + "; ".join(parts)
        )


def apply_lora_options(
    ckpt: Checkpoint, rank: int | None, alpha: float | None, targets: tuple[str, ...] = ()
) -> Checkpoint:
    """Check user-given rank / alpha / targets against the checkpoint; fill in alpha when the
    checkpoint does not record it.  Any disagreement is an error: a wrong alpha silently scales
    the adapter."""
    spec = ckpt.spec
    if spec.lora_rank is None:
        raise UsageError(
            f"no LoRA tensors in the checkpoint; pass {setting('lora_load', metavar='DIR')} with the adapter"
        )
    if rank is not None and rank != spec.lora_rank:
        raise UsageError(
            f"{setting('lora_rank', rank)} given but the LoRA tensors have rank {spec.lora_rank}"
        )
    if alpha is not None and spec.lora_alpha is not None and float(alpha) != spec.lora_alpha:
        raise UsageError(
            f"{setting('lora_alpha', alpha)} given but the checkpoint says lora_alpha={spec.lora_alpha:g}; "
            f"leave it out or fix the checkpoint"
        )
    if alpha is None and spec.lora_alpha is None:
        raise UsageError(
            f"the checkpoint does not record lora_alpha; pass {setting('lora_alpha', metavar='ALPHA')}"
        )
    if targets:
        check_targets(ckpt, targets)
    if spec.lora_alpha is None:
        assert alpha is not None  # both None was refused above
        return attrs.evolve(ckpt, spec=attrs.evolve(spec, lora_alpha=float(alpha)))
    return ckpt


@register_pass
@attrs.frozen
class LoraMerge(Pass):
    name = "lora-merge"
    summary = (
        "Merge LoRA adapters into base weights: W + s * B @ A (DoRA: rescaled rows) in fp32, rounded once"
    )
    description = (
        "Rank and alpha come from the checkpoint (Megatron args or adapter_config.json); options "
        "must agree with them.  Per-target ranks, alphas (peft's rank/alpha_pattern), rsLoRA "
        "scaling, DoRA magnitudes and saved full tensors (modules_to_save) are data of the "
        "checkpoint.  targets= (comma list of Megatron or HF module names) must name exactly the "
        "modules that carry LoRA."
    )
    requires = (WHOLE, HAS_LORA)  # whole: a DoRA row norm spans the input dim of row-parallel weights
    guarantees = "no LoRA tensors; base weights merged, dtype unchanged"
    optimizer_state = "drop"
    drop_reason = "the adapters' state has no counterpart in the merged weights (lora-merge)"

    alpha: float | None = option(None, help="LoRA alpha (default: from the checkpoint)")
    rank: int | None = option(None, help="LoRA rank r (default: from the checkpoint)", allowed=at_least(1))
    targets: str | None = option(None, help="modules expected to carry LoRA, e.g. linear_qkv,linear_proj")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        targets = tuple(t for t in (self.targets or "").split(",") if t)
        spec = apply_lora_options(ckpt, self.rank, self.alpha, targets).spec
        out: dict[str, TensorNode] = {}
        for name, t in ckpt.tensors.items():
            if is_lora(name):
                continue
            saved = ckpt.tensors.get(saved_name(name))
            if saved is not None:  # peft's modules_to_save: the trained copy replaces the base tensor
                out[name] = TensorNode.whole(name, E.simplify(E.Cast(saved.expr, t.dtype)))
                continue
            out[name] = t
            stem = name[: -len(".weight")] if name.endswith(".weight") else name
            a, b, m = (
                ckpt.tensors.get(stem + s)
                for s in (".lora_a.weight", ".lora_b.weight", ".lora_magnitude.weight")
            )
            if (a is None) != (b is None):
                raise VerifyError(f"{name}: LoRA {'A' if a is None else 'B'} is missing")
            if a is None:
                if m is not None:
                    raise VerifyError(f"{name}: DoRA magnitude without LoRA A and B")
                continue
            assert b is not None  # a and b are both present or both missing (checked above)
            delta = E.Scale(E.Matmul(b.expr, a.expr), spec.lora_scale(name, a.shape[0]))
            merged: E.Expr
            if m is None:
                merged = E.Add(t.expr, delta)
            else:  # the norm needs W + s*B@A unrounded: sum in fp32, rescale, round once
                merged = E.Cast(E.RowRescale(E.Add(E.Cast(t.expr, "F32"), delta), m.expr), t.dtype)
            out[name] = TensorNode.whole(name, E.simplify(merged))
        orphans = [n for n in ckpt.tensors if is_lora(n) and lora_target(n) not in ckpt.tensors]
        if orphans:
            raise VerifyError(
                f"LoRA tensors without a base weight: {', '.join(orphans[:3])}; load the base checkpoint"
            )
        return ckpt.with_tensors(
            out, spec=attrs.evolve(spec, lora_rank=None, lora_alpha=None, lora_rslora=False, lora_alphas=())
        )


@register_pass
@attrs.frozen
class AttachLora(Pass):
    name = "attach-lora"
    summary = "Add the LoRA adapter at path= (a PEFT directory or a Megatron LoRA checkpoint) to the weights"
    description = (
        "A PEFT adapter names HF modules, so it attaches to whole, unfused tensors; a Megatron LoRA "
        "checkpoint (e.g. saved with a LoRA filter) must have the base's parallel layout.  Adapter "
        "tensors replace any LoRA the checkpoint already carries; only headers are read.  Tokenizer "
        "files saved with a PEFT adapter (HF Trainer does) replace the base model's, said in a note."
    )
    guarantees = (
        "adapter tensors (LoRA A/B, DoRA magnitudes, saved copies) next to their base weights; the "
        "spec's LoRA settings (rank, alpha, rsLoRA, per-target alphas) from the adapter; the side "
        "files' tokenizer is the adapter's where it saved one that fits the vocabulary"
    )
    optimizer_state = "follow"  # the weights are unchanged; the adapters have no state of their own here

    path: str = option(help="adapter directory")

    def requirements(self) -> tuple[Requirement, ...]:
        from ckpt_ir.frontends import peft

        return (WHOLE, UNFUSED) if peft.detect(self.path) else ()

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        from ckpt_ir.families import by_name
        from ckpt_ir.frontends import load, peft
        from ckpt_ir.ir.roles import canonical_order

        path = self.path
        if peft.detect(path):
            tensors, spec = peft.lift_adapter(path, by_name(ckpt.spec.family), ckpt.spec)
            ckpt = _adapter_tokenizer(ckpt, path)
        else:
            adapter = load(path)
            if adapter.spec.lora_rank is None:
                raise UsageError(f"{setting('lora_load', path)}: no LoRA tensors found there")
            la, lb = adapter.layout, ckpt.layout
            if (la.tp, la.pp, la.vpp_layers, la.num_layer_list, la.noop_layers) != (
                lb.tp,
                lb.pp,
                lb.vpp_layers,
                lb.num_layer_list,
                lb.noop_layers,
            ):
                raise UsageError(
                    f"{setting('lora_load', path)}: adapter layout ({la.describe()}) differs from the base "
                    f"({lb.describe()}); both must come from the same training layout"
                )
            tensors = {n: t for n, t in adapter.tensors.items() if is_lora(n)}
            a = adapter.spec
            spec = attrs.evolve(
                ckpt.spec,
                lora_rank=a.lora_rank,
                lora_alpha=a.lora_alpha,
                lora_rslora=a.lora_rslora,
                lora_alphas=a.lora_alphas,
            )
        missing = sorted({lora_target(n) for n in tensors} - set(ckpt.tensors))
        if missing:
            raise UsageError(
                f"{setting('lora_load', path)}: adapter targets {', '.join(missing[:3])} which the base lacks"
            )
        merged = {n: t for n, t in ckpt.tensors.items() if not is_lora(n)}
        merged.update(tensors)
        ordered = dict(sorted(merged.items(), key=lambda kv: canonical_order(kv[0])))
        return attrs.evolve(ckpt, tensors=ordered, spec=spec)


def _adapter_tokenizer(ckpt: Checkpoint, path: str) -> Checkpoint:
    """The tokenizer files saved with the PEFT adapter at ``path`` in place of the base model's,
    said in a note: a tokenizer saved beside an adapter is the one it was trained with (added
    tokens, pad token, chat template).  Nothing changes where they equal the base's same-named
    files; they stay out, named in ``dropped``, where their tokens reach beyond the model's
    vocabulary (the adapter resized no embeddings, so the merged model cannot embed them)."""
    import filecmp

    from ckpt_ir.frontends import peft
    from ckpt_ir.io.side_files import is_tokenizer_file, side_file_name

    theirs, top = peft.tokenizer(path)
    base = {side_file_name(f): f for f in ckpt.aux_files if is_tokenizer_file(f)}
    same = all(
        side_file_name(f) in base and filecmp.cmp(f, base[side_file_name(f)], shallow=False) for f in theirs
    )
    if same:
        return ckpt
    names = ", ".join(side_file_name(f) for f in theirs)
    where = setting("lora_load", path)
    if top is not None and top >= ckpt.spec.vocab_size:
        why = (
            f"tokenizer files of the adapter {where}: its tokens reach id {top} but the model has "
            f"{ckpt.spec.vocab_size} embedding rows, so the output keeps the base model's tokenizer"
        )
        return attrs.evolve(ckpt, dropped={**ckpt.dropped, names: why})
    kept = [f for f in ckpt.aux_files if not is_tokenizer_file(f)]
    note = (
        f"tokenizer from the adapter {where} ({names}: saved with it, the tokenizer it was trained "
        f"with) in place of the base model's" + (f" ({', '.join(base)})" if base else "")
    )
    return attrs.evolve(
        ckpt,
        aux_files=tuple(sorted((*kept, *theirs), key=side_file_name)),
        meta={**ckpt.meta, "notes": [*ckpt.meta.get("notes", ()), note]},
    )
