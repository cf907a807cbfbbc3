"""``ckpt-ir convert-ckpt``: a drop-in front end accepting MindSpeed-LLM ``convert_ckpt.py`` /
``convert_ckpt_v2.py`` flags, running the same engine as ``ckpt-ir convert``.

Semantics follow the v2 converter: tensors keep their dtype unless ``--params-dtype`` is given,
no vocabulary padding unless ``--make-vocab-size-divisible-by`` is given, and for Megatron ->
HF the layout (TP, PP, VPP, layer list, no-op layers) is read from the checkpoint's args.  When
``--save-dir`` is an existing HF model directory (the v1 convention), the HF output goes to
``<save-dir>/mg2hf`` and takes config and tokenizer files from ``<save-dir>``.
"""

from __future__ import annotations

import argparse
import os
import sys

import attrs

from ckpt_ir.commands.common import RunOptions, add_ir_flags, int_list, resolve_sources, run_conversion
from ckpt_ir.errors import UsageError

# flags the original tools take that do not change the result here
_IGNORED_VALUE = (
    "--model-type",
    "--tokenizer-model",
    "--loader",
    "--saver",
    "--max-queue-size",
    "--megatron-path",
    "--ckpt-cfg-path",
    "--vocab-file",
    "--true-vocab-size",
    "--input-tp-rank",
    "--input-pp-rank",
    "--first-k-dense-replace",
    "--num-layers",
    "--spec",
)
_IGNORED_FLAGS = (
    "--use-mcore-models",
    "--no-checking",
    "--save-layer-by-layer",
    "--load-checkpoint-loosely",
    "--add-qkv-bias",
    "--post-norm",
    "--w-pack",
    "--add-dense-bias",
    "--load-hf-from-config",
)
_UNSUPPORTED_VALUE = {"--schedules-method": "DualPipeV's layer placement (dualpipev)"}
# what a --ckpt-format other than torch (whole tensors, resharded by Megatron on load) cannot take
_WHOLE_TENSOR_CONFLICTS = (
    "--target-tensor-parallel-size",
    "--target-pipeline-parallel-size",
    "--target-expert-parallel-size",
    "--expert-tensor-parallel-size",
    "--num-layer-list",
    "--num-layers-per-virtual-pipeline-stage",
    "--noop-layers",
    "--target-data-parallel-size",
)
_UNSUPPORTED_FLAGS = {"--moe-tp-extend-ep": "MoE TP-extend-EP", "--mla-mm-split": "MLA"}
# --model-type-hf values whose converter defaults --expert-tensor-parallel-size to 1, not to the TP
# size (MindSpeed-LLM's convert_ckpt_deepseek4.py: experts whole on every TP rank)
_EXPERT_TP_1 = ("deepseek4", "deepseek4_base")


def add_parser(sub) -> None:
    from ckpt_ir.commands.common import add_overflow_flag

    p = sub.add_parser(
        "convert-ckpt",
        help="MindSpeed-LLM convert_ckpt.py compatible front end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--load-model-type", choices=("hf", "mg", "optim"), default="hf")
    p.add_argument("--save-model-type", choices=("hf", "mg", "megatron"), default="mg")
    p.add_argument(
        "--load-dir", required=True, help="source checkpoint directory or Hub id org/name[@revision]"
    )
    p.add_argument("--save-dir", required=True)
    p.add_argument("--model-type-hf", default=None, help="family name (checked against the checkpoint)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--num-layer-list", type=int_list, default=None)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--noop-layers", type=int_list, default=())
    p.add_argument(
        "--ckpt-format",
        choices=("torch", "torch_dist", "zarr"),
        default="torch",
        help="Megatron output format, as MindSpeed-LLM's v1 converter: torch rank directories, or "
        "torch_dist whole tensors Megatron reshards on load (then without the layout flags); zarr "
        "is refused; with --save-model-type hf the source's format is detected",
    )
    p.add_argument("--params-dtype", default=None, help="cast to fp16/bf16/fp32 (default: keep)")
    add_overflow_flag(p)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    p.add_argument("--hf-cfg-dir", default=None)
    p.add_argument("--lora-load", default=None, help="LoRA checkpoint (Megatron) or PEFT adapter to merge")
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-target-modules", nargs="*", default=[])
    p.add_argument(
        "--save-lora-to-hf", action="store_true", help="write the LoRA weights alone as a PEFT adapter"
    )
    p.add_argument("--moe-grouped-gemm", action="store_true")
    p.add_argument(
        "--mtp-num-layers",
        type=int,
        default=0,
        help="multi-token-prediction layers to keep (hf->mg); "
        "extra ones in the source are dropped with a warning, as MindSpeed-LLM does",
    )
    p.add_argument(
        "--target-data-parallel-size",
        type=int,
        default=None,
        help="with --load-model-type optim: "
        "data-parallel size to lay the optimizer state out for (default: the source's)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --save-dir that holds a checkpoint and nothing else (as convert)",
    )
    for flag in _IGNORED_VALUE:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in _UNSUPPORTED_VALUE:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in _UNSUPPORTED_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    add_ir_flags(p)
    p.add_argument("--dry-run", action="store_true")


def run(args: argparse.Namespace) -> int:
    import ckpt_ir.api as ck
    from ckpt_ir.families import by_name

    for flag, what in {**_UNSUPPORTED_VALUE, **_UNSUPPORTED_FLAGS}.items():
        if getattr(args, flag[2:].replace("-", "_")):
            raise UsageError(f"convert-ckpt {flag}: {what} is not supported by this version of ckpt-ir")
    if args.load_model_type == "optim" and args.save_model_type == "hf":
        raise UsageError(
            "convert-ckpt --load-model-type optim reshards Megatron optimizer state: use "
            "--save-model-type mg (HF has no place for optimizer state)"
        )
    to = "hf" if args.save_model_type == "hf" else "mcore"
    if args.save_lora_to_hf:
        to = "peft"
    if to == "mcore" and args.ckpt_format == "zarr":
        raise UsageError(
            "convert-ckpt --ckpt-format zarr: ckpt-ir does not write Megatron's zarr format (deprecated "
            "by Megatron-Core); use --ckpt-format torch_dist or torch"
        )
    if to == "mcore" and args.ckpt_format != "torch":
        given = [
            f for f in _WHOLE_TENSOR_CONFLICTS if getattr(args, f[2:].replace("-", "_")) not in (None, (), 1)
        ]
        if given:
            raise UsageError(
                f"convert-ckpt --ckpt-format {args.ckpt_format} holds whole tensors that Megatron reshards "
                f"when it loads them: leave out {', '.join(given)} (or write --ckpt-format torch)"
            )
    save_dir, hf_cfg_dir = args.save_dir, args.hf_cfg_dir
    if to == "hf" and os.path.isfile(os.path.join(save_dir, "config.json")):
        hf_cfg_dir = hf_cfg_dir or save_dir
        save_dir = os.path.join(save_dir, "mg2hf")
        print(
            f"convert-ckpt: {args.save_dir} is an HF model directory; writing to {save_dir}", file=sys.stderr
        )
    common = dict(
        dtype=args.params_dtype,
        lora_rank=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_target_modules),
        shared_copies="drop",
        lora_load=args.lora_load,
    )
    if to == "mcore":
        target = ck.Target(
            to="mcore",
            tp=args.target_tensor_parallel_size,
            pp=args.target_pipeline_parallel_size,
            vpp_layers=args.num_layers_per_virtual_pipeline_stage,
            num_layer_list=args.num_layer_list or None,
            noop_layers=args.noop_layers,
            vocab_divisible_by=args.make_vocab_size_divisible_by,
            norm_names="te-input" if args.transformer_impl == "transformer_engine" else "local",
            # MindSpeed-LLM's own MLA modules, whatever the source's (torch_dist: megatron-core's)
            mla_keys="mindspeed" if args.ckpt_format == "torch" else None,
            gdn_keys="mindspeed" if args.ckpt_format == "torch" else None,  # its qwen3-next layout
            ep=args.target_expert_parallel_size,
            etp=args.expert_tensor_parallel_size
            if args.expert_tensor_parallel_size is not None or args.model_type_hf not in _EXPERT_TP_1
            else 1,
            grouped_gemm=args.moe_grouped_gemm,
            dp=args.target_data_parallel_size,
            optimizer=args.load_model_type == "optim",
            mtp_layers=args.mtp_num_layers if args.load_model_type == "hf" else None,
            ckpt_format=args.ckpt_format,
            **common,
        )
    else:
        target = ck.Target(to=to, hf_config_dir=hf_cfg_dir, **common)
    opts = RunOptions.from_args(args, dst=save_dir, quiet=False, progress=None)
    # <save-dir>/mg2hf inside the HF directory is MindSpeed's convention
    into_hf_dir = save_dir != args.save_dir
    found = resolve_sources(
        opts,
        {"--load-dir": args.load_dir, "--lora-load": args.lora_load, "--hf-cfg-dir": hf_cfg_dir},
        configs=("--hf-cfg-dir",),
        inside=("--hf-cfg-dir",) if into_hf_dir and hf_cfg_dir == args.save_dir else (),
    )
    load_dir, hf_cfg_dir = found["--load-dir"] or args.load_dir, found["--hf-cfg-dir"]
    target = attrs.evolve(
        target, lora_load=found["--lora-load"], hf_config_dir=target.hf_config_dir and hf_cfg_dir
    )
    hf_config = hf_cfg_dir if (hf_cfg_dir and args.load_model_type in ("mg", "optim")) else None

    def check_source(src: ck.Checkpoint) -> None:
        """MindSpeed-LLM's own checks on the lifted source."""
        if args.load_model_type == "optim" and not src.states:
            raise UsageError(
                f"convert-ckpt --load-model-type optim: {args.load_dir} has no distributed-optimizer state "
                f"(distrib_optim.pt)"
            )
        if args.model_type_hf and by_name(args.model_type_hf).name != src.spec.family:
            raise UsageError(
                f"convert-ckpt: --model-type-hf {args.model_type_hf} but {args.load_dir} is a "
                f"{src.spec.family} checkpoint"
            )
        extra_mtp = src.spec.mtp_layers - (target.mtp_layers or 0)
        if target.mtp_layers is not None and extra_mtp > 0 and not args.print_pipeline:
            print(
                f"convert-ckpt: warning: dropping {extra_mtp} multi-token-prediction layer(s) because "
                f"--mtp-num-layers is {target.mtp_layers} (as MindSpeed-LLM does); pass "
                f"--mtp-num-layers {src.spec.mtp_layers} to keep them",
                file=sys.stderr,
            )

    load_options = dict(
        allow_unused=tuple(args.allow_unused),
        hf_config=hf_config,
        family=args.model_type_hf,
        optimizer=target.carries_optimizer and not target.lora_load,
        replicas=args.replicas,
    )
    return run_conversion(load_dir, target, opts, load_options, check_source)
