"""HF -> IR -> HF is bit-exact for every family, and transformers gives the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from tests.conftest import FAMILY_CONFIGS


def hf_state(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for n in sorted(os.listdir(path)):
        if n.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, n)))
    return out


def assert_same_tensors(a: str, b: str) -> None:
    sa, sb = hf_state(a), hf_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8)), (
            f"{k} differs"
        )


def logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        # safetensors maps the file: a tensor's data sits at its offset there, and torch's grouped_mm
        # (transformers' MoE experts) rounds differently at another alignment (6e-7 for equal Gemma 4
        # experts behind headers of other lengths); fresh allocations make equal tensors give equal logits
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()
        return model(ids).logits


def convert(src: str, dst: str, target: ck.Target) -> None:
    c = ck.load(src)
    ck.save(ck.run(c, ck.derive_pipeline(c, target)), dst, target)


IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_hf_to_hf_bit_exact_with_same_logits(hf_cache, tmp_path, family):
    src = hf_cache(family)
    dst = str(tmp_path / "out")
    convert(src, dst, ck.Target(to="hf"))
    assert_same_tensors(src, dst)
    assert torch.equal(logits(src, IDS), logits(dst, IDS))


# per family: the Megatron layout of its round trip (TP 2 where the key/value heads split in two)
MCORE_LAYOUTS = {
    family: dict(tp=2 if cfg["num_key_value_heads"] % 2 == 0 else 1, pp=2)
    for family, cfg in sorted(FAMILY_CONFIGS.items())
}


@pytest.mark.parametrize("family", list(MCORE_LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact(hf_cache, tmp_path, family):
    src = hf_cache(family)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **MCORE_LAYOUTS[family]))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert torch.equal(logits(src, IDS), logits(back, IDS))


def test_sharded_input_with_index(hf_cache, tmp_path):
    src = hf_cache("qwen2", max_shard_size="100KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    dst = str(tmp_path / "out")
    convert(src, dst, ck.Target(to="hf", max_shard_size=150_000))
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    shards = {f for f in os.listdir(dst) if f.endswith(".safetensors")}
    assert set(index["weight_map"].values()) == shards and len(shards) > 1
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in hf_state(dst).values()
    )
    for f in shards:  # the cap is respected unless one tensor alone is larger
        assert os.path.getsize(os.path.join(dst, f)) < 150_000 + 40_000
    assert_same_tensors(src, dst)
    assert torch.equal(logits(src, IDS), logits(dst, IDS))


def test_bf16_model_round_trip_keeps_dtype(hf_cache, tmp_path):
    src = hf_cache("qwen3", dtype=torch.bfloat16)
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert all(t.dtype == torch.bfloat16 for t in hf_state(back).values())
    assert json.load(open(os.path.join(back, "config.json")))["dtype"] == "bfloat16"


def test_cast_to_bf16_rounds_once(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = str(tmp_path / "bf16")
    convert(src, dst, ck.Target(to="hf", dtype="bf16"))
    a, b = hf_state(src), hf_state(dst)
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k])


def test_bin_weights_are_read_safely(hf_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_cache("llama")
    bin_dir = str(tmp_path / "bin")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    os.makedirs(bin_dir)
    torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    model.config.save_pretrained(bin_dir)
    dst = str(tmp_path / "out")
    convert(bin_dir, dst, ck.Target(to="hf"))
    assert_same_tensors(src, dst)


def test_tokenizer_and_generation_files_are_copied(hf_cache, tmp_path):
    src = hf_cache("llama")
    for name, text in (
        ("tokenizer_config.json", "{}"),
        ("tokenizer.json", '{"x": 1}'),
        ("special_tokens_map.json", "{}"),
    ):
        with open(os.path.join(src, name), "w") as f:
            f.write(text)
    dst = str(tmp_path / "out")
    convert(src, dst, ck.Target(to="hf"))
    for name in (
        "tokenizer_config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert open(os.path.join(src, name)).read() == open(os.path.join(dst, name)).read()
