"""LoRA on vision-language models: adapters on the language model and the vision tower.

* A PEFT adapter made by peft itself on a tiny transformers VLM (targets in the language model and
  the tower; peft names the modules transformers builds, ``model.language_model.*``,
  ``model.visual.*``, ``model.vision_tower.*``) merges into the base as peft's merge_and_unload
  does, bit for bit, to HF directly and through Megatron-Bridge's layout at TP 2.
* A Megatron checkpoint with LoRA on both (Megatron-Bridge's layout: the tower's HF modules
  with ``X.lora_A.default.weight`` beside ``X.weight``; MindSpeed-MM's: ``image_encoder`` keys,
  the tower's qkv one head after another, split over the tower's TP) exports with ``--to peft``
  to an adapter that peft loads onto the HF model with the merged model's logits on text + image.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.errors import UsageError
from tests import test_families_internvl, test_families_qwen3vl
from tests.family_models import rank
from tests.test_families_vlm import build, vl_inputs, vl_logits
from tests.test_hf_roundtrip import assert_same_tensors, convert

R, ALPHA = 4, 8.0
# targets in both stacks: peft's target_modules rule (a name, or its end after a dot); "attn.proj"
# is Qwen2.5-VL's tower attention output only (plain "proj" would also take its patch convolution)
TARGETS = {
    "qwen2_5_vl": ["q_proj", "v_proj", "qkv", "attn.proj", "gate_proj"],
    "gemma3": ["q_proj", "v_proj", "out_proj", "fc1"],
    # transformers' llava renames (language_model.model.* stored, model.language_model.* built);
    # q_proj / v_proj in the language model and the tower, the projector's linear_1
    "internvl": ["q_proj", "v_proj", "projection_layer", "linear_1"],
    # stored as built; linear_fc1 in the tower's MLPs, its merger and the DeepStack mergers
    "qwen3_vl": ["q_proj", "v_proj", "qkv", "attn.proj", "linear_fc1"],
}
# the base models (test modules' builders) and the in-memory prefix of each tower
BUILD = {
    "internvl": lambda path, family: test_families_internvl.build(path),
    "qwen3_vl": test_families_qwen3vl.build,
}
TOWER = {"gemma3": "model.vision_tower.", "internvl": "model.vision_tower."}
# a merged tower weight kept whole on every TP rank of Megatron-Bridge's layout (a tower in
# transformers' form); InternVL goes to MindSpeed-MM's layout, Qwen3-VL's tower to Megatron's
WHOLE = {
    "qwen2_5_vl": "visual.blocks.1.attn.qkv.weight",
    "gemma3": "vision_tower.encoder.layers.1.self_attn.q_proj.weight",
}


def make_adapter(base: str, out: str, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter made by peft on the transformers model of ``base``, every factor random;
    returns peft's merge_and_unload state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload()


def peft_vl_logits(base: str, adapter: str) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        return model(**vl_inputs(base)).logits


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_adapter_on_language_model_and_tower_merges_as_peft(tmp_path, family):
    base = BUILD.get(family, build)(str(tmp_path / "base"), family)
    adapter, oracle = str(tmp_path / "adapter"), str(tmp_path / "oracle")
    make_adapter(base, adapter, TARGETS[family], seed=1).save_pretrained(oracle)
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    tower = TOWER.get(family, "model.visual.")
    assert any(k.startswith("base_model.model." + tower) for k in keys)
    assert any(k.startswith("base_model.model.model.language_model.") for k in keys)

    merged, mid, back = (str(tmp_path / n) for n in ("merged", "mid", "back"))
    flags = dict(lora_load=adapter, lora_targets=tuple(TARGETS[family]))
    convert(base, merged, ck.Target(to="hf", **flags))
    assert_same_tensors(oracle, merged)  # bit for bit: peft's merge in fp32 is W + s * (B @ A)
    convert(base, mid, ck.Target(to="mcore", tp=2, **flags))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(oracle, back)
    # the tower whole on both TP ranks of Megatron-Bridge's layout, merged
    if family in WHOLE:
        key, want = WHOLE[family], load_file(os.path.join(oracle, "model.safetensors"))
        for t in range(2):
            assert torch.equal(rank(mid, f"mp_rank_{t:02d}")["model"][key], want[key])
    with pytest.raises(UsageError, match="no LoRA tensors for fc2"):
        convert(
            base,
            str(tmp_path / "no"),
            ck.Target(to="hf", lora_load=adapter, lora_targets=(*TARGETS[family], "fc2")),
        )


def test_megatron_lora_on_language_model_and_tower_exports_to_peft(tmp_path):
    """Megatron LoRA on targets one Megatron module holds (the language model's linear_proj and
    linear_fc2, the tower's qkv with one A, its output and down projections) in both layouts."""
    base = build(str(tmp_path / "base"), "qwen2_5_vl")
    adapter, oracle = str(tmp_path / "adapter"), str(tmp_path / "oracle")
    make_adapter(base, adapter, ["o_proj", "down_proj", "qkv", "attn.proj"], seed=2).save_pretrained(oracle)
    theirs = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(base, "config.json")))["vision_config"]
    width, heads = cfg["hidden_size"], cfg["num_heads"]
    d = width // heads
    qkv_b = theirs["base_model.model.model.visual.blocks.1.attn.qkv.lora_B.weight"]
    per_head = torch.cat([qkv_b[p * width + h * d :][:d] for h in range(heads) for p in range(3)])
    layouts = {
        "bridge": "fuse-qkv,fuse-gate-up,shard{tp=2},rename-norms{names=te}",
        "mindspeed": "fuse-qkv,fuse-gate-up,fuse-vision,rename-mm{keys=mindspeed},shard{tp=2 vision-tp=2}",
    }
    for naming, passes in layouts.items():
        mid, exported, merged = (str(tmp_path / f"{n}-{naming}") for n in ("mid", "peft", "merged"))
        c = ck.load(base)
        ck.save(
            ck.run(c, ck.parse_pipeline(f"attach-lora{{path={adapter}}},{passes}")),
            mid,
            ck.Target(to="mcore"),
        )
        # the files hold the LoRA as the format puts it: Megatron-Bridge's tower HF modules whole on
        # each TP rank; MindSpeed-MM's tower qkv one head after another, B split by heads
        for t in range(2):
            if naming == "bridge":
                sd = rank(mid, f"mp_rank_{t:02d}")["model"]
                assert torch.equal(sd["visual.blocks.1.attn.qkv.lora_B.default.weight"], qkv_b)
            else:
                sd = torch.load(f"{mid}/release/mp_rank_{t:02d}/model_optim_rng.pt", weights_only=False)[
                    "model"
                ]
                key = "image_encoder.encoder.blocks.layers.1.self_attention.linear_qkv.lora_B.default.weight"
                assert torch.equal(sd[key], per_head.chunk(2)[t])
        # MindSpeed-MM's files keep no args: the HF config and alpha come from the command line
        load = dict(hf_config=base) if naming == "mindspeed" else {}
        alpha = ALPHA if naming == "mindspeed" else None
        for dst, to in ((exported, "peft"), (merged, "hf")):
            c = ck.load(mid, **load)
            target = ck.Target(to=to, lora_alpha=alpha)
            ck.save(ck.run(c, ck.derive_pipeline(c, target)), dst, target)
        assert_same_tensors(oracle, merged)
        ours = load_file(os.path.join(exported, "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
        written = json.load(open(os.path.join(exported, "adapter_config.json")))
        assert sorted(written["target_modules"]) == ["attn.proj", "down_proj", "o_proj", "qkv"]
        got = peft_vl_logits(base, exported)
        assert torch.allclose(got, vl_logits(merged), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(got, vl_logits(base), atol=1e-2)


def test_peft_adapter_in_internvls_remote_names_merges(tmp_path):
    """An adapter made on InternVL's remote-code model names its modules as that model stores
    them (``vision_model.encoder.layers.N.attn.proj``, ``mlp1.1``; one LoRA on the packed
    ``attn.qkv`` = [q; k; v]): merged into the remote checkpoint it gives peft's merge of the same
    factors on the transformers model, in the remote names, bit for bit."""
    from safetensors.torch import save_file

    from tests.test_families_internvl import remote_name, write_remote
    from tests.test_hf_roundtrip import hf_state

    base = test_families_internvl.build(str(tmp_path / "base"))
    remote = write_remote(base, str(tmp_path / "remote"))
    adapter, oracle = str(tmp_path / "adapter"), str(tmp_path / "oracle")
    targets = ["self_attn.q_proj", "self_attn.v_proj", "projection_layer", "fc1", "linear_1"]
    make_adapter(base, adapter, targets, seed=3).save_pretrained(oracle)
    # the adapter in the remote names: transformers' llava prefixes back to the stored names
    # (conversion_mapping.py:888-893), then the remote code's
    stored = (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    theirs = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    ours = {}
    for key, x in theirs.items():
        module, factor = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        for memory, disk in stored:
            module = disk + module[len(memory) :] if module.startswith(memory) else module
        ours[f"base_model.model.{remote_name(module + '.weight')[: -len('.weight')]}.lora_{factor}"] = x
    g = torch.Generator().manual_seed(4)
    qkv = "vision_model.encoder.layers.1.attn.qkv"
    a, b = torch.randn(R, 32, generator=g), torch.randn(96, R, generator=g)
    ours.update({f"base_model.model.{qkv}.lora_A.weight": a, f"base_model.model.{qkv}.lora_B.weight": b})
    os.makedirs(tmp_path / "remote-adapter")
    save_file(ours, str(tmp_path / "remote-adapter" / "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    (tmp_path / "remote-adapter" / "adapter_config.json").write_text(json.dumps(cfg))

    merged = str(tmp_path / "merged")
    convert(remote, merged, ck.Target(to="hf", lora_load=str(tmp_path / "remote-adapter")))
    want = hf_state(write_remote(oracle, str(tmp_path / "want")))
    w = want[qkv + ".weight"]
    want[qkv + ".weight"] = torch.cat(
        [w[32 * p :][:32] + (ALPHA / R) * (b[32 * p :][:32] @ a) for p in range(3)]
    )
    got = hf_state(merged)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
