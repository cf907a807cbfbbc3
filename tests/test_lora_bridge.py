"""Megatron-Bridge's own LoRA names: ``X.adapter.linear_in.weight`` (A) and
``X.adapter.linear_out.weight`` (B) beside the wrapped module's ``X.weight``
(peft/adapter_wrapper.py:226, 229), split over TP as its ParallelLinearAdapter holds them
(peft/utils.py:1033-1081): a column-parallel module's A split on dim 0 and B like the weight, a
row-parallel module's A split on dim 1 and B on dim 0; an nn.Linear of the HF-form vision tower
wrapped by LinearAdapter, whole (peft/lora.py:178-187); alpha in run_config.yaml's ``peft.alpha``
(models/conversion/auto_bridge.py:1640-1646).  The Bridge-named rank files are made here from
MindSpeed-named ones by those rules, tensor by tensor, independent of ckpt-ir's writer."""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from tests.conftest import build_hf
from tests.test_families_vlm import build, vl_logits
from tests.test_hf_roundtrip import assert_same_tensors, convert
from tests.test_lora import IDS, add_megatron_lora, deinterleave_qkv, model_spec
from tests.test_lora_vlm import make_adapter, peft_vl_logits

R, ALPHA = 4, 8.0  # test_lora's and test_lora_vlm's
SCALE = ALPHA / R
COLUMN, ROW = ("linear_qkv", "linear_fc1"), ("linear_proj", "linear_fc2")
MINDSPEED_AB = (".lora_A.default.weight", ".lora_B.default.weight")
BRIDGE_AB = (".adapter.linear_in.weight", ".adapter.linear_out.weight")


def rank_files(ckpt: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt, "*", "mp_rank_*", "model_optim_rng.pt")))


def to_bridge(src: str, dst: str, tp: int) -> None:
    """Megatron-Bridge's rank files of the MindSpeed-named LoRA checkpoint ``src`` (TP ``tp``): its
    factors renamed and re-split by Bridge's rules, the base weight ``X.weight`` (``base_layer``
    gone), alpha only in run_config.yaml."""
    shutil.copytree(src, dst)
    whole: dict[str, list[torch.Tensor]] = {}  # a factor MindSpeed keeps whole: each rank's copy
    for f in rank_files(src):
        for k, v in torch.load(f, weights_only=False)["model"].items():
            whole.setdefault(k, []).append(v)
    for f in rank_files(dst):
        t = int(os.path.basename(os.path.dirname(f))[len("mp_rank_") :][:2])
        ckpt = torch.load(f, weights_only=False)
        model = {}
        for k, v in ckpt["model"].items():
            k = k.replace(".base_layer.weight", ".weight")
            for which, (ms, br) in enumerate(zip(MINDSPEED_AB, BRIDGE_AB)):
                if not k.endswith(ms):
                    continue
                stem = k[: -len(ms)]
                module = stem.rsplit(".", 1)[-1]
                if tp > 1 and (module in COLUMN and which == 0 or module in ROW and which == 1):
                    assert all(torch.equal(c, v) for c in whole[k])  # whole on every rank
                    v = v.chunk(tp, 0)[t].clone()  # Bridge: ColumnParallelLinear(.., gather_output)
                k = stem + br
            model[k] = v
        ckpt["model"] = model
        for name in ("lora_alpha", "lora_r"):
            if hasattr(ckpt["args"], name):
                delattr(ckpt["args"], name)
        torch.save(ckpt, f)
    with open(os.path.join(dst, "run_config.yaml"), "w") as fh:
        fh.write(f"peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  dim: {R}\n  alpha: {ALPHA:g}\n")


def save(src: str, dst: str, target: ck.Target, passes: str | None = None) -> None:
    c = ck.load(src)
    pipeline = ck.parse_pipeline(passes) if passes else ck.derive_pipeline(c, target)
    ck.save(ck.run(c, pipeline), dst, target)


def same_rank_files(a: str, b: str) -> None:
    fa, fb = rank_files(a), rank_files(b)
    assert [os.path.relpath(f, a) for f in fa] == [os.path.relpath(f, b) for f in fb]
    for x, y in zip(fa, fb):
        sa, sb = (torch.load(f, weights_only=False)["model"] for f in (x, y))
        sa, sb = ({k: v for k, v in s.items() if torch.is_tensor(v)} for s in (sa, sb))
        assert sorted(sa) == sorted(sb), (x, sorted(set(sa) ^ set(sb))[:4])
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (x, k)


def test_llama_bridge_lora_tp2_to_peft_merged_and_back(tmp_path):
    base = build_hf(str(tmp_path / "base"), "llama", layers=2)
    mindspeed, bridge = str(tmp_path / "mindspeed"), str(tmp_path / "bridge")
    convert(base, mindspeed, ck.Target(to="mcore", tp=2))
    spec = {**model_spec("llama"), "layers": 2}
    full = add_megatron_lora(mindspeed, spec, tp=2, pp=1)
    to_bridge(mindspeed, bridge, tp=2)
    sd = torch.load(rank_files(bridge)[1], weights_only=False)["model"]
    A, B = full[1]["linear_qkv"]
    assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.adapter.linear_in.weight"], A[R // 2 :])
    A, B = full[1]["linear_fc2"]
    assert torch.equal(sd["decoder.layers.1.mlp.linear_fc2.adapter.linear_out.weight"], B.chunk(2)[1])

    exported = {n: str(tmp_path / f"peft-{n}") for n in ("mindspeed", "bridge")}
    for naming, src in (("mindspeed", mindspeed), ("bridge", bridge)):
        save(src, exported[naming], ck.Target(to="peft"))
    a, b = (
        load_file(os.path.join(exported[n], "adapter_model.safetensors")) for n in ("mindspeed", "bridge")
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.load(open(os.path.join(exported["bridge"], "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)  # alpha from run_config.yaml

    merged = str(tmp_path / "merged")
    save(bridge, merged, ck.Target(to="hf"))
    w, m = (
        load_file(os.path.join(base, "model.safetensors")),
        load_file(os.path.join(merged, "model.safetensors")),
    )
    A, B = full[1]["linear_qkv"]
    for name, bq in zip(("q_proj", "k_proj", "v_proj"), deinterleave_qkv(B, spec)):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert torch.equal(m[key], w[key] + (bq @ A) * SCALE), key
    A, B = full[0]["linear_fc2"]
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(m[key], w[key] + (B @ A) * SCALE)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), exported["bridge"]
    )
    with torch.no_grad():
        got = model(IDS).logits
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(IDS).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    oracle = model.merge_and_unload().state_dict()
    assert all(torch.equal(v, oracle[k]) for k, v in m.items())

    # written in Bridge's names from MindSpeed's and back: the files made above, tensor for tensor
    written, back = str(tmp_path / "written"), str(tmp_path / "back")
    save(mindspeed, written, ck.Target(to="mcore", tp=2, lora_keys="bridge"))
    same_rank_files(bridge, written)
    save(written, back, ck.Target(to="mcore", tp=2, lora_keys="mindspeed"))
    save(back, str(tmp_path / "again"), ck.Target(to="mcore", tp=2, lora_keys="bridge"))
    same_rank_files(bridge, str(tmp_path / "again"))


def test_qwen2_5_vl_bridge_lora_on_language_model_and_tower(tmp_path):
    """LoRA that one Megatron module holds (the language model's linear_proj / linear_fc2, the
    tower's packed qkv and attn.proj) made by peft, written MindSpeed-named in Megatron-Bridge's
    VLM layout at TP 2, re-named and re-split as Bridge holds it: exported and merged as peft."""
    base = build(str(tmp_path / "base"), "qwen2_5_vl")
    adapter, oracle = str(tmp_path / "adapter"), str(tmp_path / "oracle")
    make_adapter(base, adapter, ["o_proj", "down_proj", "qkv", "attn.proj"], seed=2).save_pretrained(oracle)
    theirs = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    mindspeed, bridge, written = (str(tmp_path / n) for n in ("mindspeed", "bridge", "written"))
    passes = "fuse-qkv,fuse-gate-up,shard{tp=2},rename-norms{names=te}"
    save(base, mindspeed, ck.Target(to="mcore"), f"attach-lora{{path={adapter}}},{passes}")
    to_bridge(mindspeed, bridge, tp=2)
    sd = torch.load(rank_files(bridge)[0], weights_only=False)["model"]
    a = theirs["base_model.model.model.language_model.layers.1.self_attn.o_proj.lora_B.weight"]
    assert torch.equal(
        sd["language_model.decoder.layers.1.self_attention.linear_proj.adapter.linear_out.weight"],
        a[: a.shape[0] // 2],
    )
    qkv = theirs["base_model.model.model.visual.blocks.1.attn.qkv.lora_A.weight"]
    assert torch.equal(sd["visual.blocks.1.attn.qkv.adapter.linear_in.weight"], qkv)  # whole

    exported, merged = str(tmp_path / "peft"), str(tmp_path / "merged")
    save(bridge, exported, ck.Target(to="peft"))
    save(bridge, merged, ck.Target(to="hf"))
    assert_same_tensors(oracle, merged)  # peft's merge_and_unload, bit for bit
    ours = load_file(os.path.join(exported, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    got = peft_vl_logits(base, exported)
    assert torch.allclose(got, vl_logits(merged), atol=1e-4, rtol=1e-5)

    save(mindspeed, written, ck.Target(to="mcore", tp=2, lora_keys="bridge"))
    same_rank_files(bridge, written)
