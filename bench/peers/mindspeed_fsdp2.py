"""A MindSpeed-LLM FSDP2 checkpoint saved by real FSDP2 ranks converts to HF bit for bit.

Not a test (two gloo processes with torch FSDP2 take about a minute on two shared cores): a script
to run by hand.  It builds a tiny random MoE model with transformers, loads it as MindSpeed-LLM's
FSDP2 backend does (``from_pretrained`` in fp32, wrapped in an engine module that keeps it as
``model``), shards every decoder layer and the engine with ``fully_shard`` over N CPU ranks, takes
one AdamW step, and saves as its ``CheckpointManager`` does (``dcp.save`` of
``{"model": get_model_state_dict(engine), "optimizer": get_optimizer_state_dict(engine, opt)}``
through a ``FileSystemWriter`` with one file per rank, plus ``extra_state/``); ``--grouped-gemm``
stores the experts as MindSpeed's grouped-GEMM modules hold them (transposed, flattened to 2-D).
Then ``ckpt-ir convert ... --to hf --hf-config`` must equal transformers' ``save_pretrained`` of
the trained model (gathered on rank 0), tensor for tensor and bit for bit.

Usage::

    python bench/peers/mindspeed_fsdp2.py [--family mixtral|qwen3_moe] [--ranks 2] [--grouped-gemm] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, ranks: int, hf: str, step: str, trained: str, grouped: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)

    class Engine(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.model = m

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    engine = Engine(model)
    mesh = init_device_mesh("cpu", (ranks,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(engine, mesh=mesh)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-2)
    ids = torch.arange(12).view(1, 12)
    engine(ids, labels=ids).loss.backward()
    opt.step()

    # what MindSpeed's CheckpointManager's Stateful wrappers hand dcp.save: the two state dicts
    state = get_model_state_dict(engine)
    for k, t in state.items():
        if grouped and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # GroupedGemmFlattenRule: transpose(1, 2), then (E*d1, d2); FSDP2 shards
            # MindSpeed's 2-D parameter on dim 0 like any other
            full = t.full_tensor().transpose(1, 2).contiguous()
            state[k] = distribute_tensor(full.view(-1, full.shape[2]), mesh, [Shard(0)])
    saved = {"model": state, "optimizer": get_optimizer_state_dict(engine, opt)}

    writer = dcp.FileSystemWriter(step, single_file_per_rank=True, sync_files=False)
    dcp.save(saved, storage_writer=writer)
    os.makedirs(os.path.join(step, "extra_state"), exist_ok=True)
    torch.save({"global_step": 1}, os.path.join(step, "extra_state", f"extra_state_rank_{rank}.pt"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(trained, state_dict=full)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="mixtral", choices=("mixtral", "qwen3_moe"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--grouped-gemm", action="store_true")
    ap.add_argument("--work", default="/tmp/ckpt-ir-mindspeed-fsdp2")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    from tests.test_hf_roundtrip import assert_same_tensors
    from tests.test_moe import build_moe

    shutil.rmtree(a.work, ignore_errors=True)
    hf = build_moe(os.path.join(a.work, "hf"), a.family)
    step = os.path.join(a.work, "run", "checkpoints", "global_step_1")
    trained, out = os.path.join(a.work, "trained"), os.path.join(a.work, "out")
    mp.spawn(_run, args=(a.ranks, hf, step, trained, a.grouped_gemm), nprocs=a.ranks)
    files = sorted(n for n in os.listdir(step) if n.endswith(".distcp"))
    print(f"saved {step}: {files}")
    cmd = [sys.executable, "-m", "ckpt_ir", "convert", step, out, "--to", "hf", "--hf-config", hf]
    subprocess.run(cmd, check=True, cwd=root)
    assert_same_tensors(trained, out)
    print(
        f"{a.family}{' grouped GEMM' if a.grouped_gemm else ''}, {a.ranks} FSDP2 ranks: HF output equals save_pretrained bit for bit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
