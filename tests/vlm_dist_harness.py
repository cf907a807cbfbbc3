"""Load ckpt-ir's ``torch_dist`` output of a vision-language model with megatron-core's own
``dist_checkpointing.load`` in forked gloo ranks on CPU (``tests/mcore_harness.py``'s processes,
workarounds and GPTModel building).

Not a test module: ``tests/test_torch_dist_vlm.py`` runs it (``python tests/vlm_dist_harness.py
JOB.json WORLD``).  Every rank builds what Megatron-Bridge's model holds on its (TP rank, PP stage)
and asks megatron-core for its sharded state dict, so the keys, global shapes, TP axes and
``_extra_state`` objects requested are megatron-core's, never ckpt-ir's:

* ``"lm"``: the language model, a GPTModel (local spec, configured from the HF ``text_config``)
  under ``language_model.`` (Megatron-Bridge's ``Qwen25VLModel.language_model``);
* ``"tower"``: transformers' own vision module, built as Megatron-Bridge builds it
  (``modeling_qwen25_vl.py:107``: ``Qwen2_5_VisionTransformerPretrainedModel._from_config``;
  ``modeling_gemma3_vl.py:96-99``: ``AutoModel.from_config(vision_config)``, its ``vision_model``),
  given megatron-core's ``sharded_state_dict_default`` under its attribute's name with the TP
  group (what the default ``MegatronModule.sharded_state_dict`` of the wrapping model does for a
  child module, ``transformer/module.py:82-101``);
* ``"projector"``: Gemma 3's projector (``modeling_gemma3_vl.py:315-326``): a
  ``ColumnParallelLinear`` [E -> T] without bias, and a norm whose state dict is a weight and a
  Transformer Engine ``_extra_state`` (built from that state dict with megatron-core's
  ``make_sharded_tensors_for_checkpoint``, as the default path does; Transformer Engine is not
  installed here).

* ``"vision_model"``: Megatron-Bridge's Megatron-form Qwen3-VL tower (``Qwen3VLVisionModel``, MB
  ``models/qwen_vl/modelling_qwen3_vl/model.py:346-372``), see :func:`_vision_model`.

The load is strict as Megatron-LM's default (``assume_ok_unexpected``: a key the model asks for and
the checkpoint lacks fails it).  Each rank saves what it loaded to ``OUT.rank<R>.pt`` and writes
``OUT.rank<R>.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import mcore_harness as H


def _tower(case: dict):
    import torch
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(case["model_type"], **case["config"]).vision_config
    if case["tower"] == "auto":
        if hasattr(cfg, "vision_use_head"):  # gemma3_vl_bridge: Megatron-Bridge forces it off
            cfg.vision_use_head = False
        raw = AutoModel.from_config(cfg)
        module = getattr(raw, "vision_model", raw)
    else:
        path, name = case["tower"].rsplit(".", 1)
        module = getattr(importlib.import_module(path), name)._from_config(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    return module


def _projector(case: dict, tp: int):
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    width, text = case["projector"]
    config = TransformerConfig(
        num_layers=1,
        hidden_size=text,
        num_attention_heads=tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
    )
    proj = ColumnParallelLinear(
        input_size=width,
        output_size=text,
        config=config,
        init_method=torch.nn.init.zeros_,
        gather_output=True,
        bias=False,
        skip_bias_add=True,
    )
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    out = proj.sharded_state_dict(
        prefix="multi_modal_projector.proj.", metadata=ensure_metadata_has_dp_cp_group({})
    )
    norm = {"weight": torch.full((width,), float("nan")), "_extra_state": None}
    out.update(make_sharded_tensors_for_checkpoint(norm, "multi_modal_projector.mm_soft_embed_norm."))
    return out


def _vision_model(case: dict, tp: int) -> tuple[dict, dict]:
    """What Megatron-Bridge's ``Qwen3VLVisionModel`` asks ``dist_checkpointing`` for, built from
    megatron-core's modules without Transformer Engine: (sharded state dict, for each of its keys
    the ShardedTensor's checkpoint key, global offset and prepended-axis count).

    * ``vision_model.decoder.``: megatron-core's ``TransformerBlock`` of ViT layers
      (``tests/mcore_vision.py`` ``vit_block``: local spec, no final norm, Bridge's
      ``post_layer_norm=False``, ``vision_model.py:156-162``), its own ``sharded_state_dict`` (layers
      stacked on a leading axis: ``transformer_block.py:855-880``; Bridge's
      ``Qwen3VLVisionTransformerBlock.sharded_state_dict`` does the same, ``transformer_block.py:
      393-437``).  The one name TE changes: ``TELayerNormColumnParallelLinear`` holds the layer norms
      as ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``; the local spec's separate
      ``input_layernorm`` / ``pre_mlp_layernorm`` are saved under those names by the spec's
      ``sharded_state_dict_keys_map`` (as megatron-core's GPT local spec does), not by renaming here;
    * ``vision_model.decoder.deepstack_merger_list.``: one patch merger per DeepStack index
      (``Qwen3VLVisionPatchMerger``, ``utils.py:112-170``: a norm over the merged width, a
      ``ColumnParallelLinear`` [W -> W], a ``RowParallelLinear`` [W -> out]; W = hidden *
      merge**2), stacked on a leading axis (offset ``(0, j, J)``, ``transformer_block.py:439-452``);
    * ``vision_model.merger.``: the patch merger (norm over the hidden width), unstacked;
    * ``vision_model.patch_embed.proj`` (a ``Conv3d``) and ``vision_model.pos_embed`` (an
      ``Embedding``): plain torch modules, megatron-core's ``sharded_state_dict_default``
      (replicated).

    TE's norms (``TENorm``) save an ``_extra_state`` that torch's ``LayerNorm`` has not: those
    objects are in the checkpoint and not asked for (the test checks they are the only ones)."""
    import mcore_vision
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import sharded_state_dict_default

    v = case["vision_config"]
    width = v["hidden_size"] * v["spatial_merge_size"] ** 2
    sizes = {
        "layers": v["depth"],
        "hidden": v["hidden_size"],
        "heads": v["num_heads"],
        "ffn": v["intermediate_size"],
        "eps": 1e-6,
    }
    block = mcore_vision.vit_block(sizes, tp, te_names=True)
    config = block.config

    class Merger(MegatronModule):
        def __init__(self, norm_width: int):
            super().__init__(config=config)
            self.patch_norm = torch.nn.LayerNorm(norm_width, eps=config.layernorm_epsilon)
            self.linear_fc1 = ColumnParallelLinear(
                width,
                width,
                config=config,
                init_method=config.init_method,
                gather_output=False,
                bias=True,
                skip_bias_add=False,
            )
            self.linear_fc2 = RowParallelLinear(
                width,
                v["out_hidden_size"],
                config=config,
                init_method=config.output_layer_init_method,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            )

    metadata = {"singleton_local_shards": False}
    sharded = block.sharded_state_dict(prefix="vision_model.decoder.", metadata=dict(metadata))
    stack = "vision_model.decoder.deepstack_merger_list."
    count = len(v.get("deepstack_visual_indexes", ()))
    for j in range(count):
        part = Merger(width).sharded_state_dict(f"{stack}{j}.", [(0, j, count)], dict(metadata))
        replace_prefix_for_sharding(part, f"{stack}{j}.", stack)
        sharded.update(part)
    sharded.update(Merger(v["hidden_size"]).sharded_state_dict("vision_model.merger.", (), dict(metadata)))
    patch = torch.nn.Module()
    kernel = (v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    patch.proj = torch.nn.Conv3d(v["in_channels"], v["hidden_size"], kernel, stride=kernel, bias=True)
    pos = torch.nn.Embedding(v["num_position_embeddings"], v["hidden_size"])
    tp_group = ps.get_tensor_model_parallel_group()
    for name, module in (("patch_embed", patch), ("pos_embed", pos)):
        sharded.update(
            sharded_state_dict_default(module, f"vision_model.{name}.", (), dict(metadata), tp_group=tp_group)
        )
    where = {}
    for k, sh in sharded.items():
        if isinstance(sh, ShardedTensor):
            with torch.no_grad():
                sh.data.fill_(float("nan"))  # every value compared must come from the checkpoint
            where[k] = (sh.key, list(sh.global_offset), sh.prepend_axis_num)
    return sharded, where


def _run_case(case: dict, rank: int) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import sharded_state_dict_default

    with H.model_parallel(case):
        metadata = {"singleton_local_shards": False}
        sharded: dict = {}
        where: dict = {}
        if case.get("vision_model"):
            sharded, where = _vision_model(case["config"], case["tp"])
        if case.get("lm"):
            models = H.build_models(case)
            sharded.update(models[0].sharded_state_dict(prefix="language_model.", metadata=dict(metadata)))
        if case.get("tower") and ps.is_pipeline_first_stage():  # Bridge builds it where pre_process
            # the TP group the wrapping MegatronModule passes (transformer/module.py:82-101): each TP
            # rank's copy of a replicated tensor its own replica
            tp_group = ps.get_tensor_model_parallel_group()
            tower = _tower(case)
            sharded.update(
                sharded_state_dict_default(tower, case["prefix"], (), dict(metadata), tp_group=tp_group)
            )
            if case.get("projector"):
                sharded.update(_projector(case, case["tp"]))
        with open(os.path.join(case["ckpt"], "latest_checkpointed_iteration.txt")) as fh:
            it_dir = os.path.join(case["ckpt"], f"iter_{int(fh.read().strip()):07d}")
        if case.get("vision_model"):  # both mismatches returned, for the test to assert on
            loaded, missing, unexpected = dist_checkpointing.load(sharded, it_dir, strict="return_all")
        else:
            loaded, missing, unexpected = dist_checkpointing.load(sharded, it_dir), set(), set()
        got = {k: v.detach().clone() for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        torch.save(got, f"{case['out']}.rank{rank}.pt")
        report = {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "objects": sorted(k for k, v in loaded.items() if k.endswith("_extra_state")),
            # in the checkpoint, not asked for / asked for, not in the checkpoint
            "missing": sorted(missing),
            "unexpected": sorted(unexpected),
            "where": where,
        }
        with open(f"{case['out']}.rank{rank}.json", "w") as fh:
            json.dump(report, fh)


def main(argv: list[str]) -> int:
    return H.main(argv, _run_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
