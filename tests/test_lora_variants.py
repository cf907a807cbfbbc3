"""LoRA as people train it with peft: rsLoRA, rank/alpha patterns, DoRA, modules_to_save, all of
them together, and LoRA on MoE experts (transformers 5's fused experts via target_parameters, and
per-expert modules as transformers 4 named them).  Every adapter is made by peft itself with
random (non-zero) factors; the oracles are peft's own merge_and_unload written to disk by
transformers, and peft loading the adapter ckpt-ir exports."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_server import run_cli
from tests.conftest import build_hf
from tests.test_moe import build_moe

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "rslora": dict(target_modules=DENSE, use_rslora=True),
    "patterns": dict(
        target_modules=DENSE,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3, "o_proj": 16},
    ),
    "dora": dict(target_modules=DENSE, use_dora=True),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "all": dict(
        target_modules=DENSE,
        use_rslora=True,
        use_dora=True,
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3},
    ),
    # transformers 5 keeps each layer's experts fused: peft reaches them with target_parameters
    "moe": dict(
        target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        use_rslora=True,
        alpha_pattern={"o_proj": 5},
    ),
}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = run_cli(list(args), timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def make_adapter(base, out: str, **options) -> None:
    """A peft adapter on ``base`` (a path or a module) with every adapter tensor random: LoRA A,
    B, DoRA magnitudes and the modules_to_save copies, so no part of the merge is trivial."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str) else base
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **options)
    )
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)


def peft_merged(base: str, adapter: str, out: str) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload, saved by transformers: the tensors as they are on disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    model.merge_and_unload().save_pretrained(out)
    return load_file(os.path.join(out, "model.safetensors"))


def peft_logits(base: str, adapter: str) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        return model(IDS).logits


def assert_equal_files(got_dir: str, want: dict[str, torch.Tensor]) -> None:
    got = load_file(os.path.join(got_dir, "model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), (k, (got[k] - v).abs().max().item())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "dense": build_hf(str(root / "llama"), "llama", layers=2),
        "moe": build_moe(str(root / "mixtral"), "mixtral", layers=2),
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_merges_like_peft_directly_through_mcore_and_exports(tmp_path, bases, variant):
    base = bases["moe" if variant == "moe" else "dense"]
    adapter = str(tmp_path / "adapter")
    make_adapter(base, adapter, **VARIANTS[variant])
    want = peft_merged(base, adapter, str(tmp_path / "peft-merged"))
    changed = [
        k
        for k, v in load_file(os.path.join(base, "model.safetensors")).items()
        if not torch.equal(v, want[k])
    ]
    assert len(changed) >= 2 * len(
        VARIANTS[variant]["target_modules"]
    )  # the adapter really changes the model

    # HF base + PEFT adapter -> merged HF
    cli("convert", base, str(tmp_path / "direct"), "--to", "hf", "--lora-load", adapter)
    assert_equal_files(str(tmp_path / "direct"), want)

    # through Megatron-Core TP=2 (EP=2 for the experts): an mcore base with the adapter -> HF
    layout = ["--tp", "2"] + (["--ep", "2"] if variant == "moe" else [])
    cli("convert", base, str(tmp_path / "mc"), "--to", "mcore", *layout)
    cli("convert", str(tmp_path / "mc"), str(tmp_path / "via-mc"), "--to", "hf", "--lora-load", adapter)
    assert_equal_files(str(tmp_path / "via-mc"), want)
    if variant in ("all", "moe"):  # and merged on the way in: HF + adapter -> mcore TP=2 -> HF
        cli("convert", base, str(tmp_path / "mc-merged"), "--to", "mcore", *layout, "--lora-load", adapter)
        cli("convert", str(tmp_path / "mc-merged"), str(tmp_path / "back"), "--to", "hf")
        assert_equal_files(str(tmp_path / "back"), want)

    # --to peft: the exported adapter loads in peft and computes the same logits
    exported = str(tmp_path / "exported")
    cli("convert", str(tmp_path / "mc"), exported, "--to", "peft", "--lora-load", adapter)
    cfg = json.load(open(os.path.join(exported, "adapter_config.json")))
    assert cfg["use_rslora"] == bool(VARIANTS[variant].get("use_rslora"))
    assert cfg["use_dora"] == bool(VARIANTS[variant].get("use_dora"))
    assert torch.equal(peft_logits(base, exported), peft_logits(base, adapter))


def test_per_expert_lora_as_transformers_4_named_it(tmp_path, bases):
    """Adapters trained on transformers 4 target each expert's own linears
    (``block_sparse_moe.experts.N.w1``); peft makes one here on a module tree with those names,
    holding the mixtral base's weights, and its merge is the oracle."""
    from peft import PeftModel
    from torch import nn

    base = bases["moe"]
    weights = load_file(os.path.join(base, "model.safetensors"))

    def tree() -> nn.Module:
        root = nn.Module()
        for key, w in weights.items():
            *path, leaf = key.split(".")
            mod = root
            for p in path[:-1]:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            if not hasattr(mod, path[-1]):
                mod.add_module(
                    path[-1], nn.Linear(w.shape[1], w.shape[0], bias=False) if w.ndim == 2 else nn.Module()
                )
            holder = getattr(mod, path[-1])
            setattr(holder, leaf, nn.Parameter(w.clone()))
        return root

    adapter = str(tmp_path / "adapter")
    make_adapter(tree(), adapter, target_modules=["w1", "w2", "w3", "q_proj"])
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight" in keys
    merged = PeftModel.from_pretrained(tree(), adapter).merge_and_unload().state_dict()
    out = str(tmp_path / "merged")
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(merged)
    for k in got:
        assert torch.equal(got[k], merged[k]), k
    assert not torch.equal(
        got["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
        weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"peft_type": "LOHA"}, "peft_type='LOHA' is not supported"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"bias": "all"}, "bias='all'"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora="),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices="),
        ({"rank_pattern": {"q_proj": 8}}, "q_proj has LoRA rank 4 but adapter_config.json implies r=8"),
    ],
)
def test_unsupported_options_are_one_line_errors(tmp_path, bases, edit, fragment):
    adapter = str(tmp_path / "adapter")
    make_adapter(bases["dense"], adapter, target_modules=["q_proj"])
    path = os.path.join(adapter, "adapter_config.json")
    cfg = json.load(open(path))
    cfg.update(edit)
    json.dump(cfg, open(path, "w"))
    dst = str(tmp_path / "out")
    r = cli("convert", bases["dense"], dst, "--to", "hf", "--lora-load", adapter, check=False)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("pipeline:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert not os.path.exists(dst)


def test_megatron_expert_lora_tp2_ep2_exports_fused_for_peft(tmp_path, bases):
    """MindSpeed-LLM trains LoRA on each local expert's linear_fc1/linear_fc2 (plain LoRA: its
    LoraConfig has no rsLoRA, DoRA or patterns).  Written here from the format rules on a
    TP=2 EP=2 checkpoint: the merge equals W + (alpha/r) B @ A per expert, and --to peft writes
    transformers 5's fused-expert LoRA that peft loads with the merged model's logits."""
    from transformers import AutoModelForCausalLM

    base, mc = bases["moe"], str(tmp_path / "mc")
    cli("convert", base, mc, "--to", "mcore", "--tp", "2", "--ep", "2")
    r, alpha, n_experts, tp, ep = 2, 6.0, 4, 2, 2
    local = n_experts // ep
    g = torch.Generator().manual_seed(5)
    full = {}  # (layer, expert, module) -> (A, B)
    it = os.path.join(mc, "iter_0000001")
    for d in sorted(os.listdir(it)):
        tp_rank, ep_rank = (int(x) for x in d.split("_")[2:4])
        path = os.path.join(it, d, "model_optim_rng.pt")
        ck = torch.load(path, weights_only=False)
        model = {}
        for k, v in ck["model"].items():
            parts = k.split(".")
            if "local_experts" not in parts or parts[-1] != "weight":
                model[k] = v
                continue
            layer, module = int(parts[2]), parts[-2]
            expert = ep_rank * local + int(parts[parts.index("local_experts") + 1])
            rows, cols = (
                (2 * v.shape[0], v.shape[1]) if module == "linear_fc1" else (v.shape[0], v.shape[1] * tp)
            )
            if (layer, expert, module) not in full:
                full[layer, expert, module] = (
                    torch.randn(r, cols, generator=g),
                    torch.randn(rows, r, generator=g),
                )
            A, B = full[layer, expert, module]
            if module == "linear_fc1":  # column-parallel, [gate_t; up_t] on each rank
                a, b = A, torch.cat([half.chunk(tp, 0)[tp_rank] for half in B.chunk(2, 0)])
            else:  # row-parallel: A split on its input dim
                a, b = A.chunk(tp, 1)[tp_rank], B
            stem = k[: -len(".weight")]
            model[stem + ".base_layer.weight"] = v
            model[stem + ".lora_A.default.weight"] = a.contiguous()
            model[stem + ".lora_B.default.weight"] = b.contiguous()
        ck["model"] = model
        ck["args"].lora_r, ck["args"].lora_alpha = r, alpha
        torch.save(ck, path)
    merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
    cli("convert", mc, merged, "--to", "hf", "--lora-target-modules", "linear_fc1", "linear_fc2")
    cli("convert", mc, adapter, "--to", "peft", "--lora-r", "2", "--lora-alpha", "6")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    w, m = (
        load_file(os.path.join(base, "model.safetensors")),
        load_file(os.path.join(merged, "model.safetensors")),
    )
    for (layer, e, module), (A, B) in full.items():
        stem = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        pairs = (
            [("w1", B.chunk(2, 0)[0]), ("w3", B.chunk(2, 0)[1])] if module == "linear_fc1" else [("w2", B)]
        )
        for name, b in pairs:
            assert torch.equal(m[stem + name + ".weight"], w[stem + name + ".weight"] + (b @ A) * (alpha / r))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(IDS).logits
    assert torch.allclose(peft_logits(base, adapter), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, layout",
    [
        ("dense", "shard{tp=2 pp=2}"),
        ("dense", "shard{tp=2 pp=2 vpp-layers=1}"),
        ("moe", "shard{tp=2 ep=2}"),
        ("moe", "shard{tp=1 ep=4}"),
        ("moe", "shard{tp=2 ep=2 etp=1}"),
    ],
)
def test_adapter_tensors_are_resharded_like_their_weights(tmp_path, bases, kind, layout):
    """The adapter's tensors are IR data: sharded by their split rules (DoRA magnitudes and saved
    copies like the rows of their weight) and gathered back, the merge is unchanged, bit for bit."""
    import ckpt_ir.api as ck
    from ckpt_ir.ir import expr as E

    adapter = str(tmp_path / "adapter")
    make_adapter(bases[kind], adapter, **VARIANTS["all" if kind == "dense" else "moe"])
    src = ck.attach_lora(ck.load(bases[kind]), adapter)
    sharded = ck.run(src, layout)
    for name in (
        (
            "layers.0.attn.q.lora_magnitude.weight",
            "lm_head.lora_saved.weight",
            "layers.0.attn.q.lora_b.weight",
        )
        if kind == "dense"
        else ("layers.0.attn.q.lora_b.weight",)
    ):
        assert sharded.tensors[name].tp == (1 if "{tp=1" in layout else 2), name
    direct, via = ck.run(src, "lora-merge"), ck.run(sharded, "gather,lora-merge")
    assert list(direct.tensors) == list(via.tensors)
    with E.Reader() as reader:
        for name, t in direct.tensors.items():
            assert torch.equal(E.evaluate(t.expr, reader), E.evaluate(via.tensors[name].expr, reader)), name
