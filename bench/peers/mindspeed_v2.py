"""Compare ckpt-ir's Megatron rank files with MindSpeed-LLM v2's converter, bit for bit.

Not a test (CI has no MindSpeed source): a script to run by hand where a MindSpeed-LLM checkout or
git mirror exists.  For each case it builds a tiny random HF model with transformers (the
family tests' configs, tests/family_models.py, MTP layers appended as the releases store them) or a
remote-code family's packed checkpoint (tests/test_families_remote_code.py), converts it with MindSpeed-LLM's own ``convert_ckpt_v2.py`` (HF -> mg, on
CPU) and with ``ckpt-ir convert-ckpt`` (same flags), and reports per case: identical rank
directories, identical keys in the same order, identical tensors; or which differ.

MindSpeed-LLM's conversion code is pure torch; only two incidental imports need stand-ins, and
the conversion code itself is never patched:

* the ``mindspeed_llm`` package ``__init__`` (it imports the NPU training adaptor): the package
  is registered with its directory as ``__path__`` without running ``__init__``;
* ``mindspeed_llm.training.utils`` (imports ``acl``, ``torch_npu``, Megatron): replaced by a
  module holding only ``auto_coverage``, which outside coverage runs is the identity.

Usage::

    python bench/peers/mindspeed_v2.py --mindspeed PATH/TO/MindSpeed-LLM \\
        [--work /tmp/ms-compare] [--case seed-oss-tp2pp2 ...]

``--mindspeed`` is a source checkout or a bare git directory (read with ``git archive HEAD``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
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


def run_mindspeed(source: str, argv: list[str]) -> None:
    """``python convert_ckpt_v2.py ARGV`` in this process (forked), with the two stand-ins."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"MindSpeed-LLM convert_ckpt_v2.py {' '.join(argv)} failed")
        return
    try:
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


def rank_files(root: str) -> dict[str, str]:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as fh:
        it = fh.read().strip()
    it_dir = os.path.join(root, "release" if it == "release" else f"iter_{int(it):07d}")
    return {d: os.path.join(it_dir, d, "model_optim_rng.pt") for d in sorted(os.listdir(it_dir))}


def compare(theirs: str, ours: str) -> list[str]:
    """Differences between two Megatron checkpoints' model tensors ([] if identical)."""
    import torch

    a, b = rank_files(theirs), rank_files(ours)
    if a.keys() != b.keys():
        return [f"rank directories: MindSpeed {sorted(a)} vs ckpt-ir {sorted(b)}"]
    out = []
    for rank in a:
        ma = torch.load(a[rank], map_location="cpu", weights_only=False)
        mb = torch.load(b[rank], map_location="cpu", weights_only=False)
        for model in sorted(k for k in ma if k.startswith("model")):
            sa, sb = ma[model], mb.get(model, {})
            ka = [k for k in sa if not k.endswith("_extra_state")]
            kb = [k for k in sb if not k.endswith("_extra_state")]
            if set(ka) != set(kb):
                only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
                out.append(f"{rank}/{model}: only MindSpeed {only_a}; only ckpt-ir {only_b}")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mindspeed", required=True, help="MindSpeed-LLM checkout or bare git directory")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: all)")
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
    results = {}
    for case in args.case or list(CASES):
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
            results[case] = f"MindSpeed failed: {e}"
            print(f"{case}: {results[case]}", flush=True)
            continue
        run_ckpt_ir([*common, "--load-dir", hf, "--save-dir", ours])
        diffs = compare(theirs, ours)
        results[case] = "identical" if not diffs else "differs:\n    " + "\n    ".join(diffs[:20])
        print(f"{case}: {results[case]}", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r == "identical" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
