"""Hybrid-attention families of ``ckpt_ir/families/hybrid.py`` (Qwen3-Next, Qwen3.5 dense and MoE):
a tiny random model built and saved by transformers (``tests/family_models.py``) converts HF ->
Megatron-Core -> HF bit-exactly, and transformers' logits on the result equal the original's, in
MindSpeed-LLM's qwen3-next layout (TP 1: PP with uneven stages, EP2 grouped GEMM) and in
megatron-core's GatedDeltaNet layout (TP 2 with uneven PP, EP2).  The rank files' gated-delta-net,
gated-attention and MTP tensors are checked against each layout's format facts (written here:
docs/reference/composed-blocks.md §1.2, §2.3, §2.5), and the zero-centred out_norm's exactness rule."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import DENSE, assert_round_trip, listed_families, model_cache, rank
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through (the gated-delta-net layout is the
# default's: MindSpeed-LLM's for qwen3_next at TP 1, megatron-core's at TP 2 and for qwen3_5)
LAYOUTS = {
    "qwen3_next": (
        dict(pp=2, num_layer_list=(3, 1)),
        dict(ep=2, grouped_gemm=True),
        dict(tp=2, pp=2, num_layer_list=(3, 1), ep=2),
        dict(ckpt_format="torch_dist"),
    ),
    "qwen3_5": (dict(tp=2, pp=2, num_layer_list=(3, 1)), dict(ckpt_format="torch_dist")),
    "qwen3_5_moe": (dict(tp=2, ep=2, grouped_gemm=True), dict(pp=2, num_layer_list=(1, 3), ep=2)),
    "olmo_hybrid": (dict(tp=2, pp=2, num_layer_list=(3, 1)), dict(ckpt_format="torch_dist")),
}
MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    get = model_cache(tmp_path_factory, "hybrid")
    return lambda family: get(MODEL_TYPES.get(family, family))


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


def append_qwen3_next_mtp_layer(path: str, hidden: int) -> dict:
    """Give the Qwen3-Next checkpoint at ``path`` its released MTP layer (transformers ignores
    ``^mtp.*``): ``mtp.layers.0.*`` = a random copy of full-attention MoE layer 3, plus the
    un-numbered ``mtp.fc`` [H, 2H], ``mtp.norm``, ``mtp.pre_fc_norm_embedding`` and
    ``mtp.pre_fc_norm_hidden``.  Returns the tensors."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    g = torch.Generator().manual_seed(7)
    for k in [k for k in sd if k.startswith("model.layers.3.")]:
        sd[k.replace("model.layers.3.", "mtp.layers.0.")] = torch.randn(sd[k].shape, generator=g)
    for k in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        sd[f"mtp.{k}.weight"] = torch.randn(hidden, generator=g)
    sd["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
    save_file(sd, f, metadata={"format": "pt"})
    return sd


MTP_CASES = {
    "pp2": ("qwen3_next", dict(pp=2, num_layer_list=(3, 1))),
    "ep2-grouped": ("qwen3_next", dict(ep=2, grouped_gemm=True)),
    # megatron-core's modules (the default at TP 2): its MTP names, and Qwen3.5's MTP as Qwen3-Next's
    "mcore-tp2pp2": ("qwen3_next", dict(tp=2, pp=2, num_layer_list=(3, 1))),
    "qwen3_5-mcore-tp2pp2": ("qwen3_5", dict(tp=2, pp=2, num_layer_list=(3, 1))),
}


@pytest.mark.parametrize("case", list(MTP_CASES))
def test_qwen3_next_mtp_layer_round_trips(models, tmp_path, case):
    """Qwen3-Next's MTP layer (mtp.layers.0.* and the un-numbered mtp.fc / norm /
    pre_fc_norm_*, as released; Qwen3.5 stores its own alike) goes to the last stage's MTP layer
    (a gated full-attention layer; fc = eh_proj, pre_fc_norm_embedding = enorm,
    pre_fc_norm_hidden = hnorm, norm = the MTP head norm): MindSpeed-LLM's mtp.layers.0.* and
    mtp.final_layernorms.0 in its layout, megatron-core's mtp.layers.0.final_layernorm in its own;
    and back to the same HF keys."""
    family, layout = MTP_CASES[case]
    src = str(tmp_path / "hf")
    shutil.copytree(models(family), src)
    sd = append_qwen3_next_mtp_layer(src, DENSE["hidden_size"])
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **layout))
    assert ck.load(mid).spec.mtp_layers == 1
    last = rank(mid, "mp_rank_00_001")["model"]  # PP2: the last stage; EP2: EP rank 1
    mcore = layout.get("tp", 1) > 1
    want = {
        "mtp.layers.0.enorm.weight": sd["mtp.pre_fc_norm_embedding.weight"],
        "mtp.layers.0.hnorm.weight": sd["mtp.pre_fc_norm_hidden.weight"],
        "mtp.layers.0.eh_proj.weight": sd["mtp.fc.weight"].chunk(2)[0] if mcore else sd["mtp.fc.weight"],
        "mtp.layers.0.final_layernorm.weight" if mcore else "mtp.final_layernorms.0.weight": sd[
            "mtp.norm.weight"
        ],
        "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight": sd[
            "mtp.layers.0.self_attn.q_norm.weight"
        ],
    }
    if family == "qwen3_next":
        want["mtp.layers.0.transformer_layer.mlp.shared_experts.gate_weight"] = sd[
            "mtp.layers.0.mlp.shared_expert_gate.weight"
        ]
    for k, v in want.items():
        assert torch.equal(last[k], v), k
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_qwen3_next_mtp_keys_rename_both_ways_and_refuse_a_second_unnumbered_layer():
    """The family's rename: mtp.layers.k.X <-> model.layers.{n + k}.X and the un-numbered
    mtp.fc / norm / pre_fc_norm_* <-> model.layers.{n}.mtp.*; main layers and other keys pass
    through; a second MTP layer's fc has no HF name (one-line FormatError naming the key)."""
    from ckpt_ir.errors import FormatError
    from ckpt_ir.families import by_name

    rename = by_name("qwen3_next").hf_rename
    pairs = {
        "mtp.layers.0.self_attn.q_proj.weight": "model.layers.4.self_attn.q_proj.weight",
        "mtp.layers.1.mlp.gate.weight": "model.layers.5.mlp.gate.weight",
        "mtp.fc.weight": "model.layers.4.mtp.fc.weight",
        "mtp.pre_fc_norm_hidden.weight": "model.layers.4.mtp.pre_fc_norm_hidden.weight",
        "model.layers.3.mtp.fc.weight": "model.layers.3.mtp.fc.weight",  # a main layer: untouched
        "model.norm.weight": "model.norm.weight",
        "mtp.unknown.weight": "mtp.unknown.weight",  # left for the coverage check to report
    }
    for hf, table in pairs.items():
        assert rename(hf, 4, False) == table
        if not hf.startswith("model.layers.3."):
            assert rename(table, 4, True) == hf
    with pytest.raises(FormatError, match=r"model\.layers\.5\.mtp\.fc\.weight"):
        rename("model.layers.5.mtp.fc.weight", 4, True)


def test_qwen3_next_layers_under_mindspeed_names(models, tmp_path, capsys):
    """``ckpt-ir models`` lists the family under MindSpeed-LLM's name qwen3-next, and its layout
    (qkv_type "mix", convert_hf2mg.py) is written: a gated-delta-net layer's HF tensors are copied
    whole to self_attention.{in_proj_qkvz, in_proj_ba, conv1d, A_log, dt_bias, norm, out_proj}; a
    full-attention layer keeps q_proj (with its gate rows), k_proj and v_proj unfused beside
    linear_proj and the q/k layernorms."""
    assert "--model-type-hf qwen3-next" in listed_families(capsys)["qwen3_next"]
    src = models("qwen3_next")
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", ep=2))
    sd = rank(mid, "mp_rank_00_000")["model"]
    gdn = {
        "in_proj_qkvz.weight": "in_proj_qkvz.weight",
        "in_proj_ba.weight": "in_proj_ba.weight",
        "conv1d.weight": "conv1d.weight",
        "A_log": "A_log",
        "dt_bias": "dt_bias",
        "norm.weight": "norm.weight",
        "out_proj.weight": "out_proj.weight",
    }
    for i in (0, 1, 2):
        attn = {k for k in sd if k.startswith(f"decoder.layers.{i}.self_attention.")}
        assert attn == {f"decoder.layers.{i}.self_attention.{m}" for m in gdn}
        for m, h in gdn.items():
            assert torch.equal(
                sd[f"decoder.layers.{i}.self_attention.{m}"], hf[f"model.layers.{i}.linear_attn.{h}"]
            )
    full = {
        "q_proj.weight": "q_proj.weight",
        "k_proj.weight": "k_proj.weight",
        "v_proj.weight": "v_proj.weight",
        "linear_proj.weight": "o_proj.weight",
        "q_layernorm.weight": "q_norm.weight",
        "k_layernorm.weight": "k_norm.weight",
    }
    assert {k for k in sd if k.startswith("decoder.layers.3.self_attention.")} == {
        f"decoder.layers.3.self_attention.{m}" for m in full
    }
    for m, h in full.items():
        assert torch.equal(sd[f"decoder.layers.3.self_attention.{m}"], hf[f"model.layers.3.self_attn.{h}"])
    assert sd["decoder.layers.3.self_attention.q_proj.weight"].shape == (2 * 4 * 16, 64)  # [q; gate] per head
    assert torch.equal(
        sd["decoder.layers.0.mlp.shared_experts.gate_weight"],
        hf["model.layers.0.mlp.shared_expert_gate.weight"],
    )


def test_mindspeed_layout_refuses_tensor_parallelism_in_one_line(models, tmp_path):
    """MindSpeed-LLM's qwen3-next layout holds whole tensors: asked for at TP 2 it is a one-line
    error naming both ways out (megatron-core's layout, or TP 1); nothing is written."""
    from tests.cli_contract import assert_clean_error
    from tests.cli_contract import convert as cli_convert

    out = tmp_path / "out"
    result = cli_convert(models("qwen3_next"), out, "--tp", "2", "--gdn-keys", "mindspeed")
    assert_clean_error(result, out, names=("MindSpeed-LLM", "--gdn-keys mcore", "--tp 1"))


def hf_gdn_parts(family: str, hf: dict, i: int, spec) -> dict[str, torch.Tensor]:
    """Layer ``i``'s gated-delta-net projections q, k, v, z, b, a (flat: key / value heads in
    order) from the HF tensors, by the packing facts of composed-blocks.md §1.2: Qwen3.5's
    in_proj_qkv is [q; k; v] and z / b / a separate; Qwen3-Next's in_proj_qkvz holds per key head
    [q_g (Dk); k_g (Dk); v_g (Hv/Hk x Dv); z_g (Hv/Hk x Dv)] and in_proj_ba per key head
    [b_g (Hv/Hk); a_g (Hv/Hk)]."""
    p = f"model.layers.{i}.linear_attn."
    hk, dk, per = spec.linear_k_heads, spec.linear_k_dim, spec.linear_v_heads // spec.linear_k_heads
    vg = per * spec.linear_v_dim  # value rows per key head
    if family == "qwen3_5":
        q, k, v = hf[p + "in_proj_qkv.weight"].split([hk * dk, hk * dk, hk * vg])
        return dict(q=q, k=k, v=v, **{x: hf[p + f"in_proj_{x}.weight"] for x in "zba"})
    qkvz = hf[p + "in_proj_qkvz.weight"].view(hk, 2 * dk + 2 * vg, -1)
    ba = hf[p + "in_proj_ba.weight"].view(hk, 2 * per, -1)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    q, k, v, z = (flat(t) for t in qkvz.split([dk, dk, vg, vg], dim=1))
    b, a = (flat(t) for t in ba.split([per, per], dim=1))
    return dict(q=q, k=k, v=v, z=z, b=b, a=a)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_megatron_core_layout_holds_each_part_per_rank(models, tmp_path, family):
    """megatron-core's GatedDeltaNet and gated attention at TP 2 (the default there), with
    Transformer Engine's norm names (the only spec megatron-core builds them with), as
    composed-blocks.md §2.3 / §2.5 say, built here from the HF tensors: in_proj on rank r is
    [q_r; k_r; v_r; z_r; b_r; a_r], conv1d [q_r; k_r; v_r] of its [q; k; v] channels, A_log /
    dt_bias the rank's value heads, out_norm the whole HF norm minus 1, out_proj its columns, the
    input norm in_proj.layer_norm_weight; a full-attention layer's linear_qkv per query group
    [its q heads; their gates; k; v] (HF q_proj: per head [q_h; gate_h]); args configure
    megatron-core's variant."""
    src = models(family)
    hf, spec = hf_state(src), ck.load(src).spec
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    ranks = [rank(mid, f"mp_rank_0{r}") for r in (0, 1)]
    hd, heads, groups = spec.head_dim, spec.num_heads, spec.num_kv_heads
    for r, sd in enumerate(x["model"] for x in ranks):
        half = lambda t, dim=0, r=r: t.chunk(2, dim=dim)[r]  # noqa: E731
        for i in spec.linear_layers:
            parts = hf_gdn_parts(family, hf, i, spec)
            p, m = f"model.layers.{i}.linear_attn.", f"decoder.layers.{i}.self_attention."
            conv = hf[p + "conv1d.weight"].split(list(spec.gdn_conv_parts))
            want = {
                "in_proj.weight": torch.cat([half(parts[x]) for x in "qkvzba"]),
                "in_proj.layer_norm_weight": hf[f"model.layers.{i}.input_layernorm.weight"],
                "conv1d.weight": torch.cat([half(c) for c in conv]),
                "A_log": half(hf[p + "A_log"]),
                "dt_bias": half(hf[p + "dt_bias"]),
                "out_norm.weight": hf[p + "norm.weight"] - 1,
                "out_proj.weight": half(hf[p + "out_proj.weight"], 1),
            }
            assert {k[len(m) :] for k in sd if k.startswith(m)} == set(want), i
            for k, v in want.items():
                assert torch.equal(sd[m + k], v), (i, k)
        i = next(i for i in range(spec.num_layers) if i not in spec.linear_layers)
        q = hf[f"model.layers.{i}.self_attn.q_proj.weight"].view(heads, 2, hd, -1)
        k, v = (hf[f"model.layers.{i}.self_attn.{x}_proj.weight"].view(groups, hd, -1) for x in "kv")
        per = heads // groups
        qkv = [
            torch.cat(
                [q[g * per : (g + 1) * per, 0], q[g * per : (g + 1) * per, 1], k[g : g + 1], v[g : g + 1]]
            )
            for g in range(groups)
        ]
        m = f"decoder.layers.{i}.self_attention."
        assert torch.equal(sd[m + "linear_qkv.weight"], half(torch.cat(qkv).reshape(-1, q.shape[-1])))
        assert torch.equal(
            sd[m + "linear_qkv.layer_norm_weight"], hf[f"model.layers.{i}.input_layernorm.weight"]
        )
    args = ranks[0]["args"]
    assert args.experimental_attention_variant == "gated_delta_net"
    assert args.linear_attention_freq == 4  # layers 0-2 gated-delta-net, layer 3 softmax attention
    assert args.attention_output_gate and args.apply_layernorm_1p
    assert args.transformer_impl == "transformer_engine"
    from ckpt_ir.megatron.args import Args, spec_values

    read = spec_values(Args(vars(args)))  # the same table read back
    fields = ("linear_layers", "linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim")
    assert {f: read[f] for f in (*fields, "linear_conv_kernel", "attn_gate")} == {
        f: getattr(spec, f) for f in (*fields, "linear_conv_kernel", "attn_gate")
    }


def test_zero_centred_out_norm_is_exact_where_w_minus_1_is(models, tmp_path):
    """megatron-core's out_norm is HF's plain GDN norm w stored as w - 1 (fp32 arithmetic, one
    rounding to the tensor's dtype), and w comes back as (w - 1) + 1: bit for bit exactly where
    w - 1 is exact in the dtype, which holds for every w in [0.5, 2] (Sterbenz) and w >= 2, and
    fails for other w whose low bits w - 1 cannot hold (docs/formats.md).  In bf16,
    composed-blocks.md §2.5 measured 0.000999 -> -1.0 -> 0.0 and -0.6992 -> -1.703 -> -0.7031
    while 0.3008 and 2.5 survive."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("qwen3_5"), src)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    key = "model.layers.0.linear_attn.norm.weight"
    inside = torch.tensor([0.5, 0.5001, 0.75, 1.0, 1.5, 1.999, 2.0])
    outside = torch.tensor([0.3, 0.000999, -0.6992, 0.3008, 2.5])
    outside[0] = torch.nextafter(outside[0], torch.tensor(1.0))  # 0.3's neighbour: an odd last bit
    sd[key] = torch.cat([inside, outside])
    save_file(sd, f, metadata={"format": "pt"})
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mid, back = str(tmp_path / f"mid-{dtype}"), str(tmp_path / f"back-{dtype}")
        convert(src, mid, ck.Target(to="mcore", gdn_keys="mcore", dtype=dtype))
        convert(mid, back, ck.Target(to="hf"))
        w = sd[key].to(torch_dtype)
        stored = rank(mid, "mp_rank_00")["model"]["decoder.layers.0.self_attention.out_norm.weight"]
        assert torch.equal(stored, (w.float() - 1).to(torch_dtype))
        came_back = hf_state(back)[key]
        assert torch.equal(came_back, (stored.float() + 1).to(torch_dtype))
        w_minus_1_exact = stored.double() == w.double() - 1
        assert torch.equal(came_back == w, w_minus_1_exact)
        assert w_minus_1_exact[: len(inside)].all() and not w_minus_1_exact.all()
        if dtype == "bf16":
            assert came_back[8:].tolist() == [0.0, -0.703125, w[10].item(), 2.5]


def test_mindspeed_layout_to_megatron_core_layout_and_back(models, tmp_path):
    """A Megatron checkpoint in MindSpeed-LLM's qwen3-next layout (TP 1, the default there)
    resharded to TP 2 takes megatron-core's layout (the default at TP 2: unfused and fused anew,
    out_norm = norm - 1, Transformer Engine norm names); resharded again it keeps that layout with
    the same bytes (no arithmetic), and back to HF it is the original bit for bit."""
    src = models("qwen3_next")
    ms, mc, mc1, back = (str(tmp_path / n) for n in ("ms", "mc", "mc1", "back"))
    convert(src, ms, ck.Target(to="mcore"))
    assert "decoder.layers.0.self_attention.in_proj_qkvz.weight" in rank(ms, "mp_rank_00")["model"]
    c = ck.load(ms)
    assert c.layout.gdn_keys == "mindspeed"
    assert str(ck.derive_pipeline(c, ck.Target(to="mcore", tp=2))).startswith(
        "unfuse-qkv,fuse-qkv{gdn=mcore},shard{tp=2},rename-norms{names=te}"
    )
    convert(ms, mc, ck.Target(to="mcore", tp=2))
    convert(mc, mc1, ck.Target(to="mcore"))
    assert ck.load(mc1).layout.gdn_keys == "mcore"
    one = rank(mc1, "mp_rank_00")["model"]
    two = [rank(mc, f"mp_rank_0{r}")["model"] for r in (0, 1)]
    hf = hf_state(src)
    for i in (0, 1, 2):
        m = f"decoder.layers.{i}.self_attention."
        norm = one[m + "out_norm.weight"]
        assert torch.equal(norm, two[1][m + "out_norm.weight"])
        assert torch.equal(norm, hf[f"model.layers.{i}.linear_attn.norm.weight"] - 1)
    convert(mc1, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_gdn_layout_defaults_and_choices(models):
    """Which Megatron modules a gated-delta-net model gets: MindSpeed-LLM's for qwen3_next (the
    family it converts) at TP 1 in the torch format, megatron-core's at TP 2, in torch_dist and
    for qwen3_5 (no MindSpeed-LLM form) with Transformer Engine norm names; --gdn-keys overrides
    the default; it applies only to a Megatron target."""
    from ckpt_ir.errors import UsageError

    def fuse(family: str, **target) -> str:
        c = ck.load(models(family))
        steps = str(ck.derive_pipeline(c, ck.Target(to="mcore", **target))).split(",")
        return next(s for s in steps if s.startswith("fuse-qkv")) + (
            "+te" if "rename-norms{names=te}" in steps else ""
        )

    assert fuse("qwen3_next") == "fuse-qkv{gdn=mindspeed}"
    assert fuse("qwen3_next", tp=2) == "fuse-qkv{gdn=mcore}+te"
    assert fuse("qwen3_next", ckpt_format="torch_dist") == "fuse-qkv{gdn=mcore}+te"
    assert fuse("qwen3_next", gdn_keys="mcore", norm_names="local") == "fuse-qkv{gdn=mcore}"
    assert fuse("qwen3_5") == "fuse-qkv{gdn=mcore}+te"
    assert fuse("qwen3_5_moe", gdn_keys="mindspeed") == "fuse-qkv{gdn=mindspeed}"
    with pytest.raises(UsageError, match="gdn_keys"):
        ck.Target(to="hf", gdn_keys="mcore")
    with pytest.raises(UsageError, match="gdn_keys"):
        ck.Target(to="mcore", gdn_keys="mindspeed", ckpt_format="torch_dist")


def test_out_norm_shift_follows_master_weights_not_adam_moments(models):
    """fuse-qkv{gdn=mcore} stores out_norm = norm - 1 for the weights and the optimizer's fp32
    master copies ("param"), and leaves Adam's moments as they are (the gradient of w - 1 is the
    gradient of w); unfuse-qkv adds 1 back alike."""
    from ckpt_ir.ir import expr as E
    from ckpt_ir.passes.fusion import FuseQKV, UnfuseQKV

    src = ck.load(models("qwen3_5"))
    name = "layers.0.attn.gdn.norm.weight"
    plain = src.tensors[name].expr
    fuse = FuseQKV(gdn="mcore")
    fused = {state: fuse.run_state(src, state).tensors for state in ("param", "exp_avg", "exp_avg_sq")}
    out = "layers.0.attn.gdn.out_norm.weight"
    assert fused["param"][out].expr == E.Offset(plain, -1.0)
    assert fused["exp_avg"][out].expr == fused["exp_avg_sq"][out].expr == plain
    mc = fuse.run(src)
    assert mc.tensors[out].expr == E.Offset(plain, -1.0) and name not in mc.tensors
    back = UnfuseQKV()
    assert back.run_state(mc, "param").tensors[name].expr == E.Offset(E.Offset(plain, -1.0), 1.0)
    assert back.run_state(mc, "exp_avg").tensors[name].expr == E.Offset(plain, -1.0)


def _gdn_case(args, tp: int, pp: int, **more) -> dict:
    """megatron-core's GPTModel with GatedDeltaNet layers (tests/mcore_hybrid.py, build-only
    stand-ins) as ckpt-ir's written ``args`` describe it: megatron-core builds the model from what
    the checkpoint says."""
    case = dict(
        kind="gdn",
        tp=tp,
        pp=pp,
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        groups=args.num_query_groups,
        ffn=args.ffn_hidden_size or args.moe_ffn_hidden_size,
        vocab=args.padded_vocab_size,
        tied=not args.untie_embeddings_and_output_weights,
        kv_channels=args.kv_channels,
        num_layers=args.num_layers,
        linear_attention_freq=args.linear_attention_freq,
        linear_key_head_dim=args.linear_key_head_dim,
        linear_value_head_dim=args.linear_value_head_dim,
        linear_num_key_heads=args.linear_num_key_heads,
        linear_num_value_heads=args.linear_num_value_heads,
        linear_conv_kernel_dim=args.linear_conv_kernel_dim,
        attention_output_gate=args.attention_output_gate,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        qk_layernorm=args.qk_layernorm,
    )
    if getattr(args, "num_experts", None):
        case.update(
            num_moe_experts=args.num_experts,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate,
        )
    return dict(case, **more)


# ckpt-ir's megatron-core GDN outputs (name: family, Target settings, megatron-core's pipeline layout)
ORACLE = {
    "next_tp2pp2": (
        "qwen3_next",
        dict(tp=2, pp=2, num_layer_list=(3, 1)),
        dict(num_layers_in_first_pipeline_stage=3),
    ),
    "moe_tp2ep2": ("qwen3_5_moe", dict(tp=2, ep=2), dict(ep=2)),
    "dense_tp2pp2": (
        "qwen3_5",
        dict(tp=2, pp=2, num_layer_list=(3, 1)),
        dict(num_layers_in_first_pipeline_stage=3),
    ),
    "dense_dist": ("qwen3_5", dict(ckpt_format="torch_dist"), dict(num_layers_in_first_pipeline_stage=3)),
}


def _rank_file(root: str, r: dict, pp: int, ep: int = 1) -> dict:
    name = f"mp_rank_{r['tp_rank']:02d}" + (f"_{r['pp_rank']:03d}" if pp > 1 else "")
    name += f"_{r['ep_rank']:03d}" if ep > 1 else ""
    return rank(root, name)["model"]


@pytest.fixture(scope="module")
def oracle(models, tmp_path_factory):
    """ckpt-ir's megatron-core-layout outputs and one megatron-core job over them (4 ranks): the
    torch rank files at TP 2 x PP 2 (uneven) and TP 2 x EP 2, and a torch_dist checkpoint loaded
    at TP 2 x PP 2."""
    from tests.mcore_hybrid import mcore_keys

    root = tmp_path_factory.mktemp("gdn_oracle")
    out, cases = {}, []
    for name, (family, target, _) in ORACLE.items():
        out[name] = str(root / name)
        convert(models(family), out[name], ck.Target(to="mcore", **target))
    for name, (_, _, layout) in ORACLE.items():
        args = rank(out["dense_tp2pp2" if name == "dense_dist" else name], "mp_rank_00_000")["args"]
        pp = 1 if "ep" in layout else 2
        cases.append(_gdn_case(args, 2, pp, ckpt=out[name], dump=name == "dense_dist", **layout))
    out["reports"] = dict(zip(ORACLE, mcore_keys(cases, root / "job")))
    dist = list(ORACLE).index("dense_dist")
    out["dump"] = lambda r: torch.load(os.path.join(root, "job", f"case{dist}.rank{r}.sd.pt"))
    return out


@pytest.mark.parametrize("name", ["next_tp2pp2", "moe_tp2ep2", "dense_tp2pp2"])
def test_megatron_core_builds_exactly_the_rank_files_keys_and_shapes(oracle, name):
    """Built from ckpt-ir's args alone, megatron-core's GPTModel with GatedDeltaNet layers (its TE
    spec, stand-ins for the kernels) has exactly the keys and shapes of ckpt-ir's rank file on
    every rank; loading it misses only Transformer Engine's _extra_state (an HF source has none)."""
    _, target, _ = ORACLE[name]
    for r in oracle["reports"][name]:
        sd = _rank_file(oracle[name], r, target.get("pp", 1), target.get("ep", 1))
        assert {k: list(v.shape) for k, v in sd.items()} == r["state_dict"], (name, r["rank"])
        load = r["load"]
        assert load["format"] == "torch" and load["unexpected"] == [] and load["shape_mismatch"] == []
        assert load["missing"] and all(k.endswith("._extra_state") for k in load["missing"])


def test_torch_dist_loads_strictly_into_megatron_core_as_the_rank_files(oracle):
    """megatron-core's dist_checkpointing.load accepts ckpt-ir's torch_dist of a gated-delta-net
    model strictly (layers under their global numbers, in_proj / conv1d as the parts
    GatedDeltaNet.sharded_state_dict names), and what it loads on each rank of TP 2 x PP 2 is
    ckpt-ir's rank file of that layout, tensor for tensor."""
    for r in oracle["reports"]["dense_dist"]:
        load = r["load"]
        assert load["format"] == "torch_dist" and load["ok"], load
        assert load["missing"] == load["unexpected"] == load["state_dict_missing"] == []
        loaded = oracle["dump"](r["rank"])
        want = _rank_file(oracle["dense_tp2pp2"], r, 2)
        assert sorted(k for k in loaded if not k.endswith("._extra_state")) == sorted(want)
        for k, v in want.items():
            assert torch.equal(loaded[k], v), (r["rank"], k)


def test_fsdp_dtensor_output_is_refused_in_one_line(models, tmp_path):
    """Megatron-FSDP's format for GatedDeltaNet layers is not known to ckpt-ir: refused, naming the
    formats that work, nothing written."""
    from ckpt_ir.errors import VerifyError

    out = tmp_path / "out"
    with pytest.raises(VerifyError, match=r"gated-delta-net model \(qwen3_5\).*torch_dist"):
        convert(models("qwen3_5"), str(out), ck.Target(to="mcore", ckpt_format="fsdp_dtensor"))
    assert not out.exists()


def test_live_state_dicts_of_a_tp2_gdn_model_lift_in_megatron_cores_layout(models, tmp_path):
    """A training job's megatron-core state dicts (ckpt_ir.live reads them as lift_state_dicts
    does here, tensors in memory) of a gated-delta-net model at TP 2: megatron-core's layout
    (read off the keys; its args name the variant), whole tensors joined part by part, and the
    plain norm back from out_norm."""
    from ckpt_ir.frontends.mcore import lift_state_dicts
    from ckpt_ir.ir.layout import Layout
    from ckpt_ir.passes.fusion import UnfuseQKV

    mid = str(tmp_path / "mid")
    convert(models("qwen3_5"), mid, ck.Target(to="mcore", tp=2))
    files = {r: rank(mid, f"mp_rank_0{r}") for r in (0, 1)}
    ranks = {
        (r, 0, 0): [{k: _memory_load(f"mem/{r}", k, v) for k, v in f["model"].items() if hasattr(v, "shape")}]
        for r, f in files.items()
    }
    spec = ck.load(mid).spec
    layout = Layout(format="mcore", tp=2, fused_qkv=True, fused_gate_up=True)
    c = lift_state_dicts(ranks, spec, layout, where="job", args=vars(files[0]["args"]), cfg=None)
    assert c.layout.gdn_keys == "mcore" and c.layout.norm_names == "te"
    assert c.tensors["layers.0.attn.gdn.in_proj.weight"].shape == (2 * 16 + 2 * 48 + 2 * 4, 64)
    whole = ck.run(c, "gather")
    assert UnfuseQKV().run(whole).tensors["layers.0.attn.gdn.q.weight"].shape == (16, 64)


def _memory_load(path: str, key: str, t: torch.Tensor):
    from ckpt_ir.ir import expr as E
    from ckpt_ir.ir.dtypes import from_torch

    return E.Load(path, key, tuple(t.shape), from_torch(t.dtype), 0, "memory")


def test_olmo_hybrid_convs_read_in_any_cut_and_written_as_transformers_cuts_them(models, tmp_path):
    """OLMo-Hybrid's q_conv1d / k_conv1d / v_conv1d are one conv [q; k; v] that transformers joins
    on load and saves cut as torch.chunk cuts it (composed-blocks.md §1.2: K = 16, V = 48 saved
    27 / 27 / 26): HF -> HF gives a transformers-saved checkpoint back bit for bit, and a file cut
    K / K / V (which transformers loads to the same conv) is read to the same tensors and written in
    transformers' cut."""
    src = models("olmo_hybrid")
    hf = hf_state(src)
    p = "model.layers.0.linear_attn."
    convs = [hf[p + f"{x}_conv1d.weight"] for x in "qkv"]
    joined = torch.cat(convs)
    assert [c.shape[0] for c in convs] == [c.shape[0] for c in joined.chunk(3)] != [16, 16, 48]
    out = str(tmp_path / "out")
    convert(src, out, ck.Target(to="hf"))
    assert_same_tensors(src, out)
    recut = str(tmp_path / "recut")
    shutil.copytree(src, recut)
    sd = load_file(os.path.join(recut, "model.safetensors"))
    for i in (0, 3):
        q = f"model.layers.{i}.linear_attn."
        whole = torch.cat([sd[q + f"{x}_conv1d.weight"] for x in "qkv"])
        for x, part in zip("qkv", whole.split([16, 16, 48])):
            sd[q + f"{x}_conv1d.weight"] = part.clone()
    save_file(sd, os.path.join(recut, "model.safetensors"), metadata={"format": "pt"})
    out2 = str(tmp_path / "out2")
    convert(recut, out2, ck.Target(to="hf"))
    assert_same_tensors(src, out2)


def test_olmo_hybrid_joined_cut_is_torch_chunk():
    """The writer's cut of a joined tensor is torch.chunk's (transformers' Chunk); a size torch.chunk
    cuts into fewer pieces than the HF tensors is refused in one line naming the tensor."""
    from ckpt_ir.errors import VerifyError
    from ckpt_ir.families import by_name

    joined = by_name("olmo_hybrid").joined[0]
    for n in (3, 5, 7, 10, 64, 80, 81, 82):
        sizes = [b - a for a, b in joined.cut(n, "t")]
        assert sizes == [c.shape[0] for c in torch.arange(n).chunk(3)], n
    assert len(torch.arange(4).chunk(3)) == 2
    with pytest.raises(VerifyError, match="layers.0.attn.gdn.conv1d.weight: 4 rows"):
        joined.cut(4, "layers.0.attn.gdn.conv1d.weight")


def test_olmo_hybrid_megatron_core_layout_per_rank(models, tmp_path):
    """OLMo-Hybrid at TP 2 in megatron-core's layout, built here from the HF tensors by the format
    facts (composed-blocks.md §1.2, §2.3, §2.5): a gated-delta-net layer's in_proj on rank r is
    [q_r; k_r; v_r; g_r; b_r; a_r] of q_proj / k_proj / v_proj / g_proj (the output gate z) /
    b_proj / a_proj, conv1d [q_r; k_r; v_r] of the joined convs, out_norm the plain o_norm as it is
    (OLMo's norms are not zero-centred: apply_layernorm_1p false; values where w - 1 + 1 is not w
    come back exactly), its input and pre-MLP norms attention_layer_norm / feedforward_layer_norm
    fused into in_proj / linear_fc1 (Transformer Engine); an attention layer has no norm before
    attention or MLP, feedforward_layer_norm as post_attn_norm after attention and
    post_feedforward_layernorm as post_mlp_layernorm, full-width q / k norms whole on each rank.
    A config without rotary (the released NoPE checkpoints) writes position_embedding_type none."""
    src = str(tmp_path / "hf")
    shutil.copytree(models("olmo_hybrid"), src)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.0.linear_attn.o_norm.weight"][:4] = torch.tensor([0.3, 0.000999, -0.6992, 2.5])
    save_file(sd, f, metadata={"format": "pt"})
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, rope_parameters=None), open(cfg_path, "w"))
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2))
    ranks = [rank(mid, f"mp_rank_0{r}") for r in (0, 1)]
    K, V = 16, 48
    for r, model in enumerate(x["model"] for x in ranks):
        half = lambda t, dim=0, r=r: t.chunk(2, dim=dim)[r]  # noqa: E731
        for i in (0, 3):
            p, m = f"model.layers.{i}.linear_attn.", f"decoder.layers.{i}."
            conv = torch.cat([sd[p + f"{x}_conv1d.weight"] for x in "qkv"]).split([K, K, V])
            want = {
                "self_attention.in_proj.weight": torch.cat(
                    [half(sd[p + f"{x}_proj.weight"]) for x in "qkvgba"]
                ),
                "self_attention.in_proj.layer_norm_weight": sd[
                    f"model.layers.{i}.attention_layer_norm.weight"
                ],
                "self_attention.conv1d.weight": torch.cat([half(c) for c in conv]),
                "self_attention.A_log": half(sd[p + "A_log"]),
                "self_attention.dt_bias": half(sd[p + "dt_bias"]),
                "self_attention.out_norm.weight": sd[p + "o_norm.weight"],
                "self_attention.out_proj.weight": half(sd[p + "o_proj.weight"], 1),
                "mlp.linear_fc1.layer_norm_weight": sd[f"model.layers.{i}.feedforward_layer_norm.weight"],
            }
            for k, v in want.items():
                assert torch.equal(model[m + k], v), (r, i, k)
        for i in (1, 2):
            a, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            keys = {k[len(m) :] for k in model if k.startswith(m)}
            assert not {k for k in keys if "layer_norm" in k or k.startswith(("input_", "pre_mlp"))}
            want = {
                "post_attn_norm.weight": sd[a + "feedforward_layer_norm.weight"],
                "post_mlp_layernorm.weight": sd[a + "post_feedforward_layernorm.weight"],
                "self_attention.q_layernorm.weight": sd[a + "self_attn.q_norm.weight"],
                "self_attention.k_layernorm.weight": sd[a + "self_attn.k_norm.weight"],
                "self_attention.linear_proj.bias": sd[a + "self_attn.o_proj.bias"],
            }
            for k, v in want.items():
                assert torch.equal(model[m + k], v), (r, i, k)
    args = ranks[0]["args"]
    assert args.experimental_attention_variant == "gated_delta_net"
    assert args.linear_attention_freq == [1, 0, 0, 1] and args.apply_layernorm_1p is False
    assert args.linear_allow_neg_eigval is True  # from the HF config: megatron-core has no such switch
    assert args.position_embedding_type == "none" and not hasattr(args, "rotary_base")
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
