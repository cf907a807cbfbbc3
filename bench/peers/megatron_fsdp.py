"""Compare ckpt-ir with Megatron-LM's own code on its FSDP checkpoint formats, bit for bit.

Not a test (CI has no Megatron-LM training code: megatron-core from pip has no ``megatron/training``
or ``tools/checkpoint``): a script to run by hand where a Megatron-LM checkout or git mirror exists.
One gloo job of two CPU processes runs Megatron-LM's code from the checkout (its own
``megatron.core`` too):

1. a tiny random HF llama (transformers) is put into megatron-core's ``GPTModel`` (local layer
   spec, fp32) by Megatron's layout (fused QKV per query group, fc1 = [gate; up]);
2. ``torch_dcp``: the model is sharded over the two ranks with torch FSDP2 (``fully_shard``), takes
   one Adam step at learning rate 0 (Megatron's ``FP32Optimizer``: the moments are filled, the
   weights stay the HF model's), and Megatron-LM's ``save_checkpoint`` writes it
   with ``ckpt_format='torch_dcp'`` (args as its own unit test sets them);
3. ``fsdp_dtensor``: the unsharded model's ``sharded_state_dict`` is saved as ``torch_dist`` by
   ``megatron.core.dist_checkpointing.save`` (common state: args, iteration), and Megatron-LM's
   ``tools/checkpoint/checkpoint_inspector.py`` ``convert_checkpoint`` (``--swiglu``) turns it into
   fsdp_dtensor.  The inspector reads the common state from ``common.pt``, which Megatron-Core
   0.19+ no longer writes (it is the DCP entry ``common_state``): the script writes it as 0.18 did,
   from ``load_common_state_dict``.

Then, with ckpt-ir in this process: (a) the torch_dcp save converts to HF equal to the HF model;
(b) the inspector's fsdp_dtensor converts to HF equal to the HF model; (c) ckpt-ir's own HF ->
fsdp_dtensor output holds the same model tensors (names, shapes, values) as the inspector's, and
the other entries of both are listed.

Stand-ins (Megatron's code itself is not edited): the Megatron modules that import ``triton`` (GPU
kernels none of this runs) are inert modules; ``typing.override`` (Python 3.12) is the identity on
3.11; CUDA-only calls run on the CPU (``torch.cuda.current_device``/``synchronize``/
``set_device``/``get_rng_state``, ``DeviceMesh`` on "cuda", ``Tensor.cuda``, the inspector's GPU-memory check), and
``all_gather`` of uneven sizes (which NCCL takes and gloo does not) pads them.

Usage::

    python bench/peers/megatron_fsdp.py --megatron PATH/TO/Megatron-LM [--work DIR]

``--megatron`` is a source checkout or a bare git directory (read with ``git archive HEAD``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, L, HEADS, GROUPS, FFN, VOCAB = 64, 2, 4, 2, 96, 128
IT = 5
WORLD = 2


def checkout(src: str, work: str) -> str:
    """A Megatron-LM source tree: ``src`` itself, or ``git archive HEAD`` of a bare git directory."""
    if os.path.isdir(os.path.join(src, "megatron")):
        return src
    out = os.path.join(work, "megatron-lm")
    if not os.path.isdir(out):
        os.makedirs(out)
        tar = subprocess.run(
            ["git", f"--git-dir={src}", "archive", "HEAD", "megatron", "tools/checkpoint"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "x", "-C", out], input=tar, check=True)
    return out


def stand_ins(mlm: str) -> None:
    """Inert modules for Megatron's triton-importing modules; Python 3.12's typing.override."""
    import typing

    if not hasattr(typing, "override"):
        typing.override = lambda f: f  # type: ignore[attr-defined]

    class Inert:
        def __init__(self, name: str) -> None:
            self._name = name

        def __call__(self, *a, **k):
            return a[0] if len(a) == 1 and callable(a[0]) and not k else Inert(self._name + "()")

        def __getattr__(self, n: str):
            if n.startswith("__"):
                raise AttributeError(n)
            return Inert(f"{self._name}.{n}")

    for dirpath, _, files in os.walk(os.path.join(mlm, "megatron")):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(".py") and re.search(r"^(import triton|from triton)", open(path).read(), re.M):
                name = os.path.relpath(path, mlm)[: -len(".py")].replace(os.sep, ".")
                m = types.ModuleType(name)

                def attr(n: str, name: str = name):
                    if n.startswith("__"):
                        raise AttributeError(n)
                    return Inert(f"{name}.{n}")

                m.__getattr__ = attr  # type: ignore[method-assign]
                sys.modules[name] = m


def cpu_only() -> None:
    """CUDA-only calls on the CPU."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # the RNG state a save records
    torch.Tensor.cuda = lambda self, *a, **k: self
    from_group = DeviceMesh.from_group

    def on_cpu(group, device_type, *a, **k):
        return from_group(group, "cpu", *a, **k)

    DeviceMesh.from_group = staticmethod(on_cpu)
    # gloo's all_gather needs equal sizes, NCCL's takes uneven ones (Megatron-FSDP's uneven DTensors)
    all_gather = torch.distributed.all_gather

    def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        most = max(t.numel() for t in tensor_list)
        padded = [torch.empty(most, dtype=tensor.dtype) for _ in tensor_list]
        flat = torch.cat([tensor.reshape(-1), tensor.new_zeros(most - tensor.numel())])
        all_gather(padded, flat, group=group)
        for out, got in zip(tensor_list, padded):
            out.copy_(got[: out.numel()].reshape(out.shape))

    torch.distributed.all_gather = uneven_all_gather


def cuda_to_cpu():
    """A torch function mode that makes tensors asked for on "cuda" on the CPU."""
    import torch
    from torch.overrides import TorchFunctionMode

    def cpu(value):
        if isinstance(value, torch.device) and value.type == "cuda":
            return torch.device("cpu")
        return "cpu" if isinstance(value, str) and value.startswith("cuda") else value

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            if func is torch.Tensor.to:
                args = tuple(cpu(a) for a in args)
            return func(*args, **kwargs)

    return CudaToCpu()


# ---------------------------------------------------------------------------------------------
# the HF model in Megatron's layout


def make_hf(path: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=H,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        num_hidden_layers=L,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def megatron_state(hf: dict) -> dict:
    """GPTModel's state dict (local spec) of the HF llama: linear_qkv per query group [q heads; k; v],
    linear_fc1 = [gate; up]."""
    import torch

    hd = H // HEADS
    sd = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(L):
        p, d = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].reshape(GROUPS, HEADS // GROUPS * hd, H)
        k = hf[p + "self_attn.k_proj.weight"].reshape(GROUPS, hd, H)
        v = hf[p + "self_attn.v_proj.weight"].reshape(GROUPS, hd, H)
        sd[d + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        sd[d + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, H)
        sd[d + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        sd[d + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        sd[d + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        )
        sd[d + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    sd["output_layer.weight"] = hf["lm_head.weight"]
    return sd


def megatron_args(save: str, fmt: str) -> types.SimpleNamespace:
    """Megatron-LM's args for save_checkpoint (its unit test's set) and the model's (plain
    Megatron-LM args: no HF config in them)."""
    return types.SimpleNamespace(
        # model
        num_layers=L,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        group_query_attention=True,
        kv_channels=H // HEADS,
        padded_vocab_size=VOCAB,
        max_position_embeddings=128,
        norm_epsilon=1e-5,
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=10000,
        transformer_impl="local",
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=WORLD,
        bf16=False,
        fp16=False,
        num_experts=None,
        # checkpointing (tests/unit_tests/test_checkpointing.py create_args)
        save=save,
        ckpt_format=fmt,
        use_torch_fsdp2=fmt == "torch_dcp",
        use_megatron_fsdp=False,
        use_distributed_optimizer=False,
        use_dist_ckpt=fmt != "torch",
        finetune=False,
        non_persistent_global_ckpt_dir=None,
        non_persistent_ckpt_type=None,
        non_persistent_save_interval=None,
        exit_on_missing_checkpoint=True,
        async_save=False,
        async_strategy="mcore",
        data_parallel_random_init=False,
        no_save_optim=False,
        no_save_rng=False,
        no_load_optim=False,
        no_load_rng=False,
        log_progress=False,
        ckpt_fully_parallel_save=False,
        dist_ckpt_optim_fully_reshardable=False,
        distrib_optim_fully_reshardable_mem_efficient=False,
        auto_detect_ckpt_format=False,
        ckpt_convert_update_legacy_dist_opt_format=False,
        ckpt_step=None,
        override_opt_param_scheduler=False,
        verify_integrity=False,
        save_tokenizer_assets=False,
    )


class Scheduler:
    def state_dict(self) -> dict:
        return {"max_lr": 1e-3, "num_steps": IT}


# ---------------------------------------------------------------------------------------------
# the gloo job


def rank_main(rank: int, port: int, work: str, mlm: str) -> None:
    sys.path.insert(0, mlm)
    stand_ins(mlm)
    import torch

    cpu_only()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from safetensors.torch import load_file

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.random.initialize_rng_tracker(force_reset=True)
    config = TransformerConfig(
        num_layers=L,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=H // HEADS,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        layernorm_epsilon=1e-5,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
    )

    def build() -> GPTModel:
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=VOCAB,
            max_sequence_length=128,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
        )
        missing, unexpected = model.load_state_dict(
            megatron_state(load_file(f"{work}/hf/model.safetensors")), strict=False
        )
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        return model

    # 3. torch_dist of the model, then checkpoint_inspector -> fsdp_dtensor
    from megatron.core import dist_checkpointing

    model = build()
    dist_dir = f"{work}/torch_dist/iter_{IT:07d}"
    os.makedirs(dist_dir, exist_ok=True)
    torch.distributed.barrier()
    args = megatron_args(f"{work}/torch_dist", "torch_dist")
    dist_checkpointing.save(
        {"model": model.sharded_state_dict(), "args": args, "iteration": IT, "checkpoint_version": 3.0},
        dist_dir,
    )
    if rank == 0:  # the inspector reads common.pt (<= 0.18); this megatron.core keeps it inside DCP
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict

        torch.save(load_common_state_dict(dist_dir), f"{dist_dir}/common.pt")
    torch.distributed.barrier()
    sys.path.insert(0, os.path.join(mlm, "tools", "checkpoint"))
    import checkpoint_inspector as inspector

    inspector.check_gpu_memory = lambda threshold=0.9: False
    inspector.dist.destroy_process_group = lambda *a, **k: None
    inspector.convert_checkpoint(
        dist_dir, f"{work}/inspector", swiglu=True, process_group=torch.distributed.group.WORLD
    )

    # 2. torch_dcp with torch FSDP2 and Megatron-LM's save_checkpoint
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.global_vars import set_args
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    adam = torch.optim.Adam(model.parameters(), lr=0.0)  # moments from the step, weights unchanged
    with cuda_to_cpu():
        optimizer = FP32Optimizer(adam, OptimizerConfig(lr=1e-3), lambda opt, cfg: None)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    adam.step()
    set_args(megatron_args(f"{work}/torch_dcp", "torch_dcp"))
    with cuda_to_cpu():
        save_checkpoint(IT, [model], optimizer, Scheduler(), 1.5e12)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the comparison, in this process


def ckpt_ir(*argv: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_ir", "convert", *argv, "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"ckpt-ir convert {' '.join(argv)}: {proc.stderr.strip()}")


def entries(path: str) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    sd = {
        k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
        for k, m in reader.read_metadata().state_dict_metadata.items()
    }
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def same(a: dict, b: dict) -> list[str]:
    """What differs between two tensor dicts (names, shapes, dtypes, values)."""
    import torch

    out = [f"only in the first: {k}" for k in sorted(set(a) - set(b))]
    out += [f"only in the second: {k}" for k in sorted(set(b) - set(a))]
    out += [
        f"differs: {k}"
        for k in sorted(set(a) & set(b))
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron", required=True, help="Megatron-LM checkout or bare git directory")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="mfsdp-")
    for d in (
        "torch_dist",
        "torch_dcp",
        "inspector",
        "hf_from_dcp",
        "hf_from_inspector",
        "ours",
        "inspector_it",
    ):
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    mlm = checkout(a.megatron, work)
    make_hf(f"{work}/hf")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(port, work, mlm), nprocs=WORLD, start_method="spawn")

    from safetensors.torch import load_file

    hf = load_file(f"{work}/hf/model.safetensors")
    report = []
    # (a) Megatron-LM's torch_dcp -> HF
    ckpt_ir(f"{work}/torch_dcp", f"{work}/hf_from_dcp", "--to", "hf", "--no-optimizer")
    bad = same(load_file(f"{work}/hf_from_dcp/model.safetensors"), hf)
    report.append(
        f"(a) torch_dcp (Megatron-LM save_checkpoint, FSDP2 over {WORLD} ranks) -> HF: "
        + ("bit-exact" if not bad else "; ".join(bad[:5]))
    )
    # (b) checkpoint_inspector's fsdp_dtensor -> HF (the inspector writes no tracker: give the iteration directory)
    os.makedirs(f"{work}/inspector_it", exist_ok=True)
    os.symlink(f"{work}/inspector", f"{work}/inspector_it/iter_{IT:07d}")
    ckpt_ir(
        f"{work}/inspector_it/iter_{IT:07d}",
        f"{work}/hf_from_inspector",
        "--to",
        "hf",
        "--hf-config",
        f"{work}/hf",
        "--source-ckpt-format",
        "fsdp_dtensor",
    )
    bad = same(load_file(f"{work}/hf_from_inspector/model.safetensors"), hf)
    report.append(
        "(b) fsdp_dtensor (checkpoint_inspector of Megatron's torch_dist) -> HF: "
        + ("bit-exact" if not bad else "; ".join(bad[:5]))
    )
    # (c) ckpt-ir's HF -> fsdp_dtensor against the inspector's output
    ckpt_ir(
        f"{work}/hf", f"{work}/ours", "--to", "mcore", "--ckpt-format", "fsdp_dtensor", "--norm-names", "te"
    )
    import torch

    theirs, ours = entries(f"{work}/inspector"), entries(f"{work}/ours/iter_0000001")
    tensors = lambda d: {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    bad = same(tensors(ours), tensors(theirs))
    report.append(
        "(c) HF -> fsdp_dtensor (ckpt-ir) vs checkpoint_inspector, model tensors: "
        + ("identical" if not bad else "; ".join(bad[:8]))
    )
    report.append(f"    other entries, inspector: {sorted(k for k in theirs if k not in tensors(theirs))}")
    report.append(f"    other entries, ckpt-ir:   {sorted(k for k in ours if k not in tensors(ours))}")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
