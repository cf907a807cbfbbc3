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

`--tasks move,compute,wide` chooses the task groups: `move` (the layout conversions above), `compute`
(bf16 -> fp32 and fp32 -> bf16 casts, a rank-16 LoRA merge on every linear, HF -> mcore TP2 in fp32
with vocab padding; each against `cp -r` + `sync` of a directory with the output's bytes, made
once beforehand), `dist` (HF -> torch_dist with and without `--verify-integrity`, and torch_dist
-> HF from a checkpoint without and with `integrity.json`, which is then checked first; against
`cp -r` + `sync` of the HF source) and `wide` (a 152k-vocab, 4096-hidden, 1-layer model converted HF -> mcore TP2
fp32 with `--make-vocab-size-divisible-by 128`: peak memory with embeddings of 1.2 GB per shard)
`fsdp` (HF -> Megatron-FSDP's `fsdp_dtensor` and back to HF) and `moe` (a Qwen3-MoE-shaped checkpoint with Qwen3-30B-A3B's widths: hidden 2048, 128 experts of
768, vocab 151936, as many layers as the size asks, about 400 tensors per layer in shards of about
1.2 GB; timed HF -> mcore EP8, mcore EP8 -> HF and mcore EP8 -> TP2 EP4, each against `cp -r` +
`sync` of its own source, the HF or the EP8 checkpoint; `--moe-stacked`: a Llama 4 text model of
the same widths, each layer's experts stacked in two [in, out] tensors) and `gpt2` (GPT-2 large's
widths, fp32, its Conv1D weights stored [in, out]: HF -> mcore TP2 PP2 and back, each against
`cp -r` + `sync` of its source), `hybrid` (Nemotron-H 8B's widths, bf16, the layer pattern
`M-M-M*-` repeated: Mamba-2 mixers, attention and squared-ReLU MLPs; HF -> mcore TP2 PP2 and back,
each against `cp -r` + `sync` of its source), `vlm` (Qwen2.5-VL 7B's widths, bf16: its 32-block
vision tower and as many language-model layers as the size asks; HF -> mcore TP2 PP2 and back in
Megatron-Bridge's layout (size label `v`) and in MindSpeed-MM's (`vm`: the tower split over TP, 16
vision layers per stage), each against `cp -r` + `sync` of its source).  `--torchrun N` also times HF -> mcore
EP8 under `torchrun --nproc-per-node N` and checks that its output is byte-identical to the
single-process one.  `fsdp2`: the same MoE model as MindSpeed-LLM's FSDP2 backend saves it (fp32,
`model.model.<name>` through its engine, transformers 5's fused experts `[E, 2F, H]` / `[E, H, F]`,
one torch.distributed.checkpoint.save), timed to HF against `cp -r` + `sync` of the step directory
and to mcore EP8 against `cp -r` + `sync` of an EP8 output (which repeats the embedding and head in
every rank directory).
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
# the wide-vocabulary model of the memory benchmark (Qwen2.5-7B's vocabulary and width)
SHAPES = {"llama": (HIDDEN, FFN, HEADS, KV_HEADS, VOCAB), "wide": (4096, 11008, 32, 8, 152064)}


# Qwen3-30B-A3B's widths (the MoE benchmark): hidden, heads, KV heads, head dim, experts, expert
# FFN, vocabulary
MOE = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, ffn=768, vocab=151936)
MOE_SHARD = 1_200_000_000
TINY_MOE = dict(hidden=512, heads=8, kv_heads=2, head_dim=64, ffn=256, vocab=4096)  # --moe-tiny


def use_shape(name: str) -> None:
    global HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, HEAD_DIM
    HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = SHAPES[name]
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


def generate(path: str, size: int, layers: int | None = None) -> int:
    """A llama-shaped bf16 HF checkpoint of about ``size`` bytes (or of ``layers`` layers);
    returns its layer count."""
    import torch
    from safetensors.torch import save_file

    per_layer = sum(2 * n for shape in layer_tensors(0).values() for n in [_numel(shape)])
    fixed = 2 * 2 * VOCAB * HIDDEN + 2 * HIDDEN
    layers = layers or max(4, round((size - fixed) / per_layer / 4) * 4)
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
    write_index(path, weight_map)
    json.dump(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "num_hidden_layers": layers,
            "vocab_size": VOCAB,
            "rms_norm_eps": 1e-5,
            "dtype": "bfloat16",
            "tie_word_embeddings": False,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return layers


def moe_layer_tensors(i: int, stacked: bool = False) -> dict[str, tuple[int, ...]]:
    """One MoE layer's HF tensors: Qwen3-MoE's, one tensor per expert; ``stacked``: Llama 4's text
    model, each layer's experts in two [in, out] tensors (gate_up_proj [E, H, 2F], down_proj
    [E, F, H]) and a shared expert."""
    h, d, E, f = MOE["hidden"], MOE["head_dim"], MOE["experts"], MOE["ffn"]
    p = f"model.layers.{i}."
    if stacked:
        q = p + "feed_forward."
        return {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (MOE["heads"] * d, h),
            p + "self_attn.k_proj.weight": (MOE["kv_heads"] * d, h),
            p + "self_attn.v_proj.weight": (MOE["kv_heads"] * d, h),
            p + "self_attn.o_proj.weight": (h, MOE["heads"] * d),
            p + "post_attention_layernorm.weight": (h,),
            q + "router.weight": (E, h),
            q + "experts.gate_up_proj": (E, h, 2 * f),
            q + "experts.down_proj": (E, f, h),
            q + "shared_expert.gate_proj.weight": (f, h),
            q + "shared_expert.up_proj.weight": (f, h),
            q + "shared_expert.down_proj.weight": (h, f),
        }
    out = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (MOE["heads"] * d, h),
        p + "self_attn.k_proj.weight": (MOE["kv_heads"] * d, h),
        p + "self_attn.v_proj.weight": (MOE["kv_heads"] * d, h),
        p + "self_attn.o_proj.weight": (h, MOE["heads"] * d),
        p + "self_attn.q_norm.weight": (d,),
        p + "self_attn.k_norm.weight": (d,),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate.weight": (E, h),
    }
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        out.update(
            {q + "gate_proj.weight": (f, h), q + "up_proj.weight": (f, h), q + "down_proj.weight": (h, f)}
        )
    return out


def generate_moe(path: str, size: int, stacked: bool = False) -> int:
    """A Qwen3-MoE-shaped bf16 HF checkpoint of about ``size`` bytes (at least one layer), in
    shards of about 1.2 GB as HF's ``save_pretrained`` splits them; returns its layer count.
    Written tensor by tensor (random finite bf16 bit patterns), so generating never holds a shard.
    ``stacked``: a Llama 4 text model of the same widths (see :func:`moe_layer_tensors`)."""
    import numpy as np

    h, vocab = MOE["hidden"], MOE["vocab"]
    per_layer = 2 * sum(_numel(s) for s in moe_layer_tensors(0, stacked).values())
    fixed = 2 * (2 * vocab * h + h)
    layers = max(1, round((size - fixed) / per_layer))
    tensors = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        tensors.update(moe_layer_tensors(i, stacked))
    tensors.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    shards: list[list[str]] = [[]]
    acc = 0
    for name, shape in tensors.items():
        if shards[-1] and acc + 2 * _numel(shape) > MOE_SHARD:
            shards.append([])
            acc = 0
        shards[-1].append(name)
        acc += 2 * _numel(shape)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for n in names:
            nbytes = 2 * _numel(tensors[n])
            header[n] = {"dtype": "BF16", "shape": list(tensors[n]), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for n in names:  # |x| in [2^-31, 1): exponent 0x60-0x7e, random mantissa and sign
                left = _numel(tensors[n])
                while left:
                    bits = rng.integers(0x3000, 0x3F80, size=min(left, 1 << 24), dtype=np.uint16)
                    bits |= rng.integers(0, 2, size=bits.size, dtype=np.uint16) << 15
                    out.write(bits.tobytes())
                    left -= bits.size
        weight_map.update({n: fname for n in names})
    write_index(path, weight_map)
    if stacked:
        json.dump(
            {
                "architectures": ["Llama4ForCausalLM"],
                "model_type": "llama4_text",
                "hidden_size": h,
                "intermediate_size": MOE["ffn"],
                "intermediate_size_mlp": 4 * MOE["ffn"],
                "num_local_experts": MOE["experts"],
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 1,
                "num_attention_heads": MOE["heads"],
                "num_key_value_heads": MOE["kv_heads"],
                "head_dim": MOE["head_dim"],
                "num_hidden_layers": layers,
                "vocab_size": vocab,
                "rms_norm_eps": 1e-5,
                "dtype": "bfloat16",
                "tie_word_embeddings": False,
            },
            open(os.path.join(path, "config.json"), "w"),
        )
        return layers
    json.dump(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": h,
            "intermediate_size": 6144,
            "moe_intermediate_size": MOE["ffn"],
            "num_experts": MOE["experts"],
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "num_attention_heads": MOE["heads"],
            "num_key_value_heads": MOE["kv_heads"],
            "head_dim": MOE["head_dim"],
            "num_hidden_layers": layers,
            "vocab_size": vocab,
            "rms_norm_eps": 1e-6,
            "dtype": "bfloat16",
            "tie_word_embeddings": False,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            "attention_bias": False,
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return layers


def generate_fsdp2(hf: str, path: str) -> None:
    """The HF checkpoint ``hf`` saved as MindSpeed-LLM's FSDP2 backend saves it at a step (see
    ckpt_ir/frontends/mindspeed_fsdp2.py): fp32, under the running transformers 5 model's names
    (each layer's experts fused), ``model.model.`` first, with torch.distributed.checkpoint."""
    import re

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))["weight_map"]
    state: dict[str, object] = {}
    experts: dict[tuple[str, str], dict[int, object]] = {}
    for fname in sorted(set(index.values())):
        with safe_open(os.path.join(hf, fname), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).float()
                m = re.match(r"^(.*\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$", name)
                if m:
                    experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
                else:
                    state["model." + name] = t
    for (stem, part), by_expert in list(experts.items()):
        if part == "gate":
            up = experts[(stem, "up")]
            fused = [torch.cat([by_expert[e], up[e]]) for e in sorted(by_expert)]
            state[f"model.{stem}gate_up_proj"] = torch.stack(fused)
        elif part == "down":
            state[f"model.{stem}down_proj"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    experts.clear()
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(path, single_file_per_rank=True))
    os.makedirs(os.path.join(path, "extra_state"))
    torch.save({"global_step": 1}, os.path.join(path, "extra_state", "extra_state_rank_0.pt"))


# GPT-2 large's widths (the gpt2 benchmark: Conv1D weights stored [in, out], fp32 as released; XL's 25
# heads do not split over TP 2)
GPT2 = dict(hidden=1280, heads=20, ffn=5120, vocab=50257, positions=1024)


def gpt2_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    h, f = GPT2["hidden"], GPT2["ffn"]
    out: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (GPT2["vocab"], h),
        "transformer.wpe.weight": (GPT2["positions"], h),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        out.update(
            {
                p + "ln_1.weight": (h,),
                p + "ln_1.bias": (h,),
                p + "attn.c_attn.weight": (h, 3 * h),
                p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h),
                p + "attn.c_proj.bias": (h,),
                p + "ln_2.weight": (h,),
                p + "ln_2.bias": (h,),
                p + "mlp.c_fc.weight": (h, f),
                p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, h),
                p + "mlp.c_proj.bias": (h,),
            }
        )
    out.update({"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)})
    return out


def write_random_shards(path: str, tensors: dict[str, tuple[int, ...]], dtype: str) -> None:
    """``tensors`` (name -> shape) of random values, |x| in [2^-31, 1) (exponent 0x60-0x7e, random
    mantissa and sign), as ``dtype`` ("F32" or "BF16") safetensors files of about 1.2 GB and their
    index, written without torch."""
    import numpy as np

    size = {"F32": 4, "BF16": 2}[dtype]
    # the bit patterns of 2^-31 and 1.0, and the sign bit, in the stored width
    low, high, sign, word = {
        "F32": (0x30000000, 0x3F800000, 31, np.uint32),
        "BF16": (0x3000, 0x3F80, 15, np.uint16),
    }[dtype]
    shards: list[list[str]] = [[]]
    acc = 0
    for name, shape in tensors.items():
        if shards[-1] and acc + size * _numel(shape) > MOE_SHARD:
            shards.append([])
            acc = 0
        shards[-1].append(name)
        acc += size * _numel(shape)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for n in names:
            nbytes = size * _numel(tensors[n])
            header[n] = {"dtype": dtype, "shape": list(tensors[n]), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for n in names:
                left = _numel(tensors[n])
                while left:
                    bits = rng.integers(low, high, size=min(left, 1 << 24), dtype=word)
                    bits |= rng.integers(0, 2, size=bits.size, dtype=word) << sign
                    out.write(bits.tobytes())
                    left -= bits.size
        weight_map.update({n: fname for n in names})
    write_index(path, weight_map)


def generate_gpt2(path: str, size: int) -> int:
    """A GPT-2-large-shaped fp32 HF checkpoint (tied) of about ``size`` bytes in shards of about
    1.2 GB, written without torch; returns its layer count."""

    per_layer = 4 * sum(_numel(s) for n, s in gpt2_tensors(1).items() if ".h." in n)
    fixed = 4 * sum(_numel(s) for n, s in gpt2_tensors(0).items())
    layers = max(2, round((size - fixed) / per_layer / 2) * 2)  # even: two pipeline stages
    write_random_shards(path, gpt2_tensors(layers), "F32")
    json.dump(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": GPT2["hidden"],
            "n_head": GPT2["heads"],
            "n_inner": None,
            "n_layer": layers,
            "n_positions": GPT2["positions"],
            "vocab_size": GPT2["vocab"],
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "dtype": "float32",
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return layers


def bench_gpt2(root: str, label: str, size: int, args) -> list[tuple]:
    """GPT-2 (weights read and written transposed): HF -> mcore TP2 PP2 (the vocabulary padded as
    Megatron-LM pads it: to a multiple of 128 x TP) and back, each against `cp -r` + `sync` of its
    source."""
    return bench_there_and_back(
        root, label, size, args, "gpt2", "GPT-2 large", ("--make-vocab-size-divisible-by", "128")
    )


# Nemotron-H 8B's widths (the hybrid benchmark): Mamba-2 mixers of 128 heads of 64 (state 128, 8
# groups), attention of 32 heads (8 KV heads of 128), squared-ReLU MLPs of 21504, vocab 131072
HYBRID = dict(hidden=4096, mheads=128, mhead=64, state=128, groups=8, heads=32, kv=8, ffn=21504, vocab=131072)
HYBRID_UNIT = "M-M-M*-"  # the pattern, repeated (Nemotron-H's is about this mix)


def hybrid_tensors(pattern: str) -> dict[str, tuple[int, ...]]:
    h, d = HYBRID["hidden"], HYBRID["mheads"] * HYBRID["mhead"]
    bc, hd = HYBRID["groups"] * HYBRID["state"], HYBRID["hidden"] // HYBRID["heads"]
    out: dict[str, tuple[int, ...]] = {"backbone.embeddings.weight": (HYBRID["vocab"], h)}
    for i, kind in enumerate(pattern):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = (h,)
        if kind == "M":
            out.update(
                {
                    p + "mixer.A_log": (HYBRID["mheads"],),
                    p + "mixer.D": (HYBRID["mheads"],),
                    p + "mixer.conv1d.bias": (d + 2 * bc,),
                    p + "mixer.conv1d.weight": (d + 2 * bc, 1, 4),
                    p + "mixer.dt_bias": (HYBRID["mheads"],),
                    p + "mixer.in_proj.weight": (2 * d + 2 * bc + HYBRID["mheads"], h),
                    p + "mixer.norm.weight": (d,),
                    p + "mixer.out_proj.weight": (h, d),
                }
            )
        elif kind == "*":
            out.update(
                {
                    p + "mixer.q_proj.weight": (HYBRID["heads"] * hd, h),
                    p + "mixer.k_proj.weight": (HYBRID["kv"] * hd, h),
                    p + "mixer.v_proj.weight": (HYBRID["kv"] * hd, h),
                    p + "mixer.o_proj.weight": (h, HYBRID["heads"] * hd),
                }
            )
        else:
            out.update(
                {
                    p + "mixer.up_proj.weight": (HYBRID["ffn"], h),
                    p + "mixer.down_proj.weight": (h, HYBRID["ffn"]),
                }
            )
    out.update({"backbone.norm_f.weight": (h,), "lm_head.weight": (HYBRID["vocab"], h)})
    return out


def generate_hybrid(path: str, size: int) -> int:
    """A Nemotron-H-shaped bf16 HF checkpoint (the pattern HYBRID_UNIT repeated) of about ``size``
    bytes in shards of about 1.2 GB, written without torch; returns its layer count."""

    unit = 2 * sum(_numel(s) for n, s in hybrid_tensors(HYBRID_UNIT).items() if ".layers." in n)
    fixed = 2 * sum(_numel(s) for s in hybrid_tensors("").values())
    pattern = HYBRID_UNIT * max(2, round((size - fixed) / unit / 2) * 2)  # even: two pipeline stages
    write_random_shards(path, hybrid_tensors(pattern), "BF16")
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    json.dump(
        {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "hidden_size": HYBRID["hidden"],
            "layers_block_type": [kinds[c] for c in pattern],
            "mamba_num_heads": HYBRID["mheads"],
            "mamba_head_dim": HYBRID["mhead"],
            "ssm_state_size": HYBRID["state"],
            "n_groups": HYBRID["groups"],
            "conv_kernel": 4,
            "num_attention_heads": HYBRID["heads"],
            "num_key_value_heads": HYBRID["kv"],
            "head_dim": HYBRID["hidden"] // HYBRID["heads"],
            "intermediate_size": HYBRID["ffn"],
            "mlp_hidden_act": "relu2",
            "vocab_size": HYBRID["vocab"],
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return len(pattern)


# Qwen2.5-VL 7B's widths (the vision-language benchmark): a 32-block ViT of 1280 (16 heads, gated
# MLP of 3420, merger to 3584), a Qwen2 language model of 3584 (28 heads, 4 KV heads), MLP 18944,
# vocabulary 152064, untied; the language model's layer count sets the size
VLM = dict(
    hidden=3584, heads=28, kv=4, ffn=18944, vocab=152064, vdepth=32, vhidden=1280, vheads=16, vffn=3420
)


def vlm_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    h, hd = VLM["hidden"], VLM["hidden"] // VLM["heads"]
    vh, merged = VLM["vhidden"], VLM["vhidden"] * 4
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VLM["vocab"], h),
        "visual.patch_embed.proj.weight": (vh, 3, 2, 14, 14),
    }
    for i in range(VLM["vdepth"]):
        p = f"visual.blocks.{i}."
        out.update(
            {
                p + "norm1.weight": (vh,),
                p + "norm2.weight": (vh,),
                p + "attn.qkv.weight": (3 * vh, vh),
                p + "attn.qkv.bias": (3 * vh,),
                p + "attn.proj.weight": (vh, vh),
                p + "attn.proj.bias": (vh,),
                **{p + f"mlp.{n}_proj.weight": (VLM["vffn"], vh) for n in ("gate", "up")},
                **{p + f"mlp.{n}_proj.bias": (VLM["vffn"],) for n in ("gate", "up")},
                p + "mlp.down_proj.weight": (vh, VLM["vffn"]),
                p + "mlp.down_proj.bias": (vh,),
            }
        )
    out.update(
        {
            "visual.merger.ln_q.weight": (vh,),
            "visual.merger.mlp.0.weight": (merged, merged),
            "visual.merger.mlp.0.bias": (merged,),
            "visual.merger.mlp.2.weight": (h, merged),
            "visual.merger.mlp.2.bias": (h,),
        }
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                **{p + f"self_attn.{n}_proj.weight": (VLM["kv"] * hd, h) for n in "kv"},
                **{p + f"self_attn.{n}_proj.bias": (VLM["kv"] * hd,) for n in "kv"},
                p + "self_attn.o_proj.weight": (h, h),
                **{p + f"mlp.{n}_proj.weight": (VLM["ffn"], h) for n in ("gate", "up")},
                p + "mlp.down_proj.weight": (h, VLM["ffn"]),
            }
        )
    out.update({"model.norm.weight": (h,), "lm_head.weight": (VLM["vocab"], h)})
    return out


def generate_vlm(path: str, size: int) -> int:
    """A Qwen2.5-VL-7B-shaped bf16 HF checkpoint of about ``size`` bytes (its language model's
    layers, an even number of them, make up the size), written without torch; returns that number."""
    layer = 2 * sum(_numel(s) for n, s in vlm_tensors(1).items() if n.startswith("model.layers."))
    fixed = 2 * sum(_numel(s) for s in vlm_tensors(0).values())
    layers = max(2, round((size - fixed) / layer / 2) * 2)
    write_random_shards(path, vlm_tensors(layers), "BF16")
    text = {
        "hidden_size": VLM["hidden"],
        "intermediate_size": VLM["ffn"],
        "num_attention_heads": VLM["heads"],
        "num_key_value_heads": VLM["kv"],
        "num_hidden_layers": layers,
        "vocab_size": VLM["vocab"],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": VLM["vdepth"],
        "hidden_size": VLM["vhidden"],
        "intermediate_size": VLM["vffn"],
        "num_heads": VLM["vheads"],
        "out_hidden_size": VLM["hidden"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "hidden_act": "silu",
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
    }
    json.dump(
        {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        },
        open(os.path.join(path, "config.json"), "w"),
    )
    return layers


def bench_vlm(root: str, label: str, size: int, args) -> list[tuple]:
    """The Qwen2.5-VL-shaped model: HF -> mcore TP2 PP2 and back in Megatron-Bridge's layout (the
    tower whole on stage 0) and in MindSpeed-MM's (the tower split over TP, its layers over both
    stages), each against `cp -r` + `sync` of its source."""
    rows = bench_there_and_back(root, label, size, args, "vlm", "Qwen2.5-VL 7B language-model")
    mindspeed = (
        "--mm-keys",
        "mindspeed",
        "--vision-layer-list",
        f"{VLM['vdepth'] // 2},{VLM['vdepth'] // 2}",
    )
    return rows + bench_there_and_back(
        root + "-mm", label + "m", size, args, "vlm", "Qwen2.5-VL 7B language-model", mindspeed
    )


def bench_hybrid(root: str, label: str, size: int, args) -> list[tuple]:
    """The Nemotron-H-shaped hybrid: HF -> mcore TP2 PP2 and back, each against `cp -r` + `sync`
    of its source."""
    return bench_there_and_back(root, label, size, args, "hybrid", "Nemotron-H 8B")


def bench_there_and_back(
    root: str, label: str, size: int, args, model: str, what: str, flags: tuple[str, ...] = ()
) -> list[tuple]:
    """Generate ``model`` (``--generate-<model>``), time HF -> mcore TP2 PP2 (``flags`` added)
    against `cp -r` + `sync` of the HF checkpoint and mcore -> HF against `cp -r` + `sync` of the
    TP2 PP2 one."""
    src = os.path.join(root, "hf")
    layers = int(subprocess.check_output([sys.executable, __file__, f"--generate-{model}", src, str(size)]))
    nbytes = du(src)
    print(f"[{label}] generated {nbytes / 1e9:.2f} GB, {layers} {what} layers", file=sys.stderr)
    out = {n: os.path.join(root, n) for n in ("tp2pp2", "back", "cp")}
    convert = lambda *a: [sys.executable, "-m", "ckpt_ir", "convert", *a, "--quiet", *args.extra.split()]  # noqa: E731
    tasks: dict[str, tuple[list[str], str, str]] = {
        "cp -r + sync": (["cp", "-r", src, out["cp"]], out["cp"], ""),
        f"{model} hf -> mcore tp2 pp2": (
            convert(src, out["tp2pp2"], "--to", "mcore", "--tp", "2", "--pp", "2", *flags),
            out["tp2pp2"],
            "cp -r + sync",
        ),
        "cp -r tp2pp2 + sync": (["cp", "-r", out["tp2pp2"], out["cp"]], out["cp"], ""),
        f"{model} mcore tp2pp2 -> hf": (
            convert(out["tp2pp2"], out["back"], "--to", "hf"),
            out["back"],
            "cp -r tp2pp2 + sync",
        ),
    }
    return time_tasks(tasks, {"cp -r + sync": src}, out["tp2pp2"], label, nbytes, args)


def write_index(path: str, weight_map: dict[str, str]) -> None:
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    json.dump(
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        open(os.path.join(path, "model.safetensors.index.json"), "w"),
    )


def generate_adapter(path: str, layers: int, rank: int = 16) -> None:
    """A PEFT LoRA adapter of ``rank`` on every linear of every layer (random A and B, bf16)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, shape in layer_tensors(i).items():
            if len(shape) != 2:  # norms
                continue
            rows, cols = shape
            prefix = "base_model.model." + name[: -len(".weight")]
            tensors[prefix + ".lora_A.weight"] = ((torch.rand(rank, cols, generator=g) - 0.5) / 8).to(
                torch.bfloat16
            )
            tensors[prefix + ".lora_B.weight"] = ((torch.rand(rows, rank, generator=g) - 0.5) / 8).to(
                torch.bfloat16
            )
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    json.dump(
        {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(LINEARS),
            "base_model_name_or_path": "bench",
        },
        open(os.path.join(path, "adapter_config.json"), "w"),
    )


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def read_all(path: str) -> None:
    """Read every file under ``path`` (into the page cache) through one small buffer: the
    children's peak RSS starts at this process's (see bench_model)."""
    buf = bytearray(1 << 20)
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(
            f"--cold: cannot drop the page cache ({e}); run as root or leave out --cold"
        ) from None


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
    if len(sys.argv) >= 4 and sys.argv[1] == "--generate":
        if len(sys.argv) == 6:  # --generate PATH SIZE SHAPE LAYERS
            use_shape(sys.argv[4])
        print(generate(sys.argv[2], int(sys.argv[3]), int(sys.argv[5]) if len(sys.argv) == 6 else None))
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "--generate-moe":  # PATH SIZE [tiny] [stacked]
        if "tiny" in sys.argv[4:]:
            MOE.update(TINY_MOE)
        print(generate_moe(sys.argv[2], parse_size(sys.argv[3]), "stacked" in sys.argv[4:]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--generate-fsdp2":  # --generate-fsdp2 HF STEP_DIR
        generate_fsdp2(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--generate-hybrid":
        print(generate_hybrid(sys.argv[2], parse_size(sys.argv[3])))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--generate-vlm":
        print(generate_vlm(sys.argv[2], parse_size(sys.argv[3])))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--generate-gpt2":
        print(generate_gpt2(sys.argv[2], parse_size(sys.argv[3])))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--adapter":
        generate_adapter(sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1G", help="comma-separated model sizes, e.g. 1G,2G,4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/ckpt-ir-bench")
    ap.add_argument("--keep", action="store_true", help="keep generated checkpoints")
    ap.add_argument("--extra", default="", help="extra flags for every ckpt-ir convert (e.g. '--workers 1')")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every task (needs root)")
    ap.add_argument(
        "--tasks",
        default="move",
        help="comma list of task groups: move (layout conversions), "
        "compute (casts, LoRA merge, fp32 + vocab padding), dist (torch_dist with and without "
        "integrity.json, written and read), fsdp (HF -> fsdp_dtensor -> HF), wide (wide-vocab model, memory), "
        "moe (Qwen3-MoE-shaped model: EP8 conversions), "
        "fsdp2 (that model as MindSpeed-LLM's FSDP2 backend saves it: to HF and to mcore EP8), "
        "gpt2 (GPT-2-large-shaped fp32 model: weights stored [in, out], read and written transposed), "
        "hybrid (Nemotron-H-8B-shaped bf16 Mamba / attention / MLP hybrid: HF -> mcore TP2 PP2 and back), "
        "vlm (Qwen2.5-VL-7B-shaped bf16 vision-language model: HF -> mcore TP2 PP2 and back in "
        "Megatron-Bridge's and MindSpeed-MM's layouts)",
    )
    ap.add_argument(
        "--moe-tiny",
        action="store_true",
        help="moe: narrow widths (hidden 512, experts of 256, vocab 4096) to check the benchmark quickly",
    )
    ap.add_argument(
        "--moe-stacked",
        action="store_true",
        help="moe: a Llama 4 text model of the same widths instead, each layer's experts stacked in "
        "two [in, out] tensors (gate_up_proj [E, H, 2F], down_proj [E, F, H])",
    )
    ap.add_argument(
        "--torchrun",
        type=int,
        default=0,
        metavar="N",
        help="moe: also time HF -> mcore EP8 under torchrun --nproc-per-node N (outputs compared)",
    )
    args = ap.parse_args()
    groups = set(args.tasks.split(","))
    rows = []
    for size_text in args.sizes.split(","):
        root = os.path.join(args.workdir, size_text)
        shutil.rmtree(root, ignore_errors=True)
        if groups & {"move", "compute", "dist", "fsdp"}:
            rows += bench_model(root, size_text, parse_size(size_text), "llama", groups - {"wide"}, args)
        if "wide" in groups:
            rows += bench_model(root + "-wide", size_text + "w", 0, "wide", {"wide"}, args)
        if "moe" in groups:
            rows += bench_moe(root + "-moe", size_text + "m", parse_size(size_text), args)
        if "fsdp2" in groups:
            rows += bench_fsdp2(root + "-fsdp2", size_text + "f", parse_size(size_text), args)
        if "gpt2" in groups:
            rows += bench_gpt2(root + "-gpt2", size_text + "g", parse_size(size_text), args)
        if "hybrid" in groups:
            rows += bench_hybrid(root + "-hybrid", size_text + "h", parse_size(size_text), args)
        if "vlm" in groups:
            rows += bench_vlm(root + "-vlm", size_text + "v", parse_size(size_text), args)
        if not args.keep:
            for suffix in ("", "-wide", "-moe", "-fsdp2", "-gpt2", "-hybrid", "-vlm", "-vlm-mm"):
                shutil.rmtree(root + suffix, ignore_errors=True)
    print(
        f"\n{'size':>5} {'task':34s} {'median s':>9} {'GB/s':>6} {'x cp':>6} {'x cp/B':>7} "
        f"{'peak RSS MB':>12} {'RSS/model':>10}"
    )
    for size_text, name, t, gbps, ratio, ratio_written, rss_mb, frac in rows:
        print(
            f"{size_text:>5} {name:34s} {t:9.2f} {gbps:6.2f} {ratio:6.2f} {ratio_written:7.2f} "
            f"{rss_mb:12.0f} {frac:10.1%}"
        )
    return 0


def bench_model(root: str, label: str, size: int, shape: str, groups: set[str], args) -> list[tuple]:
    """Generate one model, time the selected task groups in interleaved rounds; table rows."""
    ck = [sys.executable, "-m", "ckpt_ir"]
    extra = args.extra.split()
    src = os.path.join(root, "hf")
    # generate in a child process: the parent stays small, so children's peak RSS is their own
    # (Linux carries a parent's RSS high-water mark into forked children)
    gen = [sys.executable, __file__, "--generate", src, str(size)] + (
        ["wide", "1"] if shape == "wide" else []
    )
    layers = int(subprocess.check_output(gen))
    nbytes = du(src)
    print(f"[{label}] generated {nbytes / 1e9:.2f} GB, {layers} layers ({shape})", file=sys.stderr)
    names = ("tp2pp2", "tp1pp4", "back", "fp32", "bf16", "merged", "padded", "dist", "fsdp", "fsdp-back")
    out = {n: os.path.join(root, n) for n in names}
    convert = lambda *a: ck + ["convert", *a, "--quiet", *extra]  # noqa: E731
    pad_flags = ["--to", "mcore", "--tp", "2", "--dtype", "fp32", "--make-vocab-size-divisible-by", "128"]
    # task name -> (command, output, the cp task whose bytes equal the output's)
    tasks: dict[str, tuple[list[str], str, str]] = {}
    refs: dict[str, str] = {"cp -r + sync": src}
    if groups & {"move", "compute", "dist", "fsdp"}:
        tasks["cp -r + sync"] = (["cp", "-r", src, os.path.join(root, "cp")], os.path.join(root, "cp"), "")
    if "move" in groups:
        tasks["hf -> mcore tp2 pp2"] = (
            convert(src, out["tp2pp2"], "--to", "mcore", "--tp", "2", "--pp", "2"),
            out["tp2pp2"],
            "cp -r + sync",
        )
        tasks["mcore tp2pp2 -> tp1pp4"] = (
            convert(out["tp2pp2"], out["tp1pp4"], "--to", "mcore", "--tp", "1", "--pp", "4"),
            out["tp1pp4"],
            "cp -r + sync",
        )
        tasks["mcore -> hf"] = (
            convert(out["tp2pp2"], out["back"], "--to", "hf"),
            out["back"],
            "cp -r + sync",
        )
    if "compute" in groups:
        # references with the outputs' bytes, made once (untimed): cp of them is the baseline
        fp32_ref, padded_ref, adapter = (os.path.join(root, n) for n in ("ref-fp32", "ref-padded", "adapter"))
        subprocess.run(convert(src, fp32_ref, "--to", "hf", "--dtype", "fp32"), check=True, env=CHILD_ENV)
        subprocess.run(convert(src, padded_ref, *pad_flags), check=True, env=CHILD_ENV)
        subprocess.run([sys.executable, __file__, "--adapter", adapter, str(layers)], check=True)
        refs.update({"cp -r fp32 + sync": fp32_ref, "cp -r fp32 mcore + sync": padded_ref})
        for name in ("cp -r fp32 + sync", "cp -r fp32 mcore + sync"):
            tasks[name] = (["cp", "-r", refs[name], os.path.join(root, "cp2")], os.path.join(root, "cp2"), "")
        tasks["cast bf16 -> fp32"] = (
            convert(src, out["fp32"], "--to", "hf", "--dtype", "fp32"),
            out["fp32"],
            "cp -r fp32 + sync",
        )
        tasks["cast fp32 -> bf16"] = (
            convert(fp32_ref, out["bf16"], "--to", "hf", "--dtype", "bf16"),
            out["bf16"],
            "cp -r + sync",
        )
        tasks["lora merge (r16, all linears)"] = (
            convert(src, out["merged"], "--to", "hf", "--lora-load", adapter),
            out["merged"],
            "cp -r + sync",
        )
        tasks["hf -> mcore tp2 fp32 vocab pad"] = (
            convert(src, out["padded"], *pad_flags),
            out["padded"],
            "cp -r fp32 mcore + sync",
        )
    if "dist" in groups:
        # torch_dist with and without Megatron-Core's integrity.json (hashed after writing, checked
        # before reading); the sources of the reading tasks are made once (untimed)
        dist = ["--to", "mcore", "--ckpt-format", "torch_dist"]
        plain_ref, hashed_ref = (os.path.join(root, n) for n in ("ref-dist", "ref-dist-integrity"))
        subprocess.run(convert(src, plain_ref, *dist), check=True, env=CHILD_ENV)
        subprocess.run(convert(src, hashed_ref, *dist, "--verify-integrity"), check=True, env=CHILD_ENV)
        tasks["hf -> torch_dist"] = (convert(src, out["dist"], *dist), out["dist"], "cp -r + sync")
        tasks["hf -> torch_dist --verify-integrity"] = (
            convert(src, out["dist"], *dist, "--verify-integrity"),
            out["dist"],
            "cp -r + sync",
        )
        tasks["torch_dist -> hf"] = (
            convert(plain_ref, out["back"], "--to", "hf"),
            out["back"],
            "cp -r + sync",
        )
        tasks["torch_dist + integrity.json -> hf"] = (
            convert(hashed_ref, out["back"], "--to", "hf"),
            out["back"],
            "cp -r + sync",
        )
    if "fsdp" in groups:  # Megatron-FSDP's fsdp_dtensor: written, and read back (SwiGLU halves)
        tasks["hf -> fsdp_dtensor"] = (
            convert(src, out["fsdp"], "--to", "mcore", "--ckpt-format", "fsdp_dtensor"),
            out["fsdp"],
            "cp -r + sync",
        )
        tasks["fsdp_dtensor -> hf"] = (
            convert(out["fsdp"], out["fsdp-back"], "--to", "hf"),
            out["fsdp-back"],
            "cp -r + sync",
        )
    if "wide" in groups:
        tasks["hf -> mcore tp2 fp32 vocab pad"] = (convert(src, out["padded"], *pad_flags), out["padded"], "")
    return time_tasks(tasks, refs, (out["tp2pp2"], out["fsdp"]), label, nbytes, args)


def time_tasks(
    tasks: dict[str, tuple[list[str], str, str]],
    refs: dict[str, str],
    kept: tuple[str, ...],
    label: str,
    nbytes: int,
    args,
) -> list[tuple]:
    """Run ``tasks`` (name -> command, output, baseline task) in ``args.runs`` interleaved rounds;
    outputs are deleted once timed, except those in ``kept`` (read by later tasks).  Table rows."""
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in tasks}
    written: dict[str, int] = {}  # bytes each task's output holds
    for run in range(args.runs):
        for name, (cmd, dst, _) in tasks.items():
            shutil.rmtree(dst, ignore_errors=True)
            # untimed: the previous outputs' deletion is committed (and its blocks discarded) now,
            # not during the next task, and the task's inputs are in the page cache as `cp`'s are
            # (the 8 GB references read in between would otherwise evict some of them)
            os.sync()
            if not args.cold:
                for path in cmd:
                    if path != dst and os.path.isdir(path):
                        read_all(path)
            results[name].append(timed(cmd, args.cold))
            print(f"[{label}] run {run + 1} {name}: {results[name][-1][0]:.2f}s", file=sys.stderr)
            written[name] = du(dst)
            if dst not in kept:  # later tasks read it
                shutil.rmtree(dst, ignore_errors=True)
    rows = []
    for name, res in results.items():
        t = statistics.median(x for x, _ in res)
        base = tasks[name][2] or (name if name in refs else "")
        ratio = ratio_written = float("nan")
        if base in results:
            ratio = t / statistics.median(x for x, _ in results[base])
            # the yardstick scaled to the bytes this task writes (a replicated tower, padding)
            ratio_written = ratio * written[base] / written[name] if written[name] else ratio
        rss = max(r for _, r in res)
        rows.append((label, name, t, nbytes / t / 1e9, ratio, ratio_written, rss / 1e6, rss / nbytes))
    return rows


def bench_moe(root: str, label: str, size: int, args) -> list[tuple]:
    """The MoE model: HF -> mcore EP8, mcore EP8 -> HF, EP8 -> TP2 EP4 (and HF -> EP8 under
    torchrun), each against `cp -r` + `sync` of its own source (the HF or the EP8 checkpoint)."""
    src = os.path.join(root, "hf")
    gen = (
        [sys.executable, __file__, "--generate-moe", src, str(size)]
        + (["tiny"] if args.moe_tiny else [])
        + (["stacked"] if args.moe_stacked else [])
    )
    layers = int(subprocess.check_output(gen))
    nbytes = du(src)
    count = len(json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"])
    print(f"[{label}] generated {nbytes / 1e9:.2f} GB, {layers} MoE layers, {count} tensors", file=sys.stderr)
    out = {n: os.path.join(root, n) for n in ("ep8", "back", "tp2ep4", "dist", "cp")}
    convert = lambda *a: [sys.executable, "-m", "ckpt_ir", "convert", *a, "--quiet", *args.extra.split()]  # noqa: E731
    tasks: dict[str, tuple[list[str], str, str]] = {
        "cp -r + sync": (["cp", "-r", src, out["cp"]], out["cp"], ""),
        "hf -> mcore ep8": (
            convert(src, out["ep8"], "--to", "mcore", "--ep", "8"),
            out["ep8"],
            "cp -r + sync",
        ),
        # the EP8 checkpoint is the source of the next two tasks: their yardstick is cp of it
        "cp -r ep8 + sync": (["cp", "-r", out["ep8"], out["cp"]], out["cp"], ""),
        "mcore ep8 -> hf": (convert(out["ep8"], out["back"], "--to", "hf"), out["back"], "cp -r ep8 + sync"),
        "mcore ep8 -> tp2 ep4": (
            convert(out["ep8"], out["tp2ep4"], "--to", "mcore", "--tp", "2", "--ep", "4"),
            out["tp2ep4"],
            "cp -r ep8 + sync",
        ),
    }
    if args.torchrun:
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.torchrun)]
        cmd = (
            run
            + ["--master-port", str(29500 + os.getpid() % 1000), "-m", "ckpt_ir"]
            + convert(src, out["dist"], "--to", "mcore", "--ep", "8")[3:]
        )
        tasks[f"hf -> mcore ep8, torchrun x{args.torchrun}"] = (cmd, out["dist"], "cp -r + sync")
        # compared once, untimed: the torchrun output must be the single process's, byte for byte
        subprocess.run(convert(src, out["ep8"], "--to", "mcore", "--ep", "8"), check=True, env=CHILD_ENV)
        subprocess.run(cmd, check=True, env=CHILD_ENV, stdout=subprocess.DEVNULL)
        same = (
            subprocess.run(["diff", "-rq", out["ep8"], out["dist"]], stdout=subprocess.DEVNULL).returncode
            == 0
        )
        print(f"[{label}] torchrun output byte-identical to one process: {same}", file=sys.stderr)
        if not same:
            raise SystemExit(f"torchrun output {out['dist']} differs from {out['ep8']}")
        shutil.rmtree(out["ep8"])
        shutil.rmtree(out["dist"])
    return time_tasks(tasks, {"cp -r + sync": src}, (out["ep8"],), label, nbytes, args)


def bench_fsdp2(root: str, label: str, size: int, args) -> list[tuple]:
    """The MoE model of bench_moe (``size`` in bf16, so twice that in fp32) as MindSpeed-LLM's FSDP2
    backend saves it: to HF and to mcore EP8, each against `cp -r` + `sync` of the step directory."""
    hf, step = os.path.join(root, "hf"), os.path.join(root, "checkpoints", "global_step_1")
    gen = [sys.executable, __file__, "--generate-moe", hf, str(size)] + (["tiny"] if args.moe_tiny else [])
    layers = int(subprocess.check_output(gen))
    subprocess.run(
        [sys.executable, __file__, "--generate-fsdp2", hf, step], check=True, stderr=subprocess.DEVNULL
    )
    nbytes = du(step)
    print(f"[{label}] generated {nbytes / 1e9:.2f} GB FSDP2 step, {layers} MoE layers", file=sys.stderr)
    out = {n: os.path.join(root, n) for n in ("hf-out", "ep8", "ref-ep8", "cp")}
    convert = lambda *a: [sys.executable, "-m", "ckpt_ir", "convert", *a, "--quiet", *args.extra.split()]  # noqa: E731
    to_ep8 = ("--to", "mcore", "--ep", "8", "--hf-config", hf)
    # EP8 repeats the embedding and head in every rank directory: its yardstick is cp of its own
    # bytes (made once, untimed), as for the compute tasks
    subprocess.run(convert(step, out["ref-ep8"], *to_ep8), check=True, env=CHILD_ENV)
    tasks: dict[str, tuple[list[str], str, str]] = {
        "cp -r + sync": (["cp", "-r", step, out["cp"]], out["cp"], ""),
        "mindspeed fsdp2 -> hf": (
            convert(step, out["hf-out"], "--to", "hf", "--hf-config", hf),
            out["hf-out"],
            "cp -r + sync",
        ),
        "cp -r ep8 + sync": (["cp", "-r", out["ref-ep8"], out["cp"]], out["cp"], ""),
        "mindspeed fsdp2 -> mcore ep8": (convert(step, out["ep8"], *to_ep8), out["ep8"], "cp -r ep8 + sync"),
    }
    return time_tasks(tasks, {"cp -r + sync": step}, (), label, nbytes, args)


if __name__ == "__main__":
    sys.exit(main())
