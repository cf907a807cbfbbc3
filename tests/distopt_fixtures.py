"""Real megatron-core checkpoints with optimizer state, built on CPU, as fixtures for future tests.

Not a test module.  Two public builders, each of which runs one process (``python
tests/distopt_fixtures.py JOB.json WORLD``, or the same ``main`` in a fork of the warm
megatron-core server of ``tests/mcore_server.py``, which is how the builders run it) that has
imported megatron-core once and forks TP*PP*DP ranks joined by a gloo process group (file-store
rendezvous), like ``tests/mcore_harness.py``:

* :func:`make_distopt_checkpoint` -- a megatron-core ``GPTModel`` (local layer spec) in bf16 with
  fp32 main params, wrapped in ``Float16Module`` + ``DistributedDataParallel`` (grads in fp32,
  ``overlap_grad_reduce=True`` so that ``bucket_size`` is honoured) + ``DistributedOptimizer``
  (torch Adam), trained ``steps`` optimizer steps on random tokens through megatron-core's own
  pipeline schedule, then saved exactly as ``megatron.training.checkpointing`` does for
  ``--ckpt-format torch --use-distributed-optimizer``::

      OUT/latest_checkpointed_iteration.txt
      OUT/iter_%07d/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   # args, model, optimizer, opt_param_scheduler, rng_state...
      OUT/iter_%07d/mp_rank_TT[_PPP][_EEE]/distrib_optim.pt     # optimizer.save_parameter_state()
      OUT/ground_truth/mp_rank_TT[_PPP][_EEE].pt                # per-parameter truth, see below
      OUT/fixture.json                                    # what was built (sizes, buckets, ...)

  The ground truth file of each rank directory written (one per (TP, PP) rank for a dense model)
  is ``torch.save`` of::

      {"tp_rank", "pp_rank", "tp", "pp", "dp", "step", "bucket_size" (the one DDP used on this
       stage: None on PP stages > 0),
       "buffers": [{"dtype_key": (param_dtype, grad_dtype), "numel", "numel_unpadded",
                    "buckets": [{"offset", "numel", "numel_unpadded", "params": [names, buffer order]}]}],
       "params": {name: {"shape", "model_param" (bf16, what 'model' holds), "param" (fp32 master),
                         "exp_avg", "exp_avg_sq" (full TP-local tensors, assembled over DP),
                         "gbuf_idx", "bucket", "buffer_start", "buffer_end" (megatron's
                         param_index_map), "coalesced_offset" (where the param starts in
                         distrib_optim.pt's coalesced 1-D tensors, computed from megatron's
                         own bucket objects, not from the A5 rule)}},
       "param_order": [names in named_parameters() order],
       "optimizers": [{"group": "dense"|"expert", "dp" (its DP group's size), "dp_rank", "params"}]
                     (the chained order, i.e. that of distrib_optim.pt's list with MoE),
       "ep_rank", "ep", "etp", "expert_dp", "dp_rank", "expert_dp_rank", "dp_sizes" {group: size}}

  Every buffer entry also has ``"group"`` (``"dense"``: ``model.buffers``; ``"expert"``:
  ``model.expert_parallel_buffers``), ``"gbuf_idx"`` (index within its group = the key in that
  optimizer's ``distrib_optim.pt`` entry), ``"dp"`` and ``"bucket_size"``; every param has
  ``"group"`` too, its ``gbuf_idx`` counts within its group and its state is assembled over that
  optimizer's DP group (expert params: the expert data-parallel group).

  Mixture of experts (``hf_dir`` a Mixtral: :func:`make_tiny_hf_mixtral`; ``ep``/``etp``): the
  local spec with ``SequentialMLP`` experts, the ``allgather`` token dispatcher, no aux loss;
  directories are ``mp_rank_TT[_PPP][_EEE]`` (``_EEE``, the EP rank, only when EP > 1; TT is the
  TP rank even when ETP != TP).  As megatron.training (``--ckpt-format torch``): every rank creates
  its directory, ``optimizer.save_parameter_state`` (a ``ChainedOptimizer`` of [dense, expert]
  ``DistributedOptimizer``s) writes the list ``[dense_state, expert_state]`` on any rank that is
  DP rank 0 of either optimizer's DP group, ``None`` for the entry where it is not; the rank with
  expert-DP rank 0 writes ``model_optim_rng.pt`` (``optimizer`` is then a two-element list) and
  the ground truth ``ground_truth/mp_rank_TT[_PPP][_EEE].pt``.  With ETP=TP the dense entry is
  ``None`` in the ``_EEE > 0`` directories; with ETP < TP fewer (TP rank, EP rank) directories
  exist at all (e.g. TP=2 EP=2 ETP=1: ``mp_rank_00_000`` and ``mp_rank_01_001``, both with dense
  state).  ``fixture.json["layout"]`` records which rank wrote which file.

* :func:`make_torch_dist_checkpoint` -- the same kind of model (optionally trained too) saved with
  ``megatron.core.dist_checkpointing.save`` in the ``torch_dist`` format (``metadata.json``,
  ``common.pt``, ``.metadata``, ``__R_K.distcp``) the way ``megatron.training`` does (the model's
  ``sharded_state_dict`` under ``model`` plus ``args``/``iteration``/``checkpoint_version``/
  ``content_metadata`` as common state), plus ``OUT/ground_truth_global.pt`` ({dcp key: global
  tensor} assembled from every rank's ShardedTensors) and ``OUT/ground_truth/mp_rank_*.pt`` (each
  rank's plain local ``state_dict_for_save_checkpoint``; with ``optim_sharding`` also the
  DistributedOptimizer state under ``optimizer`` and its per-parameter truth under ``"optim"``).

Checkers, usable by tests: :func:`verify_distopt_checkpoint` (distrib_optim.pt == truth at
megatron's offsets, and :func:`a5_offsets` -- the reference doc's A5 rule fed only from the
checkpoint files -- gives the same offsets), :func:`verify_torch_dist_checkpoint` and
:func:`read_torch_dist` (plain ``torch.distributed.checkpoint``, no megatron import).

Weights: random (megatron init, then every parameter overwritten with N(0, 0.02) noise -- norms
too -- from a generator seeded by (seed, name, TP rank if the param is TP-split, PP rank), so
replicated params agree across TP and DP ranks; expert params by (seed, name, expert-TP rank if
split, PP rank, EP rank), so they agree across expert-DP ranks), or ``init="hf"``: ``hf_dir``
converted by ckpt-ir to Megatron (``--tp/--pp`` [``--ep/--etp``], vocab padded like Megatron) and
loaded strictly.  The model shape always comes from ``hf_dir/config.json`` (llama-like configs,
or Mixtral; see :func:`make_tiny_hf_llama`, :func:`make_tiny_hf_mixtral`).

CPU workarounds (no edits to megatron-core), on top of those in ``tests/mcore_harness.py``:

* the mixed-precision / distributed optimizers accept only ``param.type()`` in
  ``torch.cuda.{Float,Half,BFloat16}Tensor``: the TorchFunctionMode below also reports a CPU
  tensor's ``type()`` as its ``torch.cuda.*`` name (only the no-argument form);
* ``dist_checkpointing.save`` calls ``torch.cuda.synchronize``: a no-op;
* ``moe_utils.te_general_gemm = None`` (0.16.1's router names it without Transformer Engine), and
  ``MoELayer`` modules run with ``training=False``: in training mode 0.16.1 refuses TP > 1 without
  sequence parallelism, which the local spec's torch norms refuse in turn; for this configuration
  (no aux/z loss, no sinkhorn) the flag changes nothing else, gradients flow as usual;
* ``dist_checkpointing.save`` creates a spawn-context ``multiprocessing.Manager`` queue per rank
  (a server process that re-imports torch; orphaned by ``os._exit``): replaced by a plain
  ``queue.Queue`` (same process produces and consumes it in a synchronous save); the subprocess
  also runs in its own session and its process group is killed when it ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import traceback
import warnings
import zlib

TIMEOUT_MIN = 2
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# public API (runs in the caller's process; megatron-core is imported only by the subprocess)


def _save_random(cfg, path: str, seed: int) -> str:
    """Save an HF model of ``cfg`` whose every parameter is ~N(0, 0.5) (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def make_tiny_hf_llama(
    path: str,
    hidden: int = 72,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 120,
    vocab: int = 200,
    tied: bool = False,
    seed: int = 0,
) -> str:
    """A tiny random llama saved with ``save_pretrained`` (fp32, every parameter random).
    hidden=72 makes every norm 72 elements: not a multiple of 64, so DDP's 64-alignment shows."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _save_random(cfg, path, seed)


def make_tiny_hf_mixtral(
    path: str,
    hidden: int = 72,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    experts: int = 4,
    topk: int = 2,
    vocab: int = 256,
    tied: bool = False,
    seed: int = 0,
) -> str:
    """A tiny random Mixtral (``MixtralConfig``: ``experts`` routed experts of ``ffn`` each, top-``topk``
    routing renormalised over the chosen experts) saved with ``save_pretrained`` (fp32, every
    parameter ~N(0, 0.5), like :func:`make_tiny_hf_llama`)."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        num_local_experts=experts,
        num_experts_per_tok=topk,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _save_random(cfg, path, seed)


def make_distopt_checkpoint(
    out_dir: str,
    hf_dir: str,
    tp: int = 1,
    pp: int = 1,
    dp: int = 2,
    bucket_size: int | None = 4096,
    steps: int = 2,
    iteration: int | None = None,
    bf16: bool = True,
    grad_reduce_in_fp32: bool = True,
    init: str = "random",
    vocab_divisible_by: int = 128,
    seed: int = 1234,
    lr: float = 1e-2,
    save_rng: bool = True,
    extra_args: dict | None = None,
    timeout: float = 300,
    ep: int = 1,
    etp: int | None = None,
    gpt: bool = False,
    bias_gelu_fusion: bool = False,
    init_std: float = 0.02,
) -> dict:
    """Build a legacy ``torch``-format checkpoint with ``distrib_optim.pt`` (see the module doc).

    ``bucket_size`` is DDP's bucket size in elements (``None``: one bucket per buffer, which is also
    what megatron does on PP stages > 0).  ``bf16=False`` trains fp32 params (the optimizer then
    steps the params themselves; ``param`` == the model weights).  ``grad_reduce_in_fp32=False``
    gives the ``(bf16, bf16)`` dtype key instead of ``(bf16, fp32)``.  ``iteration`` defaults to
    ``steps``.  ``save_rng=False`` leaves out ``rng_state`` (``--no-save-rng``): megatron's
    ``rng_state`` holds ``np.random.get_state()`` (numpy arrays in the pickle).  Returns the parsed
    ``OUT/fixture.json``.

    Mixture of experts (``hf_dir`` a Mixtral, see :func:`make_tiny_hf_mixtral`): ``ep`` is the
    expert-parallel size and ``etp`` the expert-tensor-parallel size (``None``: ``tp``); the world
    stays TP*PP*DP ranks, the expert data-parallel size is TP*DP/(EP*ETP).  See the module doc for
    the ``mp_rank_TT[_PPP][_EEE]`` directories and the ``[dense, expert]`` ``distrib_optim.pt``.

    ``gpt=True``: a generic GPT with no HF family instead of a llama (LayerNorm with biases, GELU
    MLP without gating, learned absolute position embeddings, biases on every linear layer; the
    args say so as Megatron-LM's would); ``hf_dir/config.json`` then only gives the sizes.  Its
    GELU is torch's exact one unless ``bias_gelu_fusion`` (Megatron-LM's default, whose fused
    kernel computes the tanh approximation); ``args.bias_gelu_fusion`` says which.
    ``init_std``: the spread of the random initial values (``init="random"``).
    """
    return _run_job(
        "distopt",
        out_dir,
        hf_dir,
        tp=tp,
        pp=pp,
        dp=dp,
        bucket_size=bucket_size,
        steps=steps,
        iteration=steps if iteration is None else iteration,
        bf16=bf16,
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        init=init,
        vocab_divisible_by=vocab_divisible_by,
        seed=seed,
        lr=lr,
        save_rng=save_rng,
        extra_args=extra_args or {},
        timeout=timeout,
        ep=ep,
        etp=etp,
        gpt=gpt,
        bias_gelu_fusion=bias_gelu_fusion,
        init_std=init_std,
    )


def resume_distopt_checkpoint(
    out_dir: str,
    hf_dir: str,
    ckpt_dir: str,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    bucket_size: int | None = 4096,
    steps: int = 0,
    bf16: bool = True,
    vocab_divisible_by: int = 128,
    seed: int = 1234,
    lr: float = 1e-2,
    timeout: float = 300,
    ep: int = 1,
    etp: int | None = None,
    gpt: bool = False,
    mla: dict | None = None,
    mtp_layers: int = 0,
) -> dict:
    """Resume training from ``ckpt_dir`` (a legacy ``torch`` checkpoint with ``distrib_optim.pt``,
    e.g. one ckpt-ir converted) the way ``megatron.training`` loads it: model weights (strictly:
    a missing or unexpected key other than ``_extra_state`` fails), then
    ``optimizer.load_state_dict`` and ``optimizer.load_parameter_state`` on a TP*PP*DP grid; run
    ``steps`` more steps and save to ``out_dir`` with ground truth, like :func:`make_distopt_checkpoint`.
    With ``steps=0`` the ground truth is the state megatron-core loaded.  ``ep``/``etp``: as in
    :func:`make_distopt_checkpoint` (a MoE ``hf_dir``); each rank reads its own
    ``mp_rank_TT[_PPP][_EEE]`` directory.  ``mla``/``mtp_layers``: as in
    :func:`make_torch_dist_checkpoint` (megatron-core's local spec; ``steps`` must be 0 for MLA)."""
    with open(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt")) as fh:
        iteration = int(fh.read().strip())
    return _run_job(
        "distopt",
        out_dir,
        hf_dir,
        tp=tp,
        pp=pp,
        dp=dp,
        bucket_size=bucket_size,
        steps=steps,
        iteration=iteration,
        bf16=bf16,
        grad_reduce_in_fp32=True,
        init="resume",
        vocab_divisible_by=vocab_divisible_by,
        seed=seed,
        lr=lr,
        save_rng=True,
        extra_args={},
        timeout=timeout,
        resume_dir=os.path.abspath(ckpt_dir),
        ep=ep,
        etp=etp,
        gpt=gpt,
        mla=mla,
        mtp_layers=mtp_layers,
    )


def resume_torch_dist_checkpoint(
    out_dir: str,
    hf_dir: str,
    ckpt_dir: str,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    bucket_size: int | None = 4096,
    steps: int = 0,
    bf16: bool = True,
    vocab_divisible_by: int = 128,
    seed: int = 1234,
    lr: float = 1e-2,
    timeout: float = 300,
    ep: int = 1,
    etp: int | None = None,
    grouped_gemm: bool = False,
    mla: dict | None = None,
    mtp_layers: int = 0,
) -> dict:
    """Like :func:`resume_distopt_checkpoint` for a ``torch_dist`` checkpoint with fully-reshardable
    optimizer state: ``dist_checkpointing.load`` of the model's and the optimizer's sharded state
    dicts (``optimizer.sharded_state_dict(..., is_loading=True)``), then ``load_state_dict`` of
    both, as ``megatron.training`` loads ``--ckpt-format torch_dist``; saved to ``out_dir`` in the
    legacy format with ground truth.  ``ep``/``etp``: as in :func:`make_distopt_checkpoint` (a MoE
    ``hf_dir``: a dense and an expert optimizer, chained).  ``grouped_gemm=True`` builds the
    experts as megatron-core's legacy ``GroupedMLP`` (through the pure-torch ``grouped_gemm`` of
    ``tests/mcore_harness.py``): the ground truth then holds ``mlp.experts.weight1`` ``[H, E_loc*2F]``
    and ``weight2`` ``[E_loc*F, H]`` (see :func:`per_expert`).  ``mla``/``mtp_layers``: as in
    :func:`make_torch_dist_checkpoint`."""
    with open(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt")) as fh:
        iteration = int(fh.read().strip())
    return _run_job(
        "distopt",
        out_dir,
        hf_dir,
        tp=tp,
        pp=pp,
        dp=dp,
        bucket_size=bucket_size,
        steps=steps,
        iteration=iteration,
        bf16=bf16,
        grad_reduce_in_fp32=True,
        init="resume_torch_dist",
        vocab_divisible_by=vocab_divisible_by,
        seed=seed,
        lr=lr,
        save_rng=True,
        extra_args={},
        timeout=timeout,
        resume_dir=os.path.abspath(ckpt_dir),
        ep=ep,
        etp=etp,
        grouped_gemm=grouped_gemm,
        mla=mla,
        mtp_layers=mtp_layers,
    )


def per_expert(name: str, value, hidden: int, ffn: int) -> list:
    """[(name, value)] with a ``GroupedMLP`` tensor of the local experts (``...mlp.experts.weight1``
    ``[H, E_loc*2F]`` whose memory is viewed ``[E_loc, H, 2F]``, ``weight2`` ``[E_loc*F, H]`` viewed
    ``[E_loc, F, H]``, as its forward views them) split into the sequential experts' ``local_experts.J.linear_fc1.weight``
    ``[2F, H]`` / ``linear_fc2.weight`` ``[H, F]``; any other tensor as it is."""
    import re

    m = re.match(r"(.*\.mlp\.experts\.)weight([12])$", name)
    if not m:
        return [(name, value)]
    if m.group(2) == "1":
        per = value.reshape(-1, hidden, 2 * ffn).transpose(1, 2)
    else:
        per = value.reshape(-1, ffn, hidden).transpose(1, 2)
    fc = "linear_fc1" if m.group(2) == "1" else "linear_fc2"
    return [(f"{m.group(1)}local_experts.{j}.{fc}.weight", per[j].contiguous()) for j in range(per.shape[0])]


def make_torch_dist_checkpoint(
    out_dir: str,
    hf_dir: str,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    steps: int = 0,
    iteration: int = 1,
    bf16: bool = False,
    init: str = "random",
    vocab_divisible_by: int = 128,
    seed: int = 1234,
    lr: float = 1e-2,
    fully_parallel: bool = False,
    optim_sharding: str | None = None,
    bucket_size: int | None = 4096,
    extra_args: dict | None = None,
    timeout: float = 300,
    ep: int = 1,
    etp: int | None = None,
    mla: dict | None = None,
    mtp_layers: int = 0,
    fill_optimizer: bool = False,
) -> dict:
    """Build a ``torch_dist`` checkpoint of the model only (see the module doc) in
    ``OUT/iter_%07d/``.  ``steps > 0`` trains first (through the same DDP + DistributedOptimizer
    setup as :func:`make_distopt_checkpoint`; the optimizer state is not saved).
    ``fully_parallel=True`` wraps the save strategy in ``FullyParallelSaveStrategyWrapper`` over
    the DP group (megatron.training's default), spreading replicated tensors over DP ranks.
    ``optim_sharding`` (needs ``steps > 0``): also save the DistributedOptimizer state under
    ``optimizer`` as ``optimizer.sharded_state_dict(model_sd, metadata=...)`` with that
    ``distrib_optim_sharding_type`` (``"dp_reshardable"``, 0.16's default, or
    ``"fully_reshardable"``, ``"fully_sharded_model_space"``, ``"dp_zero_gather_scatter"``); the
    per-parameter optimizer truth then goes into ``OUT/ground_truth/mp_rank_*.pt`` under
    ``"optim"`` (same layout as :func:`make_distopt_checkpoint`'s ground truth), its ``"params"``
    also at the top level.  ``ep``/``etp``: a MoE ``hf_dir`` as in :func:`make_distopt_checkpoint`
    (ground truth per ``mp_rank_TT[_PPP][_EEE]``, written where the expert-DP rank is 0).
    ``mla``: multi-latent attention with these MLATransformerConfig fields (``q_lora_rank``,
    ``kv_lora_rank``, ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``; q/kv norms on,
    plain RoPE), built with the harness's MLA patches (``kv_channels`` = ``v_head_dim``); ``mtp_layers``: that many multi-token
    prediction layers.  ``fill_optimizer=True`` (instead of ``steps``, for models megatron-core
    cannot run forward on CPU): the optimizer state gets random values without a step.
    Returns the parsed ``OUT/fixture.json``."""
    if optim_sharding and steps <= 0 and not fill_optimizer:
        raise ValueError("optim_sharding needs steps > 0 or fill_optimizer")
    return _run_job(
        "torch_dist",
        out_dir,
        hf_dir,
        tp=tp,
        pp=pp,
        dp=dp,
        bucket_size=bucket_size,
        steps=steps,
        iteration=iteration,
        bf16=bf16,
        grad_reduce_in_fp32=True,
        init=init,
        vocab_divisible_by=vocab_divisible_by,
        seed=seed,
        lr=lr,
        fully_parallel=fully_parallel,
        optim_sharding=optim_sharding,
        save_rng=False,
        extra_args=extra_args or {},
        timeout=timeout,
        ep=ep,
        etp=etp,
        mla=mla,
        mtp_layers=mtp_layers,
        fill_optimizer=fill_optimizer,
    )


def mp_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """``mp_rank_TT[_PPP][_EEE]``: ``_PPP`` only when PP > 1, ``_EEE`` (the EP rank) only when EP > 1."""
    return (
        f"mp_rank_{tp_rank:02d}"
        + (f"_{pp_rank:03d}" if pp > 1 else "")
        + (f"_{ep_rank:03d}" if ep > 1 else "")
    )


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    m = divisible_by * tp
    return int(math.ceil(vocab / m) * m)


def a5_offsets(params: list, bucket_size: int | None, dp: int, shared: set | frozenset = frozenset()) -> dict:
    """The reference doc's A5 rule (plus A4.5/A4.9 for a shared embedding), independent of megatron:
    ``params`` = [(name, numel)] in ``named_parameters()`` / state-dict order (no ``_extra_state``,
    no frozen params) of one buffer; ``dp`` = the DP size of that buffer's optimizer (the expert-DP
    size for expert buffers); ``shared`` = names that get their own bucket (the word embedding on
    the first stage / output_layer on the last stage when PP > 1 with tied embeddings).  Returns
    ``{"offsets": {name: offset in the coalesced tensors}, "numel_unpadded": total,
    "buckets": [[names]], "bucket_layout": [(offset, numel) of each bucket in the padded DDP
    buffer], "numel": the padded buffer's size}``.  Only the padded layout depends on ``dp``
    (bucket ends padded to lcm(dp, 128)); the coalesced offsets do not, except through A4.9."""

    def up(n, m):
        return -(-n // m) * m

    div = math.lcm(dp, 128)
    offsets, buckets, cur, layout = {}, [], [], []
    base = bstart = cursor = end = 0
    for name, numel in reversed(params):
        s = up(cursor, 64)
        if name in shared and cur:  # close the previous bucket at the (64-aligned) start: A4.9
            base += s - bstart
            buckets.append(cur)
            layout.append((bstart, up(s, div) - bstart))
            cur, bstart = [], up(s, div)
            s = bstart
        end = s + numel
        offsets[name] = base + s - bstart
        cur.append(name)
        if (bucket_size is not None and end - bstart >= bucket_size) or name in shared:
            base += end - bstart
            buckets.append(cur)
            layout.append((bstart, up(end, div) - bstart))
            cur, bstart = [], up(end, div)
            cursor = bstart
        else:
            cursor = end
    if cur:
        base += end - bstart
        buckets.append(cur)
        layout.append((bstart, up(end, div) - bstart))
    return {
        "offsets": offsets,
        "numel_unpadded": base,
        "buckets": buckets,
        "bucket_layout": layout,
        "numel": layout[-1][0] + layout[-1][1] if layout else 0,
    }


def is_expert_param(name: str) -> bool:
    """Whether a Megatron parameter name is a routed-expert weight (``allreduce=False``: expert
    buffers, expert-DP group, the expert optimizer).  The router and shared experts are dense."""
    return ".mlp.experts." in name


def verify_distopt_checkpoint(out_dir: str) -> dict:
    """Check a :func:`make_distopt_checkpoint` output against its ground truth: every parameter's
    slice of ``distrib_optim.pt`` at megatron's own offset equals the truth bit for bit, and
    :func:`a5_offsets` (fed only with what the checkpoint files say) gives the same offsets,
    buckets and ``numel_unpadded``.  With MoE, ``distrib_optim.pt`` must be the list ``[dense,
    expert]`` with ``None`` exactly where the writing rank is not DP rank 0 of that optimizer's DP
    group; expert params (:func:`is_expert_param`) are checked against the expert entry, their A5
    walk uses the expert-DP size TP*DP/(EP*ETP).  Raises AssertionError on a mismatch; returns a
    summary (MoE: per rank directory, per group)."""
    import torch

    with open(os.path.join(out_dir, "fixture.json")) as fh:
        info = json.load(fh)
    it_dir = os.path.join(out_dir, f"iter_{info['iteration']:07d}")
    report = {}
    for r in info["ranks"]:
        truth = torch.load(os.path.join(out_dir, "ground_truth", r["mp_dir"] + ".pt"), weights_only=False)
        dopt = torch.load(os.path.join(it_dir, r["mp_dir"], "distrib_optim.pt"), weights_only=False)
        blob = torch.load(os.path.join(it_dir, r["mp_dir"], "model_optim_rng.pt"), weights_only=False)
        args = blob["args"]
        moe = bool(getattr(args, "num_experts", None))
        if moe:
            assert isinstance(dopt, list) and len(dopt) == 2, type(dopt)
            assert [o["group"] for o in truth["optimizers"]] == ["dense", "expert"]
            entries = dict(zip(("dense", "expert"), dopt))
            assert isinstance(blob["optimizer"], list) and len(blob["optimizer"]) == 2
        else:
            assert isinstance(dopt, dict)
            entries = {"dense": dopt}
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ep = getattr(args, "expert_model_parallel_size", 1)
        etp = getattr(args, "expert_tensor_parallel_size", None) or tp
        dp_of = {"dense": args.data_parallel_size, "expert": args.data_parallel_size * tp // (ep * etp)}
        names = [k for k, v in blob["model"].items() if not k.endswith("_extra_state")]
        rep = {}
        for opt in truth["optimizers"]:
            group = opt["group"]
            entry = entries[group]
            assert opt["dp"] == dp_of[group], (r["mp_dir"], group, opt["dp"], dp_of[group])
            if opt["dp_rank"] != 0:  # not DP rank 0 of this optimizer's group: megatron saves None
                assert entry is None, (r["mp_dir"], group)
                rep[group] = None
                continue
            assert isinstance(entry, dict) and entry["buckets_coalesced"] is True, (r["mp_dir"], group)
            assert set(entry) == {"buckets_coalesced", 0}, (r["mp_dir"], group, list(entry))
            buf = [b for b in truth["buffers"] if b.get("group", "dense") == group]
            assert len(buf) == 1, (r["mp_dir"], group, len(buf))
            buf = buf[0]
            ((dkey, state),) = entry[0].items()
            assert dkey == buf["dtype_key"], (dkey, buf["dtype_key"])
            assert state["numel_unpadded"] == buf["numel_unpadded"] == state["param"].numel()
            gparams = {n: t for n, t in truth["params"].items() if t.get("group", "dense") == group}
            assert sorted(gparams) == sorted(opt.get("params", gparams)), (r["mp_dir"], group)
            for name, t in gparams.items():
                assert is_expert_param(name) == (group == "expert"), name
                off, n = t["coalesced_offset"], t["model_param"].numel()
                for k in ("param", "exp_avg", "exp_avg_sq"):
                    got = state[k][off : off + n].view(t["shape"])
                    assert torch.equal(got, t[k]), (r["mp_dir"], name, k)
                assert (t["exp_avg"] != 0).any() and (t["exp_avg_sq"] != 0).any(), name
                if args.bf16:  # the model weights are the bf16 rounding of the fp32 master
                    assert torch.equal(t["param"].to(torch.bfloat16), t["model_param"]), name
            # A5 from the files alone
            params = [
                (k, blob["model"][k].numel()) for k in names if is_expert_param(k) == (group == "expert")
            ]
            shared = set()
            if group == "dense" and pp > 1 and not args.untie_embeddings_and_output_weights:
                shared = {"embedding.word_embeddings.weight", "output_layer.weight"}
            bsize = args.ddp_bucket_size if (args.overlap_grad_reduce and r["pp_rank"] == 0) else None
            a5 = a5_offsets(params, bsize, dp_of[group], shared)
            assert a5["numel_unpadded"] == state["numel_unpadded"], (
                group,
                a5["numel_unpadded"],
                state["numel_unpadded"],
            )
            assert a5["buckets"] == [b["params"] for b in buf["buckets"]], group
            # the padded DDP buffer: bucket ends at multiples of lcm(DP', 128), DP' this group's DP size
            assert a5["bucket_layout"] == [(b["offset"], b["numel"]) for b in buf["buckets"]], group
            assert a5["numel"] == buf["numel"], (group, a5["numel"], buf["numel"])
            assert a5["offsets"] == {n: t["coalesced_offset"] for n, t in gparams.items()}, group
            rep[group] = {
                "buckets": len(a5["buckets"]),
                "numel_unpadded": a5["numel_unpadded"],
                "dtype_key": str(dkey),
                "dp": dp_of[group],
            }
        assert sorted(n for n, _ in truth["params"].items()) == sorted(names), r["mp_dir"]
        report[r["mp_dir"]] = rep if moe else rep["dense"]
    return report


def read_torch_dist(ckpt_dir: str, prefix: str = "") -> dict:
    """Read every entry of a torch_dist ``iter_N`` directory whose key starts with ``prefix``
    with plain ``torch.distributed.checkpoint`` (no megatron, no process group): tensors come back
    as full global tensors, bytes entries as the object megatron pickled (``torch.load(buf)``,
    megatron wraps the value in a one-element list)."""
    import io

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(ckpt_dir).read_metadata()
    sd = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        if isinstance(v, TensorStorageMetadata)
        else io.BytesIO()
        for k, v in md.state_dict_metadata.items()
        if k.startswith(prefix)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=FileSystemReader(ckpt_dir))
    return sd  # the default load planner replaces each BytesIO by torch.load() of its bytes


def verify_torch_dist_checkpoint(out_dir: str) -> dict:
    """Check a :func:`make_torch_dist_checkpoint` output: every model tensor read back by
    :func:`read_torch_dist` equals ``ground_truth_global.pt`` bit for bit."""
    import torch

    with open(os.path.join(out_dir, "fixture.json")) as fh:
        info = json.load(fh)
    it_dir = os.path.join(out_dir, f"iter_{info['iteration']:07d}")
    truth = torch.load(os.path.join(out_dir, "ground_truth_global.pt"), weights_only=True)
    got = read_torch_dist(it_dir)
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}
    assert set(tensors) == set(truth), sorted(set(tensors) ^ set(truth))
    for k, v in truth.items():
        assert torch.equal(tensors[k], v), k
    return {"tensors": len(tensors), "other_entries": len(got) - len(tensors)}


def _run_job(kind: str, out_dir: str, hf_dir: str, **kw) -> dict:
    timeout = kw.pop("timeout")
    with open(os.path.join(hf_dir, "config.json")) as fh:
        hf = json.load(fh)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="distopt-fixture-")
    try:
        job = dict(
            kw, kind=kind, out=os.path.abspath(out_dir), hf_config=hf, store=os.path.join(tmp, "store")
        )
        job["padded_vocab"] = padded_vocab(hf["vocab_size"], kw["vocab_divisible_by"], kw["tp"])
        ep, etp = kw.get("ep", 1), kw.get("etp") or kw["tp"]
        job["ep"], job["etp"] = ep, etp
        job["moe"] = bool(hf.get("num_local_experts"))
        if not job["moe"] and (ep != 1 or kw.get("etp") not in (None, kw["tp"])):
            raise ValueError("ep/etp need a mixture-of-experts hf_dir (num_local_experts in its config)")
        if (kw["tp"] * kw["dp"]) % (ep * etp):
            raise ValueError(f"TP*DP={kw['tp'] * kw['dp']} is not a multiple of EP*ETP={ep * etp}")
        job["expert_dp"] = kw["tp"] * kw["dp"] // (ep * etp)
        if kw["init"] == "hf":
            mc = os.path.join(tmp, "mcore")
            from ckpt_ir.commands.cli import main as cli_main

            conv = [
                "convert",
                hf_dir,
                mc,
                "--to",
                "mcore",
                "--quiet",
                "--tp",
                str(kw["tp"]),
                "--pp",
                str(kw["pp"]),
                "--make-vocab-size-divisible-by",
                str(kw["vocab_divisible_by"]),
            ]
            if job["moe"]:
                conv += ["--ep", str(ep)] + (["--etp", str(kw["etp"])] if kw.get("etp") else [])
            rc = cli_main(conv)
            if rc != 0:
                raise RuntimeError(f"ckpt-ir convert failed ({rc})")
            job["init_dir"] = mc
        elif kw["init"] in ("resume", "resume_torch_dist"):
            job["init_dir"] = kw["resume_dir"]
        elif kw["init"] != "random":
            raise ValueError(f"init must be 'random' or 'hf', got {kw['init']!r}")
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as fh:
            json.dump(job, fh)
        world = kw["tp"] * kw["pp"] * kw["dp"]
        log_path = os.path.join(tmp, "log.txt")
        # a fork of the warm megatron-core server, in a session of its own: whatever the ranks
        # leave behind (megatron's spawn-context Manager used by dist_checkpointing.save) is
        # killed with its process group
        from tests import mcore_server

        rc = mcore_server.run(__file__, [job_path, str(world)], log_path, timeout)
        if rc != 0:
            with open(log_path) as fh:
                raise RuntimeError(f"fixture subprocess failed ({rc}):\n{fh.read()[-6000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(out_dir, "fixture.json")) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------------------------
# subprocess side


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
            out = func(*args, **kwargs)
            # megatron's optimizers accept only 'torch.cuda.*Tensor' type strings
            if (
                func is torch.Tensor.type
                and len(args) == 1
                and not kwargs
                and isinstance(out, str)
                and out.startswith("torch.")
                and not out.startswith("torch.cuda.")
            ):
                out = "torch.cuda." + out[len("torch.") :]
            return out

    return CudaToCpu()


def _patch_cuda() -> None:
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # 0.16.1's router GEMM names it even without Transformer Engine


def _moe_kwargs(job: dict) -> dict:
    """TransformerConfig fields of a Mixtral (``num_local_experts``) config; {} for a dense one."""
    hf = job["hf_config"]
    if not hf.get("num_local_experts"):
        return {}
    return dict(
        num_moe_experts=hf["num_local_experts"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["intermediate_size"],
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        # the alltoall dispatcher needs CUDA streams; allgather runs on gloo
        moe_token_dispatcher_type="allgather",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=bool(job.get("grouped_gemm")),
        expert_model_parallel_size=job["ep"],
        expert_tensor_parallel_size=job["etp"] or job["tp"],
    )


def _transformer_config(job: dict):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    hf = job["hf_config"]
    heads = hf["num_attention_heads"]
    mla = job.get("mla")
    dtype = torch.bfloat16 if job["bf16"] else torch.float32
    return (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        # MLA: the local core attention's output width (see mcore_harness._patch_mla_local_path)
        kv_channels=mla["v_head_dim"] if mla else hf.get("head_dim") or hf["hidden_size"] // heads,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=job["bf16"],
        normalization="LayerNorm" if job.get("gpt") else "RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        gated_linear_unit=not job.get("gpt"),
        activation_func=F.gelu if job.get("gpt") else F.silu,
        add_bias_linear=bool(job.get("gpt")),
        add_qkv_bias=False,
        # Megatron-LM's default for a GELU MLP with biases: fused, i.e. the tanh approximation
        bias_activation_fusion=bool(job.get("gpt") and job.get("bias_gelu_fusion")),
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=job["tp"],
        pipeline_model_parallel_size=job["pp"],
        sequence_parallel=False,
        batch_p2p_comm=False,
        mtp_num_layers=job.get("mtp_layers") or None,
        **_moe_kwargs(job),
        **({"multi_latent_attention": True, "qk_layernorm": True, "rope_type": "rope", **mla} if mla else {}),
    )


def _args_namespace(job: dict, config) -> argparse.Namespace:
    """A Megatron-LM-like ``args`` (plain values; megatron.training is not importable here)."""
    import torch

    hf = job["hf_config"]
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    ns = argparse.Namespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        kv_channels=config.kv_channels,
        vocab_size=hf["vocab_size"],
        padded_vocab_size=job["padded_vocab"],
        make_vocab_size_divisible_by=job["vocab_divisible_by"],
        max_position_embeddings=hf.get("max_position_embeddings", 128),
        norm_epsilon=config.layernorm_epsilon,
        normalization="LayerNorm" if job.get("gpt") else "RMSNorm",
        swiglu=not job.get("gpt"),
        bias_gelu_fusion=config.bias_activation_fusion,
        add_qkv_bias=False,
        add_bias_linear=bool(job.get("gpt")),
        qk_layernorm=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        position_embedding_type="learned_absolute" if job.get("gpt") else "rope",
        use_rotary_position_embeddings=not job.get("gpt"),
        rotary_base=theta,
        tensor_model_parallel_size=job["tp"],
        pipeline_model_parallel_size=job["pp"],
        data_parallel_size=job["dp"],
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=job.get("ep", 1),
        expert_tensor_parallel_size=job.get("etp") or job["tp"],
        context_parallel_size=1,
        num_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_grouped_gemm=config.moe_grouped_gemm,
        moe_token_dispatcher_type=config.moe_token_dispatcher_type,
        moe_router_load_balancing_type=config.moe_router_load_balancing_type,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        transformer_impl="local",
        use_mcore_models=True,
        sequence_parallel=False,
        bf16=job["bf16"],
        fp16=False,
        params_dtype=torch.bfloat16 if job["bf16"] else torch.float32,
        accumulate_allreduce_grads_in_fp32=job["grad_reduce_in_fp32"],
        use_distributed_optimizer=job["kind"] == "distopt" or job["steps"] > 0,
        overlap_grad_reduce=True,
        overlap_param_gather=False,
        ddp_bucket_size=job["bucket_size"],
        ckpt_format="torch" if job["kind"] == "distopt" else "torch_dist",
        optimizer="adam",
        lr=job["lr"],
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        weight_decay=0.01,
        clip_grad=1.0,
        iteration=job["iteration"],
        seq_length=SEQ,
        micro_batch_size=1,
        global_batch_size=MICRO * job["dp"],
    )
    if job.get("mla"):  # Megatron-LM's MLA args (--multi-latent-attention, --q-lora-rank, ...)
        ns.multi_latent_attention, ns.qk_layernorm, ns.rope_type = True, True, "rope"
        for k, v in job["mla"].items():
            setattr(ns, k, v)
    if job.get("mtp_layers"):
        ns.mtp_num_layers = job["mtp_layers"]
    for k, v in job["extra_args"].items():
        setattr(ns, k, v)
    return ns


SEQ = 16
MICRO = 2  # microbatches per step (of one sequence each)


def _perturb(model, job: dict, tp_rank: int, pp_rank: int) -> None:
    """Expert params (``allreduce=False``) are keyed by (expert-TP rank if split, EP rank) instead
    of the TP rank, so that their replicas (the expert-DP ranks) agree.  A tied model's output
    layer on the last stage starts as its first stage's embedding, as megatron-core makes it
    (GPTModel's setup_embeddings_and_output_layer); the shared gradients keep them equal."""
    import torch
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            split = bool(getattr(p, "tensor_model_parallel", False))
            stage = pp_rank
            if name == "output_layer.weight" and job["hf_config"].get("tie_word_embeddings"):
                name, stage = "embedding.word_embeddings.weight", 0
            if getattr(p, "allreduce", True):
                key = f"{job['seed']}|{name}|{tp_rank if split else -1}|{stage}".encode()
            else:
                key = f"{job['seed']}|{name}|{etp_rank if split else -1}|{pp_rank}|ep{ep_rank}".encode()
            gen = torch.Generator().manual_seed(zlib.crc32(key))
            std = job.get("init_std", 0.02)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))


def _build(job: dict):
    """The model of this rank (GPTModel, local spec), initialised; returns (gpt, config)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(job["seed"])
    config = _transformer_config(job)
    hf = job["hf_config"]
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        moe_use_legacy_grouped_gemm=config.moe_grouped_gemm,  # GroupedMLP (TEGroupedMLP needs TE)
        normalization=config.normalization,
        multi_latent_attention=bool(job.get("mla")),
        qk_layernorm=bool(job.get("mla")),
    )
    mtp = {}
    if job.get("mtp_layers"):  # multi-token prediction: the decoder's layer spec, on the last stage
        mtp["mtp_block_spec"] = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=job["padded_vocab"],
        max_sequence_length=hf.get("max_position_embeddings", 128),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="learned_absolute" if job.get("gpt") else "rope",
        rotary_base=theta,
        **mtp,
    )
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if job.get("init_dir") and job["init"] != "resume_torch_dist":  # (torch_dist: loaded with the optimizer)
        name = mp_dir_name(tp_rank, pp_rank, job["pp"], ps.get_expert_model_parallel_rank(), job.get("ep", 1))
        with open(os.path.join(job["init_dir"], "latest_checkpointed_iteration.txt")) as fh:
            it = fh.read().strip()
        it_dir = "release" if it == "release" else f"iter_{int(it):07d}"
        blob = torch.load(
            os.path.join(job["init_dir"], it_dir, name, "model_optim_rng.pt"),
            map_location="cpu",
            weights_only=False,
        )
        res = gpt.load_state_dict(blob["model"], strict=False)
        bad = [k for k in res.missing_keys + res.unexpected_keys if not k.endswith("_extra_state")]
        if bad:
            raise RuntimeError(f"HF init: state dict mismatch {bad}")
    else:
        _perturb(gpt, job, tp_rank, pp_rank)
    _moe_layers_not_training(gpt)
    return gpt, config


def _moe_layers_not_training(gpt) -> None:
    """0.16.1's ``MoELayer.forward`` raises in training mode when TP > 1 without sequence
    parallelism, which the local spec's torch norms refuse.  The layer's ``training`` flag gates
    only that check and, in the router, sinkhorn routing, the z-loss and the aux loss (none of which
    is configured here), so the MoE layers themselves (not their submodules) run with
    ``training=False``; gradients flow as usual."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for module in gpt.modules():
        if isinstance(module, MoELayer):
            module.training = False


def _train(job: dict, gpt, config, built=None):
    """Wrap in Float16Module (bf16) + DDP + DistributedOptimizer (or reuse ``built``: (model,
    optimizer)) and run job['steps'] steps."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    if built is not None:
        model, optimizer = built
    else:
        module = Float16Module(config, gpt) if job["bf16"] else gpt
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=job["grad_reduce_in_fp32"],
            overlap_grad_reduce=True,
            use_distributed_optimizer=True,
            bucket_size=job["bucket_size"],
        )
        model = DistributedDataParallel(config, ddp_config, module)
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=job["lr"],
            min_lr=0.0,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
            bf16=job["bf16"],
            params_dtype=config.params_dtype,
            use_distributed_optimizer=True,
        )
        optimizer = get_megatron_optimizer(opt_config, [model])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync

    # the same random data on every TP rank of a DP replica; different per DP rank and step
    dp_rank = ps.get_data_parallel_rank()
    vocab = job["hf_config"]["vocab_size"]
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pos = torch.arange(SEQ).unsqueeze(0)

    def step_fn(data_iter, m):
        tokens, labels = next(data_iter)
        out = m(tokens, pos, mask, labels=labels)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    losses = []
    for step in range(job["steps"]):
        gen = torch.Generator().manual_seed(job["seed"] * 1000 + step * 100 + dp_rank)
        data = []
        for _ in range(MICRO):
            t = torch.randint(0, vocab, (1, SEQ + 1), generator=gen)
            data.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step_fn,
            data_iterator=iter(data),
            model=model,
            num_microbatches=MICRO,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError("optimizer step skipped")
        losses.append(float(out[0]["lm loss"]) if out else None)
    return model, optimizer, losses


def _ground_truth(job: dict, gpt, model, optimizer) -> dict:
    """Per parameter: fp32 master, exp_avg, exp_avg_sq assembled over the DP group of the optimizer
    that owns it (dense: DP; expert: expert DP), plus megatron's buffer layout.  A collective over
    every rank; optimizers are visited in the chained order (that of ``distrib_optim.pt``'s list)."""
    import torch
    import torch.distributed as dist

    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    names = {p: n for n, p in gpt.named_parameters()}
    group_bufs = {"dense": list(model.buffers), "expert": list(getattr(model, "expert_parallel_buffers", []))}
    buffers, where, optimizers = [], {}, []
    for group, bufs in group_bufs.items():
        for gbuf_idx, buf in enumerate(bufs):
            base = 0
            binfo = {
                "group": group,
                "gbuf_idx": gbuf_idx,
                "dtype_key": (buf.param_dtype, buf.grad_dtype),
                "numel": buf.numel,
                "numel_unpadded": buf.numel_unpadded,
                "dp": buf.data_parallel_group.size(),
                "bucket_size": model.bucket_size,
                "buckets": [],
            }
            for b_idx, bucket in enumerate(buf.buckets):
                plist = sorted(bucket.params_list, key=lambda p: buf.param_index_map[p][0])
                binfo["buckets"].append(
                    {
                        "offset": bucket.offset,
                        "numel": bucket.grad_data.numel(),
                        "numel_unpadded": bucket.numel_unpadded,
                        "params": [names[p] for p in plist],
                    }
                )
                for p in plist:
                    start, end, bid = buf.param_index_map[p]
                    assert bid == b_idx
                    where[p] = dict(
                        group=group,
                        gbuf_idx=gbuf_idx,
                        bucket=b_idx,
                        buffer_start=start,
                        buffer_end=end,
                        coalesced_offset=base + start - bucket.offset,
                    )
                base += bucket.numel_unpadded
            buffers.append(binfo)

    params = {}
    for dopt in chained:
        group = "expert" if any(b is e for b in dopt.buffers for e in group_bufs["expert"]) else "dense"
        assert [id(b) for b in dopt.buffers] == [id(b) for b in group_bufs[group]], group
        dp_group = dopt.data_parallel_group
        owned = [p for buf in dopt.buffers for p in buf.params]
        order = [p for p in names if p in set(owned)]  # named_parameters() order, same on every DP rank
        optimizers.append(
            {
                "group": group,
                "dp": dp_group.size(),
                "dp_rank": dp_group.rank(),
                "params": [names[p] for p in order],
            }
        )
        for p in order:
            full = {
                k: torch.zeros(p.numel(), dtype=torch.float32) for k in ("param", "exp_avg", "exp_avg_sq")
            }
            if p in dopt.model_param_gbuf_map:  # this DP rank owns a piece of p
                rng = dopt._get_model_param_range_map(p)["param"]
                tensors = dopt._get_main_param_and_optimizer_states(p)
                for k in full:
                    full[k][rng.start : rng.end] = tensors[k].detach().float().view(-1)
            for k in full:  # every element lives on exactly one rank of the optimizer's DP group
                dist.all_reduce(full[k], group=dp_group)
            params[names[p]] = dict(
                shape=tuple(p.shape),
                model_param=p.detach().clone(),
                **{k: v.view(p.shape) for k, v in full.items()},
                **where[p],
            )
    params = {n: params[n] for p, n in names.items() if n in params}  # named_parameters() order
    return {
        "buffers": buffers,
        "params": params,
        "optimizers": optimizers,
        "param_order": [n for n, p in gpt.named_parameters() if p.requires_grad],
    }


def _fill_optimizer_state(optimizer, job: dict) -> None:
    """Give every optimizer state element a value of its own without a training step (a model
    megatron-core cannot run forward on CPU, e.g. MLA): Adam's state is initialised as megatron-core
    does for a checkpoint load, then each rank's piece of the fp32 masters and moments is
    overwritten from a generator seeded by (seed, parameter, DP rank, TP rank if the parameter is
    split, PP rank, EP rank), so that TP replicas agree as in training; exp_avg_sq non-negative."""
    import torch
    from megatron.core import parallel_state as ps

    for dopt in getattr(optimizer, "chained_optimizers", [optimizer]):
        dopt._init_optimizer_states_with_dummy_values()
        names = {p: n for chunk in dopt.model_chunks for n, p in chunk.named_parameters()}
        where = f"{dopt.data_parallel_group.rank()}|{ps.get_pipeline_model_parallel_rank()}"
        where += f"|{ps.get_expert_model_parallel_rank()}"
        with torch.no_grad():
            for p in dopt.model_param_gbuf_map:
                tensors = dopt._get_main_param_and_optimizer_states(p)
                tp = ps.get_tensor_model_parallel_rank() if getattr(p, "tensor_model_parallel", False) else -1
                for k in ("param", "exp_avg", "exp_avg_sq"):
                    key = f"{job['seed']}|{names[p]}|{k}|{where}|{tp}".encode()
                    gen = torch.Generator().manual_seed(zlib.crc32(key))
                    value = torch.randn(tensors[k].shape, generator=gen, dtype=torch.float32).mul_(0.02)
                    tensors[k].copy_(value.abs_() if k == "exp_avg_sq" else value)


def _rng_state():
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": None,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    ]


def _run_distopt(job: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gpt, config = _build(job)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep, ep_rank = job.get("ep", 1), ps.get_expert_model_parallel_rank()
    name = mp_dir_name(tp_rank, pp_rank, job["pp"], ep_rank, ep)
    if job["init"] == "resume":  # as megatron.training.checkpointing.load_checkpoint does
        src = os.path.join(job["init_dir"], f"iter_{job['iteration']:07d}", name)
        more, job["steps"] = job["steps"], 0
        model, optimizer, _ = _train(job, gpt, config)
        blob = torch.load(os.path.join(src, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        # CPU workaround: without Apex/TE, load_state_dict puts torch Adam's "step" into each
        # param's state, which load_parameter_state then expects in the file too (a KeyError even
        # for files megatron-core wrote itself); the step comes from param_groups, so set it aside
        # (in every chained optimizer: dense and expert)
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        held = [(st, st.pop("step")) for o in inner for st in o.state.values() if "step" in st]
        optimizer.load_parameter_state(os.path.join(src, "distrib_optim.pt"))
        for st, step in held:
            st["step"] = step
        job["steps"] = more
        _, _, losses = _train(job, gpt, config, (model, optimizer))
    elif job["init"] == "resume_torch_dist":  # as load_checkpoint does for --ckpt-format torch_dist
        from megatron.core import dist_checkpointing

        src = os.path.join(job["init_dir"], f"iter_{job['iteration']:07d}")
        more, job["steps"] = job["steps"], 0
        model, optimizer, _ = _train(job, gpt, config)
        metadata = {
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
            "distrib_optim_sharding_type": "fully_reshardable",
        }
        # CPU workaround: without Apex/TE, DistributedOptimizer.state_dict() reads the Adam step from
        # the (still empty) per-param state; give it dummy state first, as megatron-core itself does
        # for dist-checkpoint loads (real values are then loaded over it)
        for o in getattr(optimizer, "chained_optimizers", [optimizer]):
            o._init_optimizer_states_with_dummy_values()
        model_sd = gpt.sharded_state_dict(metadata=metadata)
        state = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata),
        }
        loaded = dist_checkpointing.load(state, src)
        res = gpt.load_state_dict(loaded["model"], strict=False)
        bad = [k for k in res.missing_keys + res.unexpected_keys if not k.endswith("_extra_state")]
        if bad:
            raise RuntimeError(f"torch_dist resume: state dict mismatch {bad}")
        # load_state_dict in two halves, with the CPU workaround of the torch-format resume above
        # (the Adam step lives in param_groups; set aside from the per-param state meanwhile)
        # (a MoE model's ChainedOptimizer: {0: dense, 1: expert}, each with its own param_state)
        chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        opt_sd = loaded["optimizer"]
        per_optimizer = [opt_sd] if len(chained) == 1 else [opt_sd[i] for i in range(len(chained))]
        param_states = [sd.pop("param_state") for sd in per_optimizer]
        optimizer.load_state_dict(opt_sd)
        held = [(st, st.pop("step")) for o in chained for st in o.optimizer.state.values() if "step" in st]
        for o, param_state in zip(chained, param_states):
            o.load_parameter_state_from_fully_reshardable(param_state)
        for st, step in held:
            st["step"] = step
        job["steps"] = more
        _, _, losses = _train(job, gpt, config, (model, optimizer))
    else:
        model, optimizer, losses = _train(job, gpt, config)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    # megatron.training writes model_optim_rng.pt where the expert-DP rank is 0 (with EP=1 and
    # ETP=TP the expert-DP group is the DP group, so that is DP rank 0 as for a dense model)
    edp_rank = ps.get_expert_data_parallel_rank()
    writer = edp_rank == 0
    it_dir = os.path.join(job["out"], f"iter_{job['iteration']:07d}")
    ckpt_dir = os.path.join(it_dir, name)
    truth = _ground_truth(job, gpt, model, optimizer)
    os.makedirs(ckpt_dir, exist_ok=True)  # every rank, as ensure_directory_exists in save_checkpoint
    dist.barrier()
    # exactly megatron.training.checkpointing.save_checkpoint (ckpt_format='torch', DistOpt):
    # distrib_optim.pt first (a collective over DP; DP rank 0 writes -- with MoE, ChainedOptimizer
    # writes [dense, expert] on any rank that is DP rank 0 of either optimizer's DP group, None for
    # the other entry), then model_optim_rng.pt
    dopt_path = os.path.join(ckpt_dir, "distrib_optim.pt")
    optimizer.save_parameter_state(dopt_path)
    # the rule of ChainedOptimizer/DistributedOptimizer.save_parameter_state: DP rank 0 of some optimizer
    wrote_dopt = any(o["dp_rank"] == 0 for o in truth["optimizers"])
    sched = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=job["lr"],
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=100,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=100,
        wd_incr_style="constant",
    )
    for _ in range(job["steps"]):
        sched.step(increment=1)
    state = {
        "args": _args_namespace(job, config),
        "checkpoint_version": 3.0,
        "iteration": job["iteration"],
        "model": model.state_dict_for_save_checkpoint(),
        "optimizer": optimizer.state_dict(),
        "opt_param_scheduler": sched.state_dict(),
        "rng_state": _rng_state(),
        "num_floating_point_operations_so_far": 0,
    }
    if not job["save_rng"]:
        del state["rng_state"]
    dp_sizes = {o["group"]: o["dp"] for o in truth["optimizers"]}
    info = {
        "rank": rank,
        "mp_dir": name,
        "tp_rank": tp_rank,
        "pp_rank": pp_rank,
        "ep_rank": ep_rank,
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
        "dp_rank": dp_rank,
        "expert_dp_rank": edp_rank,
        "expert_dp": ps.get_expert_data_parallel_world_size(),
        "writer": writer,
        "distrib_optim_writer": wrote_dopt,
        "distrib_optim_entries": [o["group"] if o["dp_rank"] == 0 else None for o in truth["optimizers"]],
        "optimizer_dp": [o["dp"] for o in truth["optimizers"]],
    }
    if writer:
        torch.save(state, os.path.join(ckpt_dir, "model_optim_rng.pt"))
        gt_dir = os.path.join(job["out"], "ground_truth")
        os.makedirs(gt_dir, exist_ok=True)
        truth.update(
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            tp=job["tp"],
            pp=job["pp"],
            dp=job["dp"],
            ep_rank=ep_rank,
            ep=ep,
            etp=job.get("etp") or job["tp"],
            expert_dp=info["expert_dp"],
            dp_rank=dp_rank,
            expert_dp_rank=edp_rank,
            dp_sizes=dp_sizes,
            step=job["steps"],
            bucket_size=model.bucket_size,
            losses=losses,
            model_state_dict_keys=list(state["model"].keys()),
        )
        torch.save(truth, os.path.join(gt_dir, name + ".pt"))
        summary = {
            "tp_rank": tp_rank,
            "pp_rank": pp_rank,
            "ep_rank": ep_rank,
            "mp_dir": name,
            "ep": ep,
            "etp": job.get("etp") or job["tp"],
            "expert_dp": info["expert_dp"],
            "bucket_size": model.bucket_size,
            "losses": losses,
            "distrib_optim": info["distrib_optim_entries"] if job.get("moe") else "dict",
            "optimizers": [{k: o[k] for k in ("group", "dp", "dp_rank")} for o in truth["optimizers"]],
            "buffers": [
                {
                    "group": b["group"],
                    "gbuf_idx": b["gbuf_idx"],
                    "dp": b["dp"],
                    "dtype_key": [str(d) for d in b["dtype_key"]],
                    "numel": b["numel"],
                    "numel_unpadded": b["numel_unpadded"],
                    "buckets": [{k: v for k, v in bk.items()} for bk in b["buckets"]],
                }
                for b in truth["buffers"]
            ],
        }
        with open(os.path.join(job["out"], f".fixture.{name}.json"), "w") as fh:
            json.dump(summary, fh)
    # who wrote what: every rank directory must hold both files, each from exactly one rank
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if rank == 0:
        dirs = {}
        for i in infos:
            d = dirs.setdefault(i["mp_dir"], {"model": [], "distrib_optim": []})
            if i["writer"]:
                d["model"].append(i["rank"])
            if i["distrib_optim_writer"]:
                d["distrib_optim"].append(i["rank"])
        bad = {k: v for k, v in dirs.items() if len(v["model"]) > 1 or len(v["distrib_optim"]) > 1}
        if bad:
            raise RuntimeError(f"several ranks wrote one file: {bad}")
        with open(os.path.join(job["out"], ".layout.json"), "w") as fh:
            json.dump({"ranks": infos, "dirs": dirs}, fh)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(job["out"], "latest_checkpointed_iteration.txt"), "w") as fh:
            fh.write(str(job["iteration"]))


def _run_torch_dist(job: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

    gpt, config = _build(job)
    losses, model, optimizer = [], None, None
    if job["steps"] > 0 or job.get("fill_optimizer"):
        model, optimizer, losses = _train(job, gpt, config)
    if job.get("fill_optimizer"):
        _fill_optimizer_state(optimizer, job)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    # one ground truth per rank directory of the torch format, written where the expert-DP rank is 0
    # (as _run_distopt; without experts that is DP rank 0)
    writer = ps.get_expert_data_parallel_rank() == 0
    name = mp_dir_name(tp_rank, pp_rank, job["pp"], ps.get_expert_model_parallel_rank(), job.get("ep", 1))
    it_dir = os.path.join(job["out"], f"iter_{job['iteration']:07d}")
    if rank == 0:
        os.makedirs(it_dir, exist_ok=True)
    dist.barrier()
    # as megatron.training.checkpointing._build_sharded_state_dict_metadata (0.16, no DistOpt state)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if job.get("optim_sharding"):
        metadata["distrib_optim_sharding_type"] = job["optim_sharding"]
    model_sd = gpt.sharded_state_dict(metadata=metadata)
    # local truth from a second, separate sharded state dict with its factories (the swiglu fc1
    # split into W and V halves) applied, as save() does to its own copy
    truth_sd = gpt.sharded_state_dict(metadata=metadata)
    apply_factories(truth_sd)
    sharded, _ = extract_sharded_tensors(truth_sd)
    local = []
    for sh in nested_values(sharded):
        assert isinstance(sh, ShardedTensor)
        local.append(
            {
                "key": sh.key,
                "data": sh.data.detach().clone(),
                "global_shape": tuple(sh.global_shape),
                "global_offset": tuple(sh.global_offset),
                "axis_fragmentations": tuple(sh.axis_fragmentations),
                "prepend_axis_num": sh.prepend_axis_num,
                "replica_id": sh.replica_id,
                "flattened_range": None
                if sh.flattened_range is None
                else (sh.flattened_range.start, sh.flattened_range.stop),
            }
        )
    state = {
        "model": model_sd,
        "args": _args_namespace(job, config),
        "checkpoint_version": 3.0,
        "iteration": job["iteration"],
        "num_floating_point_operations_so_far": 0,
        "content_metadata": metadata,
    }
    optim_truth = None
    if job.get("optim_sharding"):
        optim_truth = _ground_truth(job, gpt, model, optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=metadata)
    save_strategy = None
    if job.get("fully_parallel"):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        save_strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy("torch_dist"),
            ps.get_data_parallel_group(with_context_parallel=True),
            True,
        )
    _use_in_process_results_queue()
    dist_checkpointing.save(state, it_dir, sharded_strategy=save_strategy)
    gt_dir = os.path.join(job["out"], "ground_truth")
    if writer:
        os.makedirs(gt_dir, exist_ok=True)
        torch.save(
            {
                "tp_rank": tp_rank,
                "pp_rank": pp_rank,
                "model": gpt.state_dict_for_save_checkpoint(),
                "losses": losses,
                "optim": optim_truth,
                "params": None if optim_truth is None else optim_truth["params"],
                "bucket_size": None if model is None else model.bucket_size,
            },
            os.path.join(gt_dir, name + ".pt"),
        )
    # global truth: gather every rank's shards on rank 0
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    if rank == 0:
        glob = {}
        for per_rank in shards:
            for s in per_rank:
                t = glob.setdefault(s["key"], torch.zeros(s["global_shape"], dtype=s["data"].dtype))
                assert s["flattened_range"] is None
                data = s["data"]
                for _ in range(s["prepend_axis_num"]):
                    data = data.unsqueeze(0)
                sl = tuple(slice(o, o + n) for o, n in zip(s["global_offset"], data.shape))
                t[sl] = data
        torch.save(glob, os.path.join(job["out"], "ground_truth_global.pt"))
        with open(os.path.join(job["out"], "latest_checkpointed_iteration.txt"), "w") as fh:
            fh.write(str(job["iteration"]))
        summary = {"keys": {k: [list(v.shape), str(v.dtype)] for k, v in glob.items()}, "losses": losses}
        with open(os.path.join(job["out"], ".fixture.global.json"), "w") as fh:
            json.dump(summary, fh)
    dist.barrier()


def _use_in_process_results_queue() -> None:
    """A synchronous ``dist_checkpointing.save`` puts its write results into a module-level queue
    that 0.16 creates as ``mp.get_context("spawn").Manager().Queue()``: a server process per rank
    that re-imports torch to unpickle the results (seconds on a small box).  In the synchronous
    path the producer (``write_preloaded_data_multiproc``) and the consumer
    (``retrieve_write_results``) are the same process, so a plain ``queue.Queue`` is equivalent;
    the on-disk output is unchanged."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if fa._results_queue is None:
        fa._results_queue = queue.Queue()


def _stop_save_manager() -> None:
    """``dist_checkpointing.save`` (0.16) starts a spawn-context ``multiprocessing.Manager`` per rank
    for its write results queue; ``os._exit`` would orphan it, so shut it down here."""
    fa = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    results = getattr(fa, "_results_queue", None)
    if results is not None:
        manager = getattr(results, "_manager", None)
        if manager is not None:
            manager.shutdown()
        fa._results_queue = None


def _worker(job: dict, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        _patch_cuda()
        if job.get("mla"):  # megatron-core 0.16.1 builds MLA without Transformer Engine only so
            from mcore_harness import _patch_mla_local_path

            _patch_mla_local_path()
        dist.init_process_group(
            "gloo",
            init_method="file://" + job["store"],
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=TIMEOUT_MIN),
        )
        from megatron.core import parallel_state as ps

        with _make_cuda_to_cpu_mode():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=job["tp"],
                pipeline_model_parallel_size=job["pp"],
                expert_model_parallel_size=job.get("ep", 1),
                expert_tensor_parallel_size=job.get("etp") or job["tp"],
                create_gloo_process_groups=True,
                distributed_timeout_minutes=TIMEOUT_MIN,
            )
            try:
                (_run_distopt if job["kind"] == "distopt" else _run_torch_dist)(job, rank)
            finally:
                ps.destroy_model_parallel()
        dist.destroy_process_group()
        _stop_save_manager()
    except BaseException:
        print(f"distopt_fixtures: rank {rank} of {world}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _finish(job: dict) -> None:
    out = job["out"]
    parts = sorted(f for f in os.listdir(out) if f.startswith(".fixture."))
    info = {k: v for k, v in job.items() if k not in ("store", "hf_config", "init_dir")}
    info["ranks"] = []
    for f in parts:
        with open(os.path.join(out, f)) as fh:
            d = json.load(fh)
        if f == ".fixture.global.json":
            info["global"] = d
        else:
            info["ranks"].append(d)
        os.remove(os.path.join(out, f))
    layout = os.path.join(out, ".layout.json")
    if os.path.exists(layout):  # which rank wrote which file (distopt jobs)
        with open(layout) as fh:
            info["layout"] = json.load(fh)
        os.remove(layout)
    import megatron.core

    info["megatron_core_version"] = megatron.core.__version__
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(info, fh, indent=1)


def main(argv: list[str]) -> int:
    job_path, world = argv[0], int(argv[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    with open(job_path) as fh:
        job = json.load(fh)
    if job.get("grouped_gemm"):  # before megatron-core binds grouped_gemm.ops at import
        sys.path.insert(0, HERE)
        from mcore_harness import _install_grouped_gemm_shim

        _install_grouped_gemm_shim()
    import megatron.core.dist_checkpointing  # noqa: F401  (imported before fork, shared by all ranks)
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _worker(job, rank, world)
        pids[pid] = rank
    failed = []
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed.append(rank)
            for other in pids:
                os.kill(other, signal.SIGKILL)
    if failed:
        print(f"distopt_fixtures: rank {failed[0]} failed; the other ranks were stopped", file=sys.stderr)
        return 1
    _finish(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
