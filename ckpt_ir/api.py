"""Python API: load, derive or parse a pipeline, run it, plan and save.

    import ckpt_ir.api as ck
    src = ck.load("Qwen2.5-0.5B")
    target = ck.Target(to="mcore", tp=2, pp=2)
    out = ck.run(src, ck.derive_pipeline(src, target))
    ck.save(out, "qwen-tp2pp2", target)
"""

from __future__ import annotations

from typing import Any

import attrs

from ckpt_ir.backends.plan import Plan
from ckpt_ir.errors import UsageError
from ckpt_ir.frontends import load
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.passes.manager import Instrumentation, PassManager, Pipeline, parse_pipeline
from ckpt_ir.passes.vocab import padded_size

__all__ = ["Target", "load", "attach_lora", "derive_pipeline", "run", "plan", "save", "parse_pipeline"]


@attrs.frozen(kw_only=True)
class Target:
    """What the user asked for.  For ``mcore``, unset parallel options mean 1 / none."""

    to: str
    dtype: str | None = None
    tp: int = 1
    pp: int = 1
    vpp_layers: int | None = None
    num_layer_list: tuple[int, ...] | None = None
    noop_layers: tuple[int, ...] = ()
    vocab_divisible_by: int | None = None
    norm_names: str | None = None  # mcore: "local" or "te"; None keeps the source's naming
    max_shard_size: int | None = None
    hf_config_dir: str | None = None
    ep: int = 1
    etp: int | None = None
    grouped_gemm: bool = False
    lora_rank: int | None = None  # user-given LoRA settings, checked against the checkpoint
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    # Megatron stores some HF tensors once (DeepSeek MTP's embedding/head copies): "check" that
    # they are equal before writing, or "drop" them as MindSpeed-LLM does (recorded as dropped)
    shared_copies: str = "check"
    # Megatron target: carry the source's distributed-optimizer state (when it has any), laid out
    # for data-parallel size ``dp`` (default: the source's)
    optimizer: bool = True
    dp: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.to not in ("hf", "mcore", "peft"):
            raise UsageError(f"--to {self.to!r}: choose hf, mcore or peft")
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--ep", self.ep), ("--vpp-layers", self.vpp_layers),
                            ("--etp", self.etp), ("--make-vocab-size-divisible-by", self.vocab_divisible_by),
                            ("--target-dp", self.dp)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if self.to != "mcore" and (self.tp != 1 or self.pp != 1 or self.vpp_layers or self.num_layer_list
                                   or self.noop_layers or self.vocab_divisible_by or self.ep != 1 or self.etp
                                   or self.grouped_gemm or self.dp):
            raise UsageError("--tp/--pp/--vpp-layers/--num-layer-list/--noop-layers/--make-vocab-size-divisible-by/"
                             "--ep/--etp/--moe-grouped-gemm/--target-dp apply to --to mcore only")

    @property
    def carries_optimizer(self) -> bool:
        """Whether the source's optimizer state should be lifted for this target."""
        return self.to == "mcore" and self.optimizer


def attach_lora(base: Checkpoint, path: str) -> Checkpoint:
    """Add the LoRA adapter at ``path`` to ``base``: a PEFT adapter directory, or a Megatron
    checkpoint holding LoRA tensors (e.g. saved with a LoRA filter) in the same layout as the base.
    Adapter tensors replace any LoRA the base already carries."""
    from ckpt_ir.families import by_name
    from ckpt_ir.frontends import peft
    from ckpt_ir.ir.names import is_lora, lora_target

    if peft.detect(path):
        if base.layout.tp != 1 or base.layout.fused_qkv or base.layout.fused_gate_up:
            base = run(base, derive_pipeline(base, Target(to="hf")))
        tensors, spec = peft.lift_adapter(path, by_name(base.spec.family), base.spec)
    else:
        adapter = load(path)
        if adapter.spec.lora_rank is None:
            raise UsageError(f"--lora-load {path}: no LoRA tensors found there")
        la, lb = adapter.layout, base.layout
        if (la.tp, la.pp, la.vpp_layers, la.num_layer_list, la.noop_layers) != \
                (lb.tp, lb.pp, lb.vpp_layers, lb.num_layer_list, lb.noop_layers):
            raise UsageError(f"--lora-load {path}: adapter layout ({la.describe()}) differs from the base "
                             f"({lb.describe()}); both must come from the same training layout")
        tensors = {n: t for n, t in adapter.tensors.items() if is_lora(n)}
        a = adapter.spec
        spec = attrs.evolve(base.spec, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_rslora=a.lora_rslora,
                            lora_alphas=a.lora_alphas)
    missing = sorted({lora_target(n) for n in tensors} - set(base.tensors))
    if missing:
        raise UsageError(f"--lora-load {path}: adapter targets {', '.join(missing[:3])} which the base lacks")
    merged = {n: t for n, t in base.tensors.items() if not is_lora(n)}
    merged.update(tensors)
    from ckpt_ir.frontends.hf import canonical_order

    ordered = dict(sorted(merged.items(), key=lambda kv: canonical_order(kv[0])))
    return attrs.evolve(base, tensors=ordered, spec=spec)


def derive_pipeline(src: Checkpoint, target: Target) -> Pipeline:
    """The standard pipeline from the source layout to the target: normalise (gather, drop no-op
    layers and padding, unfuse), cast, then build the target layout."""
    lay = src.layout
    steps: list[str] = []
    if lay.tp > 1 or lay.pp > 1 or lay.vpp_layers or lay.num_layer_list or lay.ep > 1 or lay.etp is not None:
        steps.append("gather")
    if lay.grouped_gemm and not (target.to == "mcore" and target.grouped_gemm):
        steps.append("ungroup-experts")
    if lay.noop_layers:
        steps.append("remove-noop-layers")
    if lay.padded_vocab:
        steps.append("unpad-vocab")
    if src.spec.lora_rank is not None and target.to != "peft":
        opts = []
        if target.lora_alpha is not None:
            opts.append(f"alpha={target.lora_alpha:g}")
        if target.lora_rank is not None:
            opts.append(f"rank={target.lora_rank}")
        if target.lora_targets:
            opts.append("targets=" + ",".join(target.lora_targets))
        steps.append("lora-merge" + ("{" + " ".join(opts) + "}" if opts else ""))
    if target.to in ("hf", "peft"):
        if lay.fused_gate_up:
            steps.append("unfuse-gate-up")
        if lay.fused_qkv:
            steps.append("unfuse-qkv")
    if target.dtype:
        steps.append(f"cast{{dtype={target.dtype}}}")
    if target.to == "mcore":
        if not lay.fused_qkv:
            steps.append("fuse-qkv")
        if not lay.fused_gate_up:
            steps.append("fuse-gate-up")
        if target.vocab_divisible_by:
            size = padded_size(src.spec.vocab_size, target.vocab_divisible_by, target.tp)
            if size != src.spec.vocab_size:
                steps.append(f"pad-vocab{{size={size}}}")
        if target.noop_layers:
            steps.append("insert-noop-layers{layers=" + ",".join(map(str, target.noop_layers)) + "}")
        if target.grouped_gemm and not lay.grouped_gemm:
            steps.append("group-experts")
        opts = [f"tp={target.tp}", f"pp={target.pp}"]
        if target.vpp_layers:
            opts.append(f"vpp-layers={target.vpp_layers}")
        if target.num_layer_list:
            opts.append("num-layer-list=" + ",".join(map(str, target.num_layer_list)))
        if target.ep > 1:
            opts.append(f"ep={target.ep}")
        if target.etp is not None and target.etp != target.tp:
            opts.append(f"etp={target.etp}")
        if target.tp > 1 or target.pp > 1 or target.vpp_layers or target.num_layer_list or target.ep > 1:
            steps.append("shard{" + " ".join(opts) + "}")
    return parse_pipeline(",".join(steps)) if steps else Pipeline()


def run(ckpt: Checkpoint, pipeline: Pipeline | str, instrumentation: Instrumentation | None = None) -> Checkpoint:
    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline) if pipeline.strip() else Pipeline()
    return PassManager(pipeline, instrumentation).run(ckpt)


def plan(ckpt: Checkpoint, target: Target) -> Plan:
    if ckpt.states and not target.carries_optimizer:
        why = "optimizer state: only a Megatron target carries it" if target.optimizer else "--no-optimizer"
        ckpt = attrs.evolve(ckpt, states={}, dropped={**ckpt.dropped, "optimizer state": why})
    if target.to == "peft":
        from ckpt_ir.backends import peft
        from ckpt_ir.passes.lora import apply_lora_options

        return peft.plan(apply_lora_options(ckpt, target.lora_rank, target.lora_alpha, target.lora_targets))
    if target.to == "hf":
        from ckpt_ir.backends import hf

        kw: dict[str, Any] = {"hf_config_dir": target.hf_config_dir}
        if target.max_shard_size:
            kw["max_shard_size"] = target.max_shard_size
        return hf.plan(ckpt, **kw)
    from ckpt_ir.backends import mcore

    if target.norm_names and ckpt.layout.norm_names != target.norm_names:
        ckpt = attrs.evolve(ckpt, layout=attrs.evolve(ckpt.layout, norm_names=target.norm_names))
    return mcore.plan(ckpt, shared_copies=target.shared_copies, dp=target.dp)


def save(ckpt: Checkpoint, dst: str, target: Target, *, overwrite: bool = False, progress: bool = False,
         workers: int | None = None, max_memory: int | None = None) -> dict:
    """Plan and write ``ckpt`` to ``dst`` (atomically).  ``workers``: parallel writer processes
    (default: one per core); ``max_memory``: bytes of tensor data held at once (default: half
    the available memory)."""
    from ckpt_ir.backends.execute import execute

    return execute(plan(ckpt, target), dst, overwrite=overwrite, progress=progress, workers=workers,
                   max_memory=max_memory)
