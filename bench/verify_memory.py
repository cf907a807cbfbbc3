"""Benchmark: peak memory of `ckpt-ir verify` on a ~1 GB, 8-layer model (not a test).

    python bench/verify_memory.py --workdir /tmp/ckpt-ir-verify-bench [--size 1G]

Generates the synthetic llama-shaped bf16 HF checkpoint of bench.py (8 layers at 1G), converts it
to Megatron-Core TP2 PP2, then runs `ckpt-ir verify HF MCORE` (bf16 forward on 16 tokens, the
Megatron side gathered lazily) as a fresh process and reports its peak RSS as a fraction of the
model's bytes.  Verify holds one unit's weights at a time (a decoder layer, or the embedding or
output layer), so the target is below 40% of the model.  For reference it also reports the peak
RSS of a process that only imports torch and transformers and builds the model on the meta
device: the fixed cost of running the forward at all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CHILD_ENV, du, parse_size, timed  # noqa: E402

BASELINE = """
import sys
from ckpt_ir.commands.verify import build_model, hf_side, transformers_config
import torch
ckpt, _ = hf_side(sys.argv[1])
build_model(transformers_config(ckpt), torch.bfloat16, torch.device("cpu"), None)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ckpt-ir-verify-bench")
    ap.add_argument("--size", default="1G", help="model bytes (default 1G: 8 layers)")
    args = ap.parse_args()
    hf, mc = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "mc")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    here = os.path.dirname(os.path.abspath(__file__))
    layers = subprocess.run(
        [sys.executable, os.path.join(here, "bench.py"), "--generate", hf, str(parse_size(args.size))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            hf,
            mc,
            "--to",
            "mcore",
            "--tp",
            "2",
            "--pp",
            "2",
            "--quiet",
        ],
        check=True,
        env=CHILD_ENV,
    )
    nbytes = du(hf)
    base_t, base_rss = timed([sys.executable, "-c", BASELINE, hf])
    t, rss = timed([sys.executable, "-m", "ckpt_ir", "verify", hf, mc])
    print(f"model: {layers} layers, {nbytes / 1e9:.3f} GB (bf16)")
    print(
        f"verify HF vs mcore TP2 PP2: {t:.1f}s, peak RSS {rss / 1e6:.0f} MB = {rss / nbytes:.1%} of the model "
        f"(target < 40%)"
    )
    print(
        f"fixed cost (torch + transformers imported, model built on meta): peak RSS {base_rss / 1e6:.0f} MB = "
        f"{base_rss / nbytes:.1%}; verify above it: {(rss - base_rss) / 1e6:.0f} MB = "
        f"{(rss - base_rss) / nbytes:.1%}"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if rss < 0.4 * nbytes else 1


if __name__ == "__main__":
    sys.exit(main())
