"""Compare ckpt-ir's Megatron rank files with MindSpeed-LLM v2's converter, bit for bit.

Not a test (CI has no MindSpeed source): a script to run by hand where a MindSpeed-LLM checkout or
git mirror exists (the Mamba-2 cases are described further down).  For each case it builds a
tiny random HF model with transformers (the family tests' configs, tests/family_models.py, MTP layers appended as the releases store them) or a
remote-code family's packed checkpoint (tests/test_families_remote_code.py), converts it with MindSpeed-LLM's own ``convert_ckpt_v2.py`` (HF -> mg, on
CPU) and with ``ckpt-ir convert-ckpt`` (same flags), and reports per case: identical rank
directories, identical keys in the same order, identical tensors; or which differ.

MindSpeed-LLM's conversion code is pure torch; only two incidental imports need stand-ins, and
the conversion code itself is never patched:

* the ``mindspeed_llm`` package ``__init__`` (it imports the NPU training adaptor): the package
  is registered with its directory as ``__path__`` without running ``__init__``;
* ``mindspeed_llm.training.utils`` (imports ``acl``, ``torch_npu``, Megatron): replaced by a
  module holding only ``auto_coverage``, which outside coverage runs is the identity.

Mamba-2 (cases ``mamba2-*``): MindSpeed-LLM's dedicated converter
(``--model-type-hf mamba2``, ``mindspeed_llm/tasks/checkpoint/convert_ckpt_mamba2.py``) on a tiny
``Mamba2ForCausalLM`` (MAMBA2_CONFIG: hidden 64, 8 heads of 16, 2 groups, state 16, conv 4, vocab
128, 4 layers, fp32), at TP1, TP2 and TP2 PP2.  Per case: its rank files against megatron-core's
legacy layout built here from the HF tensors (``mamba2_reference``, composed-blocks.md §2.3), its
own mg -> hf on its output against the HF tensors, and ckpt-ir's output against its files with the
argv in MAMBA2_CKPT_IR (None: "ckpt-ir: not supported", which does not fail the run).  Measured
with MindSpeed-LLM ``c77308a1`` (hf -> mg and mg -> hf, 0.2-0.5 s a case):

* directories: ``latest_checkpointed_iteration.txt`` holding ``1``, ``iter_0000001/mp_rank_TT``
  (PP 1) or ``iter_0000001/mp_rank_TT_PPP``, each with one ``model_optim_rng.pt``;
* top-level dict: exactly ``model``, ``checkpoint_version`` (3.0), ``iteration`` (1); no ``args``
  (so mg -> hf needs ``--input-tp-rank``, ``--input-pp-rank``, ``--num-layers`` and the dims), no
  optimizer or RNG state;
* keys in this order (the HF file's order, which safetensors sorts by name: read in the code,
  not measured beyond 4 layers, ``layers.10`` would precede ``layers.2``), shapes at TP1 / TP2,
  dtype as in the HF file (no cast):
  ``embedding.word_embeddings.weight`` [128,64] / [64,64]; per layer ``decoder.layers.{j}.``
  ``mixer.A_log`` [8] / [4], ``mixer.D`` [8] / [4], ``mixer.conv1d.bias`` [192] / [96],
  ``mixer.conv1d.weight`` [192,1,4] / [96,1,4], ``mixer.dt_bias`` [8] / [4],
  ``mixer.in_proj.weight`` [328,64] / [164,64], ``mixer.norm.weight`` [128] / [64],
  ``mixer.out_proj.weight`` [64,128] / [64,64], ``norm.weight`` [64] / [64] (whole on every
  rank); then ``decoder.final_norm.weight`` [64] (whole) and ``output_layer.weight`` [128,64] /
  [64,64].  The TP shards equal megatron-core's per-part blocks (``in_proj`` rank r = rows
  ``[z_r; x_r; B_r; C_r; dt_r]``, ``conv1d`` ``[x_r; B_r; C_r]``, ``out_proj`` column chunks);
* PP defect (TP2 PP2): stage 0 ``mp_rank_TT_000`` holds layers 0, 1 plus the embedding, the final
  norm and the output layer; stage 1 ``mp_rank_TT_001`` holds layers -2, -1 (HF layers 0, 1 again),
  0, 1 (HF 2, 3) plus the embedding, the final norm and the output layer: 21 keys per TP rank (42
  in all) beyond a correct split.  Without them the files equal megatron-core's layout.  Its mg ->
  hf of that output gives the 39 HF tensors back plus 18 extra ``backbone.layers.-4.*`` and
  ``backbone.layers.-3.*`` (HF layers 0, 1 once more);
* mg -> hf writes one ``torch_model.bin`` (a plain dict under the HF names, loadable with
  ``weights_only=True``; no config, no safetensors); at TP1 and TP2 all 39 tensors come back equal.

DeepSeek-V4 (cases ``deepseek4-*``): MindSpeed-LLM's dedicated converter (``--model-type-hf
deepseek4``, ``convert_ckpt_deepseek4.py``) on the DeepSeek-V4 tests' tiny model in the release's
naming (tests/test_families_dsv4.py: 3 layers of compress ratios 0 / 4 / 128, the first routed by
token id, one MTP layer, bf16, which the converter requires), both converters with the same flags
(``--mtp-num-layers 1``; expert TP 1, that converter's default and ckpt-ir's for deepseek4).
Besides the rank files (``run_deepseek4_case``): ckpt-ir's mg -> hf of MindSpeed's output, and
MindSpeed's own mg -> hf (``--hf-cfg-dir``, ``--expert-tensor-parallel-size 1``) of its output
without ``--mtp-num-layers`` and of ckpt-ir's with it.  Measured with MindSpeed-LLM ``c77308a1``
(under 0.2 s a conversion):

* rank files identical at TP2 PP2 (``--num-layer-list 1,2``), TP1 EP2 grouped, TP2 EP2 and TP2 EP2
  grouped; at TP2 EP2 MindSpeed also writes ``mp_rank_00_001`` and ``mp_rank_01_000``, which
  Megatron's expert grid with expert TP 1 does not have ((t, t mod EP) only): copies of TP rank
  t's dense tensors with EP rank e's experts;
* ckpt-ir's mg -> hf of MindSpeed's output: all 162 HF tensors equal, the MTP layer included (43
  tensors, and the two embedding / head copies from the main ones), extra directories included;
* MindSpeed's mg -> hf of its own output without ``--mtp-num-layers``: 119/162, the 43 MTP tensors
  silently missing (exit 0); at TP2 EP2 (sequential experts) it fails (``KeyError: (0, 1)``);
* MindSpeed's mg -> hf of ckpt-ir's output: 160/162, all but the MTP layer's embedding and head
  copies (``deepseek4`` ties them: ``tie_mtp_embeddings_and_lmhead``), except at TP2 EP2 (the same
  KeyError).
LongCat-Flash (cases ``longcat-*``): MindSpeed-LLM's dedicated converter (``--model-type-hf
longcat``, ``convert_ckpt_longcat.py``) on the family tests' 3-layer ``longcat_flash`` model.  Besides
the rank-file comparison, READ_BACK reads each side's files back to HF: ckpt-ir's ``convert-ckpt``
on MindSpeed's (``--hf-cfg-dir``: its args hold the HF config under MindSpeed's names, where
``qk_head_dim`` is ``qk_nope_head_dim`` and ``num_layers`` is taken for Megatron's) and MindSpeed's
mg -> hf on ckpt-ir's, each against the HF tensors.  Measured with ``c77308a1``: identical rank
files and equal tensors both ways at TP2 EP2, TP2 EP2 with expert TP 1 and grouped GEMM (its
release recipe: only the (t, t % EP) rank directories), and TP2 PP2 with ``--num-layer-list 2,1``;
MindSpeed's mg -> hf reads grouped GEMM and expert TP 1 only from its flags (without them:
``KeyError: ...mlp.experts.local_experts.0.linear_fc1.weight``).

The exit status is 0 when every check that ran passed: a ckpt-ir comparison that is not
supported yet counts as not run.

Usage::

    python bench/peers/mindspeed_v2.py --mindspeed PATH/TO/MindSpeed-LLM \\
        [--work /tmp/ms-compare] [--case seed-oss-tp2pp2 ...]

``--mindspeed`` is a source checkout or a bare git directory (read with ``git archive HEAD``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the two layouts most cases use: MindSpeed-LLM v2 target flags
TP2_PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
TP2_EP2_GROUPED = [
    "--target-tensor-parallel-size",
    "2",
    "--target-expert-parallel-size",
    "2",
    "--moe-grouped-gemm",
]

# case -> (HF model_type, MindSpeed --model-type-hf, flags shared by both converters); a
# remote-code family's model is the remote test's packed checkpoint (tests/test_families_remote_code.py)
CASES = {
    "seed-oss-tp2pp2": (
        "seed_oss",
        "seed-oss",
        TP2_PP2,
    ),
    "seed-oss-tp1pp2-layers": (
        "seed_oss",
        "seed-oss",
        ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
    ),
    "glm45-tp2pp2": (
        "glm4_moe",
        "glm45",
        [
            "--target-tensor-parallel-size",
            "2",
            "--target-pipeline-parallel-size",
            "2",
        ],
    ),
    "glm45-tp2ep2-grouped": (
        "glm4_moe",
        "glm45",
        [
            "--target-tensor-parallel-size",
            "2",
            "--target-expert-parallel-size",
            "2",
            "--moe-grouped-gemm",
        ],
    ),
    "deepseek2-lite-tp2pp2": (
        "deepseek_v2",
        "deepseek2-lite",
        TP2_PP2,
    ),
    "deepseek2-lite-tp2ep2-grouped": (
        "deepseek_v2",
        "deepseek2-lite",
        TP2_EP2_GROUPED,
    ),
    "phi3.5-moe-tp2pp2": (
        "phimoe",
        "phi3.5-moe",
        TP2_PP2,
    ),
    "phi3.5-moe-tp2ep2-grouped": (
        "phimoe",
        "phi3.5-moe",
        TP2_EP2_GROUPED,
    ),
    "minimax_m2-tp2pp2": (
        "minimax_m2",
        "minimax_m2",
        TP2_PP2,
    ),
    "minimax_m2-tp2ep2-grouped": (
        "minimax_m2",
        "minimax_m2",
        TP2_EP2_GROUPED,
    ),
    "bailing_mini-tp2pp2": (
        "bailing_moe_v2",
        "bailing_mini",
        TP2_PP2,
    ),
    "bailing_mini-tp2ep2-grouped": (
        "bailing_moe_v2",
        "bailing_mini",
        TP2_EP2_GROUPED,
    ),
    # Ling 2.0 as released (use_qkv_bias false): MindSpeed's bailing_mini entry maps no
    # use_qkv_bias -> add_qkv_bias, so it cannot carry query_key_value.bias (see docs/families.md)
    "bailing_mini-nobias-tp2ep2-grouped": (
        "bailing_moe_v2-no-qkv-bias",
        "bailing_mini",
        TP2_EP2_GROUPED,
    ),
    # Hunyuan V3 with one MTP layer as the release stores it (tests/test_families_moe.py)
    "HYV3-mtp-tp2pp2ep2-grouped": (
        "hy_v3+mtp",
        "HYV3",
        [
            "--target-tensor-parallel-size",
            "2",
            "--target-pipeline-parallel-size",
            "2",
            "--target-expert-parallel-size",
            "2",
            "--moe-grouped-gemm",
            "--mtp-num-layers",
            "1",
        ],
    ),
    "HYV3-mtp-tp2ep2": (
        "hy_v3+mtp",
        "HYV3",
        ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--mtp-num-layers", "1"],
    ),
    # Qwen3-Next with its MTP layer as released (tests/test_families_hybrid.py); TP 1 only
    "qwen3-next-mtp-pp2-layers": (
        "qwen3_next+mtp",
        "qwen3-next",
        ["--target-pipeline-parallel-size", "2", "--num-layer-list", "3,1", "--mtp-num-layers", "1"],
    ),
    "qwen3-next-mtp-ep2-grouped": (
        "qwen3_next+mtp",
        "qwen3-next",
        ["--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1"],
    ),
    "deepseek32-tp2pp2": (
        "deepseek_v32",
        "deepseek32",
        TP2_PP2,
    ),
    "deepseek32-tp2ep2-grouped": (
        "deepseek_v32",
        "deepseek32",
        TP2_EP2_GROUPED,
    ),
    "deepseek32-mtp-tp2pp2ep2": (
        "deepseek_v32+mtp",
        "deepseek32",
        [
            "--target-tensor-parallel-size",
            "2",
            "--target-pipeline-parallel-size",
            "2",
            "--target-expert-parallel-size",
            "2",
            "--mtp-num-layers",
            "1",
        ],
    ),
    # MindSpeed's glm5 entry fixes first_k_dense_replace at 3 and always groups the experts
    "glm5-tp2pp2-grouped": (
        "glm_moe_dsa+3dense",
        "glm5",
        ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--moe-grouped-gemm"],
    ),
    "glm5-tp2ep2-grouped": (
        "glm_moe_dsa+3dense",
        "glm5",
        TP2_EP2_GROUPED,
    ),
    "plm-tp2pp2": (
        "plm",
        "plm",
        TP2_PP2,
    ),
    "plm-tp1pp2-layers": ("plm", "plm", ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"]),
    # DeepSeek-V4 in the release's naming with one MTP layer, bf16 (tests/test_families_dsv4.py);
    # its dedicated converter: expert TP 1 by default, MTP only with --mtp-num-layers
    "deepseek4-mtp-tp2pp2-layers": (
        "deepseek_v4+release",
        "deepseek4",
        [*TP2_PP2, "--num-layer-list", "1,2", "--mtp-num-layers", "1"],
    ),
    "deepseek4-mtp-tp1ep2-grouped": (
        "deepseek_v4+release",
        "deepseek4",
        ["--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1"],
    ),
    "deepseek4-mtp-tp2ep2": (
        "deepseek_v4+release",
        "deepseek4",
        ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--mtp-num-layers", "1"],
    ),
    "deepseek4-mtp-tp2ep2-grouped": (
        "deepseek_v4+release",
        "deepseek4",
        [*TP2_EP2_GROUPED, "--mtp-num-layers", "1"],
    ),
    # LongCat-Flash (3 layers, tests/family_models.py): MindSpeed's dedicated converter
    # (convert_ckpt_longcat.py); the second case is its release recipe (expert TP 1, grouped GEMM)
    "longcat-tp2ep2": (
        "longcat_flash",
        "longcat",
        ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    ),
    "longcat-tp2ep2-etp1-grouped": (
        "longcat_flash",
        "longcat",
        [*TP2_EP2_GROUPED, "--expert-tensor-parallel-size", "1"],
    ),
    "longcat-tp2pp2-layers": (
        "longcat_flash",
        "longcat",
        [*TP2_PP2, "--num-layer-list", "2,1"],
    ),
}
# cases whose rank files are also read back to HF both ways: ckpt-ir's convert-ckpt on MindSpeed's
# files (with --hf-cfg-dir: MindSpeed's LongCat args rename qk_head_dim and drop num_layers) and
# MindSpeed's own mg -> hf on ckpt-ir's, each against the HF tensors; case -> the flags MindSpeed's
# mg -> hf needs besides its files' args (it does not read grouped GEMM or expert TP 1 from them)
READ_BACK = {
    "longcat-tp2ep2": [],
    "longcat-tp2ep2-etp1-grouped": ["--moe-grouped-gemm", "--expert-tensor-parallel-size", "1"],
    "longcat-tp2pp2-layers": [],
}


def mindspeed_source(src: str, into: str) -> str:
    """A directory holding MindSpeed-LLM's converter sources (checkout used as is, bare git dir
    exported with ``git archive``)."""
    if os.path.exists(os.path.join(src, "convert_ckpt_v2.py")):
        return src
    paths = ["convert_ckpt_v2.py", "mindspeed_llm/tasks/checkpoint", "configs/checkpoint"]
    archive = subprocess.run(
        ["git", "--git-dir", src, "archive", "HEAD", *paths], check=True, capture_output=True
    )
    subprocess.run(["tar", "x", "-C", into], input=archive.stdout, check=True)
    return into


def run_mindspeed(source: str, argv: list[str], log: str | None = None) -> None:
    """``python convert_ckpt_v2.py ARGV`` in this process (forked), with the two stand-ins;
    its output goes to the file ``log`` if given (the last line of it in the error if it fails)."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status):
            tail = ""
            if log is not None:
                with open(log, errors="replace") as fh:
                    tail = ": " + ((fh.read().strip().splitlines() or ["(empty log)"])[-1])
            raise RuntimeError(f"MindSpeed-LLM convert_ckpt_v2.py {' '.join(argv)} failed{tail}")
        return
    try:
        if log is not None:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        for name in ("mindspeed_llm", "mindspeed_llm.tasks", "mindspeed_llm.training"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(source, *name.split("."))]
            sys.modules[name] = pkg
        utils = types.ModuleType("mindspeed_llm.training.utils")
        utils.auto_coverage = lambda func: func  # what it is without START_COVERAGE=true
        sys.modules["mindspeed_llm.training.utils"] = utils
        sys.path.insert(0, source)
        os.chdir(source)  # it reads configs/checkpoint/model_cfg.json relative to the working dir
        sys.argv = ["convert_ckpt_v2.py", *argv]
        runpy.run_path(os.path.join(source, "convert_ckpt_v2.py"), run_name="__main__")
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_ckpt_ir(argv: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "ckpt_ir", "convert-ckpt", *argv], check=True, env=env, cwd=ROOT)


def hf_tensors(path: str) -> dict:
    """Every tensor of the safetensors files of the HF directory ``path``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def same_hf(want: dict, got: dict) -> str | None:
    """None when ``got`` holds exactly ``want``'s tensors (names, dtypes, values), else what differs."""
    import torch

    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    unequal = sorted(
        k for k in set(want) & set(got) if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])
    )
    if not (missing or extra or unequal):
        return None
    return f"missing {missing[:3]}, extra {extra[:3]}, unequal {unequal[:3]}"


def read_back(case: str, source: str, work: str, hf: str, theirs: str, ours: str) -> list[str]:
    """READ_BACK's checks of ``case``: ckpt-ir reads MindSpeed's rank files, MindSpeed reads
    ckpt-ir's, both back to HF; [] when both give the HF tensors."""
    want, out = hf_tensors(hf), []
    back = os.path.join(work, "back", case)
    shutil.rmtree(back, ignore_errors=True)
    args = ["--load-model-type", "mg", "--save-model-type", "hf", "--hf-cfg-dir", hf]
    run_ckpt_ir([*args, "--load-dir", theirs, "--save-dir", os.path.join(back, "ckpt-ir")])
    bad = same_hf(want, hf_tensors(os.path.join(back, "ckpt-ir")))
    if bad:
        out.append(f"ckpt-ir on MindSpeed's files: {bad}")
    ms_name = CASES[case][1]
    argv = [*args, "--model-type-hf", ms_name, *READ_BACK[case], "--load-dir", ours]
    try:
        run_mindspeed(source, [*argv, "--save-dir", os.path.join(back, "mindspeed")], back + "-mindspeed.log")
    except RuntimeError as e:
        return [*out, f"MindSpeed on ckpt-ir's files failed: {e}"]
    bad = same_hf(want, hf_tensors(os.path.join(back, "mindspeed")))
    if bad:
        out.append(f"MindSpeed on ckpt-ir's files: {bad}")
    return out


def rank_files(root: str) -> dict[str, str]:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as fh:
        it = fh.read().strip()
    it_dir = os.path.join(root, "release" if it == "release" else f"iter_{int(it):07d}")
    return {d: os.path.join(it_dir, d, "model_optim_rng.pt") for d in sorted(os.listdir(it_dir))}


def load_ranks(root: str) -> dict[str, dict]:
    """Each rank directory's ``model_optim_rng.pt`` of the Megatron checkpoint at ``root``."""
    import torch

    return {
        rank: torch.load(f, map_location="cpu", weights_only=False) for rank, f in rank_files(root).items()
    }


def compare(theirs: str, ours: str) -> list[str]:
    """Differences between two Megatron checkpoints' model tensors ([] if identical)."""
    return compare_ranks(load_ranks(theirs), load_ranks(ours))


def compare_ranks(
    a: dict[str, dict], b: dict[str, dict], names: tuple[str, str] = ("MindSpeed", "ckpt-ir")
) -> list[str]:
    """Differences between two sets of rank dicts' model tensors: rank directories, keys, key
    order, dtypes, shapes and values ([] if identical)."""
    import torch

    if a.keys() != b.keys():
        return [f"rank directories: {names[0]} {sorted(a)} vs {names[1]} {sorted(b)}"]
    out = []
    for rank in a:
        ma, mb = a[rank], b[rank]
        for model in sorted(k for k in ma if k.startswith("model")):
            sa, sb = ma[model], mb.get(model, {})
            ka = [k for k in sa if not k.endswith("_extra_state")]
            kb = [k for k in sb if not k.endswith("_extra_state")]
            if set(ka) != set(kb):
                only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
                out.append(f"{rank}/{model}: only {names[0]} {only_a}; only {names[1]} {only_b}")
            elif ka != kb:
                out.append(f"{rank}/{model}: same keys, different order")
            for k in sorted(set(ka) & set(kb)):
                ta, tb = sa[k], sb[k]
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
                    out.append(
                        f"{rank}/{model}: {k} differs ({tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype})"
                    )
    return out


NO_QKV_BIAS = "-no-qkv-bias"


def build_remote(hf: str, work: str, model_type: str) -> None:
    """The remote test's packed checkpoint of ``model_type`` at ``hf``; with the NO_QKV_BIAS
    suffix, Ling 2.0 as released: ``use_qkv_bias`` false and no query_key_value.bias tensors."""
    import json

    from safetensors.torch import load_file, save_file

    from tests import test_families_remote_code as remote

    family = model_type.removesuffix(NO_QKV_BIAS)
    os.makedirs(os.path.dirname(hf), exist_ok=True)
    shutil.move(remote.build(tempfile.mkdtemp(dir=work), family, seed=0)["src"], hf)
    if model_type.endswith(NO_QKV_BIAS):
        f, c = os.path.join(hf, "model.safetensors"), os.path.join(hf, "config.json")
        save_file({k: v for k, v in load_file(f).items() if not k.endswith("query_key_value.bias")}, f)
        with open(c) as fh:
            cfg = json.load(fh)
        with open(c, "w") as fh:
            json.dump(dict(cfg, use_qkv_bias=False), fh, indent=2)


def build_hy_v3_mtp(hf: str) -> None:
    """The MoE tests' Hunyuan V3 model with one MTP layer in the release's form.  MindSpeed's
    HYV3 entry reads the dense layers from ``first_k_dense_replace`` (transformers' config has
    ``mlp_layer_types`` instead): the count is added to config.json (layer 0 dense, as built)."""
    import json

    from tests import family_models

    family_models.build(hf, "hy_v3")
    cfg, _ = family_models.append_mtp_layer(hf, family_models.DENSE["hidden_size"], hunyuan=True)
    assert cfg["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"], cfg["mlp_layer_types"]
    with open(os.path.join(hf, "config.json"), "w") as fh:
        json.dump(dict(cfg, first_k_dense_replace=1), fh, indent=2)


def build_qwen3_next_mtp(hf: str) -> None:
    """The hybrid tests' Qwen3-Next model with its MTP layer in the release's form.  MindSpeed
    reads ``full_attention_interval`` (the released configs have it; transformers 5 saves
    ``layer_types``): added to config.json, 4 as built (layers 0-2 linear, 3 full)."""
    import json

    from tests import family_models
    from tests.test_families_hybrid import append_qwen3_next_mtp_layer

    family_models.build(hf, "qwen3_next")
    append_qwen3_next_mtp_layer(hf, family_models.DENSE["hidden_size"])
    with open(os.path.join(hf, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"], cfg["layer_types"]
    with open(os.path.join(hf, "config.json"), "w") as fh:
        json.dump(dict(cfg, full_attention_interval=4), fh, indent=2)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V4 through MindSpeed-LLM's dedicated converter (convert_ckpt_deepseek4.py)


def build_deepseek_v4_release(hf: str, work: str) -> None:
    """The DeepSeek-V4 tests' tiny model in the release's naming with one MTP layer, in bf16 (the
    converter refuses other dtypes); compress ratios 0 / 4 / 128 as the release's."""
    import torch

    from tests import test_families_dsv4 as dsv4

    tf = dsv4.build_dsv4(tempfile.mkdtemp(dir=work), compress_rates=dsv4.RELEASE_RATES)
    os.makedirs(os.path.dirname(hf), exist_ok=True)
    dsv4.release_named(tf, hf, torch.bfloat16)


def _hf_diff(want: dict, got: dict) -> tuple[list[str], list[str], list[str]]:
    import torch

    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    unequal = sorted(
        k
        for k in set(want) & set(got)
        if want[k].dtype != got[k].dtype or want[k].shape != got[k].shape or not torch.equal(want[k], got[k])
    )
    return missing, extra, unequal


def run_deepseek4_case(
    case: str, source: str, work: str, hf: str, theirs: str, ours: str
) -> tuple[bool, str]:
    """Beyond the rank files: MindSpeed's every-(TP, EP) directories (expert TP 1; Megatron's
    expert grid uses (t, t mod EP) only) checked to be copies, the rank files compared where both
    write them; ckpt-ir's mg -> hf of MindSpeed's output (no MTP flag: the MTP layer must come
    back); MindSpeed's own mg -> hf of it without --mtp-num-layers (its MTP drop); MindSpeed's
    mg -> hf of ckpt-ir's output (with the flags it needs).  Returns (passed, summary)."""
    from tests.test_hf_roundtrip import hf_state

    _, _, flags = CASES[case]
    a, b = load_ranks(theirs), load_ranks(ours)
    ok, lines = True, []
    extra = sorted(set(a) - set(b))
    if extra and set(b) <= set(a):
        tp = int(flags[flags.index("--target-tensor-parallel-size") + 1])
        ep = int(flags[flags.index("--target-expert-parallel-size") + 1])
        bad = []
        for d in extra:  # mp_rank_TT_EEE: TP rank t's dense tensors, EP rank e's experts
            t, e = (int(x) for x in d.split("_")[2:])
            dense, experts = b[f"mp_rank_{t:02d}_{t % ep:03d}"], b[f"mp_rank_{e % tp:02d}_{e:03d}"]
            have = {k: v for k, v in dense["model"].items() if ".experts." not in k}
            have |= {k: v for k, v in experts["model"].items() if ".experts." in k}
            want = {k: have[k] for k in a[d]["model"] if k in have} | have  # values compared, not order
            bad += compare_ranks({d: {"model": a[d]["model"]}}, {d: {"model": want}}, ("MindSpeed", "copy"))
        ok &= not bad
        lines.append(
            f"MindSpeed also writes {extra} (not in Megatron's expert grid): "
            + ("copies" if not bad else "; ".join(bad[:3]))
        )
        a = {d: a[d] for d in b}
    diffs = compare_ranks(a, b)
    ok &= not diffs
    lines.append("rank files: " + ("identical" if not diffs else "; ".join(diffs[:10])))
    src = hf_state(hf)
    back = os.path.join(work, "ckpt-ir-hf", case)
    shutil.rmtree(back, ignore_errors=True)
    run_ckpt_ir(
        ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", theirs, "--save-dir", back]
    )
    missing, more, unequal = _hf_diff(src, hf_state(back))
    ok &= not (missing or more or unequal)
    lines.append(
        f"ckpt-ir mg->hf of MindSpeed's output: {len(src) - len(missing) - len(unequal)}/{len(src)} HF tensors equal"
        + (
            f", missing {missing[:5]}, extra {more[:5]}, unequal {unequal[:5]}"
            if missing or more or unequal
            else ""
        )
    )
    log = os.path.join(work, "logs", case + "-{}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    back_flags = ["--expert-tensor-parallel-size", "1"] + (
        ["--moe-grouped-gemm"] if "--moe-grouped-gemm" in flags else []
    )
    common = [
        "--load-model-type",
        "mg",
        "--save-model-type",
        "hf",
        "--model-type-hf",
        "deepseek4",
        "--hf-cfg-dir",
        hf,
    ]
    for what, load, extra_flags in (
        ("MindSpeed mg->hf of its own output without --mtp-num-layers", theirs, back_flags),
        ("MindSpeed mg->hf of ckpt-ir's output", ours, ["--mtp-num-layers", "1", *back_flags]),
    ):
        out = os.path.join(work, "mindspeed-hf", case + ("-own" if load == theirs else "-ckpt-ir"))
        shutil.rmtree(out, ignore_errors=True)
        try:
            run_mindspeed(
                source, [*common, *extra_flags, "--load-dir", load, "--save-dir", out], log.format(what[-8:])
            )
        except RuntimeError as e:
            lines.append(f"{what}: failed ({str(e).rsplit(': ', 1)[-1]})")
            continue
        missing, more, unequal = _hf_diff(src, hf_state(out))
        mtp = [k for k in missing if k.startswith("mtp.")]
        lines.append(
            f"{what}: {len(src) - len(missing) - len(unequal)}/{len(src)} equal"
            + (f", {len(mtp)} MTP tensors missing {mtp[:3]}" if mtp else "")
            + (f", other missing {sorted(set(missing) - set(mtp))[:5]}" if set(missing) - set(mtp) else "")
            + (f", unequal {unequal[:5]}" if unequal else "")
        )
    return ok, "\n    ".join(lines)


# ---------------------------------------------------------------------------------------------
# Mamba-2 through MindSpeed-LLM's dedicated converter (convert_ckpt_mamba2.py)

# the tiny Mamba2ForCausalLM: d_inner = expand * hidden = num_heads * head_dim = 128; MindSpeed
# hard-codes expand 2 and takes the other dims from its own flags (mamba2_ms_dims)
MAMBA2_CONFIG = dict(
    hidden_size=64,
    n_groups=2,
    state_size=16,
    head_dim=16,
    expand=2,
    num_heads=8,
    conv_kernel=4,
    vocab_size=128,
)
MAMBA2_LAYERS = 4
# case -> (TP, PP) of MindSpeed-LLM's dedicated Mamba-2 converter (kept out of CASES, whose entries run
# the generic one); tests/test_support_matrix.py holds the mamba2 family's claims to them
MAMBA2_CASES = {"mamba2-tp1": (1, 1), "mamba2-tp2": (2, 1), "mamba2-tp2pp2": (2, 2)}
# case -> ckpt-ir's argv (after ``python -m ckpt_ir``) writing the same layout, ``{hf}`` and ``{out}``
# replaced by the HF model and the output directory, e.g. ["convert", "{hf}", "{out}", "--to",
# "mcore", "--tp", "2", ...]; None: ckpt-ir cannot write it yet (the case says "not supported")
MAMBA2_CKPT_IR: dict[str, list[str] | None] = {
    "mamba2-tp1": ["convert", "{hf}", "{out}", "--to", "mcore"],
    "mamba2-tp2": ["convert", "{hf}", "{out}", "--to", "mcore", "--tp", "2"],
    "mamba2-tp2pp2": ["convert", "{hf}", "{out}", "--to", "mcore", "--tp", "2", "--pp", "2"],
}
_LAYER = re.compile(r"^decoder\.layers\.(-?\d+)\.")


def mamba2_ms_dims(cfg: dict) -> list[str]:
    """MindSpeed's dimension flags for ``cfg`` (it reads none of them from config.json)."""
    if cfg["expand"] != 2:
        raise ValueError(
            f"MindSpeed-LLM's mamba2 converter fixes expand at 2, the config has {cfg['expand']}"
        )
    return [
        "--hidden-size",
        str(cfg["hidden_size"]),
        "--mamba-state-dim",
        str(cfg["state_size"]),
        "--mamba-num-groups",
        str(cfg["n_groups"]),
        "--mamba-head-dim",
        str(cfg["head_dim"]),
    ]


def mamba2_reference(hf: dict, cfg: dict, layers: int, tp: int, pp: int) -> dict[str, dict]:
    """The rank dicts of megatron-core's legacy Mamba-2 layout (composed-blocks.md §2.3) under
    MindSpeed's names and key order (§4.1: the HF file's order), with a correct pipeline split:
    stage s holds layers s*L/pp.. numbered from 0, the embedding only on the first stage, the final
    norm and output layer only on the last.  Top-level keys as MindSpeed writes them (no args)."""
    import torch

    d, gn, heads = cfg["num_heads"] * cfg["head_dim"], cfg["n_groups"] * cfg["state_size"], cfg["num_heads"]

    def parts(t, sizes):  # each part of a fused tensor chunked over TP; rank r's blocks concatenated
        chunks = [torch.chunk(p, tp) for p in torch.split(t, sizes)]
        return [torch.cat([c[r] for c in chunks]) for r in range(tp)]

    per_part = {"mixer.in_proj.weight": [d, d, gn, gn, heads], "mixer.conv1d.weight": [d, gn, gn]}
    per_part["mixer.conv1d.bias"] = per_part["mixer.conv1d.weight"]
    dim0 = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight")
    per_stage = layers // pp
    ranks: dict[str, dict] = {}
    for s in range(pp):
        models = [{} for _ in range(tp)]
        for key, t in hf.items():
            if key == "backbone.embeddings.weight":
                name, shards = "embedding.word_embeddings.weight", torch.chunk(t, tp)
                if s != 0:
                    continue
            elif key in ("backbone.norm_f.weight", "lm_head.weight"):
                if s != pp - 1:
                    continue
                if key == "lm_head.weight":
                    name, shards = "output_layer.weight", torch.chunk(t, tp)
                else:
                    name, shards = "decoder.final_norm.weight", [t] * tp
            else:
                m = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key)
                if m is None:
                    raise ValueError(
                        f"{key}: not a Mamba2ForCausalLM tensor; mamba2_reference knows none such"
                    )
                i, suffix = int(m.group(1)), m.group(2)
                if i // per_stage != s:
                    continue
                name = f"decoder.layers.{i - s * per_stage}.{suffix}"
                if suffix in per_part:
                    shards = parts(t, per_part[suffix])
                elif suffix in dim0:
                    shards = torch.chunk(t, tp)
                elif suffix == "mixer.out_proj.weight":
                    shards = torch.chunk(t, tp, dim=1)
                elif suffix == "norm.weight":
                    shards = [t] * tp
                else:
                    raise ValueError(f"{key}: no TP rule for {suffix} in mamba2_reference")
            for r in range(tp):
                models[r][name] = shards[r].contiguous()
        for r in range(tp):
            rank = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{s:03d}"
            ranks[rank] = {"model": models[r], "checkpoint_version": 3.0, "iteration": 1}
    return ranks


def mamba2_pp_extras(ranks: dict[str, dict], pp: int) -> dict[str, list[str]]:
    """Per rank, the keys MindSpeed's pipeline split adds beyond a correct one (§4.1's defect):
    layers under negative numbers, the embedding after the first stage, the final norm and output
    layer before the last."""
    extras = {}
    for rank, ckpt in ranks.items():
        stage = int(rank.rsplit("_", 1)[1]) if pp > 1 else 0
        out = []
        for k in ckpt["model"]:
            m = _LAYER.match(k)
            if m and int(m.group(1)) < 0:
                out.append(k)
            elif k.startswith("embedding.") and stage != 0:
                out.append(k)
            elif k in ("decoder.final_norm.weight", "output_layer.weight") and stage != pp - 1:
                out.append(k)
        extras[rank] = out
    return extras


def mamba2_stage_summary(ranks: dict[str, dict]) -> str:
    """Per TP-0 rank: the layer numbers it holds and its non-layer tensors (the PP defect, measured)."""
    out = []
    for rank, ckpt in ranks.items():
        if not rank.startswith("mp_rank_00"):
            continue
        nums = sorted({int(m.group(1)) for k in ckpt["model"] if (m := _LAYER.match(k))})
        top = [k.rsplit(".weight", 1)[0] for k in ckpt["model"] if not _LAYER.match(k)]
        out.append(f"{rank}: layers {nums} + {', '.join(top)}")
    return "; ".join(out)


def run_mamba2_case(case: str, source: str, work: str, hf: str) -> tuple[bool, str]:
    """MindSpeed's Mamba-2 converter hf -> mg at the case's layout, its files against
    megatron-core's layout, its mg -> hf back to the HF tensors, and ckpt-ir's output against its
    files where ckpt-ir can write the layout.  Returns (all checks that ran passed, summary)."""
    import torch
    from safetensors.torch import load_file

    tp, pp = MAMBA2_CASES[case]
    theirs, back, ours = (os.path.join(work, d, case) for d in ("mindspeed", "mindspeed-hf", "ckpt-ir"))
    for d in (theirs, back, ours):
        shutil.rmtree(d, ignore_errors=True)
    dims = mamba2_ms_dims(MAMBA2_CONFIG)
    ms = ["--model-type-hf", "mamba2", *dims]
    layout = ["--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp)]
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    log = os.path.join(work, "logs", case + "-{}.log")
    try:
        argv = ["--load-model-type", "hf", "--save-model-type", "mg", *ms, *layout]
        run_mindspeed(source, [*argv, "--load-dir", hf, "--save-dir", theirs], log.format("hf2mg"))
    except RuntimeError as e:
        return False, f"MindSpeed hf->mg failed: {e}"
    hf_tensors = load_file(os.path.join(hf, "model.safetensors"))
    ranks = load_ranks(theirs)
    ok, lines = True, []
    tops = sorted({(k, v) for r in ranks.values() for k, v in r.items() if k != "model"})
    lines.append(f"MindSpeed rank dirs {sorted(ranks)}, top-level {tops}")
    extras = mamba2_pp_extras(ranks, pp)
    n_extra = sum(map(len, extras.values()))
    if pp > 1:
        lines.append(f"PP defect: {n_extra} extra keys; {mamba2_stage_summary(ranks)}")
    repaired = {
        rank: dict(ckpt, model={k: v for k, v in ckpt["model"].items() if k not in extras[rank]})
        for rank, ckpt in ranks.items()
    }
    ref = mamba2_reference(hf_tensors, MAMBA2_CONFIG, MAMBA2_LAYERS, tp, pp)
    diffs = compare_ranks(repaired, ref, ("MindSpeed", "megatron-core layout"))
    if pp == 1 and n_extra:
        diffs.insert(0, f"unexpected extra keys at PP 1: {extras}")
    ok &= not diffs
    what = "MindSpeed" + (" minus its PP extras" if pp > 1 else "")
    lines.append(
        f"{what} vs megatron-core layout (§2.3): " + ("identical" if not diffs else "; ".join(diffs[:5]))
    )

    try:  # MindSpeed's own mg -> hf on its output (no args in its files: the layout as flags)
        argv = [
            "--load-model-type",
            "mg",
            "--save-model-type",
            "hf",
            *ms,
            "--load-dir",
            theirs,
            "--save-dir",
            back,
        ]
        argv += ["--input-tp-rank", str(tp), "--input-pp-rank", str(pp), "--num-layers", str(MAMBA2_LAYERS)]
        run_mindspeed(source, argv, log.format("mg2hf"))
        got = torch.load(os.path.join(back, "torch_model.bin"), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:
        ok = False
        lines.append(f"MindSpeed mg->hf failed: {e}")
    else:
        missing = sorted(set(hf_tensors) - set(got))
        extra = sorted(set(got) - set(hf_tensors))
        unequal = sorted(
            k
            for k in set(hf_tensors) & set(got)
            if got[k].dtype != hf_tensors[k].dtype or not torch.equal(got[k], hf_tensors[k])
        )
        equal = len(set(hf_tensors) & set(got)) - len(unequal)
        msg = f"mg->hf: {equal}/{len(hf_tensors)} HF tensors equal"
        if missing or unequal:
            ok = False
            msg += f", missing {missing}, unequal {unequal}"
        if extra:
            layers_extra = sorted(
                {m.group(1) for k in extra if (m := re.match(r"backbone\.layers\.(-?\d+)\.", k))}
            )
            msg += f", {len(extra)} extra keys (layers {', '.join(layers_extra)})"
            # the PP defect's copies are layers under negative numbers; at PP 1 nothing is extra
            ok &= pp > 1 and all(re.match(r"backbone\.layers\.-\d+\.", k) for k in extra)
        lines.append(msg)

    argv = MAMBA2_CKPT_IR[case]
    if argv is None:
        lines.append("ckpt-ir: not supported")
    else:
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "ckpt_ir", *(a.format(hf=hf, out=ours) for a in argv)]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            ok = False
            tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            lines.append(f"ckpt-ir failed: {tail}")
        else:
            diffs = compare_ranks(repaired, load_ranks(ours), (what, "ckpt-ir"))
            ok &= not diffs
            lines.append(f"{what} vs ckpt-ir: " + ("identical" if not diffs else "; ".join(diffs[:10])))
    return ok, "\n    ".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mindspeed", required=True, help="MindSpeed-LLM checkout or bare git directory")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument(
        "--case", action="append", choices=sorted([*CASES, *MAMBA2_CASES]), help="cases to run (default: all)"
    )
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ms-compare-")
    os.makedirs(work, exist_ok=True)
    sys.path.insert(0, ROOT)
    sys.path.insert(1, os.path.join(ROOT, "tests"))  # the tests import their conftest as a module
    from tests import family_models
    from tests import test_families_remote_code as remote

    # MindSpeed's glm45 entry fixes first_k_dense_replace = 3 (GLM-4.5's value) instead of reading
    # the HF config, and converts num_nextn_predict_layers MTP layers (transformers saves none):
    # the peer model matches both
    family_models.CONFIGS["glm4_moe"] = dict(
        family_models.CONFIGS["glm4_moe"], first_k_dense_replace=3, num_nextn_predict_layers=0
    )

    src_dir = os.path.join(work, "mindspeed-src")
    os.makedirs(src_dir, exist_ok=True)
    source = mindspeed_source(args.mindspeed, src_dir)
    results: dict[str, bool] = {}
    for case in args.case or [*CASES, *MAMBA2_CASES]:
        if case in MAMBA2_CASES:
            hf = os.path.join(work, "hf", "mamba2")
            if not os.path.exists(hf):
                family_models.build(hf, "mamba2", layers=MAMBA2_LAYERS, configs={"mamba2": MAMBA2_CONFIG})
            start = time.perf_counter()
            results[case], summary = run_mamba2_case(case, source, work, hf)
            print(f"{case} ({time.perf_counter() - start:.1f} s): {summary}", flush=True)
            continue
        model_type, ms_name, flags = CASES[case]
        hf = os.path.join(work, "hf", model_type)
        if not os.path.exists(hf):
            if model_type.removesuffix(NO_QKV_BIAS) in remote.PACK:
                build_remote(hf, work, model_type)
            elif model_type == "hy_v3+mtp":
                build_hy_v3_mtp(hf)
            elif model_type == "qwen3_next+mtp":
                build_qwen3_next_mtp(hf)
            elif model_type == "deepseek_v32+mtp":  # the release's MTP layer (with its indexer)
                family_models.build(hf, "deepseek_v32")
                family_models.append_mtp_layer(hf, family_models.DENSE["hidden_size"])
            elif model_type == "deepseek_v4+release":
                build_deepseek_v4_release(hf, work)
            elif model_type == "glm_moe_dsa+3dense":  # GLM-5's 3 dense layers, as MindSpeed assumes
                configs = {"glm_moe_dsa": dict(family_models.CONFIGS["glm_moe_dsa"], first_k_dense_replace=3)}
                family_models.build(hf, "glm_moe_dsa", configs=configs)
            else:
                family_models.build(hf, model_type)
        theirs, ours = os.path.join(work, "mindspeed", case), os.path.join(work, "ckpt-ir", case)
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(ours, ignore_errors=True)
        common = ["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", ms_name, *flags]
        try:
            run_mindspeed(source, [*common, "--load-dir", hf, "--save-dir", theirs])
        except RuntimeError as e:
            results[case] = False
            print(f"{case}: MindSpeed failed: {e}", flush=True)
            continue
        run_ckpt_ir([*common, "--load-dir", hf, "--save-dir", ours])
        if ms_name == "deepseek4":
            results[case], summary = run_deepseek4_case(case, source, work, hf, theirs, ours)
            print(f"{case}: {summary}", flush=True)
            continue
        diffs = compare(theirs, ours)
        back = read_back(case, source, work, hf, theirs, ours) if case in READ_BACK else []
        results[case] = not diffs and not back
        line = "identical" if not diffs else "differs:\n    " + "\n    ".join(diffs[:20])
        if case in READ_BACK:
            line += "; read back to HF both ways: " + ("equal" if not back else "; ".join(back))
        print(f"{case}: {line}", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
