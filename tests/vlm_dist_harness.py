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


def _run_case(case: dict, rank: int) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import sharded_state_dict_default

    with H.model_parallel(case):
        metadata = {"singleton_local_shards": False}
        sharded: dict = {}
        if case.get("lm"):
            models = H.build_models(case)
            sharded.update(models[0].sharded_state_dict(prefix="language_model.", metadata=dict(metadata)))
        if ps.is_pipeline_first_stage():  # Megatron-Bridge builds the tower where pre_process
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
        loaded = dist_checkpointing.load(sharded, it_dir)
        got = {k: v.detach().clone() for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        torch.save(got, f"{case['out']}.rank{rank}.pt")
        report = {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "objects": sorted(k for k, v in loaded.items() if k.endswith("_extra_state")),
        }
        with open(f"{case['out']}.rank{rank}.json", "w") as fh:
            json.dump(report, fh)


def main(argv: list[str]) -> int:
    return H.main(argv, _run_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
