"""``torch_dist`` for models whose decoder layers differ: tiny random models of the families whose
layers hold different blocks (LFM2's convolution and attention layers, Kimi Linear's KDA and MLA
layers with dense and MoE MLPs, Jamba's Mamba-1 and attention layers, DeepSeek-V4's sliding,
compressed and hash-routed layers with an MTP layer, in its release naming) and Falcon-H1 (alike
layers, but a Megatron-Bridge stack) convert HF -> torch_dist -> Megatron at TP2 (EP2 for MoE) ->
torch_dist -> HF bit-exactly, and both torch_dist checkpoints hold the same tensors.

Format facts the keys are held to: megatron-core's ``TransformerBlock.sharded_state_dict`` stores a
block of alike layers stacked on a leading layer axis (``decoder.layers.<key>`` ``[L, ...]``) and
non-homogeneous layers each under its global number (``decoder.layers.<i>.<key>``;
``transformer_block.py``, ``non_homogeneous_layers``); megatron-core's ``MambaStack`` and
Megatron-Bridge's ``FalconH1Stack`` (``falconh1_block.py``) always store per global layer; a
MambaMixer's ``in_proj`` / ``conv1d`` are stored as one tensor per part
(``MambaMixer.sharded_state_dict``: ``z, x, B, C, dt`` / ``x, B, C``), Megatron-Bridge's
Falcon-H1 mixer under ``mamba_mixer`` (``falconh1_layer.py``: the same mixer's sharded state
dict)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import ckpt_ir.api as ck
from tests.distopt_fixtures import read_torch_dist
from tests.family_models import build
from tests.test_families_dsv4 import RELEASE_RATES, build_dsv4, release_named
from tests.test_families_recurrent import CONFIGS as RECURRENT
from tests.test_families_split_layers import MODELS as SPLIT_LAYERS
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# family -> the Megatron layout the torch_dist checkpoint is resharded to and gathered from
LAYOUTS = {
    "lfm2": dict(tp=2),
    "kimi_linear": dict(tp=2, ep=2),
    "jamba": dict(tp=2, ep=2),
    "deepseek_v4": dict(tp=2, ep=2),
    "falcon_h1": dict(tp=2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_dist_layers")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            path = str(root / family)
            if family in RECURRENT:
                build(path, family, configs=RECURRENT)
            elif family == "deepseek_v4":  # the release naming, with one MTP layer
                release_named(build_dsv4(str(root / "dsv4-tf"), compress_rates=RELEASE_RATES), path)
            else:
                model_type, layers, cfg = SPLIT_LAYERS[family]
                build(path, model_type, layers, configs={model_type: cfg})
            cache[family] = path
        return cache[family]

    return get


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _layer_keys(keys) -> dict[int, set[str]]:
    """The stored keys below each global layer number."""
    out: dict[int, set[str]] = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_layers_that_differ_go_through_torch_dist_one_global_layer_each(models, tmp_path, family):
    src = models(family)
    spec = ck.load(src).spec
    dist, mid, dist2, back = (str(tmp_path / n) for n in ("dist", "mid", "dist2", "back"))
    convert(src, dist, ck.Target(to="mcore", ckpt_format="torch_dist"))
    convert(dist, mid, ck.Target(to="mcore", **LAYOUTS[family]))
    convert(mid, dist2, ck.Target(to="mcore", ckpt_format="torch_dist"))
    convert(dist2, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    a, b = (read_torch_dist(os.path.join(d, "iter_0000001")) for d in (dist, dist2))
    tensors = sorted(k for k, v in a.items() if isinstance(v, torch.Tensor))
    assert tensors == sorted(k for k, v in b.items() if isinstance(v, torch.Tensor))
    for k in tensors:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    # every decoder key names its global layer (none stacked); layers hold the same keys exactly
    # when they hold the same blocks
    decoder = [k for k in tensors if k.startswith("decoder.layers.")]
    assert decoder and all(_LAYER_KEY.match(k) for k in decoder), decoder[0]
    per_layer = _layer_keys(tensors)
    assert sorted(per_layer) == list(range(spec.num_layers))
    for i in range(spec.num_layers):
        for j in range(i):
            same = spec.blocks(i) == spec.blocks(j)
            assert (per_layer[i] == per_layer[j]) == same, (i, j, spec.blocks(i), spec.blocks(j))
    if spec.mtp_layers:  # DeepSeek-V4's MTP layer: its own hyper-connection head beside enorm / hnorm
        hc = {k for k in tensors if k.startswith("mtp.layers.0.hc_head.")}
        assert hc and {k for k in tensors if k.startswith("hc_head.")}, tensors


def test_falcon_h1_mixer_is_stored_part_by_part_under_mamba_mixer(models, tmp_path):
    """Megatron-Bridge's Falcon-H1 layer stores megatron-core's MambaMixer under ``mamba_mixer``:
    ``in_proj`` as ``[z; x; B; C; dt]`` (d_ssm, d_ssm, groups x state twice, heads rows) and
    ``conv1d`` as ``[x; B; C]``, each part the HF tensor's rows."""
    src = models("falcon_h1")
    cfg = json.load(open(os.path.join(src, "config.json")))
    dist = str(tmp_path / "dist")
    convert(src, dist, ck.Target(to="mcore", ckpt_format="torch_dist"))
    sd = read_torch_dist(os.path.join(dist, "iter_0000001"), "decoder.layers.1.mamba_mixer.")
    d, gn, h = cfg["mamba_d_ssm"], cfg["mamba_n_groups"] * cfg["mamba_d_state"], cfg["mamba_n_heads"]
    hf = hf_state(src)
    for tensor, parts in (
        ("in_proj.weight", (("z", d), ("x", d), ("B", gn), ("C", gn), ("dt", h))),
        ("conv1d.weight", (("x", d), ("B", gn), ("C", gn))),
        ("conv1d.bias", (("x", d), ("B", gn), ("C", gn))),
    ):
        whole = hf[f"model.layers.1.mamba.{tensor}"]
        assert f"decoder.layers.1.mamba_mixer.{tensor}" not in sd
        start = 0
        for name, rows in parts:
            assert torch.equal(
                sd[f"decoder.layers.1.mamba_mixer.{tensor}.{name}"], whole[start : start + rows]
            )
            start += rows
        assert start == whole.shape[0]
