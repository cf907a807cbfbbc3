"""Benchmark: ckpt-ir conversions against `cp -r` + `sync` of the same bytes (not a test).

    python bench/bench.py --sizes 1G,2G,4G --runs 3 --workdir /tmp/ckpt-ir-bench

For each size it generates a synthetic llama-shaped HF checkpoint (random bf16, several shards),
then runs, interleaved in each round: `cp -r SRC X && sync`, HF -> mcore TP2 PP2, mcore TP2 PP2 ->
mcore TP1 PP4 (reshard), and mcore -> HF.  Every conversion is a fresh `ckpt-ir` process (start-up
included) followed by `sync`.  Each task's output is deleted right after it is timed (the TP2 PP2
checkpoint once the round is over), so page-cache pressure does not build up across tasks;
`--cold` also empties the page cache before every task (needs root), so that every task,
`cp` included, reads its source from disk.  It prints, per size and task, the median wall time, GB/s, the ratio
to cp, and the peak RSS of the converting process as a fraction of the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
HEAD_DIM = HIDDEN // HEADS


def parse_size(text: str) -> int:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (FFN, HIDDEN),
        p + "mlp.up_proj.weight": (FFN, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, FFN),
    }


def generate(path: str, size: int) -> int:
    """A llama-shaped bf16 HF checkpoint of about ``size`` bytes; returns its layer count."""
    import torch
    from safetensors.torch import save_file

    per_layer = sum(2 * n for shape in layer_tensors(0).values() for n in [_numel(shape)])
    fixed = 2 * 2 * VOCAB * HIDDEN + 2 * HIDDEN
    layers = max(4, round((size - fixed) / per_layer / 4) * 4)
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (VOCAB, HIDDEN)}]
    for i in range(layers):
        if i and i % 8 == 0:
            shards.append({})
        shards[-1].update(layer_tensors(i))
    shards[-1].update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.rand(s, generator=g) - 0.5).to(torch.bfloat16) for n, s in shard.items()}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        del tensors
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
               "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
               "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
               "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 10000.0},
              open(os.path.join(path, "config.json"), "w"))
    return layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# converters run as installed: with cached bytecode (pip compiles it at install time), even where
# the environment sets PYTHONDONTWRITEBYTECODE (about 0.1 s of start-up for ckpt-ir's modules)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root or leave out --cold") from None


def timed(cmd: list[str], cold: bool = False) -> tuple[float, int]:
    """Wall seconds (command + sync) and the child's peak RSS in bytes."""
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    os.sync()
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--generate":
        print(generate(sys.argv[2], int(sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1G", help="comma-separated model sizes, e.g. 1G,2G,4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/ckpt-ir-bench")
    ap.add_argument("--keep", action="store_true", help="keep generated checkpoints")
    ap.add_argument("--extra", default="", help="extra flags for every ckpt-ir convert (e.g. '--workers 1')")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every task (needs root)")
    args = ap.parse_args()
    ck = [sys.executable, "-m", "ckpt_ir"]
    extra = args.extra.split()
    rows = []
    for size_text in args.sizes.split(","):
        root = os.path.join(args.workdir, size_text)
        shutil.rmtree(root, ignore_errors=True)
        src = os.path.join(root, "hf")
        # generate in a child process: the parent stays small, so children's peak RSS is their own
        # (Linux carries a parent's RSS high-water mark into forked children)
        layers = int(subprocess.check_output([sys.executable, __file__, "--generate", src, str(parse_size(size_text))]))
        nbytes = du(src)
        print(f"[{size_text}] generated {nbytes / 1e9:.2f} GB, {layers} layers", file=sys.stderr)
        tp2pp2, tp1pp4, back = (os.path.join(root, n) for n in ("tp2pp2", "tp1pp4", "back"))
        tasks = {
            "cp -r + sync": (["cp", "-r", src, os.path.join(root, "cp")], os.path.join(root, "cp")),
            "hf -> mcore tp2 pp2": (ck + ["convert", src, tp2pp2, "--to", "mcore", "--tp", "2", "--pp", "2",
                                          "--quiet", *extra], tp2pp2),
            "mcore tp2pp2 -> tp1pp4": (ck + ["convert", tp2pp2, tp1pp4, "--to", "mcore", "--tp", "1", "--pp", "4",
                                             "--quiet", *extra], tp1pp4),
            "mcore -> hf": (ck + ["convert", tp2pp2, back, "--to", "hf", "--quiet", *extra], back),
        }
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in tasks}
        for run in range(args.runs):
            for name, (cmd, out) in tasks.items():
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(timed(cmd, args.cold))
                print(f"[{size_text}] run {run + 1} {name}: {results[name][-1][0]:.2f}s", file=sys.stderr)
                if out != tp2pp2:  # the reshard and mcore -> HF read it
                    shutil.rmtree(out, ignore_errors=True)
        cp_time = statistics.median(t for t, _ in results["cp -r + sync"])
        for name, res in results.items():
            t = statistics.median(x for x, _ in res)
            rss = max(r for _, r in res)
            rows.append((size_text, name, t, nbytes / t / 1e9, t / cp_time, rss / 1e6, rss / nbytes))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'size':>5} {'task':26s} {'median s':>9} {'GB/s':>6} {'x cp':>6} {'peak RSS MB':>12} {'RSS/model':>10}")
    for size_text, name, t, gbps, ratio, rss_mb, frac in rows:
        print(f"{size_text:>5} {name:26s} {t:9.2f} {gbps:6.2f} {ratio:6.2f} {rss_mb:12.0f} {frac:10.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
