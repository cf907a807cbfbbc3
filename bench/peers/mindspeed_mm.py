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
  the pydantic config its command line would build from the same ``--cfg`` values;
* InternVL's remote ``InternVLChatConfig`` (MindSpeed-MM reads OpenGVLab's remote-code layout): a
  local config class registered for ``internvl_chat`` (``internvl_chat_config``); the model is the
  tiny one of tests/test_families_internvl.py written in that layout, its config.json without
  ``auto_map``, so no repository code runs.

MindSpeed-MM's own ``InternVLConverter.mm_to_hf`` joins the vision ``linear_qkv`` TP parts with a
plain ``cat`` (rank r holds ``[q_r; k_r; v_r]``), so at TP > 1 it gives back every ViT layer's
``attn.qkv`` scrambled (``[q_0; k_0; v_0; q_1; ...]``); ckpt-ir's ``mm_to_hf`` of the same files is
bit-exact (the internvl-tp2 lines of RESULTS).

Where MindSpeed-MM is wrong, ckpt-ir's files are compared with what MindSpeed-MM writes for the
same model where it is right (``REFERENCE``): a first pipeline stage without language-model layers
(``qwen25vl-llm-first-stage-empty``: MindSpeed-MM's files of the same lists without that stage,
one stage later), and a vocabulary TP does not divide (``qwen25vl-vocab-odd-tp2``: the embedding
and output layer padded to a multiple of TP with copies of the last row, as Megatron-LM's tools
pad, split in equal parts; MindSpeed-MM drops the last rows), and GLM-4.1V at TP 2
(``glm4v-tp2pp2``: MindSpeed-MM's ``GlmConverter`` has no TP rules and copies every tensor whole to
every rank; ckpt-ir's files are compared with MindSpeed-MM's files at TP 1 split as its GLM model
builds the modules, ``split_glm``).  ``GlmConverter.mm_to_hf`` is ``pass``: it writes nothing.
MindSpeed-MM's canonical layout (``--cfg.common_model_config.enable_canonical_hf_struct true``,
the ``*-canonical-*`` cases): at TP > 1 its converter cuts the tower's ``linear_qkv`` (kept HF's
``[q; k; v]``) as plain row blocks, so rank 1 holds the second half of k and all of v, while its
canonical attention reshapes each rank's output as ``[3, heads per rank, head dim]``
(``mindspeed_mm/patchs/canonical_layer_patch.py:344-353``) and so needs ``[q_r; k_r; v_r]``: ckpt-ir
writes that, compared with the split of the HF tensors (``canonical_qkv``); every other tensor is
compared with MindSpeed-MM's, and its ``mm_to_hf`` (a plain concatenation) gives ckpt-ir's files'
tower qkv back scrambled.
Qwen3-VL-MoE's inputs store the experts in the hub's orientation (``hub_orientation``), the only
one MindSpeed-MM reads; given them in transformers' (``qwen3vlmoe-transformers-orientation-tp2ep2``)
it writes every expert tensor transposed the wrong way, and ckpt-ir's files are compared with
MindSpeed-MM's files of the hub-orientation copy.

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
    "glm4v-tp1": ("glm4v", {}, [[2]], [[2]], 1),
    "glm4v-pp2": ("glm4v", {}, [[1, 1]], [[2, 0]], 1),
    "glm4v-pp2-vit-split": ("glm4v", {}, [[1, 1]], [[1, 1]], 1),
    "glm4v-tp2pp2": ("glm4v", {}, [[1, 1]], [[2, 0]], 2),
    # InternVL in the remote code's layout (tests/test_families_internvl.py), what InternVLConverter reads
    "internvl-tp1": ("internvl_chat", {}, [[2]], [[2]], 1),
    "internvl-tp2": ("internvl_chat", {}, [[2]], [[2]], 2),
    "internvl-tp2pp2": ("internvl_chat", {}, [[1, 1]], [[2, 0]], 2),
    "internvl-pp2-vit-split": ("internvl_chat", {}, [[1, 1]], [[1, 1]], 1),
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
    # MindSpeed-MM's canonical layout (--cfg.common_model_config.enable_canonical_hf_struct true)
    "qwen25vl-canonical-tp1": ("qwen2_5_vl", {}, [[2]], [[2]], 1),
    "qwen25vl-canonical-tp2": ("qwen2_5_vl", {}, [[2]], [[2]], 2),
    "qwen25vl-canonical-tp2pp2": ("qwen2_5_vl", {}, [[1, 1]], [[2, 0]], 2),
    "qwen2vl-canonical-tp2": ("qwen2_vl", {}, [[2]], [[2]], 2),
}
# cases in MindSpeed-MM's canonical layout; at TP > 1 its converter cuts the tower's [q; k; v] as
# plain rows (RowSplit, converters/qwen2vl.py:119) where its canonical attention reads rank r's as
# [q_r; k_r; v_r] (mindspeed_mm/patchs/canonical_layer_patch.py:344-353): ckpt-ir's tower qkv is
# compared with that split of the HF tensors instead (canonical_qkv), the rest with MindSpeed-MM's
CANONICAL = {
    "qwen25vl-canonical-tp1",
    "qwen25vl-canonical-tp2",
    "qwen25vl-canonical-tp2pp2",
    "qwen2vl-canonical-tp2",
}
# cases whose Qwen3-VL-MoE input keeps transformers' orientation (the others: the hub's)
TRANSFORMERS_ORIENTATION = {"qwen3vlmoe-transformers-orientation-tp2ep2"}
# --cfg.parallel_config.ep_size where not 1
EP = {"qwen3vlmoe-tp2ep2": 2, "qwen3vlmoe-pp2ep2": 2, "qwen3vlmoe-transformers-orientation-tp2ep2": 2}
CONVERTER = {
    "qwen2_5_vl": "Qwen2_5_VLConverter",
    "qwen2_vl": "Qwen2VLConverter",
    "glm4v": "GlmConverter",
    "internvl_chat": "InternVLConverter",
    "qwen3_vl": "Qwen3VLMegatronConverter",
    "qwen3_vl_moe": "Qwen3VLMegatronConverter",
}
# where MindSpeed-MM is wrong: what its own files of another case show the right content to be
REFERENCE = {
    "qwen25vl-llm-first-stage-empty": "qwen25vl-tp2pp2-as-tp1",
    "glm4v-tp2pp2": "its files at TP 1, split as its GLM model splits (split_glm)",
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
glm4v-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: writes nothing
glm4v-pp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: writes nothing
glm4v-pp2-vit-split: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: writes nothing
glm4v-tp2pp2: rank files identical to MindSpeed-MM's files at TP 1 split as its GLM model splits (4 files); ckpt-ir mm_to_hf of its own: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: writes nothing; MindSpeed-MM's own TP 2 files hold 48 of 48 tensors whole on rank 1
internvl-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 69/69 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 69/69 equal
internvl-tp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 69/69 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 65/69 equal (the rest: attn.qkv.bias, attn.qkv.weight)
internvl-tp2pp2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 69/69 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 65/69 equal (the rest: attn.qkv.bias, attn.qkv.weight)
internvl-pp2-vit-split: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 69/69 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 69/69 equal
qwen3vl-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vl-tp2: rank files identical (2 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vl-tp2pp2-vit-split: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 81/81 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 81/81 equal
qwen3vlmoe-tp2ep2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 64/64 equal
qwen3vlmoe-pp2ep2: rank files identical (4 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 64/64 equal
qwen3vlmoe-transformers-orientation-tp2ep2: rank files identical to MindSpeed-MM's files of the hub-orientation copy (4 files); ckpt-ir mm_to_hf of its own: 64/64 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 60/64 equal; MindSpeed-MM's own files of this input: 32 of 32 expert tensors wrong
qwen25vl-canonical-tp1: rank files identical (1 files); ckpt-ir mm_to_hf of MindSpeed-MM's: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 57/57 equal
qwen25vl-canonical-tp2: rank files identical but the tower qkv, which is [q_r; k_r; v_r] of the HF tensors (2 files); ckpt-ir mm_to_hf of its own: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 53/57 equal (the rest: qkv.bias, qkv.weight); MindSpeed-MM's own tower qkv: 8 of 8 tensors plain row blocks of [q; k; v]
qwen25vl-canonical-tp2pp2: rank files identical but the tower qkv, which is [q_r; k_r; v_r] of the HF tensors (4 files); ckpt-ir mm_to_hf of its own: 57/57 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 53/57 equal (the rest: qkv.bias, qkv.weight); MindSpeed-MM's own tower qkv: 8 of 8 tensors plain row blocks of [q; k; v]
qwen2vl-canonical-tp2: rank files identical but the tower qkv, which is [q_r; k_r; v_r] of the HF tensors (2 files); ckpt-ir mm_to_hf of its own: 58/58 equal; MindSpeed-MM mm_to_hf of ckpt-ir's: 54/58 equal (the rest: qkv.bias, qkv.weight); MindSpeed-MM's own tower qkv: 8 of 8 tensors plain row blocks of [q; k; v]
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
    internvl_chat_config()


def internvl_chat_config() -> None:
    """Stand-in 3 (docs/reference/vision-language-models.md section 3.9): the remote code's
    InternVLChatConfig, as a local config class for model_type internvl_chat exposing llm_config (a
    transformers config of its model type) and vision_config (its keys as attributes); the
    model's config.json has no auto_map, so no repository code is involved."""
    from transformers import AutoConfig, PreTrainedConfig

    class InternVLChatStandIn(PreTrainedConfig):
        model_type = "internvl_chat"

        def __init__(self, llm_config=None, vision_config=None, **kwargs):
            llm = dict(llm_config or {})
            self.llm_config = AutoConfig.for_model(llm.pop("model_type", "qwen2"), **llm)
            self.vision_config = PreTrainedConfig(**(vision_config or {}))
            super().__init__(**kwargs)

    AutoConfig.register("internvl_chat", InternVLChatStandIn, exist_ok=True)


def build_internvl_chat(path: str) -> str:
    """The tiny InternVL of tests/test_families_internvl.py in the remote code's layout, in two
    shards with an index (MindSpeed-MM's mm_to_hf follows the index)."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, ROOT)
    from tests.test_families_internvl import build as build_hf
    from tests.test_families_internvl import write_remote

    write_remote(build_hf(path + "-transformers"), path)
    sd = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    for name, names in shards.items():
        save_file({k: sd[k] for k in names}, os.path.join(path, name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
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


def build(path: str, model_type: str, overrides: dict, hub: bool = True) -> str:
    """A tiny model saved in shards with an index (MindSpeed-MM's mm_to_hf follows the index);
    Qwen3-VL-MoE's experts rewritten in the hub's orientation (transposed) unless ``hub`` is
    False."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if model_type == "internvl_chat":
        return build_internvl_chat(path)
    sys.path.insert(0, ROOT)
    from tests.test_families_vlm import CONFIGS, SIDE_FILES

    if model_type.startswith("glm4v"):
        from tests.test_families_glm4v import CONFIGS
    if model_type.startswith("qwen3_vl"):
        from tests.test_families_qwen3vl import CONFIGS
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


def parallel(llm: list, vit: list, tp: int, ep: int) -> dict:
    return {"llm_pp_layers": llm, "vit_pp_layers": vit, "tp_size": tp, **({"ep_size": ep} if ep > 1 else {})}


def mindspeed_hf_to_mm(
    model_type: str, hf: str, out: str, llm: list, vit: list, tp: int, ep: int = 1, canonical: bool = False
) -> None:
    from checkpoint.vlm_model.converters import glm, internvl, qwen2_5vl, qwen2vl, qwen3vl_megatron

    if model_type.startswith("qwen3_vl"):
        config_class, converter = (
            qwen3vl_megatron.ConvertVppMMConfigQwen3,
            qwen3vl_megatron.Qwen3VLMegatronConverter,
        )
    elif model_type == "glm4v":
        config_class, converter = glm.ConvertVppMMConfigGlm, glm.GlmConverter
    elif model_type == "internvl_chat":
        config_class, converter = internvl.ConvertVppMMConfigInternVL, internvl.InternVLConverter
    elif model_type == "qwen2_5_vl":
        config_class, converter = qwen2_5vl.ConvertVppMMConfigQwen2_5, qwen2_5vl.Qwen2_5_VLConverter
    else:
        config_class, converter = qwen2vl.ConvertVppMMConfigQwen2, qwen2vl.Qwen2VLConverter
    common = {"common_model_config": {"enable_canonical_hf_struct": True}} if canonical else {}
    cfg = config_class(
        mm_dir=out, hf_config={"hf_dir": hf}, parallel_config=parallel(llm, vit, tp, ep), **common
    )
    converter.hf_to_mm(cfg)


def mindspeed_mm_to_hf(
    model_type: str,
    hf: str,
    mm: str,
    out: str,
    llm: list,
    vit: list,
    tp: int,
    ep: int = 1,
    canonical: bool = False,
) -> None:
    from checkpoint.vlm_model.config import ConvertHFConfig
    from checkpoint.vlm_model.converters import glm, internvl, qwen2_5vl, qwen2vl, qwen3vl_megatron

    if model_type.startswith("qwen3_vl"):  # its mm_to_hf takes the plain ConvertHFConfig
        config_class, converter = ConvertHFConfig, qwen3vl_megatron.Qwen3VLMegatronConverter
    elif model_type == "glm4v":
        config_class, converter = ConvertHFConfig, glm.GlmConverter
    elif model_type == "internvl_chat":
        config_class, converter = ConvertHFConfig, internvl.InternVLConverter
    elif model_type == "qwen2_5_vl":
        config_class, converter = qwen2_5vl.ConvertHFConfigQwen2_5, qwen2_5vl.Qwen2_5_VLConverter
    else:
        config_class, converter = qwen2vl.ConvertHFConfigQwen2, qwen2vl.Qwen2VLConverter
    common = {"common_model_config": {"enable_canonical_hf_struct": True}} if canonical else {}
    cfg = config_class(
        save_hf_dir=out,
        mm_dir=mm,
        hf_config={"hf_dir": hf},
        parallel_config=parallel(llm, vit, tp, ep),
        **common,
    )
    converter.mm_to_hf(cfg)


def ckpt_ir(*words: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "ckpt_ir", *words], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"ckpt-ir {' '.join(words)}: {proc.stderr.strip().splitlines()[-1]}")


def cfg_args(llm: list, vit: list, tp: int, ep: int = 1, canonical: bool = False) -> list[str]:
    return [
        *(("--cfg.common_model_config.enable_canonical_hf_struct", "true") if canonical else ()),
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


def hf_differ(src: str, out: str) -> list[str]:
    """The HF tensors of ``src`` that ``out`` lacks or holds otherwise."""
    from safetensors.torch import load_file

    def tensors(d: str) -> dict:
        sd = {}
        for n in os.listdir(d):
            if n.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, n)))
        return sd

    a, b = tensors(src), tensors(out)
    return sorted(k for k in a if k not in b or not same_tensor(a[k], b[k]))


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


def split_glm(files: dict[str, dict], tp: int) -> dict[str, dict]:
    """MindSpeed-MM's GLM-4.1V rank files at TP 1 split over ``tp`` as its GLM model builds the
    modules (its converter copies every tensor whole instead, glm.py:88): the language model's
    Megatron GPTModel layers (mm_gpt_model.py:94, 169; glm4v_layer_spec.py:173-201: linear_qkv
    (weight, bias) and the embedding / output layer by rows, linear_proj and linear_fc2 by columns,
    linear_fc1 [gate_r; up_r]) and the tower's Megatron MLP (glm4v_layer_spec.py:204-222); the
    tower's attention, convolutions, norms, positions and projector whole (plain modules)."""
    import torch

    def parts(key: str, x):
        if key.endswith(
            ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
        ):
            return x.chunk(tp)
        if key.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")):
            return x.chunk(tp, dim=1)
        if key.endswith("mlp.linear_fc1.weight"):
            gate, up = x.chunk(2)
            return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        return [x] * tp

    out: dict[str, dict] = {}
    for name, obj in files.items():
        stage = name.split("_")[3:]  # mp_rank_00[_PPP]
        for t in range(tp):
            model = {k: parts(k, v)[t].clone() for k, v in obj["model"].items()}
            out["_".join(["mp", "rank", f"{t:02d}", *stage])] = {"model": model, "checkpoint_version": 3.0}
    return out


_TOWER_QKV = "image_encoder.encoder.blocks.layers."


def tower_qkv_keys(files: dict[str, dict]) -> set[str]:
    return {
        k
        for o in files.values()
        for k in o.get("model", {})
        if k.startswith(_TOWER_QKV)
        and k.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"))
    }


def canonical_qkv(ours: str, theirs: dict[str, dict], hf: str, tp: int, vit: list) -> tuple[list[str], int]:
    """MindSpeed-MM's canonical tower qkv at TP > 1: ckpt-ir's rank r must hold [q_r; k_r; v_r] of
    the HF [q; k; v] (each part cut in tp equal row blocks); returns what differs, and how many of
    MindSpeed-MM's own tensors are the plain row blocks of [q; k; v] instead."""
    import torch
    from safetensors.torch import load_file

    hf_sd: dict = {}
    for n in os.listdir(hf):
        if n.endswith(".safetensors"):
            hf_sd.update(load_file(os.path.join(hf, n)))
    mine = rank_files(ours)
    flat_vit = [n for c in vit for n in c]
    problems, plain = [], 0
    for name, obj in mine.items():
        parts = name.split("_")
        t, p = int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
        for k in sorted(tower_qkv_keys({name: obj})):
            local, kind = int(k[len(_TOWER_QKV) :].split(".")[0]), k.rsplit(".", 1)[1]
            full = hf_sd[f"visual.blocks.{sum(flat_vit[:p]) + local}.attn.qkv.{kind}"]
            want = torch.cat([x.chunk(tp)[t] for x in full.chunk(3)])
            if not same_tensor(obj["model"][k], want):
                problems.append(f"{name}.{k} is not [q_r; k_r; v_r]")
            plain += same_tensor(theirs[name]["model"][k], full.chunk(tp)[t])
    return problems, plain


def run_case(name: str, work: str) -> tuple[bool, str]:
    model_type, overrides, llm, vit, tp = CASES[name]
    ep = EP.get(name, 1)
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    hf = build(os.path.join(root, "hf"), model_type, overrides, hub=name not in TRANSFORMERS_ORIENTATION)
    theirs_dir, ours_dir = os.path.join(root, "mindspeed"), os.path.join(root, "ckpt-ir")
    canonical = name in CANONICAL
    mindspeed_hf_to_mm(model_type, hf, theirs_dir, llm, vit, tp, ep, canonical)
    converter = CONVERTER[model_type]
    ckpt_ir(
        "mm-convert",
        converter,
        "hf_to_mm",
        "--cfg.mm_dir",
        ours_dir,
        "--cfg.hf_config.hf_dir",
        hf,
        *cfg_args(llm, vit, tp, ep, canonical),
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
    elif name == "glm4v-tp2pp2":
        ref_dir = os.path.join(root, "mindspeed-reference")
        mindspeed_hf_to_mm(model_type, hf, ref_dir, llm, vit, 1)
        problems = compare_rank_files(ours_dir, split_glm(rank_files(ref_dir), tp))
        whole = [
            k
            for p in range(len(llm[0]))
            for k, v in theirs[f"mp_rank_01_{p:03d}"]["model"].items()
            if same_tensor(v, rank_files(ref_dir)[f"mp_rank_00_{p:03d}"]["model"][k])
        ]
        total = sum(len(o["model"]) for o in theirs.values()) // tp
        notes.append(f"MindSpeed-MM's own TP 2 files hold {len(whole)} of {total} tensors whole on rank 1")
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
    elif canonical and tp > 1:
        problems = compare_rank_files(ours_dir, theirs, skip=tower_qkv_keys(theirs))
        wrong_qkv, plain = canonical_qkv(ours_dir, theirs, hf, tp, vit)
        problems += wrong_qkv
        notes.append(
            f"MindSpeed-MM's own tower qkv: {plain} of {sum(len(tower_qkv_keys({n: o})) for n, o in theirs.items())} "
            f"tensors plain row "
            f"blocks of [q; k; v]"
        )
    else:
        problems = compare_rank_files(ours_dir, theirs)
    ok &= not problems
    against = {
        "qwen25vl-llm-first-stage-empty": " to MindSpeed-MM's files of llm [[1,1]] one stage later",
        "qwen25vl-vocab-odd-tp2": " to MindSpeed-MM's, the embedding and output layer to the padded rows",
        "glm4v-tp2pp2": " to MindSpeed-MM's files at TP 1 split as its GLM model splits",
        "qwen3vlmoe-transformers-orientation-tp2ep2": " to MindSpeed-MM's files of the hub-orientation copy",
    }.get(
        name, " but the tower qkv, which is [q_r; k_r; v_r] of the HF tensors" if canonical and tp > 1 else ""
    )
    verdict = "identical" + against if not problems else "differ: " + "; ".join(problems[:4])
    result = [f"rank files {verdict} ({len(theirs)} files)"]
    # back: ckpt-ir reads MindSpeed-MM's files (where they are right, else its own), MindSpeed-MM ckpt-ir's
    wrong = name in (
        "qwen25vl-llm-first-stage-empty",
        "qwen25vl-vocab-odd-tp2",
        "glm4v-tp2pp2",
        *TRANSFORMERS_ORIENTATION,
    ) or (canonical and tp > 1)
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
        *cfg_args(flat_llm, flat_vit, tp, ep, canonical),
    )
    equal, total = hf_equal(hf, back)
    ok &= equal == total
    result.append(
        f"ckpt-ir mm_to_hf of {'its own' if wrong else 'MindSpeed-MM' + chr(39) + 's'}: {equal}/{total} equal"
    )
    if len(llm) == 1:  # MindSpeed-MM's mm_to_hf reads one model chunk ("model") only
        back = os.path.join(root, "mindspeed-back")
        try:
            mindspeed_mm_to_hf(model_type, hf, ours_dir, back, flat_llm, flat_vit, tp, ep, canonical)
            if model_type == "glm4v":  # GlmConverter.mm_to_hf is `pass` (glm.py:131-133)
                wrote = os.path.isdir(back) and any(n.endswith(".safetensors") for n in os.listdir(back))
                result.append(f"MindSpeed-MM mm_to_hf of ckpt-ir's: {'wrote' if wrote else 'writes'} nothing")
                return ok, "; ".join(result + notes)
            equal, total = hf_equal(hf, back)
            result.append(f"MindSpeed-MM mm_to_hf of ckpt-ir's: {equal}/{total} equal")
            differ = hf_differ(hf, back)
            # MindSpeed-MM's InternVL reverse joins the vision qkv's TP parts with a plain cat
            # (operator.py:514-530): [q_0; k_0; v_0; q_1; ...] instead of [q; k; v]
            # and so does its canonical Qwen2/2.5-VL reverse (RowSplit.merge, operator.py:467-480)
            scrambled = (model_type == "internvl_chat" or canonical) and tp > 1
            if scrambled and differ:
                result[-1] += " (the rest: " + ", ".join(sorted({k.split(".", 4)[-1] for k in differ})) + ")"
            qkv = all(k.endswith(("attn.qkv.weight", "attn.qkv.bias")) for k in differ)
            # its Qwen3-VL-MoE mm_to_hf always writes the hub's orientation
            hub_only = name in TRANSFORMERS_ORIENTATION and all(".mlp.experts." in k for k in differ)
            ok &= equal == total or name == "qwen25vl-vocab-odd-tp2" or (scrambled and qkv) or hub_only
        except Exception as e:  # noqa: BLE001 - reported, not raised
            result.append(
                f"MindSpeed-MM mm_to_hf of ckpt-ir's: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            )
            ok = ok and name == "qwen25vl-vocab-odd-tp2"
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
