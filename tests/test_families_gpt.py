"""Classic GPT families of ``ckpt_ir/families/gpt.py``: tiny random models built and saved by
transformers (``tests/family_models.py``) convert HF -> Megatron-Core -> HF bit-exactly, with
transformers' logits on the result equal to the original's.  megatron-core's own logits on the
rank files are in ``test_megatron_oracle.py``; a Megatron-LM GPT converted to GPT-2 without an HF
config in ``test_megatron_args_only.py``."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import assert_round_trip, model_cache
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    # tied: with PP the last stage holds the output layer's copy of the embedding
    "gpt2": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "gpt")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


def test_gpt2_as_openai_released_it_is_read(models, tmp_path):
    """openai-community/gpt2 stores the bare GPT2Model's names (no ``transformer.`` prefix) and
    each layer's causal-mask buffers ``attn.bias`` / ``attn.masked_bias``, which transformers
    ignores: read as the same model (the buffers reported dropped), written in transformers'
    names."""
    src = models("gpt2")
    old = str(tmp_path / "old")
    os.makedirs(old)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(f"{src}/model.safetensors").items()}
    for i in range(4):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.uint8)).view(1, 1, 32, 32)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, f"{old}/model.safetensors", metadata={"format": "pt"})
    with open(f"{src}/config.json") as a, open(f"{old}/config.json", "w") as b:
        b.write(a.read())
    c = ck.load(old)
    assert sorted(c.dropped) == sorted(
        f"transformer.h.{i}.attn.{b}" for i in range(4) for b in ("bias", "masked_bias")
    )
    back = str(tmp_path / "back")
    convert(old, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_gpt2_peft_adapter_merge_equals_peft_merge_and_unload(models, tmp_path):
    """LoRA on GPT-2's Conv1D layers (peft's fan_in_fan_out: A [r, in] and B [out, r], the weight
    stored [in, out]; c_attn's B rows are [q; k; v]) and full copies of both c_proj modules
    (modules_to_save, stored [in, out] like their base) merge to exactly what peft gives."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.test_lora import cli

    base, adapter, out = models("gpt2"), str(tmp_path / "adapter"), str(tmp_path / "merged")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], modules_to_save=["c_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(adapter)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload().state_dict()
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    ours = hf_state(out)
    assert set(ours) <= set(merged)
    for k in ours:
        assert torch.equal(ours[k], merged[k]), k
