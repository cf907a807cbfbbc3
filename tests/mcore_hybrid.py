"""megatron-core as a *keys-and-shapes* oracle for hybrid models: Mamba hybrids (``MambaModel``) and
gated-delta-net models (``GPTModel`` with ``experimental_attention_variant="gated_delta_net"``),
built on CPU without the kernels they need to run.

Not a test module: ``python tests/mcore_hybrid.py JOB.json WORLD`` (in a fork of the warm server,
``tests/mcore_server.py``), built on ``tests/mcore_harness.py``: the same forked ranks joined by a
gloo group, the same CPU workarounds, Megatron's model-parallel state per case
(:func:`mcore_harness.model_parallel`).  From a test, :func:`mcore_keys` and :func:`mcore_load`.

For every case each rank builds its part of the model (its TP rank and pipeline stage) and writes
``OUT.rank<R>.json`` with

* ``state_dict``: the legacy (``torch`` format) ``state_dict()`` keys -> local shapes, in the
  model's order (layers numbered from 0 on every stage), ``dtypes`` beside it, and
  ``extra_state``: the ``_extra_state`` keys, left out of ``state_dict``;
* ``sharded``: ``sharded_state_dict()`` after ``apply_factories`` (Mamba's ``in_proj`` /
  ``conv1d`` and GDN's ``in_proj`` / ``conv1d`` become one global tensor per part): checkpoint key
  (layers numbered globally) -> ``global_shape`` and this rank's ``shards``, each with
  ``local_shape``, ``global_offset``, ``replica_id`` and ``local`` (the state-dict key it comes
  from, a part name appended; a gated ``linear_fc1`` is two shards of one key, gate and up);
  ``sharded_objects``: the ShardedObjects (``_extra_state``) the same way (``global_offset``,
  ``replica_id``, ``local``; one per local expert for ``SequentialMLP``);
* ``layers``: the layer kind of each local layer (Mamba symbols ``M * - E``; GDN models ``G`` or
  ``*``) and ``offset``, the global number of the first one; ``modules``: the class of every
  mixer / attention / MLP / experts module.

A case (JSON) names ``kind`` (``"mamba"`` | ``"gdn"``), ``tp``, ``pp`` (optional ``ep``, ``etp``),
``spec`` (``"te"``, the default, or ``"local"``: see below), ``hidden``, ``heads``, ``groups``
(query groups), ``ffn``, ``vocab``, ``num_layers`` (GDN; a Mamba model has one layer per symbol of
``hybrid_override_pattern``), ``tied``, ``out`` (the report's path prefix), and any
TransformerConfig field by its own name (``kv_channels``, ``mamba_num_heads``,
``mamba_head_dim``, ``mamba_state_dim``, ``mamba_num_groups``, ``num_moe_experts``,
``moe_ffn_hidden_size``, ``moe_shared_expert_intermediate_size``, ``moe_shared_expert_gate``,
``moe_router_enable_expert_bias``, ``moe_grouped_gemm``, ``moe_layer_freq``,
``linear_key_head_dim``, ``linear_value_head_dim``, ``linear_num_key_heads``,
``linear_num_value_heads``, ``linear_conv_kernel_dim``, ``linear_attention_freq``,
``attention_output_gate``, ``layernorm_zero_centered_gamma``, ``qk_layernorm``,
``gated_linear_unit``, ``normalization``, ``num_layers_in_first_pipeline_stage``,
``num_layers_in_last_pipeline_stage``, ...).  A key that is neither is an error.

``"metadata"`` is what ``sharded_state_dict(metadata=...)`` gets (saves and loads too); the
default ``{"singleton_local_shards": False}`` is what Megatron-LM's
``_build_sharded_state_dict_metadata`` sets for the model (True would key SequentialMLP experts
one by one).

Checkpoints:

* ``"ckpt"``: a Megatron checkpoint directory (``latest_checkpointed_iteration.txt`` and
  ``iter_*``, or an ``iter_*`` directory itself).  ``torch_dist`` (``metadata.json``): every rank
  calls ``dist_checkpointing.load(model.sharded_state_dict(), dir, strict=RETURN_ALL)``, the
  strictest handling that cannot hang: ``RAISE_ALL`` raises on a rank whose own keys are
  "unexpected" while the other ranks go on into the load's collectives; ``RETURN_ALL`` runs the
  same checks (``validate_integrity_and_strict_load``) and returns megatron-core's two key sets,
  so ``ok`` is exactly what ``RAISE_ALL`` would accept, plus a load that did not raise.  In
  megatron-core's words "missing" = in the checkpoint, requested by no rank (the same on all
  ranks), "unexpected" = requested by this rank, not in the checkpoint.  ``torch`` format: the
  rank's ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` against the model: ``missing``,
  ``unexpected``, ``shape_mismatch`` (``[key, file shape, model shape]``), then
  ``load_state_dict(strict=True)`` when the names and shapes agree.  Either way
  ``load = {"format", "ok", "error", "missing", "unexpected", ...}``.  ``"dump": true``
  saves the model's tensors after the load to ``OUT.rank<R>.sd.pt``.
* ``"save"``: ``{"dir": D, "format": "torch_dist" | "torch"}`` writes the built model (random
  weights from the case's ``seed``) as megatron-core does: ``dist_checkpointing.save`` of
  ``sharded_state_dict()`` into ``D/iter_0000001``, or one ``{"model", "checkpoint_version",
  "iteration"}`` rank file per model-parallel rank (data-parallel rank 0; no ``args``, as
  MindSpeed-LLM's Mamba converter writes), and ``D/latest_checkpointed_iteration.txt``
  (the save's results queue in-process, as ``tests/distopt_fixtures.py`` does).

Stand-ins (nothing here computes: a forward pass needs the Triton / CUDA kernels; they are what
docs/reference/composed-blocks.md §2.6 lists, in its order; :func:`install_standins`):

1. ``megatron.core.inference.contexts.attention_context.triton.tensor_ops`` (imports ``triton``;
   ``ssm/mamba_mixer.py`` imports it) is put in ``sys.modules`` with its three names, each
   raising.  There is no ``triton`` package stand-in: ``torch._dynamo`` would then take triton for
   installed.
2. ``mamba_ssm``: ``ops.triton.layernorm_gated.RMSNorm`` (the mixer's gated norm: ``weight
   [hidden_size]``, no bias, as mamba_ssm's has) and ``ops.triton.ssd_combined`` with the two scan
   names (raising); without it ``MambaMixer`` raises ``ImportError``.  Installed before
   ``mamba_mixer`` is imported: its ``ExtendedRMSNorm`` subclasses ``RMSNorm`` at import.
3. ``einops`` (``rearrange``, ``repeat``, raising) when it is not installed (``HAVE_EINOPS``).
4. Transformer Engine classes (``te`` is a ``MagicMock`` without TE), swapped in the specs
   (:func:`swap_te`): ``TELayerNormColumnParallelLinear`` -> :class:`LayerNormColumnLinear`
   (``ColumnParallelLinear`` plus ``layer_norm_weight [in]``, ``layer_norm_bias`` with LayerNorm,
   registered before ``weight`` as TE's ``LayerNormLinear`` does; sharded like TE's wrapper:
   ``weight``/``bias`` on dim 0, the norm replicated), ``TEColumnParallelLinear`` /
   ``TERowParallelLinear`` -> ``ColumnParallelLinear`` / ``RowParallelLinear`` (the same
   shapes, sharding and ``_extra_state`` key), ``TEDotProductAttention`` ->
   :class:`CoreAttention` (``DotProductAttention`` with an ``_extra_state``, which TE's has in a
   legacy state dict and not in its sharded one), ``TENorm`` -> :class:`Norm` (``weight``, zero-
   centred allowed, ``bias`` with LayerNorm; megatron-core's ``WrappedTorchNorm`` refuses
   zero-centred gamma).  Any other TE class left in a spec is an error.
5. ``megatron.core.ssm.mamba_block.TENorm`` (``MambaStack`` builds its final norm directly):
   :class:`Norm` (TE spec) or ``WrappedTorchNorm`` (local spec).
6. Experts: the stock Mamba spec's MoE uses grouped GEMM, which without TE is the legacy
   ``GroupedMLP`` (CUDA ``grouped_gemm``); the TE spec gets ``SequentialMLP`` with local linears
   instead (``...mlp.experts.local_experts.{j}.linear_fc1.weight``, what TE's
   ``SequentialMLP`` also has); ``moe_grouped_gemm`` needs TE's ``TEGroupedMLP``
   (``linear_fc1.weight{e}``) there and is refused.  The local spec with ``moe_grouped_gemm``
   builds ``GroupedMLP`` on the pure-torch ``grouped_gemm`` of ``mcore_harness``.
7. ``TESpecProvider`` is bound in ``gpt_layer_specs`` and ``experimental_attention_variant_module_
   specs`` (only defined there when ``import transformer_engine`` works), 8. with its module's
   ``is_te_min_version`` answering True (it compares TE's version, ``None`` here).
9. ``megatron.core.ssm.gated_delta_net.HAVE_FLA = True`` (FLA kernels are used in forward only).
10. ``pipeline_dtype=torch.float32``.

Norm flavours and key names (Mamba):

* ``"spec": "te"``: megatron-core's own ``mamba_stack_spec`` (``models/mamba/mamba_layer_specs.py``,
  TE-only): each layer's pre-norm is fused into its first linear: ``mixer.in_proj.
  layer_norm_weight`` (``M``), ``self_attention.linear_qkv.layer_norm_weight`` (``*``),
  ``mlp.linear_fc1.layer_norm_weight`` (``-``); ``E`` has ``pre_mlp_layernorm.weight``; attention
  layers carry ``self_attention.core_attention._extra_state``.
* ``"spec": "local"``: MindSpeed-LLM's Mamba spec (``mindspeed_llm/tasks/models/spec/
  mamba_spec.py``) rebuilt from megatron-core 0.16.1's own local modules, which builds:
  ``MambaLayer.norm`` (``decoder.layers.{j}.norm.weight``), ``TransformerLayer.input_layernorm``
  (``input_layernorm.weight``), ``MLPLayer.pre_mlp_layernorm`` (``pre_mlp_layernorm.weight``),
  plain ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``DotProductAttention`` (no
  ``core_attention._extra_state``), norms ``WrappedTorchNorm`` (megatron-core's local
  ``torch.nn.RMSNorm``; MindSpeed's ``PTNorm`` is Megatron's legacy ``RMSNorm``, the same
  ``weight``), MoE ``E`` with ``get_moe_module_spec(use_te=False)`` (MindSpeed's spec has no
  MoE layer).  Both: ``decoder.final_norm.weight``; the mixer keys are the same.
* GDN models have the TE flavour only: megatron-core 0.16.1's GDN spec needs a fused
  norm+linear ``in_proj`` (``LocalSpecProvider.column_parallel_layer_norm_linear()`` is None).

What the stand-ins cannot reproduce: TE's ``_extra_state`` values (objects, not None), whether a
TE norm has an ``_extra_state`` (the stand-in norm has none), and ``TEGroupedMLP`` keys.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import types

if __package__:  # imported from a test as tests.mcore_hybrid
    from tests import distopt_fixtures as DF
    from tests import mcore_harness as H
else:  # run as a script: tests/ is sys.path[0]
    import distopt_fixtures as DF
    import mcore_harness as H

WORLD = 4
SHARDED_METADATA = {"singleton_local_shards": False}
SCRIPT = os.path.abspath(__file__)

# case keys that are not TransformerConfig fields
_CASE_KEYS = {
    "kind",
    "tp",
    "pp",
    "ep",
    "etp",
    "spec",
    "hidden",
    "heads",
    "groups",
    "ffn",
    "vocab",
    "num_layers",
    "hybrid_override_pattern",
    "tied",
    "seed",
    "ckpt",
    "dump",
    "save",
    "metadata",
    "out",
    "load_only",
}


# ---------------------------------------------------------------------------------------------
# test side


def mcore_keys(cases: list[dict], tmp_path, world: int = WORLD, timeout: float = 300) -> list[list[dict]]:
    """Run ``cases`` in one job: per case, every rank's report (rank order)."""
    root = str(tmp_path)
    os.makedirs(root, exist_ok=True)
    job = []
    for i, case in enumerate(cases):
        job.append(dict(case, out=os.path.join(root, f"case{i}"), load_only=True))
    return [reports for _, reports in H.run_job(root, job, world, timeout, script=SCRIPT)]


def mcore_load(case: dict, tmp_path, world: int = WORLD, timeout: float = 300) -> list[dict]:
    """Build ``case`` and load its ``"ckpt"``: every rank's ``load`` result (rank order), see
    :func:`load_results`."""
    if not case.get("ckpt"):
        raise ValueError('mcore_load: the case names no checkpoint; give it a "ckpt" directory')
    return load_results(mcore_keys([case], tmp_path, world, timeout)[0])


def load_results(reports: list[dict]) -> list[dict]:
    """A case's ``load`` results, each with the rank's ``rank``, ``tp_rank``, ``pp_rank``,
    ``ep_rank``, ``dp_rank``."""
    ids = ("rank", "tp_rank", "pp_rank", "ep_rank", "dp_rank")
    return [dict(r["load"], **{k: r[k] for k in ids}) for r in reports]


# ---------------------------------------------------------------------------------------------
# stand-ins (module docstring, items 1-9)


def _raising(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"{name} is a build-only stand-in (tests/mcore_hybrid.py): no forward pass")

    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    if "." in name:
        mod.__path__ = []  # importable submodules below it: a package
    sys.modules[name] = mod
    return mod


def install_standins() -> None:
    """Items 1-3 and 7-9 of the module docstring; the TE classes (4) are swapped per spec."""
    import importlib
    import importlib.util

    import torch

    ops = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    try:
        importlib.import_module(ops)
    except ImportError:  # no triton (the CPU box)
        names = ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge")
        sys.modules[ops] = types.ModuleType(ops)
        sys.modules[ops].__dict__.update({n: _raising(f"{ops}.{n}") for n in names})

    if importlib.util.find_spec("mamba_ssm") is None:

        class RMSNorm(torch.nn.Module):
            """mamba_ssm's gated RMSNorm, parameters only."""

            def __init__(
                self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None
            ):
                super().__init__()
                self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
                self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
                self.register_parameter("bias", None)

        for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
            _module(pkg)
        _module("mamba_ssm.ops.triton.layernorm_gated", RMSNorm=RMSNorm)
        scans = ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined")
        _module("mamba_ssm.ops.triton.ssd_combined", **{n: _raising(f"mamba_ssm.{n}") for n in scans})

    if importlib.util.find_spec("einops") is None:
        sys.modules["einops"] = types.ModuleType("einops")
        sys.modules["einops"].__dict__.update({n: _raising(f"einops.{n}") for n in ("rearrange", "repeat")})

    from megatron.core.extensions import transformer_engine as te_ext

    if not te_ext.HAVE_TE:
        from megatron.core.extensions import transformer_engine_spec_provider as provider
        from megatron.core.models.gpt import experimental_attention_variant_module_specs as gdn_specs
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.ssm import gated_delta_net

        provider.is_te_min_version = lambda *a, **k: True
        gpt_layer_specs.TESpecProvider = provider.TESpecProvider
        gdn_specs.TESpecProvider = provider.TESpecProvider
        gated_delta_net.HAVE_FLA = True


def _te_standins() -> dict:
    """TE class -> stand-in (item 4)."""
    import torch
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LayerNormColumnLinear(ColumnParallelLinear):
        """TE's LayerNormLinear, column-parallel: the pre-norm's ``layer_norm_weight`` (and
        ``layer_norm_bias``) beside the linear's parameters, registered first."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            zero = config.layernorm_zero_centered_gamma
            params = {"layer_norm_weight": torch.zeros(input_size) if zero else torch.ones(input_size)}
            if config.normalization == "LayerNorm":
                params["layer_norm_bias"] = torch.zeros(input_size)
            own = dict(self._parameters)
            self._parameters.clear()
            for name, value in params.items():
                self.register_parameter(name, torch.nn.Parameter(value.to(config.params_dtype)))
            self._parameters.update(own)

    class CoreAttention(DotProductAttention):
        """TEDotProductAttention's constructor and ``_extra_state``; the local attention's
        (empty) sharded state dict, as TE's."""

        def __init__(self, config, *args, k_channels=None, v_channels=None, num_splits=None, **kwargs):
            kwargs.pop("cp_comm_type", None)
            super().__init__(config, *args, **kwargs)

        def get_extra_state(self):
            return None

        def set_extra_state(self, state):
            pass

    class Norm(torch.nn.Module):
        """TENorm: RMSNorm or LayerNorm parameters, zero-centred gamma allowed."""

        def __init__(self, config, hidden_size, eps=1e-5):
            super().__init__()
            zero = config.layernorm_zero_centered_gamma
            w = torch.zeros(hidden_size) if zero else torch.ones(hidden_size)
            self.weight = torch.nn.Parameter(w.to(config.params_dtype))
            if config.normalization == "LayerNorm":
                self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    return {
        te_ext.TELayerNormColumnParallelLinear: LayerNormColumnLinear,
        te_ext.TEColumnParallelLinear: ColumnParallelLinear,
        te_ext.TERowParallelLinear: RowParallelLinear,
        te_ext.TEDotProductAttention: CoreAttention,
        te_ext.TENorm: Norm,
    }


def swap_te(spec, table: dict):
    """A copy of ``spec`` (ModuleSpec / submodule dataclasses / lists of them) with every TE
    class replaced by its stand-in."""
    from unittest import mock

    from megatron.core.transformer.spec_utils import ModuleSpec

    def walk(x):
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        try:
            hit = table.get(x)
        except TypeError:  # unhashable: not a class
            hit = None
        if hit is not None:
            return hit
        # without TE the TE classes are MagicMock instances (their base, te.pytorch.*, is one)
        if isinstance(x, mock.NonCallableMock) or (
            isinstance(x, type) and x.__module__ == "megatron.core.extensions.transformer_engine"
        ):
            raise ValueError(f"{x!r} in the layer spec has no stand-in in tests/mcore_hybrid.py; add one")
        if isinstance(x, ModuleSpec) or dataclasses.is_dataclass(x) and not isinstance(x, type):
            y = copy.copy(x)
            for f in dataclasses.fields(x):
                setattr(y, f.name, walk(getattr(x, f.name)))
            return y
        return x

    return walk(spec)


# ---------------------------------------------------------------------------------------------
# rank side


def _config(case: dict):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(k for k in case if k not in _CASE_KEYS and k not in fields)
    if unknown:
        raise ValueError(
            f"case {case.get('out')}: {unknown} are neither case keys nor TransformerConfig fields: rename or drop them"
        )
    kind = case["kind"]
    if kind == "mamba":
        num_layers = len(case["hybrid_override_pattern"])
    elif kind == "gdn":
        num_layers = case["num_layers"]
    else:
        raise ValueError(f"case {case.get('out')}: kind {kind!r} is not 'mamba' or 'gdn'")
    kw = dict(
        num_layers=num_layers,
        hidden_size=case["hidden"],
        num_attention_heads=case["heads"],
        num_query_groups=case.get("groups") or case["heads"],
        ffn_hidden_size=case["ffn"],
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=bool(case.get("save")),  # random weights only when written out
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=case["tp"],
        pipeline_model_parallel_size=case["pp"],
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
        sequence_parallel=False,
        is_hybrid_model=kind == "mamba",
    )
    if case.get("num_moe_experts"):
        kw.update(
            moe_router_topk=2,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
        )
    if kind == "gdn":
        kw.update(experimental_attention_variant="gated_delta_net")
    kw.update({k: v for k, v in case.items() if k in fields})
    return TransformerConfig(**kw)


def _mamba_spec(case: dict, config):
    """The stock TE spec with stand-ins, or the local (MindSpeed-LLM) one; sets the final norm."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm import mamba_block

    if case.get("spec", "te") == "te":
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.spec_utils import ModuleSpec

        if config.moe_grouped_gemm:
            raise ValueError(
                f"case {case['out']}: moe_grouped_gemm with the TE spec is TEGroupedMLP, which needs "
                "Transformer Engine; use moe_grouped_gemm=False or spec 'local'"
            )
        table = _te_standins()
        spec = swap_te(mamba_stack_spec, table)
        moe = spec.submodules.moe_layer.submodules.mlp
        moe.submodules = copy.copy(moe.submodules)
        moe.submodules.experts = ModuleSpec(
            module=SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
        mamba_block.TENorm = table[_te_class("TENorm")]
        return spec

    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    mamba_block.TENorm = WrappedTorchNorm
    linear = dict(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=WrappedTorchNorm,
                    mixer=ModuleSpec(
                        module=MambaMixer,
                        submodules=MambaMixerSubmodules(
                            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=WrappedTorchNorm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            core_attention=DotProductAttention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm,
                    mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(**linear)),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm,
                    mlp=get_moe_module_spec(
                        use_te=False,
                        num_experts=config.num_moe_experts or 1,
                        moe_grouped_gemm=config.moe_grouped_gemm,
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def _te_class(name: str):
    from megatron.core.extensions import transformer_engine as te_ext

    return getattr(te_ext, name)


def _build(case: dict):
    """This rank's model for ``case`` (one pipeline stage; neither model supports VPP here)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    config = _config(case)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    import torch

    torch.manual_seed(case.get("seed", 1234))
    common = dict(
        config=config,
        vocab_size=case["vocab"],
        max_sequence_length=128,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=bool(case.get("tied")),
    )
    if case["kind"] == "mamba":
        from megatron.core.models.mamba import MambaModel

        return MambaModel(
            mamba_stack_spec=_mamba_spec(case, config),
            hybrid_override_pattern=case["hybrid_override_pattern"],
            position_embedding_type="none",
            **common,
        ).eval()

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec,
    )

    if case.get("spec", "te") != "te":
        raise ValueError(
            f"case {case['out']}: megatron-core 0.16.1 builds gated-delta-net layers with the TE spec "
            "only (a fused norm+linear in_proj); use spec 'te'"
        )
    block = get_transformer_block_with_experimental_attention_variant_spec(
        config, vp_stage=None, pp_rank=ps.get_pipeline_model_parallel_rank()
    )
    return GPTModel(
        transformer_layer_spec=swap_te(block, _te_standins()),
        position_embedding_type="rope",
        **common,
    ).eval()


def _flat(tree, path=()):
    """(local key path, ShardedBase) pairs of a sharded state dict after apply_factories."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, path + (str(k),))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, path + (str(i),))
    else:
        yield ".".join(path), tree


def _replica(rid):
    return list(rid) if isinstance(rid, (tuple, list)) else rid


def _sharded_report(model, metadata: dict) -> tuple[dict, dict]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict(metadata=dict(metadata))
    apply_factories(sd)
    tensors, objects = {}, {}
    for local, sh in _flat(sd):
        if isinstance(sh, ShardedTensor):
            entry = tensors.setdefault(sh.key, {"global_shape": list(sh.global_shape), "shards": []})
            if entry["global_shape"] != list(sh.global_shape):
                raise ValueError(
                    f"{sh.key}: shards of global shapes {entry['global_shape']} and {list(sh.global_shape)}"
                )
            entry["shards"].append(
                {
                    "local_shape": list(sh.local_shape),
                    "global_offset": list(sh.global_offset),
                    "replica_id": _replica(sh.replica_id),
                    "local": local,
                }
            )
        elif isinstance(sh, ShardedObject):
            entry = objects.setdefault(sh.key, {"global_shape": list(sh.global_shape), "shards": []})
            entry["shards"].append(
                {
                    "global_offset": list(sh.global_offset),
                    "replica_id": _replica(sh.replica_id),
                    "local": local,
                }
            )
        else:
            raise ValueError(
                f"{local}: {type(sh).__name__} in the sharded state dict; the oracle knows tensors and objects"
            )
    return tensors, objects


def _layer_kinds(case: dict, model) -> tuple[list, int]:
    """The local layers' kinds and the global number of the first: every layer's ``layer_number``
    is global (MambaStack adds its stage offset to Mamba layers, TransformerLayer its own)."""
    if not hasattr(model, "decoder") or not len(model.decoder.layers):
        return [], 0
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1
    if case["kind"] == "mamba":
        return list(model.decoder.layer_type_list), offset
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    return ["G" if isinstance(m.self_attention, GatedDeltaNet) else "*" for m in layers], offset


def _modules(model) -> dict:
    ends = (".mixer", ".self_attention", ".mlp", ".mlp.experts", ".mlp.shared_experts", ".core_attention")
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(ends)}


def _iter_dir(ckpt: str) -> str:
    latest = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    if not os.path.exists(latest):
        return ckpt
    with open(latest) as fh:
        it = fh.read().strip()
    return os.path.join(ckpt, "release" if it == "release" else f"iter_{int(it):07d}")


def _error_lines(e: BaseException) -> str:
    """An exception in a few lines: DCP's CheckpointException holds every rank's traceback; the
    exception lines of them (each once) are the message."""
    lines = []
    for line in f"{type(e).__name__}: {e}".splitlines():
        if line and not line[0].isspace() and not line.startswith("Traceback") and line not in lines:
            lines.append(line)
    return "\n".join(lines)[:4000]


def _load(case: dict, model, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    it_dir = _iter_dir(case["ckpt"])
    if os.path.exists(os.path.join(it_dir, "metadata.json")):
        strategy = None if os.path.exists(os.path.join(it_dir, "common.pt")) else H._common_state_loader()
        sharded = model.sharded_state_dict(metadata=dict(case.get("metadata", SHARDED_METADATA)))
        result = {"format": "torch_dist", "missing": [], "unexpected": [], "error": None}
        try:
            loaded, missing, unexpected = dist_checkpointing.load(
                sharded, it_dir, common_strategy=strategy, strict=StrictHandling.RETURN_ALL
            )
        # torch.distributed.checkpoint's CheckpointException (every rank's errors, on every rank)
        # is a BaseException
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (the report is the error)
            result.update(ok=False, error=_error_lines(e))
            return result
        result.update(missing=sorted(missing), unexpected=sorted(unexpected))
        result["ok"] = not missing and not unexpected
        own = {k for k in model.state_dict()}
        tensors = {k: v for k, v in loaded.items() if k in own}
        res = model.load_state_dict(tensors, strict=False)
        # core_attention's _extra_state is in no sharded state dict (TE's neither)
        result["state_dict_missing"] = sorted(k for k in res.missing_keys if not k.endswith("_extra_state"))
        result["state_dict_unexpected"] = sorted(res.unexpected_keys)
        return result

    ep = case.get("ep", 1)
    path = H._rank_file(case["ckpt"], tp_rank, pp_rank, case["pp"], ep_rank, ep)
    if not os.path.exists(path):
        return {
            "format": "torch",
            "ok": False,
            "error": f"{path}: no such rank file",
            "missing": [],
            "unexpected": [],
        }
    sd = torch.load(path, map_location="cpu", weights_only=False)["model"]
    want = model.state_dict()
    missing = sorted(k for k in want if k not in sd)
    unexpected = sorted(k for k in sd if k not in want)
    mismatch = [
        [k, list(sd[k].shape), list(want[k].shape)]
        for k in want
        if k in sd
        and isinstance(want[k], torch.Tensor)
        and (not isinstance(sd[k], torch.Tensor) or sd[k].shape != want[k].shape)
    ]
    result = {
        "format": "torch",
        "file": path,
        "missing": missing,
        "unexpected": unexpected,
        "shape_mismatch": mismatch,
        "error": None,
    }
    if not missing and not unexpected and not mismatch:
        try:
            model.load_state_dict(sd, strict=True)
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"[:4000]
    result["ok"] = not missing and not unexpected and not mismatch and result["error"] is None
    return result


def _save(case: dict, model, tp_rank: int, pp_rank: int, ep_rank: int, dp_rank: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    save = case["save"]
    root, fmt = save["dir"], save.get("format", "torch_dist")
    it_dir = os.path.join(root, "iter_0000001")
    if fmt not in ("torch_dist", "torch"):
        raise ValueError(f"case {case['out']}: save format {fmt!r} is not 'torch_dist' or 'torch'")
    if dist.get_rank() == 0:
        os.makedirs(it_dir, exist_ok=True)
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as fh:
            fh.write("1")
    dist.barrier()
    if fmt == "torch_dist":
        DF._use_in_process_results_queue()  # not a spawned Manager re-importing torch per rank
        sharded = model.sharded_state_dict(metadata=dict(case.get("metadata", SHARDED_METADATA)))
        dist_checkpointing.save(sharded, it_dir)
    elif dp_rank == 0:
        path = H._rank_file(root, tp_rank, pp_rank, case["pp"], ep_rank, case.get("ep", 1))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"model": model.state_dict(), "checkpoint_version": 3.0, "iteration": 1}, path)
    dist.barrier()


def _run_case(case: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    start = time.perf_counter()
    with H.model_parallel(case):
        model = _build(case)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        ep_rank, dp_rank = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank()
        state = model.state_dict()
        kinds, offset = _layer_kinds(case, model)
        tensors, objects = _sharded_report(model, case.get("metadata", SHARDED_METADATA))
        report = {
            "rank": rank,
            "tp_rank": tp_rank,
            "pp_rank": pp_rank,
            "ep_rank": ep_rank,
            "dp_rank": dp_rank,
            "model": type(model).__name__,
            "spec": case.get("spec", "te"),
            "layers": kinds,
            "offset": offset,
            "state_dict": {k: list(v.shape) for k, v in state.items() if not k.endswith("_extra_state")},
            "dtypes": {
                k: str(v.dtype).replace("torch.", "")
                for k, v in state.items()
                if not k.endswith("_extra_state")
            },
            "extra_state": [k for k in state if k.endswith("_extra_state")],
            "sharded": tensors,
            "sharded_objects": objects,
            "modules": _modules(model),
        }
        if case.get("save"):
            _save(case, model, tp_rank, pp_rank, ep_rank, dp_rank)
        if case.get("ckpt"):
            report["load"] = _load(case, model, tp_rank, pp_rank, ep_rank)
            if case.get("dump"):
                torch.save(
                    {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                    f"{case['out']}.rank{rank}.sd.pt",
                )
        report["seconds"] = round(time.perf_counter() - start, 3)
        with open(f"{case['out']}.rank{rank}.json", "w") as fh:
            json.dump(report, fh)
        dist.barrier()


def main(argv: list[str]) -> int:
    """``mcore_hybrid.py JOB.json WORLD``: the stand-ins installed and the Mamba / GDN modules
    imported before the ranks are forked, then :func:`mcore_harness.main` with this oracle."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    with open(argv[0]) as fh:
        job = json.load(fh)
    install_standins()
    if any(c.get("moe_grouped_gemm") for c in job["cases"]):
        H._install_grouped_gemm_shim()
    import megatron.core.models.gpt.experimental_attention_variant_module_specs  # noqa: F401
    import megatron.core.models.mamba.mamba_layer_specs  # noqa: F401

    return H.main(argv, _run_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
