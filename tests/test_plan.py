"""``ckpt-ir plan``: a conversion planned from config.json alone equals ``convert --dry-run`` of the
real checkpoint, refuses the same layouts, and sizes DeepSeek-V3 (671B + MTP) as transformers does."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tests.cli_contract import cli
from tests.test_deepseek import build_deepseek
from tests.test_moe import build_moe

FILE_LINE = re.compile(r"^(\S+)  \((\w+), (\d+) bytes\)$")
TENSOR_LINE = re.compile(r"^    (\S+)  (\S+) (\w+)  (\d+) B  <- ")


def dry_run_files(*args: object) -> dict[str, tuple[str, int, list[tuple[str, list[int], str, int]]]]:
    """``convert --dry-run``'s text, parsed: path -> (kind, bytes, [(tensor, shape, dtype, bytes)])."""
    r = cli("convert", *args, "--dry-run")
    assert r.returncode == 0, r.stderr
    files: dict = {}
    for line in r.stdout.splitlines():
        if m := FILE_LINE.match(line):
            current = files[m[1]] = (m[2], int(m[3]), [])
        elif m := TENSOR_LINE.match(line):
            current[2].append((m[1], [int(x) for x in m[2].split("x")], m[3], int(m[4])))
    return files


def plan_files(config_dir: object, *args: object) -> tuple[dict, dict]:
    r = cli("plan", "--hf-config", config_dir, *args, "--format", "json", "--tensors", "--disk-gbps", "1")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    files = {
        f["path"]: (
            f["kind"],
            f["bytes"],
            [(t["name"], t["shape"], t["dtype"], t["bytes"]) for t in f["tensor_list"]],
        )
        for f in s["files"]
    }
    return files, s


CASES = {
    "llama-tp2-pp3-padded-noop": (
        "llama",
        [
            "--to",
            "mcore",
            "--tp",
            "2",
            "--pp",
            "3",
            "--noop-layers",
            "1,5",
            "--make-vocab-size-divisible-by",
            "48",
            "--dtype",
            "bf16",
        ],
    ),
    "qwen2-vpp-te-names": (
        "qwen2",
        ["--to", "mcore", "--pp", "2", "--vpp-layers", "1", "--norm-names", "te"],
    ),
    "phi3-to-hf-sharded": ("phi3", ["--to", "hf", "--max-shard-size", "60KB"]),
    "gemma-tied-pp2": ("gemma", ["--to", "mcore", "--pp", "2"]),
    "qwen2_moe-ep2-grouped": ("qwen2_moe", ["--to", "mcore", "--tp", "2", "--ep", "2", "--moe-grouped-gemm"]),
    "mixtral-ep2-etp1": ("mixtral", ["--to", "mcore", "--tp", "2", "--ep", "2", "--etp", "1"]),
    "deepseek-mtp-pp3": ("deepseek_v3", ["--to", "mcore", "--pp", "3", "--ep", "2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_from_config_equals_dry_run_of_the_checkpoint(hf_cache, tmp_path, case):
    family, flags = CASES[case]
    if family in ("qwen2_moe", "mixtral"):
        src = build_moe(str(tmp_path / "src"), family, layers=3)
    elif family == "deepseek_v3":
        src = build_deepseek(str(tmp_path / "src"))  # with an MTP layer, which its config must announce
        cfg_path = tmp_path / "src" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["num_nextn_predict_layers"] = 1
        cfg_path.write_text(json.dumps(cfg))
    else:
        src = hf_cache(family, layers=4)
    dry = dry_run_files(src, tmp_path / "out", *flags)
    planned, summary = plan_files(src, *flags)
    assert planned == dry
    assert summary["file_count"] == len(dry) and summary["bytes_written"] == sum(f[1] for f in dry.values())
    assert summary["largest_tensor"]["bytes"] == max(t[3] for f in dry.values() for t in f[2])


def test_plan_refuses_what_convert_refuses(hf_cache, tmp_path):
    src = hf_cache("llama", layers=4)
    for flags in (
        ["--tp", "3"],
        ["--pp", "3"],
        ["--pp", "2", "--num-layer-list", "1,2"],
        ["--ep", "2"],
        ["--pp", "2", "--vpp-layers", "3"],
    ):
        a = cli("convert", src, tmp_path / "o", "--to", "mcore", *flags, "--dry-run")
        b = cli("plan", "--hf-config", src, "--to", "mcore", *flags, "--disk-gbps", "1")
        assert a.returncode == b.returncode != 0 and a.stderr == b.stderr and b.stderr.count("\n") == 1, flags
    r = cli("plan", "--hf-config", tmp_path, "--to", "hf")
    assert r.returncode == 1 and "no config.json" in r.stderr
    r = cli("plan", "--hf-config", src, "--to", "hf", "--output-dir", tmp_path / "missing")
    assert r.returncode == 2 and "--output-dir" in r.stderr


def test_disk_probe_is_used_when_no_speed_is_given(hf_cache, tmp_path):
    r = cli(
        "plan",
        "--hf-config",
        hf_cache("llama", layers=2),
        "--to",
        "hf",
        "--output-dir",
        tmp_path,
        "--format",
        "json",
    )
    s = json.loads(r.stdout)
    assert s["disk_gbps"] > 0 and s["disk_gbps_source"].startswith("measured on")
    assert s["expected_seconds"] == pytest.approx(
        (s["bytes_read"] + s["bytes_written"]) / (s["disk_gbps"] * 1e9)
    )
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def read_at_system_calls(monkeypatch, log_dir, source: str) -> None:
    """From now on every process (this one, and the writer processes it forks) logs each byte
    range of ``source`` it reads (pread, preadv, copy_file_range) to ``log_dir/<pid>``."""
    import os

    source = os.path.realpath(source)

    def logged(call, fd_arg: int, offset_arg: int):
        def wrapper(*args):
            n = call(*args)
            if os.readlink(f"/proc/self/fd/{args[fd_arg]}") == source:
                size = n if isinstance(n, int) else len(n)
                with open(os.path.join(log_dir, str(os.getpid())), "a") as log:
                    log.write(f"{args[offset_arg]} {size}\n")
            return n

        return wrapper

    monkeypatch.setattr(os, "pread", logged(os.pread, 0, 2))
    monkeypatch.setattr(os, "preadv", logged(os.preadv, 0, 2))
    monkeypatch.setattr(os, "copy_file_range", logged(os.copy_file_range, 0, 3))


def bytes_read_per_process(log_dir) -> int:
    """The source bytes each logged process read, each byte once per process, summed."""
    total = 0
    for log in log_dir.iterdir():
        seen = bytearray(1 << 24)
        for line in log.read_text().splitlines():
            offset, size = map(int, line.split())
            seen[offset : offset + size] = b"\x01" * size
        total += sum(seen)
    return total


@pytest.mark.parametrize("workers", [1, 2])
def test_plan_counts_the_bytes_the_conversion_reads(tmp_path, monkeypatch, workers):
    """TP 2 x EP 2 x PP 2 rank files repeat the norms and (under EP) the attention in every file
    that holds them.  ``plan`` and ``--dry-run`` count what the writers really read, measured
    here at the system calls: each source byte once per writer process that needs it; with one
    writer, every tensor once: the source's tensor bytes."""
    import ckpt_ir.api as ck

    src = build_moe(str(tmp_path / "src"), "mixtral", layers=2)
    flags = ["--to", "mcore", "--tp", "2", "--ep", "2", "--pp", "2", "--workers", str(workers)]
    r = cli("plan", "--hf-config", src, *flags, "--format", "json", "--disk-gbps", "1")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    dry = cli("convert", src, tmp_path / "dry", *flags, "--dry-run")
    dry_read = int(re.search(r"^total: \d+ bytes to write, (\d+) bytes to read", dry.stdout, re.M)[1])

    weights = tmp_path / "src" / "model.safetensors"
    source = ck.load(src)
    (tmp_path / "reads").mkdir()
    read_at_system_calls(monkeypatch, tmp_path / "reads", str(weights))
    target = ck.Target(to="mcore", tp=2, ep=2, pp=2)
    stats = ck.convert(source, str(tmp_path / "out"), target, workers=workers).stats
    monkeypatch.undo()
    measured = bytes_read_per_process(tmp_path / "reads")
    assert len(list((tmp_path / "reads").iterdir())) == workers
    assert planned["bytes_read"] == dry_read == stats["bytes_read"] == measured
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    if workers == 1:
        assert measured == weights.stat().st_size - header  # each tensor read once
    else:
        assert weights.stat().st_size - header < measured < planned["bytes_written"]
    assert planned["expected_seconds"] == pytest.approx((measured + planned["bytes_written"]) / 1e9)


# the published DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3), the values that decide shapes
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "num_nextn_predict_layers": 1,
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def meta_counts(**overrides) -> tuple[int, int]:
    """(parameters, persistent buffer elements) of the model transformers builds on the meta device."""
    import transformers

    cfg = {k: v for k, v in {**DEEPSEEK_V3, **overrides}.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("deepseek_v3", **cfg), dtype=torch.bfloat16
        )
    params = dict(model.named_parameters())
    buffers = [v for k, v in model.state_dict().items() if k not in params]
    assert all(b.dtype == torch.float32 for b in buffers)  # the routers' score-correction biases
    return sum(p.numel() for p in params.values()), sum(b.numel() for b in buffers)


def test_deepseek_v3_671b_plans_from_its_config_in_seconds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    layers = "3," + ",".join(["4"] * 14) + ",2"  # 61 layers over 16 stages
    t0 = time.monotonic()
    r = cli(
        "plan",
        "--hf-config",
        tmp_path,
        "--to",
        "mcore",
        "--tp",
        "8",
        "--pp",
        "16",
        "--ep",
        "64",
        "--etp",  # experts whole on their EP rank, as MoE runs at this scale train them
        "1",
        "--num-layer-list",
        layers,
        "--make-vocab-size-divisible-by",
        "128",
        "--format",
        "json",
        "--disk-gbps",
        "2",
    )
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    # every rank file, latest_checkpointed_iteration.txt, and the HF config kept in hf/: with expert
    # TP 1, Megatron's expert grid reuses the TP ranks, so each stage has the directories
    # mp_rank_{e % 8}_{stage}_{e} of its 64 EP ranks
    assert s["file_count"] == 16 * 64 + 2
    assert sum(f["path"] == "hf/config.json" for f in s["files"]) == 1
    # transformers builds the 61 main layers (no MTP layer: it neither loads nor saves them)
    params, biases = meta_counts()
    assert params == 671_026_404_352 and biases == 58 * 256
    # the MTP layer, counted apart: one MoE decoder layer as transformers builds it, plus the MTP
    # tensors of the released checkpoint (enorm, hnorm, eh_proj, shared_head.norm, and copies of
    # the embedding and output layer)
    one_layer, one_bias = meta_counts(num_hidden_layers=1, first_k_dense_replace=0)
    h, v = 7168, 129280
    embed_norm_head = 2 * v * h + h
    mtp = one_layer - embed_norm_head + 3 * h + 2 * h * h + 2 * v * h
    padded = 130048  # 129280 rounded up to a multiple of 128 x TP 8
    assert s["padded_vocab"] == padded
    # rows added to the embedding, the output layer and the MTP layer's copies of both, in bf16
    assert s["vocab_padding_bytes"] == 4 * (padded - v) * h * 2
    assert s["total_bytes"] == 2 * (params + mtp) + 4 * (biases + one_bias) + s["vocab_padding_bytes"]
    assert (
        s["bytes_written"] > s["total_bytes"]
    )  # norms, routers and the dense part repeat across TP/EP ranks
    print(
        f"DeepSeek-V3 TP8 PP16 EP64 ETP1 planned in {seconds:.1f}s: {s['total_bytes'] / 1e12:.3f} TB model, "
        f"{s['bytes_written'] / 1e12:.3f} TB in {s['file_count']} files"
    )
    assert seconds < 300  # a hang guard; the time itself is reported, not asserted (shared CI cores)


def test_deepseek_v3_fp8_release_plans_both_forms(tmp_path):
    """The published DeepSeek-V3 config with its fp8 quantization_config: the plan reads the FP8
    form (fp8 linears + one fp32 scale per 128x128 tile, the rest bf16) and writes bf16."""
    qcfg = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    (tmp_path / "config.json").write_text(json.dumps({**DEEPSEEK_V3, "quantization_config": qcfg}))
    r = cli("plan", "--hf-config", tmp_path, "--to", "hf", "--format", "json", "--disk-gbps", "2")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["pipeline"].startswith("dequantize")
    # the linears of the released checkpoint, from the config: attention (MLA) of 62 layers (61 +
    # MTP), the dense MLPs of 3 layers, 256 routed + 1 shared expert in 59 MoE layers, eh_proj
    h, heads, qk, v = 7168, 128, 128 + 64, 128
    attn = [(1536, h), (heads * qk, 1536), (512 + 64, h), (heads * (128 + v), 512), (h, heads * v)]
    dense = [(18432, h), (18432, h), (h, 18432)]
    expert = [(2048, h), (2048, h), (h, 2048)]
    linears = attn * 62 + dense * 3 + expert * 257 * 59 + [(h, 2 * h)]
    fp8 = sum(a * b for a, b in linears)
    scales = sum(-(-a // 128) * -(-b // 128) for a, b in linears)
    assert s["bytes_read"] == s["total_bytes"] - fp8 + 4 * scales  # fp8: 1 byte instead of 2; scales fp32
    print(
        f"DeepSeek-V3 FP8 release: {s['bytes_read'] / 1e9:.1f} GB read, {s['bytes_written'] / 1e9:.1f} GB bf16 written"
    )
