"""The Python API as a caller meets it: short reprs, errors worded for Python, docstrings that
hold, and the API reference generated from them."""

from __future__ import annotations

import ckpt_ir.api as ck


def test_public_objects_have_short_reprs(hf_cache, tmp_path):
    """A Conversion printed in a notebook is one line, not its whole plan (tens of KB)."""
    src = ck.load(hf_cache("llama", layers=4))
    target = ck.Target(to="mcore", tp=2, dtype="bf16")
    assert repr(target) == "Target(to='mcore', dtype='bf16', tp=2)"
    assert eval(repr(target), {"Target": ck.Target}) == target
    dry = ck.convert(src, str(tmp_path / "dry"), target, dry_run=True)
    plan = dry.plan
    assert repr(dry.pipeline) == "<Pipeline cast{dtype=bf16},fuse-qkv,fuse-gate-up,shard{tp=2}>"
    assert repr(plan) == f"<Plan 5 files, {plan.nbytes} bytes to write>"
    assert repr(plan.files[0]) == (
        f"<OutputFile iter_0000001/mp_rank_00/model_optim_rng.pt (torch): 27 tensors, {plan.files[0].nbytes} bytes>"
    )
    assert repr(dry) == (
        "<Conversion pipeline=cast{dtype=bf16},fuse-qkv,fuse-gate-up,shard{tp=2} "
        f"output=<Checkpoint llama hf tp=2 pp=1 qkv=fused gate_up=fused: 27 tensors, {dry.output.nbytes} bytes> "
        f"plan={plan!r} stats=None>"
    )
    done = ck.convert(src, str(tmp_path / "out"), ck.Target(to="hf"))
    assert repr(done).startswith("<Conversion pipeline=(no passes) output=<Checkpoint llama hf tp=1")
    assert repr(done).endswith(f"stats={done.stats!r}>") and len(repr(done)) < 400
    assert repr(ck.Pipeline()) == "<Pipeline (no passes)>"
