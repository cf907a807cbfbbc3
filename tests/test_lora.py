"""LoRA: merge (fp32 accumulate, one rounding), PEFT import equals peft's merge_and_unload, and
Megatron LoRA (TP=2, PP=2) exported as a PEFT adapter that peft loads with the merged logits."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_server import run_cli
from tests.conftest import FAMILY_CONFIGS, build_hf

R, ALPHA = 4, 8.0
SCALE = ALPHA / R
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = run_cli(list(args), timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def make_peft_adapter(
    base: str, out: str, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)
    )
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)


def peft_logits(base: str, adapter: str) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        return model(IDS).logits


def hf_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_of_peft_adapter_equals_peft_merge_and_unload(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_hf(str(tmp_path / "base"), family, layers=2)
    adapter = str(tmp_path / "adapter")
    make_peft_adapter(base, adapter)
    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        .merge_and_unload()
        .state_dict()
    )
    out = str(tmp_path / "merged")
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert set(ours) <= set(merged)
    for k, v in ours.items():
        assert torch.equal(v, merged[k]), k


def test_bf16_merge_rounds_once(tmp_path):
    base = build_hf(str(tmp_path / "base"), "llama", layers=2, dtype=torch.bfloat16)
    adapter = str(tmp_path / "adapter")
    make_peft_adapter(base, adapter, targets=("q_proj", "down_proj"))
    out = str(tmp_path / "merged")
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    w = load_file(os.path.join(base, "model.safetensors"))
    a = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    ours = load_file(os.path.join(out, "model.safetensors"))
    for layer in range(2):
        for mod, key in (("self_attn.q_proj", "q_proj"), ("mlp.down_proj", "down_proj")):
            prefix = f"base_model.model.model.layers.{layer}.{mod}"
            A, B = a[prefix + ".lora_A.weight"].float(), a[prefix + ".lora_B.weight"].float()
            W = w[f"model.layers.{layer}.{mod}.weight"]
            want = (W.float() + (B @ A) * SCALE).to(torch.bfloat16)
            got = ours[f"model.layers.{layer}.{mod}.weight"]
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), (layer, key)


# ---------------------------------------------------------------------------------------------
# Megatron LoRA checkpoints, written here from the format rules (independent of ckpt-ir)


def add_megatron_lora(mcore: str, spec: dict, tp: int, pp: int, lora_only_dir: str | None = None) -> dict:
    """Add random LoRA on linear_qkv/proj/fc1/fc2 to every rank file (base renamed base_layer).
    Returns the full (unsharded) A and B per global layer and module."""
    h, f = spec["hidden"], spec["ffn"]
    qkv_rows, q_size = spec["qkv_rows"], spec["q_size"]
    layers_per_stage = spec["layers"] // pp
    g = torch.Generator().manual_seed(11)
    full = {}
    for layer in range(spec["layers"]):
        full[layer] = {
            "linear_qkv": (torch.randn(R, h, generator=g), torch.randn(qkv_rows, R, generator=g)),
            "linear_proj": (torch.randn(R, q_size, generator=g), torch.randn(h, R, generator=g)),
            "linear_fc1": (torch.randn(R, h, generator=g), torch.randn(2 * f, R, generator=g)),
            "linear_fc2": (torch.randn(R, f, generator=g), torch.randn(h, R, generator=g)),
        }
    for stage in range(pp):
        for rank in range(tp):
            rel = os.path.join(
                "iter_0000001",
                f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""),
                "model_optim_rng.pt",
            )
            path = os.path.join(mcore, rel)
            ckpt = torch.load(path, weights_only=False)
            model, lora_only = {}, {}
            for k, v in ckpt["model"].items():
                parts = k.split(".")
                module = parts[-2] if len(parts) > 2 else ""
                if (
                    module in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
                    and parts[-1] == "weight"
                ):
                    local = int(parts[2])
                    A, B = full[stage * layers_per_stage + local][module]
                    if module in ("linear_qkv",):
                        a, b = A, B.chunk(tp, 0)[rank]
                    elif module == "linear_fc1":
                        gate, up = B.chunk(2, 0)
                        a, b = A, torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
                    else:  # row-parallel: A split on dim 1, B replicated
                        a, b = A.chunk(tp, 1)[rank], B
                    stem = k[: -len(".weight")]
                    model[stem + ".base_layer.weight"] = v
                    for key, t in (
                        (stem + ".lora_A.default.weight", a),
                        (stem + ".lora_B.default.weight", b),
                    ):
                        model[key] = t.contiguous()
                        lora_only[key] = t.contiguous()
                else:
                    model[k] = v
            ckpt["args"].lora_r, ckpt["args"].lora_alpha = R, ALPHA
            if lora_only_dir is None:
                ckpt["model"] = model
                torch.save(ckpt, path)
            else:
                os.makedirs(os.path.dirname(os.path.join(lora_only_dir, rel)), exist_ok=True)
                torch.save(dict(ckpt, model=lora_only), os.path.join(lora_only_dir, rel))
    if lora_only_dir is not None:
        with open(os.path.join(lora_only_dir, "latest_checkpointed_iteration.txt"), "w") as fh:
            fh.write("1")
    return full


def model_spec(family: str) -> dict:
    c = FAMILY_CONFIGS[family]
    d = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {
        "hidden": c["hidden_size"],
        "ffn": c["intermediate_size"],
        "q_size": q,
        "qkv_rows": q + 2 * kv,
        "layers": 4,
        "heads": c["num_attention_heads"],
        "groups": c["num_key_value_heads"],
        "head_dim": d,
    }


def deinterleave_qkv(b: torch.Tensor, spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query group: heads/groups query heads, then one key head, then one value head."""
    d, per = spec["head_dim"], spec["heads"] // spec["groups"]
    q, k, v, pos = [], [], [], 0
    for _ in range(spec["groups"]):
        q.append(b[pos : pos + per * d])
        k.append(b[pos + per * d : pos + per * d + d])
        v.append(b[pos + per * d + d : pos + per * d + 2 * d])
        pos += (per + 2) * d
    return torch.cat(q), torch.cat(k), torch.cat(v)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_megatron_lora_tp2_pp2_to_peft_and_merged(tmp_path, family):
    base = build_hf(str(tmp_path / "base"), family, layers=4)
    mcore = str(tmp_path / "mcore")
    cli("convert", base, mcore, "--to", "mcore", "--tp", "2", "--pp", "2")
    spec = model_spec(family)
    full = add_megatron_lora(mcore, spec, tp=2, pp=2)

    merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
    cli(
        "convert",
        mcore,
        merged,
        "--to",
        "hf",
        "--lora-target-modules",
        "linear_qkv",
        "linear_proj",
        "linear_fc1",
        "linear_fc2",
    )
    stderr = cli("convert", mcore, adapter, "--to", "peft").stderr
    # the adapter alone; the base model's side files (beside its weights) are named as left out
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    side = sorted(n for n in os.listdir(base) if not n.endswith(".safetensors"))
    assert "config.json" in side
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dropped:") and "side files" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"dropped: {', '.join(side)}: "), stderr
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == (R, ALPHA, "CAUSAL_LM")
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    # oracle 1: peft applies the exported adapter to the HF base and matches the merged model
    assert torch.allclose(peft_logits(base, adapter), hf_logits(merged), atol=1e-4, rtol=1e-5)
    # oracle 2: merged weights equal W + (alpha/r) B A, computed here from the format rules
    w, m = (
        load_file(os.path.join(base, "model.safetensors")),
        load_file(os.path.join(merged, "model.safetensors")),
    )
    for layer in (0, 3):
        A, B = full[layer]["linear_qkv"]
        for name, b in zip(("q_proj", "k_proj", "v_proj"), deinterleave_qkv(B, spec)):
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            assert torch.equal(m[key], w[key] + (b @ A) * SCALE), key
        A, B = full[layer]["linear_fc1"]
        gate_b, up_b = B.chunk(2, 0)
        assert torch.equal(
            m[f"model.layers.{layer}.mlp.gate_proj.weight"],
            w[f"model.layers.{layer}.mlp.gate_proj.weight"] + (gate_b @ A) * SCALE,
        )
        assert torch.equal(
            m[f"model.layers.{layer}.mlp.up_proj.weight"],
            w[f"model.layers.{layer}.mlp.up_proj.weight"] + (up_b @ A) * SCALE,
        )
        A, B = full[layer]["linear_fc2"]
        assert torch.equal(
            m[f"model.layers.{layer}.mlp.down_proj.weight"],
            w[f"model.layers.{layer}.mlp.down_proj.weight"] + (B @ A) * SCALE,
        )


def test_lora_only_checkpoint_with_lora_load_matches_unified(tmp_path):
    base = build_hf(str(tmp_path / "base"), "llama", layers=4)
    unified, separate, lora_dir = (str(tmp_path / n) for n in ("unified", "separate", "lora"))
    cli("convert", base, unified, "--to", "mcore", "--tp", "2", "--pp", "2")
    cli("convert", base, separate, "--to", "mcore", "--tp", "2", "--pp", "2")
    spec = model_spec("llama")
    add_megatron_lora(unified, spec, tp=2, pp=2)
    add_megatron_lora(separate, spec, tp=2, pp=2, lora_only_dir=lora_dir)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli("convert", unified, a, "--to", "hf")
    cli("convert", separate, b, "--to", "hf", "--lora-load", lora_dir)
    assert cli("diff", a, b).returncode == 0
    assert cli("diff", a, base, check=False).returncode == 1  # the merge really changed weights


def test_flag_mismatches_are_clear_errors(tmp_path):
    base = build_hf(str(tmp_path / "base"), "llama", layers=2)
    mcore = str(tmp_path / "mcore")
    cli("convert", base, mcore, "--to", "mcore", "--tp", "2")
    add_megatron_lora(mcore, dict(model_spec("llama"), layers=2), tp=2, pp=1)
    cases = [
        (["--lora-r", "8"], "--lora-r 8 given but the LoRA tensors have rank 4"),
        (["--lora-alpha", "16"], "--lora-alpha 16 given but the checkpoint says lora_alpha=8"),
        (["--lora-target-modules", "linear_qkv", "linear_proj"], "not in the list"),
        (["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "q_proj"], None),
        (
            [
                "--lora-target-modules",
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            None,
        ),
        (["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1"], "linear_fc2"),
        (["--lora-target-modules", "bogus"], "unknown module 'bogus'"),
    ]
    for i, (flags, fragment) in enumerate(cases):
        dst = str(tmp_path / f"o{i}")
        r = cli("convert", mcore, dst, "--to", "hf", *flags, check=False)
        if fragment is None:
            assert r.returncode == 0, r.stderr
            continue
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(dst)
    # an adapter without a recorded alpha needs the flag
    for stage_file in [
        os.path.join(mcore, "iter_0000001", d, "model_optim_rng.pt")
        for d in os.listdir(os.path.join(mcore, "iter_0000001"))
    ]:
        ck = torch.load(stage_file, weights_only=False)
        del ck["args"].lora_alpha
        torch.save(ck, stage_file)
    r = cli("convert", mcore, str(tmp_path / "x"), "--to", "hf", check=False)
    assert r.returncode == 2 and "pass --lora-alpha" in r.stderr
    cli("convert", mcore, str(tmp_path / "y"), "--to", "hf", "--lora-alpha", "8")
    r = cli("convert", base, str(tmp_path / "z"), "--to", "peft", check=False)
    assert r.returncode == 2 and "--lora-load" in r.stderr


def test_mindspeed_lora_flags(tmp_path):
    base = build_hf(str(tmp_path / "base"), "qwen2", layers=4)
    mcore = str(tmp_path / "mcore")
    cli("convert", base, mcore, "--to", "mcore", "--tp", "2", "--pp", "2")
    lora_dir = str(tmp_path / "lora")
    add_megatron_lora(mcore, model_spec("qwen2"), tp=2, pp=2, lora_only_dir=lora_dir)
    merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
    common = [
        "--load-model-type",
        "mg",
        "--model-type-hf",
        "qwen25",
        "--load-dir",
        mcore,
        "--lora-load",
        lora_dir,
        "--lora-r",
        str(R),
        "--lora-alpha",
        "8",
        "--lora-target-modules",
        "linear_qkv",
        "linear_proj",
        "linear_fc1",
        "linear_fc2",
        "--load-checkpoint-loosely",
    ]
    cli("convert-ckpt", *common, "--save-model-type", "hf", "--save-dir", merged)
    cli("convert-ckpt", *common, "--save-model-type", "hf", "--save-lora-to-hf", "--save-dir", adapter)
    assert torch.allclose(peft_logits(base, adapter), hf_logits(merged), atol=1e-4, rtol=1e-5)


def test_lora_training_optimizer_state_is_reported_not_carried(tmp_path):
    """A LoRA run's distributed-optimizer state covers the adapters only (the frozen base has
    none): converting to Megatron merges the adapters and lists that state as dropped."""
    base = build_hf(str(tmp_path / "base"), "llama", layers=2)
    mcore = str(tmp_path / "mcore")
    cli("convert", base, mcore, "--to", "mcore", "--tp", "2")
    add_megatron_lora(mcore, dict(model_spec("llama"), layers=2), tp=2, pp=1)
    it = os.path.join(mcore, "iter_0000001")
    for d in os.listdir(it):
        torch.save({"buckets_coalesced": True}, os.path.join(it, d, "distrib_optim.pt"))
    out = str(tmp_path / "merged")
    r = cli("convert", mcore, out, "--to", "mcore", "--tp", "1", "--dry-run")
    assert "distributed-optimizer state of LoRA adapters" in r.stdout
    cli("convert", mcore, out, "--to", "mcore", "--tp", "1")
    assert os.listdir(os.path.join(out, "iter_0000001", "mp_rank_00")) == ["model_optim_rng.pt"]
