"""Benchmark: ``ckpt_ir.live.export_hf`` of a megatron-core model in 2 processes (gloo, CPU)
against ``torch.save`` of the same state dicts (not a test).

    python bench/live.py --size 1G --tp 2 --runs 3 --workdir /tmp/ckpt-ir-live-bench

It forks 2 ranks joined by a gloo process group, builds a llama-shaped ``GPTModel`` of about
``--size`` bytes (bf16; bench.py's widths: hidden 2048, FFN 5632, 16 heads, 4 KV heads, vocabulary
32000, as many layers as the size asks) at TP ``--tp`` x PP ``--pp`` with megatron-core's local
spec, and times, in each of ``--runs`` rounds: every rank draining ``export_hf`` (every HF tensor,
whole, on every rank; the consumer keeps nothing), and every rank ``torch.save``-ing its chunks'
state dicts to ``--workdir`` (flushed and fsynced; the file deleted after).  It prints the median
wall time of each (the slowest rank's), the bytes each rank handles, and each rank's peak RSS
growth during the export (``VmHWM`` reset before it) against ``--bucket``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def parse_size(text: str) -> int:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def layers_for(size: int, pp: int) -> int:
    """Layers (a multiple of ``pp``) for about ``size`` bf16 bytes with untied embeddings."""
    kv = KV_HEADS * HIDDEN // HEADS
    per_layer = 2 * ((HIDDEN + 2 * kv) * HIDDEN + HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)
    rest = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(pp, round(max(size - rest, 0) / per_layer / pp) * pp)


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _rank(rank: int, args: argparse.Namespace, layers: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.live import export_hf

    torch.set_num_threads(1)
    torch.cuda.current_device = lambda: torch.device("cpu")  # megatron-core asks it on CPU too
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(args.workdir, "gloo-store"),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(minutes=10),
    )
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    config = TransformerConfig(
        num_layers=layers,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=KV_HEADS,
        ffn_hidden_size=FFN,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        perform_initialization=False,  # the bytes do not matter, the time to make them would
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        bf16=True,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=4096,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    models = [model]
    own = sum(
        t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)
    )
    out: dict = {"rank": rank, "own_bytes": own, "export": [], "save": [], "rss_growth": []}
    path = os.path.join(args.workdir, f"rank{rank}.pt")
    for _ in range(args.runs):
        with open("/proc/self/clear_refs", "w") as fh:  # VmHWM back to the current RSS
            fh.write("5")
        before = _vm_hwm()
        dist.barrier()
        t0 = time.perf_counter()
        exported = 0
        for _name, tensor in export_hf(models, bucket_bytes=args.bucket):
            exported += tensor.numel() * tensor.element_size()
            del tensor
        dist.barrier()
        out["export"].append(time.perf_counter() - t0)
        out["rss_growth"].append(_vm_hwm() - before)
        out["exported_bytes"] = exported
        dist.barrier()
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            torch.save({k: v for k, v in model.state_dict().items()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        dist.barrier()
        out["save"].append(time.perf_counter() - t0)
        os.remove(path)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="model bytes (bf16), e.g. 400M, 1G")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bucket", type=parse_size, default=parse_size("256M"), help="export_hf's bucket_bytes")
    ap.add_argument("--workdir", default="/tmp/ckpt-ir-live-bench")
    args = ap.parse_args()
    if args.tp * args.pp != 2:
        raise SystemExit("--tp x --pp must be 2 (the benchmark runs 2 processes)")
    os.makedirs(args.workdir, exist_ok=True)
    store = os.path.join(args.workdir, "gloo-store")
    if os.path.exists(store):
        os.remove(store)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)

    import ckpt_ir.live  # noqa: F401

    layers = layers_for(parse_size(args.size), args.pp)
    pids = {}
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                result = _rank(rank, args, layers)
                with open(os.path.join(args.workdir, f"rank{rank}.json"), "w") as fh:
                    json.dump(result, fh)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        pids[pid] = rank
    failed = False
    for _ in range(2):
        _, status = os.wait()
        failed |= os.waitstatus_to_exitcode(status) != 0
    if failed:
        return 1
    ranks = [json.load(open(os.path.join(args.workdir, f"rank{r}.json"))) for r in range(2)]
    export = statistics.median(max(r["export"][i] for r in ranks) for i in range(args.runs))
    save = statistics.median(max(r["save"][i] for r in ranks) for i in range(args.runs))
    hf_bytes = ranks[0]["exported_bytes"]
    print(
        f"model: {layers} layers, {hf_bytes / 1e9:.2f} GB bf16, TP {args.tp} x PP {args.pp}, 2 processes (gloo, CPU)"
    )
    print(
        f"export_hf (every rank yields all {hf_bytes / 1e9:.2f} GB): {export:.2f} s  ({hf_bytes / export / 1e9:.2f} GB/s per rank)"
    )
    own = max(r["own_bytes"] for r in ranks)
    print(f"torch.save of each rank's state dict ({own / 1e9:.2f} GB, fsynced): {save:.2f} s")
    print(f"ratio export_hf / torch.save: {export / save:.2f}")
    growth = max(max(r["rss_growth"]) for r in ranks)
    print(
        f"peak RSS growth during export_hf: {growth / 1e6:.0f} MB (bucket_bytes {args.bucket / 1e6:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
