"""Shared fixtures: tiny random HF models built offline from transformers configs."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

# shape parameters per family; every model gets random values in *every* parameter (norms and
# biases too), so a swapped or dropped tensor cannot hide behind default initialisation
FAMILY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gemma": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16
    ),
    "gemma2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16
    ),
    "seed_oss": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "glm": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        pad_token_id=0,
        partial_rotary_factor=0.5,
    ),
    "phi3": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0
    ),
}


def build_hf(
    path: str,
    family: str = "llama",
    layers: int = 4,
    vocab: int = 128,
    tied: bool | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILY_CONFIGS[family], num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=128)
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model = model.to(dtype)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kw)
    return path


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """build_hf with caching across the session: returns a fresh copy under tmp for each call."""
    root = tmp_path_factory.mktemp("hf-cache")
    cache: dict[tuple, str] = {}
    counter = [0]

    def get(family: str = "llama", **kw) -> str:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_hf(str(root / f"{family}-{len(cache)}"), family, **kw)
        counter[0] += 1
        dst = str(root / f"copy-{counter[0]}")
        shutil.copytree(cache[key], dst)
        return dst

    return get


def files_of(path: str) -> dict[str, bytes]:
    out = {}
    for r, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(r, f), "rb") as fh:
                out[os.path.relpath(os.path.join(r, f), path)] = fh.read()
    return out
