"""Benchmark: peak memory of `ckpt-ir verify` on a ~1 GB, 8-layer model (not a test).

    python bench/verify_memory.py --workdir /tmp/ckpt-ir-verify-bench [--size 1G] [--vlm]

Generates the synthetic llama-shaped bf16 HF checkpoint of bench.py (8 layers at 1G), converts it
to Megatron-Core TP2 PP2, then runs `ckpt-ir verify HF MCORE` (bf16 forward on 16 tokens, the
Megatron side gathered lazily) as a fresh process and reports its peak RSS as a fraction of the
model's bytes.  ``--vlm``: a random bf16 Qwen2.5-VL instead, about ``--size`` bytes in 8 language
model layers and 8 vision blocks of the same width (transformers builds and saves it), verified on
16 tokens plus the default generated image, the tower unit by unit too.  Verify holds one unit's weights at a time (a decoder layer, or the embedding or
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
build_model(transformers_config(ckpt), torch.bfloat16, torch.device("cpu"), None, image=ckpt.spec.vision is not None)
"""

# a Qwen2.5-VL of about SIZE bytes in bf16: 8 text layers and 8 vision blocks of width HIDDEN with
# gated 4x MLPs (16 HIDDEN^2 parameters each, 32 HIDDEN^2 bytes), the merger (20 HIDDEN^2
# parameters), an untied 32k vocabulary (4 x 32000 HIDDEN bytes): 552 HIDDEN^2 + 128000 HIDDEN bytes
VLM = """
import sys, math, torch
from transformers import AutoConfig, AutoModelForImageTextToText
size, path = int(sys.argv[1]), sys.argv[2]
hidden = 128 * round((-128000 + math.sqrt(128000**2 + 4 * 552 * size)) / (2 * 552) / 128)  # even heads: TP 2
text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64, num_hidden_layers=8, vocab_size=32000, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
vision = dict(depth=8, hidden_size=hidden, intermediate_size=4 * hidden, num_heads=hidden // 64,
              out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
              fullatt_block_indexes=[3, 7], window_size=112)
cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, image_token_id=31990,
                           video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(path)
print(hidden)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ckpt-ir-verify-bench")
    ap.add_argument("--size", default="1G", help="model bytes (default 1G: 8 layers)")
    ap.add_argument("--vlm", action="store_true", help="a Qwen2.5-VL (language model and vision tower)")
    args = ap.parse_args()
    hf, mc = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "mc")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    here = os.path.dirname(os.path.abspath(__file__))
    if args.vlm:
        hidden = subprocess.run(
            [sys.executable, "-c", VLM, str(parse_size(args.size)), hf],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        what = f"Qwen2.5-VL, 8 layers + 8 vision blocks of width {hidden}"
    else:
        layers = subprocess.run(
            [sys.executable, os.path.join(here, "bench.py"), "--generate", hf, str(parse_size(args.size))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        what = f"{layers} layers"
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
    print(f"model: {what}, {nbytes / 1e9:.3f} GB (bf16)")
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
