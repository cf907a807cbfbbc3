"""Mixture of experts: expert placement over EP ranks, expert TP (= TP or 1), grouped-GEMM memory
views, written from the format rules; property round trips; nothing dropped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from tests.test_hf_roundtrip import assert_same_tensors, hf_state

E, H, F, SHARED_F = 4, 64, 32, 48


def build_moe(path: str, family: str, layers: int = 2, **extra) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        hidden_size=H,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    if family == "mixtral":
        kw.update(num_local_experts=E, num_experts_per_tok=2, intermediate_size=F)
    elif family == "qwen2_moe":
        kw.update(
            num_experts=E,
            num_experts_per_tok=2,
            moe_intermediate_size=F,
            shared_expert_intermediate_size=SHARED_F,
        )
    else:
        kw.update(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=F, head_dim=16)
    kw.update(extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def convert(src: str, dst: str, target: ck.Target) -> None:
    c = ck.load(src)
    ck.save(ck.run(c, ck.derive_pipeline(c, target)), dst, target)


def rank_model(root: str, name: str) -> dict:
    return torch.load(os.path.join(root, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)[
        "model"
    ]


def test_expected_tensors_tp2_ep2_with_shared_experts(tmp_path):
    src = build_moe(str(tmp_path / "hf"), "qwen2_moe")
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=2, ep=2))
    sd = hf_state(src)
    assert sorted(os.listdir(os.path.join(out, "iter_0000001"))) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    for tp in range(2):
        for ep in range(2):
            model = rank_model(out, f"mp_rank_{tp:02d}_{ep:03d}")
            p = "decoder.layers.1.mlp."
            h = "model.layers.1.mlp."
            keys = [k for k in model if k.startswith(p)]
            assert keys == [
                p + "router.weight",
                p + "shared_experts.gate_weight",
                p + "shared_experts.linear_fc1.weight",
                p + "shared_experts.linear_fc2.weight",
                p + "experts.local_experts.0.linear_fc1.weight",
                p + "experts.local_experts.0.linear_fc2.weight",
                p + "experts.local_experts.1.linear_fc1.weight",
                p + "experts.local_experts.1.linear_fc2.weight",
            ]
            assert torch.equal(model[p + "router.weight"], sd[h + "gate.weight"])
            assert torch.equal(model[p + "shared_experts.gate_weight"], sd[h + "shared_expert_gate.weight"])
            s = SHARED_F // 2
            assert torch.equal(
                model[p + "shared_experts.linear_fc1.weight"],
                torch.cat(
                    [
                        sd[h + "shared_expert.gate_proj.weight"][tp * s : (tp + 1) * s],
                        sd[h + "shared_expert.up_proj.weight"][tp * s : (tp + 1) * s],
                    ]
                ),
            )
            for j in range(2):
                e = ep * 2 + j  # EP rank ep holds experts [2 ep, 2 ep + 1]
                f = F // 2
                assert torch.equal(
                    model[p + f"experts.local_experts.{j}.linear_fc1.weight"],
                    torch.cat(
                        [
                            sd[h + f"experts.{e}.gate_proj.weight"][tp * f : (tp + 1) * f],
                            sd[h + f"experts.{e}.up_proj.weight"][tp * f : (tp + 1) * f],
                        ]
                    ),
                )
                assert torch.equal(
                    model[p + f"experts.local_experts.{j}.linear_fc2.weight"],
                    sd[h + f"experts.{e}.down_proj.weight"][:, tp * f : (tp + 1) * f],
                )
    args = torch.load(
        os.path.join(out, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )["args"]
    assert (args.num_experts, args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (E, 2, 2)
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


@pytest.mark.parametrize(
    "tp, ep, dirs",
    [
        (2, 2, ["mp_rank_00_000", "mp_rank_01_001"]),
        (2, 4, ["mp_rank_00_000", "mp_rank_00_002", "mp_rank_01_001", "mp_rank_01_003"]),
        (1, 2, ["mp_rank_00_000", "mp_rank_00_001"]),
    ],
)
def test_expert_tp_1_writes_whole_experts_in_owned_rank_files(tmp_path, tp, ep, dirs):
    src = build_moe(str(tmp_path / "hf"), "qwen3_moe")
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=tp, ep=ep, etp=1))
    assert sorted(os.listdir(os.path.join(out, "iter_0000001"))) == dirs
    sd = hf_state(src)
    per = E // ep
    for name in dirs:
        t, e_rank = int(name[8:10]), int(name[11:14])
        model = rank_model(out, name)
        for j in range(per):
            e = e_rank * per + j
            fc1 = model[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"]
            assert torch.equal(
                fc1,
                torch.cat(
                    [
                        sd[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"],
                        sd[f"model.layers.0.mlp.experts.{e}.up_proj.weight"],
                    ]
                ),
            )
        q = sd["model.layers.0.self_attn.o_proj.weight"]
        n = q.shape[1] // tp
        assert torch.equal(
            model["decoder.layers.0.self_attention.linear_proj.weight"], q[:, t * n : (t + 1) * n]
        )
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


@pytest.mark.parametrize("tp, etp", [(1, None), (2, None), (2, 1)])
def test_grouped_gemm_is_megatrons_memory_view(tmp_path, tp, etp):
    src = build_moe(str(tmp_path / "hf"), "mixtral")
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=tp, ep=2, etp=etp, grouped_gemm=True))
    sd = hf_state(src)
    t_exp = tp if etp is None else 1
    f = F // t_exp
    for name in sorted(os.listdir(os.path.join(out, "iter_0000001"))):
        t, e_rank = int(name[8:10]), int(name[11:14])
        t = t if t_exp > 1 else 0
        model = rank_model(out, name)
        w1, w2 = model["decoder.layers.1.mlp.experts.weight1"], model["decoder.layers.1.mlp.experts.weight2"]
        assert w1.shape == (H, 2 * 2 * f) and w2.shape == (2 * f, H)
        assert not any("local_experts" in k for k in model)
        for j in range(2):
            e = e_rank * 2 + j
            h = f"model.layers.1.block_sparse_moe.experts.{e}."
            fc1 = torch.cat(
                [sd[h + "w1.weight"][t * f : (t + 1) * f], sd[h + "w3.weight"][t * f : (t + 1) * f]]
            )
            fc2 = sd[h + "w2.weight"][:, t * f : (t + 1) * f]
            assert torch.equal(w1.view(2, H, 2 * f)[j], fc1.T)
            assert torch.equal(w2.view(2, f, H)[j], fc2.T)
    assert (
        torch.load(os.path.join(out, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)[
            "args"
        ].moe_grouped_gemm
        is True
    )
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))  # grouped GEMM read back from args
    assert_same_tensors(src, back)


def test_dense_layers_of_moe_models_keep_a_dense_mlp(tmp_path):
    src = build_moe(str(tmp_path / "hf"), "qwen3_moe", layers=3, mlp_only_layers=[1])
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", ep=2))
    model = rank_model(out, "mp_rank_00_000")
    assert (
        "decoder.layers.1.mlp.linear_fc1.weight" in model
        and "decoder.layers.1.mlp.router.weight" not in model
    )
    assert "decoder.layers.0.mlp.router.weight" in model
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


# the property test's families and the values each layout setting is drawn from (expert TP 1 only
# with TP 2)
PROPERTY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
PROPERTY_LAYOUTS = dict(tp=(1, 2), pp=(1, 2), ep=(1, 2, 4), etp=(None, 1), grouped_gemm=(False, True))
PROPERTY_EXAMPLES = 20


@st.composite
def moe_layouts(draw):
    values = PROPERTY_LAYOUTS
    tp = draw(st.sampled_from(values["tp"]))
    ep = draw(st.sampled_from(values["ep"]))
    etp = draw(st.sampled_from(values["etp"])) if tp > 1 else None
    return dict(
        tp=tp, pp=draw(st.sampled_from(values["pp"])), ep=ep, etp=etp, grouped_gemm=draw(st.booleans())
    )


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: build_moe(str(root / f), f) for f in PROPERTY_FAMILIES}


@settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(family=st.sampled_from(PROPERTY_FAMILIES), first=moe_layouts(), second=moe_layouts())
def test_property_moe_round_trips_are_bit_exact(moe_models, tmp_path_factory, family, first, second):
    src = moe_models[family]
    root = tmp_path_factory.mktemp("case")
    a, b, back1, back2 = (str(root / n) for n in ("a", "b", "back1", "back2"))
    convert(src, a, ck.Target(to="mcore", **first))
    convert(a, back1, ck.Target(to="hf"))
    assert_same_tensors(src, back1)
    convert(a, b, ck.Target(to="mcore", **second))
    convert(b, back2, ck.Target(to="hf"))
    assert_same_tensors(src, back2)


def test_no_expert_is_dropped_silently(tmp_path):
    from safetensors.torch import load_file, save_file

    src = build_moe(str(tmp_path / "hf"), "qwen3_moe")
    path = os.path.join(src, "model.safetensors")
    sd = load_file(path)
    del sd["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CkptIrError, match="layers.1.mlp.experts.3.down.weight"):
        c = ck.load(src)
        ck.run(c, ck.derive_pipeline(c, ck.Target(to="mcore", ep=2)))
    # and a Megatron checkpoint missing an EP rank's file is refused before anything is written
    full = build_moe(str(tmp_path / "hf2"), "qwen3_moe")
    mc = str(tmp_path / "mc")
    convert(full, mc, ck.Target(to="mcore", ep=2))
    import shutil

    shutil.rmtree(os.path.join(mc, "iter_0000001", "mp_rank_00_001"))
    r = subprocess.run(
        [sys.executable, "-m", "ckpt_ir", "convert", mc, str(tmp_path / "o"), "--to", "hf"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "mp_rank_00_001 is missing" in r.stderr and "EP=2" in r.stderr


@pytest.mark.parametrize(
    "target, fragment",
    [
        (dict(ep=3), "4 experts are not divisible by expert parallel size 3"),
        (dict(tp=2, etp=2, ep=2), None),
        (dict(tp=2, etp=3), "expert tensor parallel size must be 1 or the TP size"),
    ],
)
def test_moe_layout_errors(moe_models, target, fragment):
    c = ck.load(moe_models["qwen3_moe"])
    t = ck.Target(to="mcore", **target)
    if fragment is None:
        ck.run(c, ck.derive_pipeline(c, t))
        return
    with pytest.raises(CkptIrError, match=fragment):
        ck.run(c, ck.derive_pipeline(c, t))


def test_mindspeed_moe_flags(moe_models, tmp_path):
    src = moe_models["qwen3_moe"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert-ckpt",
            "--load-dir",
            src,
            "--save-dir",
            a,
            "--model-type-hf",
            "qwen3-moe",
            "--target-tensor-parallel-size",
            "2",
            "--target-expert-parallel-size",
            "2",
            "--expert-tensor-parallel-size",
            "1",
            "--moe-grouped-gemm",
        ],
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            src,
            b,
            "--to",
            "mcore",
            "--tp",
            "2",
            "--ep",
            "2",
            "--etp",
            "1",
            "--moe-grouped-gemm",
        ],
        check=True,
    )
    assert sorted(os.listdir(os.path.join(a, "iter_0000001"))) == ["mp_rank_00_000", "mp_rank_01_001"]
    for name in ("mp_rank_00_000", "mp_rank_01_001"):
        ma, mb = rank_model(a, name), rank_model(b, name)
        assert list(ma) == list(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
