"""Compare ``ckpt-ir mm-convert`` with MindSpeed-MM's own converter (its ``checkpoint/`` package),
bit for bit, on tiny random vision-language models.

Not a test (CI has no MindSpeed-MM source): a script to run by hand where a MindSpeed-MM checkout or
git mirror exists.  For each case it builds a tiny random model with transformers (the configs of
tests/test_families_vlm.py, saved in shards with an index, as MindSpeed-MM's ``mm_to_hf`` needs),
converts it with MindSpeed-MM's ``<Converter>.hf_to_mm`` (on CPU) and with ``ckpt-ir mm-convert
<Converter> hf_to_mm`` (the same ``--cfg`` arguments), and reports per case: the rank directories,
the tracker, each rank file's top-level keys and its model keys, and every tensor (dtype, shape,
bytes).  Then each side's files go back: ``ckpt-ir mm-convert ... mm_to_hf`` of MindSpeed-MM's
files and MindSpeed-MM's ``mm_to_hf`` of ckpt-ir's, each against the HF tensors.

MindSpeed-MM's conversion code is pure torch; the conversion code is never patched, and these
stand-ins cover what its environment would provide:

* ``mindspeed.megatron_adaptor`` (imported by ``load_from_mm`` for its side effects on NPU): an
  empty module, with an empty ``mindspeed`` package;
* transformers 4.57's flat config attributes (MindSpeed-MM pins ``transformers==4.57.0``; its
  Qwen2/2.5-VL converters read ``config.num_key_value_heads`` and the like at the top level, which
  transformers 5 keeps only in ``text_config``): a class-level ``__getattr__`` on
  ``PreTrainedConfig`` that looks a missing attribute up in ``text_config``;
* its command line (``jsonargparse``, not installed): the converter's static method is called with
  the pydantic config its command line would build from the same ``--cfg`` values.

Where MindSpeed-MM is wrong, ckpt-ir's files are compared with what MindSpeed-MM writes for the
same model where it is right (``REFERENCE``): a first pipeline stage without language-model layers
(``qwen25vl-llm-first-stage-empty``: MindSpeed-MM's files of the same lists without that stage,
one stage later), and a vocabulary TP does not divide (``qwen25vl-vocab-odd-tp2``: the embedding
and output layer padded to a multiple of TP with copies of the last row, as Megatron-LM's tools
pad, split in equal parts; MindSpeed-MM drops the last rows).

Usage::

    python bench/peers/mindspeed_mm.py --mindspeed-mm PATH/TO/MindSpeed-MM [--work DIR] [--case NAME ...]

``--mindspeed-mm`` is a source checkout or a bare git directory (read with ``git archive HEAD``).

Measured with MindSpeed-MM ``57069cd`` (about 5 s a case, mostly imports): RESULTS below, as the
script printed them (MindSpeed-MM's mm_to_hf reads one model chunk only, so the VPP case has no
such line; reading ckpt-ir's padded vocabulary it keeps the padding row, hence 55/57).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# case -> (model type, config overrides, hf_to_mm llm_pp_layers, vit_pp_layers, tp_size)
CASES: dict[str, tuple[str, dict, list, list, int]] = {
    "qwen25vl-tp1": ("qwen2_5_vl", {}, [[2]], [[2]], 1),
    "qwen25vl-tp2": ("qwen2_5_vl", {}, [[2]], [[2]], 2),
    "qwen25vl-tp2pp2": ("qwen2_5_vl", {}, [[1, 1]], [[2, 0]], 2),
    "qwen25vl-pp2-vit-split": ("qwen2_5_vl", {}, [[1, 1]], [[1, 1]], 1),
    "qwen25vl-vpp2": ("qwen2_5_vl", {}, [[1, 0], [0, 1]], [[2, 0], [0, 0]], 1),
    "qwen2vl-tp2pp2": ("qwen2_vl", {}, [[1, 1]], [[2, 0]], 2),
    "qwen25vl-llm-first-stage-empty": ("qwen2_5_vl", {}, [[0, 1, 1]], [[2, 0, 0]], 1),
    "qwen25vl-vocab-odd-tp2": ("qwen2_5_vl", {"vocab_size": 161}, [[2]], [[2]], 2),
    # Qwen3-VL (tests/test_families_qwen3vl.py's configs: 3 text layers, DeepStack mergers on vision
    # layers 1 and 0) and Qwen3-VL-MoE (2 text layers, 4 experts 48 wide, hidden 64), the experts
    # written in the hub's orientation, the one MindSpeed-MM reads (vlm_model/operator.py:582-611)
    "qwen3vl-tp1": ("qwen3_vl", {}, [[3]], [[2]], 1),
    "qwen3vl-tp2": ("qwen3_vl", {}, [[3]], [[2]], 2),
    "qwen3vl-tp2pp2-vit-split": ("qwen3_vl", {}, [[2, 1]], [[1, 1]], 2),
    "qwen3vlmoe-tp2ep2": ("qwen3_vl_moe", {}, [[2]], [[2]], 2),
    "qwen3vlmoe-pp2ep2": ("qwen3_vl_moe", {}, [[1, 1]], [[2, 0]], 1),
    # the experts as transformers 5.25 saves them: MindSpeed-MM transposes them the wrong way
    "qwen3vlmoe-transformers-orientation-tp2ep2": ("qwen3_vl_moe", {}, [[2]], [[2]], 2),
}
# cases whose Qwen3-VL-MoE input keeps transformers' orientation (the others: the hub's)
TRANSFORMERS_ORIENTATION = {"qwen3vlmoe-transformers-orientation-tp2ep2"}
# --cfg.parallel_config.ep_size where not 1
EP = {"qwen3vlmoe-tp2ep2": 2, "qwen3vlmoe-pp2ep2": 2, "qwen3vlmoe-transformers-orientation-tp2ep2": 2}
CONVERTER = {
    "qwen2_5_vl": "Qwen2_5_VLConverter",
    "qwen2_vl": "Qwen2VLConverter",
    "qwen3_vl": "Qwen3VLMegatronConverter",
    "qwen3_vl_moe": "Qwen3VLMegatronConverter",
}
# where MindSpeed-MM is wrong: what its own files of another case show the right content to be
REFERENCE = {
    "qwen25vl-llm-first-stage-empty": "qwen25vl-tp2pp2-as-tp1",
    "qwen3vlmoe-transformers-orientation-tp2ep2": "the same model with its experts in the hub's orientation",
}
# what the script printed with MindSpeed-MM 57069cd (stand-ins as above), 2026-08
RESULTS = """
qwen25vl-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal
qwen25vl-tp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal
qwen25vl-tp2pp2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal
qwen25vl-pp2-vit-split: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal
qwen25vl-vpp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal
qwen2vl-tp2pp2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 58/58 equal
qwen25vl-llm-first-stage-empty: rank files identical to MindSpeed-MM's files of llm [[1,1]] one stage later (3 files); ckpt-ir mm_to_hf of its own: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal; MindSpeed-MM's own files: mp_rank_00_000 0 language-model tensors, mp_rank_00_001 0 language-model tensors, mp_rank_00_002 8 language-model tensors (embedding) of 17
qwen25vl-vocab-odd-tp2: rank files identical to MindSpeed-MM's, the embedding and output layer to the padded rows (2 files); ckpt-ir mm_to_hf of its own: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 55/57 equal; MindSpeed-MM's text_decoder.embedding.word_embeddings.weight holds 160 of 161 rows; MindSpeed-MM's text_decoder.output_layer.weight holds 160 of 161 rows
qwen3vl-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vl-tp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vl-tp2pp2-vit-split: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vlmoe-tp2ep2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 64/64 equal
qwen3vlmoe-pp2ep2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 64/64 equal
qwen3vlmoe-transformers-orientation-tp2ep2: rank files identical to MindSpeed-MM's files of the hub-orientation copy (4 files); ckpt-ir mm_to_hf of its own: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 60/64 equal; MindSpeed-MM's own files of this input: 32 of 32 expert tensors wrong
"""


def stand_ins() -> None:
    """The stand-ins the module docstring lists (none touches conversion code)."""
    package = types.ModuleType("mindspeed")
    package.__path__ = []  # type: ignore[attr-defined]
    sys.modules.setdefault("mindspeed", package)
    sys.modules.setdefault("mindspeed.megatron_adaptor", types.ModuleType("mindspeed.megatron_adaptor"))
    from transformers import PreTrainedConfig

    def flat(self, name):  # transformers 4.57: a flat config.json's text keys on the config itself
        text = self.__dict__.get("text_config")
        if text is not None and not name.startswith("__") and hasattr(text, name):
            return getattr(text, name)
        raise AttributeError(name)

    PreTrainedConfig.__getattr__ = flat  # type: ignore[attr-defined]


def build(path: str, model_type: str, overrides: dict, hub: bool = True) -> str:
    """A tiny model saved in shards with an index (MindSpeed-MM's mm_to_hf follows the index);
    Qwen3-VL-MoE's experts rewritten in the hub's orientation (transposed)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    sys.path.insert(0, ROOT)
    from tests import test_families_qwen3vl, test_families_vlm
    from tests.test_families_vlm import SIDE_FILES

    CONFIGS = {**test_families_vlm.CONFIGS, **test_families_qwen3vl.CONFIGS}
    config = dict(CONFIGS[model_type])
    config["text_config"] = {**config["text_config"], **overrides}
    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, max_shard_size="200KB")
    if model_type == "qwen3_vl_moe" and hub:
        hub_orientation(path)
    for name, text in SIDE_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def hub_orientation(path: str) -> None:
    """Rewrite the stacked experts of a transformers-saved Qwen3-VL-MoE ([Ex, 2Im, T], [Ex, T, Im])
    as the hub stores them ([Ex, T, 2Im], [Ex, Im, T]); docs/reference/vision-language-models.md 1.2."""
    from safetensors.torch import load_file, save_file

    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            sd = load_file(os.path.join(path, name))
            sd = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in sd.items()}
            save_file(sd, os.path.join(path, name), metadata={"format": "pt"})


def _converter(model_type: str, back: bool):
    """MindSpeed-MM's config class (hf_to_mm's, or mm_to_hf's with ``back``) and converter class."""
    from checkpoint.vlm_model.config import ConvertHFConfig
    from checkpoint.vlm_model.converters import qwen2_5vl, qwen2vl, qwen3vl_megatron

    if model_type == "qwen2_5_vl":
        config = qwen2_5vl.ConvertHFConfigQwen2_5 if back else qwen2_5vl.ConvertVppMMConfigQwen2_5
        return config, qwen2_5vl.Qwen2_5_VLConverter
    if model_type == "qwen2_vl":
        return (
            qwen2vl.ConvertHFConfigQwen2 if back else qwen2vl.ConvertVppMMConfigQwen2
        ), qwen2vl.Qwen2VLConverter
    # Qwen3-VL(-MoE): mm_to_hf takes the plain ConvertHFConfig (its converter's type hint)
    config_class = ConvertHFConfig if back else qwen3vl_megatron.ConvertVppMMConfigQwen3
    return config_class, qwen3vl_megatron.Qwen3VLMegatronConverter


def parallel(llm: list, vit: list, tp: int, ep: int) -> dict:
    return {"llm_pp_layers": llm, "vit_pp_layers": vit, "tp_size": tp, **({"ep_size": ep} if ep > 1 else {})}


def mindspeed_hf_to_mm(
    model_type: str, hf: str, out: str, llm: list, vit: list, tp: int, ep: int = 1
) -> None:
    config_class, converter = _converter(model_type, back=False)
    cfg = config_class(mm_dir=out, hf_config={"hf_dir": hf}, parallel_config=parallel(llm, vit, tp, ep))
    converter.hf_to_mm(cfg)


def mindspeed_mm_to_hf(
    model_type: str, hf: str, mm: str, out: str, llm: list, vit: list, tp: int, ep: int = 1
) -> None:
    config_class, converter = _converter(model_type, back=True)
    cfg = config_class(
        save_hf_dir=out, mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=parallel(llm, vit, tp, ep)
    )
    converter.mm_to_hf(cfg)


def ckpt_ir(*words: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "ckpt_ir", *words], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"ckpt-ir {' '.join(words)}: {proc.stderr.strip().splitlines()[-1]}")


def cfg_args(llm: list, vit: list, tp: int, ep: int = 1) -> list[str]:
    return [
        "--cfg.parallel_config.llm_pp_layers",
        json.dumps(llm),
        "--cfg.parallel_config.vit_pp_layers",
        json.dumps(vit),
        "--cfg.parallel_config.tp_size",
        str(tp),
        *(("--cfg.parallel_config.ep_size", str(ep)) if ep > 1 else ()),
    ]


def rank_files(root: str) -> dict[str, dict]:
    import torch

    out = {}
    for d in sorted(os.listdir(os.path.join(root, "release"))):
        out[d] = torch.load(os.path.join(root, "release", d, "model_optim_rng.pt"), weights_only=False)
    return out


def same_tensor(a, b) -> bool:
    import torch

    # values bit for bit (MindSpeed-MM saves Qwen3-VL-MoE's experts as transposed views: strides differ)
    a, b = a.contiguous(), b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def compare_rank_files(ours: str, theirs: dict[str, dict], skip=()) -> list[str]:
    """What differs between ckpt-ir's output directory and MindSpeed-MM's rank files."""
    problems = []
    mine = rank_files(ours)
    if sorted(mine) != sorted(theirs):
        return [f"rank directories {sorted(mine)} vs {sorted(theirs)}"]
    if open(os.path.join(ours, "latest_checkpointed_iteration.txt")).read() != "release":
        problems.append("tracker is not 'release'")
    for name in mine:
        a, b = mine[name], theirs[name]
        if list(a) != list(b):
            problems.append(f"{name}: top-level keys {list(a)} vs {list(b)}")
            continue
        for chunk in (k for k in a if k.startswith("model")):
            ka, kb = set(a[chunk]), set(b[chunk])
            if ka != kb:
                problems.append(
                    f"{name}.{chunk}: keys only in ckpt-ir {sorted(ka - kb)[:3]}, only in MindSpeed-MM {sorted(kb - ka)[:3]}"
                )
            for k in sorted(ka & kb):
                if k not in skip and not same_tensor(a[chunk][k], b[chunk][k]):
                    problems.append(f"{name}.{chunk}.{k} differs")
        if a.get("checkpoint_version") != b.get("checkpoint_version"):
            problems.append(
                f"{name}: checkpoint_version {a.get('checkpoint_version')} vs {b.get('checkpoint_version')}"
            )
    return problems


def hf_equal(src: str, out: str) -> tuple[int, int]:
    from safetensors.torch import load_file

    def tensors(d: str) -> dict:
        sd = {}
        for n in os.listdir(d):
            if n.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, n)))
        return sd

    a, b = tensors(src), tensors(out)
    return sum(1 for k in a if k in b and same_tensor(a[k], b[k])), len(a)


def shifted(files: dict[str, dict], by: int, stages: int) -> dict[str, dict]:
    """Rank files of a PP layout with every language-model key ``by`` stages later (a layout whose
    first ``by`` stages hold no language-model layers), the vision keys where they were."""
    out: dict[str, dict] = {}
    tps = sorted({name.split("_")[2] for name in files})
    for t in tps:
        for p in range(stages):
            out[f"mp_rank_{t}_{p:03d}"] = {"model": {}, "checkpoint_version": 3.0}
    for name, obj in files.items():
        t, p = name.split("_")[2], int(name.split("_")[3]) if len(name.split("_")) > 3 else 0
        for k, v in obj["model"].items():
            where = p + by if k.startswith("text_decoder.") else p
            out[f"mp_rank_{t}_{where:03d}"]["model"][k] = v
    return out


def run_case(name: str, work: str) -> tuple[bool, str]:
    model_type, overrides, llm, vit, tp = CASES[name]
    ep = EP.get(name, 1)
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    hf = build(os.path.join(root, "hf"), model_type, overrides, hub=name not in TRANSFORMERS_ORIENTATION)
    theirs_dir, ours_dir = os.path.join(root, "mindspeed"), os.path.join(root, "ckpt-ir")
    mindspeed_hf_to_mm(model_type, hf, theirs_dir, llm, vit, tp, ep)
    converter = CONVERTER[model_type]
    ckpt_ir(
        "mm-convert",
        converter,
        "hf_to_mm",
        "--cfg.mm_dir",
        ours_dir,
        "--cfg.hf_config.hf_dir",
        hf,
        *cfg_args(llm, vit, tp, ep),
    )
    theirs = rank_files(theirs_dir)
    notes, ok = [], True
    flat_llm, flat_vit = [n for c in llm for n in c], [n for c in vit for n in c]
    if name == "qwen25vl-llm-first-stage-empty":
        ref_dir = os.path.join(root, "mindspeed-reference")
        mindspeed_hf_to_mm(model_type, hf, ref_dir, [[1, 1]], [[2, 0]], tp)
        problems = compare_rank_files(ours_dir, shifted(rank_files(ref_dir), 1, 3))
        held = {p: sorted(o["model"]) for p, o in theirs.items()}
        notes.append(
            "MindSpeed-MM's own files: "
            + ", ".join(
                f"{p} {sum(k.startswith('text_decoder.') for k in keys)} language-model tensors"
                + (" (embedding)" if "text_decoder.embedding.word_embeddings.weight" in keys else "")
                for p, keys in held.items()
            )
            + f" of {sum(k.startswith('text_decoder.') for o in rank_files(ref_dir).values() for k in o['model'])}"
        )
    elif name == "qwen25vl-vocab-odd-tp2":
        emb = ("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")
        problems = compare_rank_files(ours_dir, theirs, skip=emb)
        import torch
        from safetensors.torch import load_file

        hf_sd = {}
        for n in os.listdir(hf):
            if n.endswith(".safetensors"):
                hf_sd.update(load_file(os.path.join(hf, n)))
        mine = rank_files(ours_dir)
        for key, hf_key in zip(emb, ("model.embed_tokens.weight", "lm_head.weight")):
            full = hf_sd[hf_key]
            padded = torch.cat([full, full[-1:]])  # ckpt-ir's padding: copies of the last row
            for t, part in enumerate(padded.chunk(tp)):
                if not same_tensor(mine[f"mp_rank_{t:02d}"]["model"][key], part):
                    problems.append(f"{key} rank {t} is not the padded embedding's part")
            held = sum(theirs[f"mp_rank_{t:02d}"]["model"][key].shape[0] for t in range(tp))
            notes.append(f"MindSpeed-MM's {key} holds {held} of {full.shape[0]} rows")
    elif name in TRANSFORMERS_ORIENTATION:
        hub = os.path.join(root, "hf-hub")
        shutil.copytree(hf, hub)
        hub_orientation(hub)
        ref_dir = os.path.join(root, "mindspeed-reference")
        mindspeed_hf_to_mm(model_type, hub, ref_dir, llm, vit, tp, ep)
        reference = rank_files(ref_dir)
        problems = compare_rank_files(ours_dir, reference)
        wrong_experts = sum(
            not same_tensor(v, reference[r]["model"][k])
            for r, obj in theirs.items()
            for k, v in obj["model"].items()
            if ".local_experts." in k
        )
        experts = sum(".local_experts." in k for obj in theirs.values() for k in obj["model"])
        notes.append(
            f"MindSpeed-MM's own files of this input: {wrong_experts} of {experts} expert tensors wrong"
        )
    else:
        problems = compare_rank_files(ours_dir, theirs)
    ok &= not problems
    against = {
        "qwen25vl-llm-first-stage-empty": " to MindSpeed-MM's files of llm [[1,1]] one stage later",
        "qwen25vl-vocab-odd-tp2": " to MindSpeed-MM's, the embedding and output layer to the padded rows",
        "qwen3vlmoe-transformers-orientation-tp2ep2": " to MindSpeed-MM's files of the hub-orientation copy",
    }.get(name, "")
    verdict = "identical" + against if not problems else "differ: " + "; ".join(problems[:4])
    result = [f"rank files {verdict} ({len(theirs)} files)"]
    # back: ckpt-ir reads MindSpeed-MM's files (where they are right, else its own), MindSpeed-MM ckpt-ir's
    wrong = name in ("qwen25vl-llm-first-stage-empty", "qwen25vl-vocab-odd-tp2", *TRANSFORMERS_ORIENTATION)
    back = os.path.join(root, "ckpt-ir-back")
    ckpt_ir(
        "mm-convert",
        converter,
        "mm_to_hf",
        "--cfg.save_hf_dir",
        back,
        "--cfg.mm_dir",
        ours_dir if wrong else theirs_dir,
        "--cfg.hf_config.hf_dir",
        hf,
        *cfg_args(flat_llm, flat_vit, tp, ep),
    )
    equal, total = hf_equal(hf, back)
    ok &= equal == total
    result.append(
        f"ckpt-ir mm_to_hf of {'its own' if wrong else 'MindSpeed-MM' + chr(39) + 's'}: {equal}/{total} equal"
    )
    if len(llm) == 1:  # MindSpeed-MM's mm_to_hf reads one model chunk ("model") only
        back = os.path.join(root, "mindspeed-back")
        try:
            mindspeed_mm_to_hf(model_type, hf, ours_dir, back, flat_llm, flat_vit, tp, ep)
            equal, total = hf_equal(hf, back)
            result.append(f"MindSpeed-MM mm_to_hf of ckpt-ir's: {equal}/{total} equal")
            ok &= equal == total or name in ("qwen25vl-vocab-odd-tp2", *TRANSFORMERS_ORIENTATION)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            result.append(
                f"MindSpeed-MM mm_to_hf of ckpt-ir's: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            )
            ok = ok and name in ("qwen25vl-vocab-odd-tp2", *TRANSFORMERS_ORIENTATION)
    return ok, "; ".join(result + notes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mindspeed-mm", required=True, help="MindSpeed-MM checkout or bare git directory")
    p.add_argument("--work", default=None)
    p.add_argument("--case", action="append", choices=sorted(CASES))
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="mm-compare-")
    src = os.path.join(work, "src")
    if not os.path.isdir(os.path.join(src, "checkpoint")):
        os.makedirs(src, exist_ok=True)
        if os.path.isdir(os.path.join(args.mindspeed_mm, "checkpoint")):
            shutil.copytree(os.path.join(args.mindspeed_mm, "checkpoint"), os.path.join(src, "checkpoint"))
        else:
            archive = subprocess.run(
                ["git", f"--git-dir={args.mindspeed_mm}", "archive", "HEAD", "checkpoint"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    sys.path.insert(0, src)
    stand_ins()
    failed = 0
    for name in args.case or CASES:
        ok, line = run_case(name, work)
        failed += not ok
        print(f"{name}: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
