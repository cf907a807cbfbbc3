"""Run a real megatron-core ``GPTModel`` on CPU as a logits oracle for ckpt-ir's Megatron output.

Not a test module: ``tests/test_megatron_oracle.py`` runs ``python tests/mcore_harness.py JOB.json
WORLD``, which imports megatron-core once and forks ``WORLD`` ranks joined by a gloo process group
(file-store rendezvous, so no port has to be found).  For every
case in the job all ranks initialise Megatron's model-parallel state with that case's TP/PP, build
the model for their own (TP rank, PP stage) with the *local* layer spec, load the matching
``mp_rank_TT[_PPP]/model_optim_rng.pt`` written by ckpt-ir, run a forward pass (through Megatron's
pipeline schedule when PP > 1), gather the vocab-parallel logits over TP, and the rank holding
the last stage's logits writes them out.  Each rank also records what ``load_state_dict`` said
(missing / unexpected keys) so the test can assert that the checkpoint matched the model exactly.

The model is configured from the *HF* config (the test's ground truth), never from the ``args``
that ckpt-ir wrote, so a wrong value in ckpt-ir's output cannot configure the oracle to agree.

megatron-core 0.16 assumes CUDA in a few places; the workarounds (no edits to megatron-core):
* RNG: ``initialize_rng_tracker(inference_rng_tracker=True)`` instead of
  ``model_parallel_cuda_manual_seed`` (which asserts CUDA);
* ``torch.cuda.current_device`` returns the CPU device (rotary ``inv_freq``, p2p shape buffers);
* an explicit boolean causal mask (True = masked), since the default one is built on "cuda";
* everything runs under a ``TorchFunctionMode`` that maps "cuda" devices to CPU and makes
  ``Tensor.cuda()`` a no-op (pipeline schedule buffers, tied-embedding sync with PP > 1);
* ``torch.cuda.synchronize`` is a no-op (p2p communication calls it).

A case with ``"gpt": true`` builds a plain Megatron-LM GPT: LayerNorm (with biases), a GELU MLP
without gating, learned absolute position embeddings and biases on every linear layer
(``hf_config`` then only gives the sizes, under Llama's config keys).  ``"arch"`` overrides any of
those settings (:func:`_arch`): TransformerConfig fields (``activation_func`` by name: ``silu`` or
``gelu``; with ``bias_activation_fusion`` and biases, megatron-core's fused bias-GELU, i.e. the
tanh approximation) and GPTModel's ``position_embedding_type``.

``"mla"`` (MLATransformerConfig fields: ``q_lora_rank``, ``kv_lora_rank``, ``rope_type``,
``rotary_scaling_factor``, ``mscale``, ...) builds multi-latent attention with the local spec
(``get_gpt_layer_local_spec(multi_latent_attention=True)``: every MLA projection a
``ColumnParallelLinear``, the down-projections' outputs gathered over TP, local
``DotProductAttention``), after two fixes of megatron-core bugs on the no-TE path (see
:func:`_patch_mla_local_path`).  ``kv_channels`` is ``v_head_dim`` (the local core attention's
output width; MLA's own softmax scale and key width are passed to it).  A torch-format rank file
keeps MindSpeed-LLM's fused ``self_attention.linear_qkv`` = ``[q (or q_a); kv_a]`` down-projection
whole on every TP rank; the harness splits it into megatron-core's ``linear_q_proj`` (or
``linear_q_down_proj``) and ``linear_kv_down_proj`` and keeps this TP rank's rows of each, as
``ColumnParallelLinear`` holds them (:func:`_split_mla_down_projections`).  A case with
``"mla_keys": "mcore"`` (ckpt-ir's ``--mla-keys mcore`` output: megatron-core's own modules) is
loaded as it is, with no such adaptation.  ``"config_extra"`` adds
TransformerConfig fields (e.g. ``mtp_num_layers``: the GPTModel then gets
the multi-token-prediction block of its last layer's spec); ``"load_only"`` saves each rank's
loaded tensors to ``OUT.rank<R>.sd.pt`` instead of running the forward pass.  ``"yarn"`` (the
fields of Megatron-Bridge's provider without their ``yarn_`` prefix: ``rotary_scaling_factor``,
``original_max_position_embeddings``, ``beta_fast``, ...) gives the GPTModel a YaRN rotary
embedding, which reads them off the config.

Mixture-of-experts cases (a ``"moe"`` entry in the case, plus ``"ep"`` / ``"etp"``) build the MoE
layer with the local spec (``SequentialMLP`` experts, or the legacy ``GroupedMLP`` when
``grouped_gemm`` is set), the ``allgather`` token dispatcher (the ``alltoall`` one needs CUDA
streams), no capacity factor (no token dropping), no load-balancing loss (sigmoid scores with an
``expert_bias`` buffer, group-limited top-k and a top-k scaling factor where the case says so); each rank loads
``mp_rank_TT[_PPP]_EEE`` for its own (TP rank, EP rank).  More workarounds:
* ``moe_utils.te_general_gemm = None``: 0.16.1's router GEMM names it even without Transformer
  Engine (``NameError``);
* ``GroupedMLP`` needs the CUDA-only ``grouped_gemm`` extension and asserts ``config.bf16`` in its
  forward.  For jobs with grouped-GEMM cases the harness installs a pure-torch
  ``grouped_gemm.ops.gmm`` (same contract: ``a`` [tokens, K] split by ``batch_sizes``, row block i
  times ``b[i]`` [K, N]; it records the split sizes) before importing megatron-core, and gives
  each ``GroupedMLP`` a copy of the config with ``bf16=True`` (the flag only gates that assert;
  parameters and maths stay fp32).  The weights are still read through ``GroupedMLP``'s own
  ``weight1.view(E_loc, H, -1)`` / ``weight2.view(E_loc, -1, H)``, which is the layout under test;
* ``TORCHDYNAMO_DISABLE=1``: megatron-core's ``jit_fuser`` is ``torch.compile`` (``GroupedMLP``'s
  GLU), which would compile in every forked rank; eager gives the reference maths.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import os
import signal
import sys
import traceback
import warnings

TIMEOUT_MIN = 2  # a collective that waits this long has lost a peer: fail instead of hanging


def run_job(
    root, cases: list[dict], world: int = 4, timeout: float = 400, script: str | None = None
) -> list[tuple[object, list[dict]]]:
    """Run ``cases`` in one harness process (from a test; a fork of the warm megatron-core server,
    ``tests/mcore_server.py``): per case, the logits it wrote (None for load-only cases) and every
    rank's report.  ``script``: another harness built on this one (``tests/live_harness.py``).
    A failing harness fails with its output."""
    import torch

    from tests import mcore_server

    job = os.path.join(str(root), "job.json")
    with open(job, "w") as fh:
        json.dump({"store": os.path.join(str(root), "gloo-store"), "cases": cases}, fh)
    log = os.path.join(str(root), "harness.log")
    rc = mcore_server.run(script or __file__, [job, str(world)], log, timeout)
    if rc != 0:
        with open(log) as fh:
            raise AssertionError(f"megatron-core harness failed ({rc}):\n{fh.read()[-12000:]}")
    results = []
    for c in cases:
        reports = []
        for r in range(world):
            with open(f"{c['out']}.rank{r}.json") as fh:
                reports.append(json.load(fh))
        results.append((None if c.get("load_only") else torch.load(c["out"]), reports))
    return results


def _cpu_device(value):
    import torch

    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


def _make_cuda_to_cpu_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            if func is torch.Tensor.to:
                args = tuple(_cpu_device(a) for a in args)
            return func(*args, **kwargs)

    return CudaToCpu()


def _patch_mla_local_path() -> None:
    """Two megatron-core 0.16.1 bugs stop multi-latent attention without Transformer Engine (no
    edits to megatron-core; nothing else changes):

    * ``MultiLatentAttention`` builds its core attention with ``k_channels=`` / ``v_channels=``
      keywords that only ``TEDotProductAttention`` accepts: the local ``DotProductAttention``
      raises ``TypeError`` (megatron-core's own modelopt MLA spec pairs it with MLA all the same).
      The local attention reads the query / key head width from the tensors and takes MLA's
      softmax scale as an argument; only its output width comes from the config (``kv_channels``),
      so the wrapper accepts the two keywords and checks that ``v_channels`` is ``kv_channels``.
    * MLA tests ``isinstance(linear_proj, TELinear)`` whenever ``HAVE_TE``, which is True without
      Transformer Engine because ``megatron.core.extensions.transformer_engine`` imports with a
      ``MagicMock`` in its place, and ``TELinear`` is then a ``MagicMock`` instance
      (``isinstance`` raises ``TypeError``).  A class nothing is an instance of restores the
      intended False (the branch only serves FP8 / FP4 training)."""
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    init = DotProductAttention.__init__

    def accept(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        assert v_channels in (None, config.kv_channels), (v_channels, config.kv_channels)
        init(self, config, *args, **kwargs)

    DotProductAttention.__init__ = accept
    if not isinstance(mla.TELinear, type):
        mla.TELinear = type("NoTELinear", (), {})


def _split_mla_down_projections(sd: dict, config, tp: int, tp_rank: int) -> dict:
    """A torch-format rank file's MLA layers in megatron-core's local-spec form: MindSpeed-LLM's
    fused, replicated ``linear_qkv`` [q_lora_rank (or heads * (qk_head_dim + qk_pos_emb_head_dim)
    without q-LoRA) + kv_lora_rank + qk_pos_emb_head_dim, hidden] becomes ``linear_q_down_proj``
    (``linear_q_proj``) and ``linear_kv_down_proj``, each cut to this TP rank's rows (they are
    ``ColumnParallelLinear`` in the local spec)."""
    import torch

    q_rows = config.q_lora_rank or config.num_attention_heads * (
        config.qk_head_dim + config.qk_pos_emb_head_dim
    )
    q_name = "linear_q_down_proj" if config.q_lora_rank else "linear_q_proj"
    out = {}
    for key, value in sd.items():
        if not key.endswith("self_attention.linear_qkv.weight"):
            out[key] = value
            continue
        base = key[: -len("linear_qkv.weight")]
        q, kv = torch.split(value, [q_rows, value.shape[0] - q_rows])
        out[base + q_name + ".weight"] = q.chunk(tp)[tp_rank].clone()
        out[base + "linear_kv_down_proj.weight"] = kv.chunk(tp)[tp_rank].clone()
    return out


def _patch_cuda() -> None:
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # referenced unconditionally by the router GEMM


def _install_grouped_gemm_shim() -> None:
    """A pure-torch stand-in for the CUDA-only ``grouped_gemm`` package (``ops.gmm`` only); it
    replaces an installed one too, whose kernels would need CUDA tensors.  Installed before
    megatron-core is imported, or after (then megatron-core's ``grouped_gemm_util`` is rebound)."""
    import types

    import torch

    def gmm(a, b, batch_sizes, trans_b=False):
        sizes = [int(n) for n in batch_sizes.tolist()]
        gmm.calls.append(sizes)
        assert sum(sizes) == a.shape[0] and len(sizes) == b.shape[0]
        outs = [x @ (w.t() if trans_b else w) for x, w in zip(torch.split(a, sizes), b)]
        return torch.cat(outs) if outs else a.new_empty(0, b.shape[1 if trans_b else 2])

    gmm.calls = []  # tokens per local expert of every call, for the test's reports
    ops = types.ModuleType("grouped_gemm.ops")
    ops.gmm = gmm
    pkg = types.ModuleType("grouped_gemm")
    pkg.ops = ops
    sys.modules["grouped_gemm"] = pkg
    sys.modules["grouped_gemm.ops"] = ops
    gg = sys.modules.get("megatron.core.transformer.moe.grouped_gemm_util")
    if gg is not None:  # megatron-core already imported (the warm server): rebind what it bound
        gg.grouped_gemm, gg.ops = pkg, ops


def _moe_kwargs(case: dict) -> dict:
    moe = case.get("moe")
    if not moe:
        return {}
    kw = dict(
        num_moe_experts=moe["num_experts"],
        moe_router_topk=moe["topk"],
        moe_ffn_hidden_size=moe["ffn_hidden_size"],
        moe_router_pre_softmax=moe.get("pre_softmax", False),
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=moe.get("grouped_gemm", False),
        moe_layer_freq=moe.get("layer_freq", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
    )
    if moe.get("shared_ffn_hidden_size"):
        kw.update(
            moe_shared_expert_intermediate_size=moe["shared_ffn_hidden_size"],
            moe_shared_expert_gate=moe.get("shared_gate", False),
        )
    if moe.get("score_function"):  # sigmoid routing with a score-correction bias (HYV3, GLM-4.5)
        kw.update(
            moe_router_score_function=moe["score_function"],
            moe_router_enable_expert_bias=moe.get("expert_bias", False),
            moe_router_topk_scaling_factor=moe.get("scaling_factor"),
            moe_router_num_groups=moe.get("num_groups"),
            moe_router_group_topk=moe.get("group_topk"),
        )
    return kw


def _arch(case: dict) -> dict:
    """Norm, MLP, biases and positions: Llama's, or a plain Megatron-LM GPT's (``"gpt"``), with the
    case's ``"arch"`` settings on top."""
    gpt = bool(case.get("gpt"))
    return {
        "normalization": "LayerNorm" if gpt else "RMSNorm",
        "gated_linear_unit": not gpt,
        "activation_func": "gelu" if gpt else "silu",
        "add_bias_linear": gpt,
        "bias_activation_fusion": False,
        "position_embedding_type": "learned_absolute" if gpt else "rope",
        **case.get("arch", {}),
    }


def _transformer_config(case: dict, tp: int, pp: int, vpp: int | None):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    arch = {k: v for k, v in _arch(case).items() if k != "position_embedding_type"}
    arch["activation_func"] = {"gelu": F.gelu, "silu": F.silu}[arch["activation_func"]]
    hf = case["hf_config"]
    heads = hf["num_attention_heads"]
    kw = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        # MLA: the local core attention's output width (see _patch_mla_local_path)
        kv_channels=case["mla"]["v_head_dim"]
        if case.get("mla")
        else hf.get("head_dim") or hf["hidden_size"] // heads,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        layernorm_epsilon=hf["rms_norm_eps"],
        add_qkv_bias=case["qkv_bias"],
        qk_layernorm=case["qk_norm"],
        rotary_interleaved=case.get("rotary_interleaved", False),
        **arch,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=False,
        batch_p2p_comm=False,
        **_moe_kwargs(case),
        **_mla_kwargs(case),
    )
    kw.update(case.get("config_extra", {}))  # may replace a field above (Llama 4's dense ffn width)
    kw.update(_gpt_oss_kwargs(case))
    kw.update(_dense_kwargs(case))
    config = (MLATransformerConfig if case.get("mla") else TransformerConfig)(**kw)
    for key, value in (case.get("yarn") or {}).items():  # GPTModel's YaRN reads them off the config
        setattr(config, f"yarn_{key}", value)
    return config


def _dense_kwargs(case: dict) -> dict:
    """A dense case's MLP and biases: ``"bias_linear"`` (biases on linear_proj and both MLP
    linears), ``"activation": "squared_relu"`` (a non-gated MLP, relu(x)^2)."""
    from megatron.core.activations import squared_relu

    kw: dict = {}
    if case.get("bias_linear"):
        kw["add_bias_linear"] = True
    if case.get("activation") == "squared_relu":
        kw.update(activation_func=squared_relu, gated_linear_unit=False)
    return kw


def _mla_kwargs(case: dict) -> dict:
    """Multi-latent attention: the case's MLATransformerConfig fields and the rotary base (MLA
    builds its own rotary embedding from the config, not from GPTModel's ``rotary_base``)."""
    if not case.get("mla"):
        return {}
    return {
        "multi_latent_attention": True,
        "rotary_base": _rope_theta(case["hf_config"]),
        **case["mla"],
    }


def _gpt_oss_kwargs(case: dict) -> dict:
    """gpt-oss from its HF config: biases on every linear layer (experts' and router's too),
    learned softmax offsets (sinks), sliding windows on the layers HF's layer_types mark
    (Megatron's window (left, right) keeps k with q - left <= k <= q; HF keeps q - k < window),
    and its GLU: (clamp(up) + 1) * g * sigmoid(1.702 g) with g = clamp(gate) (quick_gelu)."""
    if not case.get("gpt_oss"):
        return {}
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    hf = case["hf_config"]
    return dict(
        add_bias_linear=True,
        softmax_type="learnable",
        window_size=(hf["sliding_window"] - 1, 0),
        window_attn_skip_freq=[int(t == "sliding_attention") for t in hf["layer_types"]],
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=hf["swiglu_limit"],
    )


def _no_qk_norm_without_rotary(spec, config):
    """Llama 4 applies its weightless L2 q/k norm only in layers with rotary; megatron-core's
    ``qk_l2_norm`` puts one in every layer, so the layers ``no_rope_freq`` marks get none (what
    Megatron-Bridge's Llama 4 layer spec does).  The block's layer specs are this stage's."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config)
    layers = []
    for i, layer in enumerate(spec.layer_specs):
        if config.no_rope_freq[offset + i]:
            layer = copy.deepcopy(layer)  # the MoE layers share one spec object
            attention = layer.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = IdentityOp
        layers.append(layer)
    spec.layer_specs = layers
    return spec


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rank_file(ckpt: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as fh:
        it = fh.read().strip()
    it_dir = "release" if it == "release" else f"iter_{int(it):07d}"
    name = (
        f"mp_rank_{tp_rank:02d}"
        + (f"_{pp_rank:03d}" if pp > 1 else "")
        + (f"_{ep_rank:03d}" if ep > 1 else "")
    )
    return os.path.join(ckpt, it_dir, name, "model_optim_rng.pt")


@functools.cache
def _zero_norm_class():
    import torch
    import torch.nn.functional as F

    class ZeroCentred(torch.nn.LayerNorm):
        """megatron-core's LayerNorm with ``layernorm_zero_centered_gamma`` (apply_layernorm_1p) as
        FusedLayerNorm and TE compute it, ``x_hat * (1 + w) + b`` (fusions/fused_layer_norm.py
        forward: ``weight = self.weight + 1``); the local spec's WrappedTorchNorm refuses it and
        FusedLayerNorm needs apex, so the CPU oracle builds this one, under the same parameter names."""

        def __init__(self, config, hidden_size, eps=1e-5):
            assert config.normalization == "LayerNorm"
            super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)

        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)

    return ZeroCentred


def _zero_centred_layer_norms(spec):
    """The local layer spec with its two LayerNorms zero-centred (see :func:`_zero_norm_class`)."""
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = _zero_norm_class()
    return spec


def build_models(case: dict, seed: int = 1234) -> list:
    """This rank's ``GPTModel`` chunks for ``case`` (Megatron's model-parallel state initialised
    with the case's layout): configured from the case's HF config, with the local layer spec (a
    per-layer spec when dense and MoE layers mix), one chunk per virtual pipeline stage, in eval
    mode, parameters initialised from ``seed``."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.moe.experts import GroupedMLP

    tp, pp, vpp = case["tp"], case["pp"], case.get("vpp")
    moe = case.get("moe")
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)
    config = _transformer_config(case, tp, pp, vpp)
    if moe and moe.get("layer_freq", 1) != 1:  # dense and MoE layers mixed: per-layer specs
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", qk_l2_norm=config.qk_l2_norm
        )
        if config.qk_l2_norm and config.no_rope_freq:
            spec = _no_qk_norm_without_rotary(spec, config)
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=moe["num_experts"] if moe else None,
            moe_grouped_gemm=bool(moe and moe.get("grouped_gemm")),
            qk_layernorm=case["qk_norm"],
            multi_latent_attention=config.multi_latent_attention,
            normalization=config.normalization,
        )
    if config.layernorm_zero_centered_gamma:
        spec = _zero_centred_layer_norms(spec)
    mtp = {}
    if config.mtp_num_layers:  # multi-token prediction: the decoder's last layer spec, on the last stage
        mtp["mtp_block_spec"] = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    from megatron.core.transformer import transformer_block

    final_norm = transformer_block.LayerNormImpl
    if config.layernorm_zero_centered_gamma:  # the decoder's final norm, built from this module global
        transformer_block.LayerNormImpl = _zero_norm_class()
    models = []
    for v in range(vpp or 1):
        vp_stage = v if vpp else None
        models.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=case["padded_vocab"],
                max_sequence_length=case["hf_config"].get("max_position_embeddings", 128),
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=case["tied"],
                position_embedding_type="yarn"
                if case.get("yarn")
                else _arch(case)["position_embedding_type"],
                rotary_base=_rope_theta(case["hf_config"]),
                vp_stage=vp_stage,
                rotary_percent=case.get("rotary_percent", 1.0),
                **mtp,
            ).eval()
        )
    transformer_block.LayerNormImpl = final_norm
    for model in models:
        for module in model.modules():
            if isinstance(module, GroupedMLP):  # see the module docstring: the bf16 assert only
                module.config = copy.copy(module.config)
                module.config.bf16 = True
    return models


def _run_case(case: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp, pp, vpp = case["tp"], case["pp"], case.get("vpp")
    ep = case.get("ep", 1)
    with model_parallel(case):
        models = build_models(case)
        config = models[0].config
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()
        chunks = vpp or 1

        if case.get("torch_dist"):  # ckpt-ir's torch_dist output, read by megatron-core's own loader
            blob = _load_torch_dist(case["ckpt"], models)
        else:
            blob = torch.load(
                _rank_file(case["ckpt"], tp_rank, pp_rank, pp, ep_rank, ep),
                map_location="cpu",
                weights_only=False,
            )
        report = {
            "rank": rank,
            "tp_rank": tp_rank,
            "pp_rank": pp_rank,
            "ep_rank": ep_rank,
            "etp_rank": ps.get_expert_tensor_parallel_rank(),
            "chunks": [],
        }
        shim_calls = getattr(getattr(sys.modules.get("grouped_gemm.ops"), "gmm", None), "calls", None)
        calls_before = len(shim_calls or ())
        for v, model in enumerate(models):
            sd = blob["model" if chunks == 1 else f"model{v}"]
            if (
                config.multi_latent_attention
                and not case.get("torch_dist")
                and case.get("mla_keys") != "mcore"
            ):
                sd = _split_mla_down_projections(sd, config, tp, tp_rank)
            res = model.load_state_dict(sd, strict=False)
            report["chunks"].append(
                {
                    "missing": sorted(res.missing_keys),
                    "unexpected": sorted(res.unexpected_keys),
                    "loaded": sum(not k.endswith("._extra_state") for k in sd),
                    # parameters and persistent buffers (a router's expert_bias)
                    "params": sum(not k.endswith("._extra_state") for k in model.state_dict()),
                    # of which persistent buffers the file fills (a router's expert_bias)
                    "buffers": sum(1 for n, _ in model.named_buffers() if n in sd),
                    # which MLP implementation each layer got (MLP, MoELayer, SequentialMLP, GroupedMLP, ...)
                    "mlp_modules": {
                        n: type(m).__name__
                        for n, m in model.named_modules()
                        if n.endswith((".mlp", ".mlp.experts", ".mlp.shared_experts"))
                    },
                }
            )
        report["args"] = {  # the plain values (layer lists included)
            k: v
            for k, v in vars(blob["args"]).items()
            if isinstance(v, (int, float, str, bool))
            or isinstance(v, list)
            and all(isinstance(x, (int, float, str, bool)) for x in v)
        }
        if case.get("load_only"):  # the rank's loaded tensors are the result (no forward pass)
            torch.save(
                {k: v for k, v in blob["model"].items() if isinstance(v, torch.Tensor)},
                f"{case['out']}.rank{rank}.sd.pt",
            )
            with open(f"{case['out']}.rank{rank}.json", "w") as fh:
                json.dump(report, fh)
            dist.barrier()
            return

        ids = torch.tensor(case["input_ids"], dtype=torch.long)
        b, s = ids.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

        with torch.no_grad():
            if pp == 1:
                logits = models[0](ids, pos, mask)
            else:

                def step(data_iter, model):
                    i, p, m = next(data_iter)
                    out = model(i, p, m)
                    return out, lambda o, non_loss_data=False: o.detach().clone()

                # one sequence per microbatch (the interleaved schedule needs >= PP microbatches)
                micro = [(ids[j : j + 1], pos[j : j + 1], mask) for j in range(b)]
                data = [iter(micro) for _ in models]  # every model chunk reads its own iterator
                got = get_forward_backward_func()(
                    forward_step_func=step,
                    data_iterator=data if vpp else data[0],
                    model=models if vpp else models[0],
                    num_microbatches=b,
                    seq_length=s,
                    micro_batch_size=1,
                    forward_only=True,
                    collect_non_loss_data=True,
                )
                logits = torch.cat(got, dim=0) if ps.is_pipeline_last_stage(ignore_virtual=True) else None

        if logits is not None:
            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=group)
            logits = torch.cat(parts, dim=-1)  # output_layer is vocab-parallel: [b, s, V/tp] per rank
            if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
                torch.save(logits, case["out"])
        if shim_calls is not None:  # grouped GEMMs this rank ran for this case (tokens per local expert)
            report["gmm_calls"] = shim_calls[calls_before:]
        with open(f"{case['out']}.rank{rank}.json", "w") as fh:
            json.dump(report, fh)
        dist.barrier()


@contextlib.contextmanager
def model_parallel(case: dict):
    """Megatron's model-parallel state for the case's layout (``tp``, ``pp``, ``vpp``, ``ep``,
    ``etp``) while the block runs; its process groups are closed after it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    groups_before = set(_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=case["tp"],
        pipeline_model_parallel_size=case["pp"],
        virtual_pipeline_model_parallel_size=case.get("vpp"),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
        create_gloo_process_groups=False,
        distributed_timeout_minutes=TIMEOUT_MIN,
    )
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        # destroy_model_parallel only forgets Megatron's groups: close them, or every case's gloo
        # groups stay alive and each later case runs slower (seconds per case after ~15 cases)
        for group in _process_groups():
            if group not in groups_before:
                dist.destroy_process_group(group)


def _load_torch_dist(root: str, models: list) -> dict:
    """``megatron.core.dist_checkpointing.load`` of the model's sharded state dict from ``root``'s
    latest iteration (as megatron.training does for --ckpt-format torch_dist), shaped like a
    torch-format rank file: {"args", "model"} (the model entry what load returned)."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as fh:
        it_dir = os.path.join(root, f"iter_{int(fh.read().strip()):07d}")
    if len(models) != 1:
        # a job error, not a missing feature: no test loads torch_dist with VPP (megatron-core would
        # need one sharded state dict per model chunk)
        raise ValueError(f"{root}: the harness loads torch_dist checkpoints without VPP only")
    if os.path.exists(os.path.join(it_dir, "common.pt")):
        strategy, common = None, dist_checkpointing.load_common_state_dict(it_dir)
    else:  # the Megatron-Core 0.19+ layout
        strategy = _common_state_loader()
        common = strategy.load_common(it_dir)
    sharded = models[0].sharded_state_dict(metadata={"singleton_local_shards": False})
    # strict: assume_ok_unexpected (missing keys raise)
    loaded = dist_checkpointing.load(sharded, it_dir, common_strategy=strategy)
    # load returns the common state merged with the model's tensors
    return {"args": common["args"], "model": {k: v for k, v in loaded.items() if k not in common}}


def _common_state_loader():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateLoader(TorchCommonLoadStrategy):
        """Megatron-Core 0.19's ``load_common_state_dict`` for a checkpoint without ``common.pt``
        (its source, ``dist_checkpointing/serialization.py``): the common state is the sharded
        object ``common_state`` (DCP key ``common_state/shard_0_1``), read with a single-process
        ``torch.distributed.checkpoint.load`` and ``torch.load(..., weights_only=True)`` with
        megatron's safe globals (``argparse.Namespace`` among them), element 0 of the saved list.
        0.16.1 reads only ``common.pt``; everything else is its own loader."""

        def load_common(self, checkpoint_dir):
            import argparse
            import io

            import torch
            import torch.distributed.checkpoint as dcp

            key = "common_state/shard_0_1"
            state = {key: io.BytesIO()}
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
            loaded = state[key]
            if isinstance(loaded, io.BytesIO):
                loaded.seek(0)
                with torch.serialization.safe_globals([argparse.Namespace]):
                    loaded = torch.load(loaded, weights_only=True)
            return loaded[0]

    return CommonStateLoader()


def _process_groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    return [g for g in c10d._world.pg_map if g is not c10d.GroupMember.WORLD]


def _worker(job: dict, rank: int, world: int, run_case=None) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        _patch_cuda()
        dist.init_process_group(
            "gloo",
            init_method="file://" + job["store"],
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=TIMEOUT_MIN),
        )
        with _make_cuda_to_cpu_mode():
            for case in job["cases"]:
                (run_case or _run_case)(case, rank)
        dist.destroy_process_group()
    except BaseException:
        print(f"mcore_harness: rank {rank} of {world}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # never wait in a collective for ranks that are still alive
    os._exit(0)


def main(argv: list[str], run_case=None) -> int:
    """``mcore_harness.py JOB.json WORLD``: import torch and megatron-core once, then fork WORLD
    ranks (imports cost ~7 s per process on a small CPU box; forked ranks share them), each
    running every case of the job (``run_case(case, rank)``; default: the logits oracle's)."""
    job_path, world = argv[0], int(argv[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # megatron-core's jit_fuser is torch.compile (GroupedMLP's GLU): eager is enough for a tiny
    # model, and compiling it in every forked rank would cost seconds of a 2-core box
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    with open(job_path) as fh:
        job = json.load(fh)
    if any((c.get("moe") or {}).get("grouped_gemm") for c in job["cases"]):
        _install_grouped_gemm_shim()  # before megatron-core binds grouped_gemm.ops at import
    import megatron.core.models.gpt  # noqa: F401  (imported before fork, shared by all ranks)

    if any(c.get("mla") for c in job["cases"]):
        _patch_mla_local_path()
    import megatron.core.pipeline_parallel  # noqa: F401

    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _worker(job, rank, world, run_case)  # never returns
        pids[pid] = rank
    failed: list[int] = []
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed.append(rank)
            for other in pids:  # the others would block in a collective forever
                os.kill(other, signal.SIGKILL)
    if failed:
        print(f"mcore_harness: rank {failed[0]} failed; the other ranks were stopped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
