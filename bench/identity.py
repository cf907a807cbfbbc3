"""Byte identity of outputs across a change: run a fixed set of conversions and hash every file.

    python bench/identity.py OUT_DIR                 # writes OUT_DIR/manifest.json
    python bench/identity.py --compare A.json B.json # exit 1 when any output file differs

Run it on the commit before a refactor and on the one after; the manifests must be equal. The models
are tiny random transformers models (seeded), built offline; every conversion goes through the
``ckpt-ir`` command line, so the check covers the CLI, the derived pipelines and the writers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

DENSE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,
    max_position_embeddings=128,
)
MODELS: dict[str, dict] = {
    "llama": dict(DENSE, num_hidden_layers=5),
    "qwen2": dict(DENSE, num_hidden_layers=4),
    "mixtral": dict(DENSE, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        DENSE,
        num_hidden_layers=3,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    "bloom": dict(hidden_size=64, n_head=4, n_layer=4, vocab_size=250),
}

# (name, source, extra args): sources are model names or earlier outputs
CONVERSIONS: list[tuple[str, str, list[str]]] = [
    ("llama-tp2pp2", "llama", ["--to", "mcore", "--tp", "2", "--pp", "2", "--num-layer-list", "2,3"]),
    ("llama-vpp", "llama", ["--to", "mcore", "--pp", "2", "--vpp-layers", "1", "--noop-layers", "5"]),
    ("llama-pad", "llama", ["--to", "mcore", "--tp", "2", "--make-vocab-size-divisible-by", "64"]),
    ("llama-bf16", "llama", ["--to", "hf", "--dtype", "bf16"]),
    ("llama-dist", "llama", ["--to", "mcore", "--ckpt-format", "torch_dist"]),
    ("llama-back", "llama-tp2pp2", ["--to", "hf"]),
    ("llama-reshard", "llama-tp2pp2", ["--to", "mcore", "--tp", "1", "--pp", "1"]),
    ("llama-dist-back", "llama-dist", ["--to", "hf"]),
    ("qwen2-tp2", "qwen2", ["--to", "mcore", "--tp", "2", "--norm-names", "te"]),
    ("qwen2-back", "qwen2-tp2", ["--to", "hf"]),
    ("mixtral-ep2", "mixtral", ["--to", "mcore", "--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    ("mixtral-back", "mixtral-ep2", ["--to", "hf"]),
    ("ds3-tp2ep2", "deepseek_v3", ["--to", "mcore", "--tp", "2", "--ep", "2", "--pp", "1"]),
    ("ds3-back", "ds3-tp2ep2", ["--to", "hf"]),
    ("ds3-dist", "deepseek_v3", ["--to", "mcore", "--ckpt-format", "torch_dist"]),
    ("bloom-tp2", "bloom", ["--to", "mcore", "--tp", "2"]),
    ("bloom-back", "bloom-tp2", ["--to", "hf"]),
]


def build(root: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for family, kw in MODELS.items():
        cfg = AutoConfig.for_model(family, **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        model.save_pretrained(os.path.join(root, family))


def digest(path: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(out.items()))


def run(root: str) -> dict[str, dict[str, str]]:
    os.makedirs(root, exist_ok=True)
    build(root)
    manifest: dict[str, dict[str, str]] = {}
    for name, src, extra in CONVERSIONS:
        dst = os.path.join(root, name)
        cmd = [sys.executable, "-m", "ckpt_ir", "convert", os.path.join(root, src), dst, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            manifest[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            manifest[name] = digest(dst)
        print(f"{name}: {len(manifest[name])} file(s)", file=sys.stderr)
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--compare", action="store_true", help="compare two manifests")
    a = ap.parse_args()
    if a.compare:
        one, two = (json.load(open(p)) for p in a.paths)
        bad = [
            f"{conv}/{f}"
            for conv in sorted(set(one) | set(two))
            for f in sorted(set(one.get(conv, {})) | set(two.get(conv, {})))
            if one.get(conv, {}).get(f) != two.get(conv, {}).get(f)
        ]
        print("\n".join(bad) if bad else f"identical: {sum(len(v) for v in one.values())} files")
        return 1 if bad else 0
    manifest = run(a.paths[0])
    with open(os.path.join(a.paths[0], "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
