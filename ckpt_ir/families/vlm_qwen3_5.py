"""Qwen3.5's vision-language families (qwen3_5_vl: ``Qwen3_5ForConditionalGeneration``,
model_type ``qwen3_5``; qwen3_5_vl_moe: ``Qwen3_5MoeForConditionalGeneration``, ``qwen3_5_moe``).

The language model is the hybrid text family's table (``hybrid.py``'s qwen3_5 / qwen3_5_moe:
gated-delta-net layers between gated full-attention layers, per-expert MoE on disk) under
``model.language_model.*``; the hub's multi-token-prediction tensors ``mtp.*``, which transformers
ignores (``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``, TF ``modeling_qwen3_5.py:1001``),
stay at the top level and are read as the text family reads them (as layer ``num_layers + k``).
The tower is Qwen3-VL's (``vlm.py``'s table under ``model.visual.*``) without DeepStack: Qwen3.5's
``vision_config`` has no ``deepstack_visual_indexes`` (TF ``configuration_qwen3_5.py:123-148``).

Megatron: Megatron-Bridge's layout (``qwen_vl/qwen35_vl_bridge.py``): the language model under
``language_model.`` with megatron-core's GatedDeltaNet modules (``Qwen35Bridge`` /
``Qwen35MoEBridge`` mappings with ``hf_prefix="model.language_model."``,
``megatron_prefix="language_model."``: 271-279, 362-365), its MTP layer as
``language_model.mtp.*`` (the same lines, ``_get_*_mtp_mappings``), and the tower in Megatron's
modules under ``vision_model.`` (``_get_vision_mappings``, 71-142: Qwen3-VL's names and splits
without the DeepStack list).  MindSpeed-MM has no Megatron converter for Qwen3.5 (its qwen3_5
recipe trains with FSDP2 from DCP checkpoints; ``hf_to_mm`` / ``mm_to_hf`` of its Qwen35Converter
are ``pass``: ``checkpoint/vlm_model/converters/qwen3_5.py:303-308``), so ``--mm-keys mindspeed``
is refused (``Tower.mindspeed`` is None).
"""

from __future__ import annotations

import re

import attrs

from ckpt_ir.families import Family, Tested, by_name, hybrid, register
from ckpt_ir.families.vlm import V, tower_qkv
from ckpt_ir.families.vlm_qwen3 import (
    Q3B,
    QWEN3_BRIDGE,
    QWEN3_TOWER,
    QWEN3_VISION,
    language_model_table,
)

LM = "model.language_model."


def _vl_packed(text: Family) -> tuple:
    """The text family's packed tensors (the gated-delta-net's in_proj_qkv) under LM."""
    return tuple(attrs.evolve(p, hf=LM + p.hf[len("model.") :]) for p in text.packed)


_TABLE_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


def _mtp_keys(key: str, num_layers: int, to_hf: bool) -> str:
    """The text family's MTP rename (mtp.layers.k.X <-> layer num_layers + k, the un-numbered
    mtp.fc / norms <-> model.layers.{num_layers}.mtp.*) with the table's layers under LM."""
    if not to_hf:
        out = hybrid._qwen3_next_mtp_keys(key, num_layers, False)
        return LM + out[len("model.") :] if out != key else key
    if not _TABLE_LAYER.match(key):
        return key
    plain = "model." + key[len(LM) :]
    out = hybrid._qwen3_next_mtp_keys(plain, num_layers, True)
    return key if out == plain else out


# Qwen3-VL's tower without DeepStack: no deepstack_visual_indexes in its config (so none is
# written back), no DeepStack list in Megatron-Bridge's names (qwen35_vl_bridge.py:71-142), and no
# MindSpeed-MM form
QWEN35_TOWER = attrs.evolve(
    QWEN3_TOWER,
    config=tuple(k for k in QWEN3_TOWER.config if k.field != "deepstack_layers"),
    mindspeed=None,
    bridge=attrs.evolve(QWEN3_BRIDGE, listed=(), listed_by=""),
)
QWEN35_VISION = tuple((h, c) for h, c in QWEN3_VISION if not c.startswith(V + "deepstack."))

NO_MCORE = (
    "no: megatron-core 0.16 has no Qwen3-VL-style model (Megatron-Bridge's Qwen3VLModel is its own), "
    "and its gated-delta-net layers need flash-linear-attention (Triton). Its tower's torch_dist loads "
    "with megatron-core's dist_checkpointing.load at TP 2 into megatron-core's ViT TransformerBlock "
    "and merger (as qwen3_vl's; tests/vlm_dist_harness.py)"
)


def _vl(text_name: str, name: str, model_type: str, architecture: str, tested: Tested) -> Family:
    text = by_name(text_name)
    return Family(
        name=name,
        model_types=(model_type,),
        architecture=architecture,
        tensors=language_model_table(text.tensors) + QWEN35_VISION,
        packed=_vl_packed(text) + tower_qkv(Q3B + "attn.qkv"),
        config=text.config,
        constants=text.constants,
        megatron_args=text.megatron_args,
        hf_rename=_mtp_keys,
        text_config="text_config",
        towers=(QWEN35_TOWER,),
        tested=tested,
    )


register(
    _vl(
        "qwen3_5",
        "qwen3_5_vl",
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        Tested(
            round_trip=(
                "--tp 1 --pp 1",
                "--tp 2",
                "--tp 2 --pp 2 --num-layer-list 1,1",
                "--ckpt-format torch_dist",
            ),
            mcore_missing=NO_MCORE,
        ),
    )
)
register(
    _vl(
        "qwen3_5_moe",
        "qwen3_5_vl_moe",
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        Tested(
            round_trip=("--tp 1 --pp 1", "--tp 2 --ep 2", "--pp 2 --ep 2 --num-layer-list 1,1"),
            mcore_missing=NO_MCORE,
        ),
    )
)
