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

__all__ = ["Target", "load", "derive_pipeline", "run", "plan", "save", "parse_pipeline"]


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

    def __attrs_post_init__(self) -> None:
        if self.to not in ("hf", "mcore"):
            raise UsageError(f"--to {self.to!r}: choose hf or mcore")
        if self.to == "hf" and (self.tp != 1 or self.pp != 1 or self.vpp_layers or self.num_layer_list
                                or self.noop_layers or self.vocab_divisible_by):
            raise UsageError("--tp/--pp/--vpp-layers/--num-layer-list/--noop-layers/--make-vocab-size-divisible-by "
                             "apply to --to mcore only")


def derive_pipeline(src: Checkpoint, target: Target) -> Pipeline:
    """The standard pipeline from the source layout to the target: normalise (gather, drop no-op
    layers and padding, unfuse), cast, then build the target layout."""
    lay = src.layout
    steps: list[str] = []
    if lay.tp > 1 or lay.pp > 1 or lay.vpp_layers or lay.num_layer_list:
        steps.append("gather")
    if lay.noop_layers:
        steps.append("remove-noop-layers")
    if lay.padded_vocab:
        steps.append("unpad-vocab")
    if target.to == "hf":
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
        opts = [f"tp={target.tp}", f"pp={target.pp}"]
        if target.vpp_layers:
            opts.append(f"vpp-layers={target.vpp_layers}")
        if target.num_layer_list:
            opts.append("num-layer-list=" + ",".join(map(str, target.num_layer_list)))
        if target.tp > 1 or target.pp > 1 or target.vpp_layers or target.num_layer_list:
            steps.append("shard{" + " ".join(opts) + "}")
    return parse_pipeline(",".join(steps)) if steps else Pipeline()


def run(ckpt: Checkpoint, pipeline: Pipeline | str, instrumentation: Instrumentation | None = None) -> Checkpoint:
    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline) if pipeline.strip() else Pipeline()
    return PassManager(pipeline, instrumentation).run(ckpt)


def plan(ckpt: Checkpoint, target: Target) -> Plan:
    if target.to == "hf":
        from ckpt_ir.backends import hf

        kw: dict[str, Any] = {"hf_config_dir": target.hf_config_dir}
        if target.max_shard_size:
            kw["max_shard_size"] = target.max_shard_size
        return hf.plan(ckpt, **kw)
    from ckpt_ir.backends import mcore

    if target.norm_names and ckpt.layout.norm_names != target.norm_names:
        ckpt = attrs.evolve(ckpt, layout=attrs.evolve(ckpt.layout, norm_names=target.norm_names))
    return mcore.plan(ckpt)


def save(ckpt: Checkpoint, dst: str, target: Target, *, overwrite: bool = False, progress: bool = False,
         workers: int | None = None, max_memory: int | None = None) -> dict:
    """Plan and write ``ckpt`` to ``dst`` (atomically).  ``workers``: parallel writer processes
    (default: one per core); ``max_memory``: bytes of tensor data held at once (default: half
    the available memory)."""
    from ckpt_ir.backends.execute import execute

    return execute(plan(ckpt, target), dst, overwrite=overwrite, progress=progress, workers=workers,
                   max_memory=max_memory)
