"""Megatron-core's own ViT layers as a strict-load and forward oracle for the Megatron-form vision
tower ckpt-ir writes in Megatron-Bridge's layout (Qwen3-VL: ``vision_model.decoder.layers.N``).

Not a test module: ``tests/test_families_qwen3vl.py`` runs ``python tests/mcore_vision.py JOB.json
WORLD``, which forks ``WORLD`` gloo ranks through ``tests/mcore_harness.py`` (same CPU workarounds).
Megatron-Bridge builds the tower's layers from megatron-core's
``get_vit_layer_with_transformer_engine_spec()`` with its own ``Qwen3VLSelfAttention`` (which adds
no parameters) in its ``Qwen3VLVisionTransformerBlock`` (MB
``models/qwen_vl/modelling_qwen3_vl/model.py:346-372``); Transformer Engine is not installed here,
so each rank builds megatron-core's ``TransformerBlock`` from ``get_vit_layer_with_local_spec()``
(the same layer with separate ``input_layernorm`` / ``pre_mlp_layernorm`` LayerNorms, and no
attention mask: Megatron-Bridge's is ``no_mask``) and loads its rank file's layer tensors with TE's
fused norm names mapped to the local ones (``linear_qkv.layer_norm_{weight,bias}`` ->
``input_layernorm.*``, ``linear_fc1.layer_norm_{weight,bias}`` -> ``pre_mlp_layernorm.*``) with
``strict=True``.  Every rank then runs the block on the case's input (``[s, 1, hidden]``, no
rotary embedding) and rank 0 saves the output; the patch embedding, learned positions, merger and
DeepStack mergers are Megatron-Bridge's own modules (``utils.py``), which megatron-core does not
have, so they are not loaded here.

:func:`vit_block` is also the block ``tests/vlm_dist_harness.py`` loads the ``torch_dist`` tower
into.

Job: ``{"store": PATH, "cases": [{"ckpt": DIR, "tp": T, "out": FILE, "input": FILE, "layers": N,
"hidden": E, "heads": H, "ffn": I, "eps": EPS}]}``; each rank reads ``mp_rank_TT`` (PP 1,
EP 1) or ``mp_rank_TT_000`` with ``"ep"`` > 1 (the tower is replicated over EP).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import mcore_harness  # noqa: E402

TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
PREFIX = "vision_model.decoder."


def local_state(model: dict) -> dict:
    """The rank file's tower layers as megatron-core's local-spec TransformerBlock names them."""
    out = {}
    for key, value in model.items():
        if not key.startswith(PREFIX + "layers.") or key.endswith("._extra_state"):
            continue
        rest = key[len(PREFIX) :]
        layer, _, name = rest[len("layers.") :].partition(".")
        out[f"layers.{layer}.{TE_TO_LOCAL.get(name, name)}"] = value
    return out


def vit_block(case: dict, tp: int, te_names: bool = False):
    """Megatron-core's ``TransformerBlock`` of ViT layers (local spec, no attention mask, no final
    norm) for the case's sizes at TP ``tp``, inside an initialised model-parallel state.
    ``te_names``: the layer spec's ``sharded_state_dict_keys_map`` saves the local norms under TE's
    fused names (``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``,
    ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_``), megatron-core's own mechanism for
    this (its GPT local spec, ``models/gpt/gpt_layer_specs.py:417-420``)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=case["layers"],
        hidden_size=case["hidden"],
        num_attention_heads=case["heads"],
        ffn_hidden_size=case["ffn"],
        kv_channels=case["hidden"] // case["heads"],
        normalization="LayerNorm",
        layernorm_epsilon=case["eps"],
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=lambda x: F.gelu(x, approximate="tanh"),  # gelu_pytorch_tanh
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
    )
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    if te_names:
        spec.submodules.sharded_state_dict_keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return TransformerBlock(config, spec, post_layer_norm=False)


def run_case(case: dict, rank: int) -> None:
    import torch
    from megatron.core import parallel_state as ps

    tp = case["tp"]
    with mcore_harness.model_parallel({"tp": tp, "pp": 1}):  # EP ranks hold the same tower
        block = vit_block(case, tp)
        t = ps.get_tensor_model_parallel_rank()
        name = f"mp_rank_{t:02d}" + ("_000" if case.get("ep", 1) > 1 else "")
        obj = torch.load(f"{case['ckpt']}/{name}/model_optim_rng.pt", map_location="cpu", weights_only=False)
        sd = local_state(obj["model"])
        extra = {k: v for k, v in block.state_dict().items() if k.endswith("._extra_state")}
        block.load_state_dict({**sd, **extra}, strict=True)
        block.eval()
        x = torch.load(case["input"])
        with torch.no_grad():
            y = block(hidden_states=x[:, None, :], attention_mask=None)
        if rank == 0:
            torch.save({"out": y[:, 0, :], "loaded": sorted(sd)}, case["out"])


if __name__ == "__main__":
    sys.exit(mcore_harness.main(sys.argv[1:], run_case=run_case))
