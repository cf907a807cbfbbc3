"""Run ``ckpt_ir.live`` on megatron-core ``GPTModel``s built in forked gloo ranks on CPU.

Not a test module: ``tests/test_live.py`` runs it (``python tests/live_harness.py JOB.json WORLD``,
in a fork of the warm megatron-core server, ``tests/mcore_server.py``).  It reuses
``tests/mcore_harness.py``: the same rank processes, workarounds and model building (the model
configured from the case's HF config, never from ckpt-ir's output).  For every case each rank:

1. builds its model chunks and loads ckpt-ir's rank files of the case into them
   (``load_state_dict``, as the logits oracle does): the reference state dicts;
2. runs ``export_hf`` on them (``hf_config`` when the case gives one) and compares every yielded
   tensor with the HF checkpoint the rank files were converted from (``safetensors`` reads it),
   bit for bit, and the order of names (reported, compared across ranks by the test); with
   ``"dtype"`` again with that cast, against torch's cast of the HF tensor;
3. with ``"errors"``: reports what ``load_hf`` raises for another model's checkpoint and for
   pairs that lack a tensor or name one the family does not have (:func:`_errors`);
   then fills a second build of the chunks (every value NaN first) with ``load_hf`` from the HF
   directory, then again from ``(name, tensor)`` pairs in reverse order, and compares its state
   dicts with the reference, bit for bit;
4. with ``"memory"``: plans ``export_hf`` with that bucket size, then streams it under a torch
   dispatch mode that adds up the tensor storage made since and still alive after every torch
   operation, and reports its peak (the consumer keeps nothing);
5. with ``"example"``: runs the code of docs/live.md with the case's chunks as ``models`` and
   reports the tensors its engine does not hold as the HF checkpoint's times 0.25;
6. with ``"lora"``: adds LoRA adapters to the chunks and exports them merged and as PEFT tensors
   (:func:`_lora_case`; the test compares with ckpt-ir's file conversions of the same weights).

Each rank writes ``OUT.rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import mcore_harness as H


def _hf_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _state(models: list) -> dict:
    return {
        f"{v}/{k}": t
        for v, m in enumerate(models)
        for k, t in m.state_dict().items()
        if not k.endswith("_extra_state")
    }


def _load_rank_files(case: dict, models: list) -> None:
    import torch
    from megatron.core import parallel_state as ps

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    path = H._rank_file(case["ckpt"], tp_rank, pp_rank, case["pp"], ep_rank, case.get("ep", 1))
    blob = torch.load(path, map_location="cpu", weights_only=False)
    for v, model in enumerate(models):
        sd = blob["model" if len(models) == 1 else f"model{v}"]
        if model.config.multi_latent_attention:
            sd = H._split_mla_down_projections(sd, model.config, case["tp"], tp_rank)
        res = model.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys and not [k for k in res.missing_keys if not k.endswith("_extra_state")]


def _different(a: dict, b: dict) -> list[str]:
    import torch

    keys = sorted(set(a) | set(b))
    return [
        k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    ]


def _peak_during(run) -> int:
    """The peak bytes of tensor storage allocated while ``run()`` runs and still alive, sampled
    after every torch operation (a TorchDispatchMode sees each operation's outputs; a storage is
    counted from the operation that made it until it is freed, which its preserved Python object's
    finalizer reports)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    alive: dict[int, int] = {}  # id of a storage made during the run -> its bytes

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
            for t in _tensors(out):  # a new storage: not an input's (views and in-place ops reuse one)
                st = t.untyped_storage()
                if id(st) not in inputs and id(st) not in alive:
                    alive[id(st)] = st.nbytes()
                    weakref.finalize(st, alive.pop, id(st), None)
            self.peak = max(self.peak, sum(alive.values()))
            return out

    with Peak() as mode:
        run()
    return mode.peak


def _drain(pairs) -> None:
    """Take every pair and keep nothing (the consumer's share of memory is none)."""
    for _name, tensor in pairs:
        del tensor


def _tensors(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


def _run_case(case: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist

    from ckpt_ir.live import export_hf, load_hf

    report: dict = {"rank": rank}
    with H.model_parallel(case):
        models = H.build_models(case, seed=1)
        _load_rank_files(case, models)
        ref = {k: t.clone() for k, t in _state(models).items()}
        hf = _hf_tensors(case["hf_dir"])
        config = case.get("export_config")

        names, wrong = [], []
        for name, t in export_hf(models, config, bucket_bytes=case.get("bucket", 1 << 20)):
            names.append(name)
            if name not in hf or t.dtype != hf[name].dtype or not torch.equal(t, hf[name]):
                wrong.append(name)
        report.update(names=names, wrong=wrong, hf_names=sorted(hf))
        if case.get("dtype"):
            want = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[case["dtype"]])
            report["cast_wrong"] = [
                n
                for n, t in export_hf(models, config, dtype=case["dtype"])
                if t.dtype != want or not torch.equal(t, hf[n].to(want))
            ]

        if case.get("errors"):  # before the chunks change: a failed load leaves them as they were
            report["errors"] = _errors(case, models, hf)
        fresh = H.build_models(case, seed=2)
        for source in ("dir", "pairs"):
            with torch.no_grad():
                for t in _state(fresh).values():
                    t.fill_(float("nan"))
            if source == "dir":
                load_hf(fresh, case["hf_dir"])
            else:
                load_hf(fresh, reversed(list(hf.items())), case["hf_config"])
            report[f"load_{source}_wrong"] = _different(_state(fresh), ref)

        if case.get("memory"):
            bucket = case["memory"]
            report["memory"] = {
                "bucket": bucket,
                # planned (metadata only) before the measurement; streamed during it
                "peak": _peak_during(lambda it=export_hf(models, config, bucket_bytes=bucket): _drain(it)),
                "model_bytes": sum(t.numel() * t.element_size() for t in hf.values()),
                # the model's largest tensor, HF or Megatron (a whole fused fc1: TP times a shard)
                "largest": max(
                    max(t.numel() * t.element_size() for t in hf.values()),
                    case["tp"] * max(t.numel() * t.element_size() for t in ref.values()),
                ),
            }
        if case.get("example"):  # halves the chunks twice: the engine must hold the HF tensors x 0.25
            space = {"models": models, "hf_dir": case["hf_dir"]}
            exec(compile(case["example"], "docs/live.md", "exec"), space)
            held = space["engine"].weights
            report["example_wrong"] = sorted(
                set(hf) ^ set(held)
                | {n for n in set(hf) & set(held) if not torch.equal(held[n], hf[n] * 0.25)}
            )
        if case.get("lora"):  # last: it changes the chunks
            _lora_case(case, models, rank)
        with open(f"{case['out']}.rank{rank}.json", "w") as fh:
            json.dump(report, fh)
        dist.barrier()


def _errors(case: dict, models: list, hf: dict) -> dict:
    """[error type, message] (None when nothing was raised) of load_hf given another model's HF
    directory, pairs lacking one tensor, and pairs with a name the family does not have, and of
    export_hf from chunks with a parameter no table names."""
    import torch

    from ckpt_ir.live import export_hf, load_hf

    missing = case["errors"]["missing"]
    tries = {
        "other_model": lambda: load_hf(models, case["errors"]["other_dir"]),
        "missing_pair": lambda: load_hf(
            models, [(n, t) for n, t in hf.items() if n != missing], case["hf_config"]
        ),
        "unknown_pair": lambda: load_hf(models, [("model.foo.weight", torch.zeros(1)), *hf.items()]),
    }
    out: dict = {}

    def unknown_module():  # a parameter no table names: export_hf refuses to lose it
        models[0].register_parameter("extra_scale", torch.nn.Parameter(torch.ones(1)))
        try:
            export_hf(models)
        finally:
            del models[0].extra_scale

    tries["unknown_module"] = unknown_module

    def vision_model():  # a vision-language model's config: refused, its files convert
        from transformers import AutoConfig

        text = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64)
        cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision)
        export_hf(models, cfg.to_dict())

    tries["vision_model"] = vision_model
    for name, call in tries.items():
        try:
            call()
            out[name] = None
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    return out


LORA_MODULES = (  # (module, whether its rows are cut over TP: column-parallel; else its columns)
    ("self_attention.linear_qkv", True),
    ("self_attention.linear_proj", False),
    ("mlp.linear_fc1", True),
    ("mlp.linear_fc2", False),
)


def _lora_case(case: dict, models: list, rank: int) -> None:
    """Give every linear layer of the chunks a LoRA adapter (MindSpeed-LLM's keys, peft's modules:
    ``X.lora_A.default.weight`` [r, in], ``X.lora_B.default.weight`` [out, r]; the factor on the
    uncut side replicated, the same on every TP rank), save this rank's state as a rank file of
    ``case["lora"]["ckpt"]`` (the case's args with the LoRA rank and alpha) for ckpt-ir's file
    conversions, and export the chunks merged and as PEFT tensors to
    ``OUT.rank<R>.{merged,peft}.safetensors``."""
    import torch
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from ckpt_ir.live import export_hf

    r, alpha = case["lora"]["rank"], case["lora"]["alpha"]
    tp_rank = ps.get_tensor_model_parallel_rank()
    for v, model in enumerate(models):
        for name, module in model.named_modules():
            for suffix, column in LORA_MODULES:
                if not name.endswith(suffix):
                    continue
                out_dim, in_dim = module.weight.shape
                for which, shape, cut in (("A", (r, in_dim), not column), ("B", (out_dim, r), column)):
                    seed = zlib.crc32(f"{v}/{name}/{which}/{tp_rank if cut else '*'}".encode())
                    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
                    linear = torch.nn.Linear(shape[1], shape[0], bias=False)
                    linear.weight.data.copy_(w)
                    module.add_module(f"lora_{which}", torch.nn.ModuleDict({"default": linear}))
    blob = torch.load(
        H._rank_file(case["ckpt"], tp_rank, 0, case["pp"]), map_location="cpu", weights_only=False
    )
    blob["args"].lora_r, blob["args"].lora_alpha = r, alpha
    blob["model"] = {
        k: t.clone() for k, t in models[0].state_dict().items() if not k.endswith("_extra_state")
    }
    root = case["lora"]["ckpt"]
    path = os.path.join(root, "iter_0000001", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(blob, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("1")
    for kind, merge in (("merged", True), ("peft", False)):
        got = {n: t.clone() for n, t in export_hf(models, merge_lora=merge, lora_alpha=alpha)}
        save_file(got, f"{case['out']}.rank{rank}.{kind}.safetensors")


def main(argv: list[str]) -> int:
    return H.main(argv, _run_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
