"""The ``ckpt-ir`` command line.  Heavy modules are imported inside the commands that need them,
so ``ckpt-ir --help`` and ``ckpt-ir passes`` start in well under a second."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ckpt_ir.commands.common import (
    Parser,
    add_ir_flags,
    add_iteration_flag,
    add_overflow_flag,
    add_plugin_flag,
    add_replicas_flag,
    add_source_format_flag,
    int_list,
    load_plugins,
    parse_size,
)
from ckpt_ir.errors import CkptIrError, command_line


def build_parser() -> argparse.ArgumentParser:
    from ckpt_ir import __version__

    p = Parser(
        prog="ckpt-ir",
        description="Convert and reshard LLM checkpoints (HF safetensors <-> "
        "Megatron-Core) through a typed, lazy checkpoint IR with compiler-style passes.",
    )
    p.add_argument("--version", action="version", version=f"ckpt-ir {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    c = sub.add_parser(
        "convert",
        help="convert a checkpoint to another format or layout",
        description="Convert SRC (format auto-detected) into DST. The pipeline is derived from the "
        "source and target layouts; --print-pipeline shows it, --pipeline replaces it.",
    )
    c.add_argument(
        "src",
        help="source checkpoint directory (HF, Megatron-Core, or a MindSpeed-LLM FSDP2 run's "
        "global_step_N, with --hf-config), one .safetensors file beside its config.json, or a "
        "Hugging Face Hub id org/name[@revision] (from the local cache; downloaded unless "
        "HF_HUB_OFFLINE=1)",
    )
    add_iteration_flag(c)
    add_source_format_flag(c)
    c.add_argument("dst", help="destination directory (written atomically; missing parents are created)")
    c.add_argument(
        "--to",
        required=True,
        choices=("hf", "mcore", "peft"),
        help="output format (peft: a LoRA-only adapter)",
    )
    c.add_argument(
        "--dtype",
        help="cast floating tensors to bf16, fp16 or fp32 (default: keep; an FP8/MXFP4 source is "
        "dequantized to its config's compute dtype); what the target's loader keeps in fp32 stays "
        "fp32 (HF: as transformers' from_pretrained in that dtype, e.g. DeepSeek's router; Megatron: "
        "the router's expert_bias)",
    )
    add_overflow_flag(c)
    c.add_argument(
        "--quantize",
        choices=("fp8",),
        help="--to hf: write block-scaled FP8 weights + weight_scale_inv (the modules the source "
        "release quantized, or every linear but embeddings, norms, lm_head and router gates)",
    )
    c.add_argument("--quant-block-size", type=int, default=128, help="--quantize: tile size (default 128)")
    c.add_argument(
        "--quant-scale-fmt",
        choices=("float", "ue8m0"),
        default="float",
        help="--quantize: inverse scales as fp32 or as powers of two (ue8m0)",
    )
    c.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (files, tensors, sources, bytes, peak memory) and write nothing",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST atomically if it holds a checkpoint (HF, Megatron, PEFT) and nothing else; "
        "any other DST is refused naming its first foreign entry",
    )
    c.add_argument(
        "--hf-config",
        metavar="DIR",
        help="take config.json and the side files (tokenizer, generation config, chat template, code) "
        "from DIR, or from a Hub id's snapshot, instead of the source's (those DIR lacks are listed as "
        "dropped); for a Megatron source it describes the model, and must fit the checkpoint's tensors; "
        "a MindSpeed-LLM FSDP2 source needs it (the HF model the run started from)",
    )
    c.add_argument(
        "--model-type-hf",
        metavar="FAMILY",
        help="Megatron source with plain Megatron-LM args: the "
        "model family (llama, qwen2, mixtral, ...; see 'ckpt-ir models'; megatron: the args alone, "
        "Megatron targets only); default: inferred from the args, megatron when no HF family computes it",
    )
    c.add_argument(
        "--weights-from",
        choices=("model", "master"),
        default="model",
        help="Megatron source: take "
        "the weights from the model (default) or from the distributed optimizer's fp32 master copies",
    )
    c.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=None,
        help="HF output: cap per safetensors file (default 5GB)",
    )
    c.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")
    c.add_argument(
        "--workers", type=int, default=None, help="parallel writer processes (default: one per core)"
    )
    c.add_argument(
        "--max-memory",
        type=parse_size,
        default=None,
        help="bound on tensor data held at once, e.g. "
        "4GB (default: half the available memory); limits --workers",
    )
    c.add_argument(
        "--device",
        default="cpu",
        help="where casts and LoRA merges compute: cpu (default), cuda[:N] "
        "or npu[:N] (npu needs pip install 'ckpt-ir[npu]'); on cpu a LoRA merge calls torch's "
        "MKL without importing torch where it can (CKPT_IR_MATMUL=torch: in torch, same bytes)",
    )
    m = c.add_argument_group("Megatron-Core layout (with --to mcore)")
    m.add_argument(
        "--ckpt-format",
        choices=("torch", "torch_dist", "fsdp_dtensor"),
        default="torch",
        help="Megatron checkpoint "
        "format, as Megatron-LM's flag: torch (mp_rank_* directories for one TP/PP layout, default), "
        "torch_dist (dist_checkpointing, resharded by Megatron on load) or fsdp_dtensor (Megatron-FSDP, "
        "--use-megatron-fsdp; weights only); each keeps the HF side files in the checkpoint's hf/ folder",
    )
    m.add_argument(
        "--torch-dist-version",
        choices=("0.15", "0.19"),
        default="0.15",
        help="the Megatron-Core layout of torch_dist output: 0.15 (0.15-0.18, with common.pt; 0.19+ "
        "loads it too; default) or 0.19 (0.19+ only: the common state in the DCP entry common_state)",
    )
    m.add_argument(
        "--megatron-version",
        metavar="X.Y",
        help="the Megatron-Core release the output is for: torch rank files name multi-token "
        "prediction as its own GPTModel does (mtp.layers.K.mtp_model_layer from 0.17, "
        "transformer_layer before); default: a Megatron source's naming, else MindSpeed-LLM's",
    )
    m.add_argument(
        "--verify-integrity",
        action="store_true",
        help="torch_dist output: write integrity.json, the SHA-256 of every file of the iteration, "
        "as Megatron-LM's --verify-integrity (0.18+) does (a source's integrity.json is always checked)",
    )
    m.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    m.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    m.add_argument("--num-layer-list", type=int_list, help="layers per pipeline stage, e.g. 2,6")
    m.add_argument("--vpp-layers", type=int, help="layers per virtual pipeline stage")
    m.add_argument(
        "--noop-layers", type=int_list, default=(), help="global indices of no-op layers, e.g. 94,95"
    )
    m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        help="pad the vocabulary to a multiple of N*TP (new rows copy the vocabulary's last row); "
        "default: a Megatron source's padded size, its padding rows kept as they are",
    )
    m.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE)")
    m.add_argument(
        "--etp",
        type=int,
        default=None,
        help="expert tensor parallel size: 1 (whole experts per rank) or the TP size (default)",
    )
    m.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="store experts as grouped-GEMM weight1/weight2 "
        "(torch_dist: the run builds grouped-GEMM experts, the keys stay per expert)",
    )
    m.add_argument(
        "--target-dp",
        type=int,
        default=None,
        help="data-parallel size the optimizer state is laid out for (default: the source's)",
    )
    m.add_argument(
        "--no-optimizer",
        action="store_true",
        help="do not carry the source's distributed-optimizer "
        "state (fp32 masters, Adam moments, scheduler); by default a Megatron source's state is carried",
    )
    o = c.add_argument_group("Distributed-optimizer source layout (default: from the checkpoint's args)")
    o.add_argument(
        "--source-dp", type=int, default=None, help="data-parallel size the optimizer state was saved with"
    )
    o.add_argument(
        "--source-bucket-size",
        type=int,
        default=None,
        help="DDP bucket size (elements) it was saved with; 0 for one bucket (no --overlap-grad-reduce)",
    )
    o.add_argument(
        "--source-param-align",
        type=int,
        choices=(1, 64),
        default=None,
        help="elements each parameter "
        "starts on a multiple of: 64 (Megatron-Core >= 0.8) or 1 (older); default: whichever matches",
    )
    m.add_argument(
        "--norm-names",
        choices=("local", "te", "te-input"),
        help="norm key naming: local "
        "(input_layernorm, pre_mlp_layernorm), te (linear_qkv/linear_fc1.layer_norm_weight, Megatron's TE "
        "spec) or te-input (only the input norm fused, as MindSpeed-LLM v2 writes); default local, or "
        "the source's (a torch_dist source's: the spec its args.transformer_impl names)",
    )
    m.add_argument(
        "--mla-keys",
        choices=("mindspeed", "mcore"),
        help="multi-latent attention's modules in torch-format rank files: mindspeed (MindSpeed-LLM's: "
        "the two down-projections fused in linear_qkv) or mcore (megatron-core's own, as Megatron-LM "
        "writes them and its GPTModel loads: linear_q_down_proj / linear_q_proj and "
        "linear_kv_down_proj, split over TP with --norm-names local, whole with te; MTP layers' "
        "final_layernorm inside mtp.layers.<k>); distributed-optimizer state of MLA / MTP models "
        "needs mcore; default mindspeed, or the source's (read from its keys); a vision-language "
        "model written in Megatron-Bridge's layout from HF (or from MindSpeed-MM's): mcore, its "
        "language model's modules",
    )
    m.add_argument(
        "--lora-keys",
        choices=("mindspeed", "bridge"),
        help="unmerged LoRA factors in torch-format rank files: mindspeed (X.lora_A.default.weight / "
        "X.lora_B.default.weight, as MindSpeed-LLM saves them) or bridge (Megatron-Bridge's "
        "X.adapter.linear_in.weight / X.adapter.linear_out.weight, split over TP as its "
        "ParallelLinearAdapter holds them); default mindspeed, or the source's (read from its keys)",
    )
    m.add_argument(
        "--gdn-keys",
        choices=("mindspeed", "mcore"),
        help="gated-delta-net models' (Qwen3-Next, Qwen3.5, OLMo-Hybrid) modules: mindspeed (MindSpeed-LLM's qwen3-next "
        "layout: in_proj_qkvz / in_proj_ba as HF packs them, gated attention's q_proj / k_proj / v_proj "
        "apart; whole tensors, so TP 1 only) or mcore (megatron-core's GatedDeltaNet, as Megatron-LM and "
        "Megatron-Bridge write it: in_proj = [q; k; v; z; b; a] split over TP part by part, out_norm "
        "zero-centred (the HF norm - 1) where the model's norms are (Qwen), gated linear_qkv = [q heads; gates; k; v] per group); default "
        "mindspeed for qwen3_next at TP 1 (and a source in that layout), else mcore",
    )
    v = c.add_argument_group("Vision-language models (--to mcore)")
    v.add_argument(
        "--mm-keys",
        choices=("bridge", "mindspeed", "mindspeed-canonical"),
        help="whose Megatron names: bridge (Megatron-Bridge's: language_model.*, Qwen2.5-VL's tower as "
        "transformers' visual.*, whole on every TP rank of stage 0), mindspeed (MindSpeed-MM's "
        "text_decoder.* and image_encoder.*, the tower in Megatron's modules split over TP) or "
        "mindspeed-canonical (MindSpeed-MM's enable_canonical_hf_struct: q/k/v and gate/up kept apart, "
        "the tower's qkv [q; k; v]); default bridge, or the source's",
    )
    v.add_argument(
        "--vision-tp",
        type=int,
        help="the vision tower's tensor parallel size (default: 1 with --mm-keys bridge, --tp with mindspeed)",
    )
    v.add_argument(
        "--vision-layer-list",
        type=int_list,
        help="vision layers per pipeline stage (stage after stage, virtual chunk after chunk), e.g. 2,0; "
        "default: all on stage 0",
    )
    lo = c.add_argument_group(
        "LoRA (merged into the weights for --to hf/mcore; exported alone for --to peft)"
    )
    lo.add_argument(
        "--lora-load",
        metavar="DIR",
        help="LoRA adapter: a PEFT directory or Hub id (rsLoRA, rank/alpha patterns, DoRA, "
        "modules_to_save, MoE experts) or a Megatron LoRA checkpoint; tokenizer files saved with a "
        "PEFT adapter replace the base model's in the merged output (a note: line says so)",
    )
    lo.add_argument("--lora-r", type=int, help="LoRA rank (checked against the adapter)")
    lo.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha (needed when the adapter does not record it)"
    )
    lo.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="modules carrying LoRA, e.g. linear_qkv linear_proj linear_fc1 linear_fc2 (checked)",
    )
    add_ir_flags(c)

    i = sub.add_parser("inspect", help="print a checkpoint's IR (spec, layout, one line per tensor)")
    i.add_argument("path", help="checkpoint directory (any format) or Hub id org/name[@revision]")
    add_iteration_flag(i)
    add_source_format_flag(i)
    i.add_argument("--format", choices=("text", "json", "dot"), default="text")
    i.add_argument("--allow-unused", metavar="PATTERN", action="append", default=[])
    add_replicas_flag(i)
    i.add_argument(
        "--hf-config",
        metavar="DIR",
        help="HF config.json describing a Megatron checkpoint whose args do not (plain Megatron-LM args), "
        "or a MindSpeed-LLM FSDP2 checkpoint (the HF model the run started from)",
    )
    i.add_argument(
        "--model-type-hf",
        metavar="FAMILY",
        help="model family of a Megatron checkpoint with plain "
        "Megatron-LM args (default: inferred from the args)",
    )
    i.add_argument(
        "--weights-from",
        choices=("model", "master"),
        default="model",
        help="Megatron source: the model's weights or the distributed optimizer's fp32 masters",
    )
    i.add_argument(
        "--optimizer",
        action="store_true",
        help="also list the distributed-optimizer state tensors "
        "(rows named param:..., exp_avg:..., exp_avg_sq:...)",
    )

    d = sub.add_parser(
        "diff",
        help="compare two checkpoints of any formats tensor by tensor",
        description="Compare A and B (any formats and layouts) tensor by tensor at the canonical "
        "level. Exit 0 if identical, 1 if they differ, 2 if they could not be compared (a side "
        "missing or unreadable, a bad flag).",
    )
    d.add_argument("a", help="checkpoint directory (any format) or Hub id org/name[@revision]")
    d.add_argument("b", help="the same for the other side")
    add_iteration_flag(d, "A or B")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("--atol", type=float, default=0.0, help="treat differences up to ATOL as equal")
    d.add_argument(
        "--hf-config",
        metavar="DIR",
        help="HF config.json describing a Megatron side whose args do not (plain Megatron-LM args), "
        "or a MindSpeed-LLM FSDP2 side",
    )

    from ckpt_ir.commands.plan import add_parser as add_plan
    from ckpt_ir.commands.verify import add_parser as add_verify

    add_verify(sub)
    add_plan(sub)
    sub.add_parser("passes", help="list passes, their options and what they require/guarantee")
    mo = sub.add_parser(
        "models",
        help="list supported model families and what the tests verify for each",
        description="List the model families, grouped by architecture: HF model_type, architecture and "
        "MindSpeed-LLM --model-type-hf names (text), or the support matrix (markdown, json): for each "
        "family the layouts whose HF -> Megatron-Core -> HF round trip is bit-exact, those where "
        "megatron-core's own GPTModel gives transformers' logits (or why it cannot), and the "
        "comparisons with MindSpeed-LLM's converter. Each claim is a test case of ckpt-ir's suite.",
    )
    mo.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="output format")
    mo.add_argument(
        "--coverage",
        action="store_true",
        help="instead: every causal-LM model type the installed transformers registers, supported or the "
        "one-line reason it is not (encoder-decoder, encoder, multimodal, the block it needs, ...)",
    )

    de = sub.add_parser(
        "demo", help="build a tiny random model, convert it HF -> mcore -> HF, verify, report"
    )
    de.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="work directory, kept; its hf/, mcore-tp2-pp2/ and hf-roundtrip/ replace only previous "
        "checkpoints (default: a temporary directory, removed at the end)",
    )

    from ckpt_ir.commands.mindspeed import add_parser as add_mindspeed
    from ckpt_ir.commands.mm_convert import add_parser as add_mm_convert

    add_mindspeed(sub)
    add_mm_convert(sub)
    for command in sub.choices.values():  # every command imports user passes and families
        add_plugin_flag(command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mm-convert"]:  # MindSpeed-MM's --cfg.<field> VALUE arguments
        from ckpt_ir.commands.mm_convert import argv as mm_argv

        argv = mm_argv(argv)
    debug = "--debug" in argv
    try:
        with command_line():  # errors name flags (--overwrite), not Python keywords
            parser = build_parser()
            args = parser.parse_args(argv)
            if not args.command:
                parser.print_help()
                return 2
            load_plugins(args)
            return COMMANDS[args.command](args)
    except CkptIrError as e:
        if debug:
            raise
        sys.stderr.write(f"ckpt-ir: error: {e}\n")  # one write: ranks under torchrun share stderr
        return e.exit_code
    except KeyboardInterrupt:
        print("ckpt-ir: interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if debug:
            raise
        sys.stderr.write(f"ckpt-ir: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}\n")
        return 1


def run() -> None:
    """The ``ckpt-ir`` command: :func:`main`, then leave.  Once torch is imported, the
    interpreter's teardown (module and thread-pool finalisers) takes seconds after the work is
    done: measured 2-3 s of wall time on two busy cores.  Nothing is pending by then (every
    output file was fsynced and closed before its rename, every worker joined), so the process
    leaves without it.  After a LoRA merge without torch, unloading torch's library (its static
    destructors, :mod:`ckpt_ir.ir.sgemm`) takes 0.25 s: the process runs its atexit hooks and
    leaves without the rest.  Otherwise it exits normally."""
    import os

    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # a closed pipe (``| head``): nothing left to say
        pass
    if "torch" in sys.modules:
        os._exit(code)
    sgemm = sys.modules.get("ckpt_ir.ir.sgemm")
    if sgemm is not None and sgemm.loaded():
        import atexit

        atexit._run_exitfuncs()
        os._exit(code)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_convert(args: argparse.Namespace) -> int:
    import attrs

    import ckpt_ir.api as ck
    from ckpt_ir.commands.common import RunOptions, resolve_sources, run_conversion
    from ckpt_ir.frontends import MEGATRON_FORMATS, detect

    if args.device != "cpu":
        from ckpt_ir.device import resolve_device
        from ckpt_ir.ir.expr import set_math_device

        set_math_device(resolve_device(args.device))
    target = ck.Target(
        to=args.to,
        dtype=args.dtype,
        tp=args.tp,
        pp=args.pp,
        vpp_layers=args.vpp_layers,
        num_layer_list=args.num_layer_list,
        noop_layers=args.noop_layers,
        vocab_divisible_by=args.make_vocab_size_divisible_by,
        norm_names=args.norm_names,
        mla_keys=args.mla_keys,
        gdn_keys=args.gdn_keys,
        lora_keys=args.lora_keys,
        mm_keys=args.mm_keys,
        vision_tp=args.vision_tp,
        vision_layer_list=args.vision_layer_list,
        max_shard_size=args.max_shard_size,
        hf_config_dir=args.hf_config,
        ep=args.ep,
        etp=args.etp,
        grouped_gemm=args.moe_grouped_gemm,
        lora_rank=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_target_modules),
        dp=args.target_dp,
        optimizer=not args.no_optimizer,
        lora_load=args.lora_load,
        ckpt_format=args.ckpt_format,
        torch_dist_version=args.torch_dist_version,
        megatron_version=args.megatron_version,
        verify_integrity=args.verify_integrity,
        quantize=args.quantize,
        quant_block_size=args.quant_block_size,
        quant_scale_fmt=args.quant_scale_fmt,
    )

    opts = RunOptions.from_args(args)
    found = resolve_sources(
        opts,
        {"SRC": args.src, "--hf-config": args.hf_config, "--lora-load": args.lora_load},
        ("--hf-config",),
    )
    src, hf_config = found["SRC"] or args.src, found["--hf-config"]
    target = attrs.evolve(target, hf_config_dir=hf_config, lora_load=found["--lora-load"])
    # --hf-config also describes a Megatron source whose args carry no HF config
    megatron = detect(src, args.iteration) in MEGATRON_FORMATS
    hf_cfg = hf_config if hf_config and megatron else None
    layout = {"dp": args.source_dp, "bucket_size": args.source_bucket_size, "align": args.source_param_align}
    return run_conversion(
        src,
        target,
        opts,
        {
            "allow_unused": tuple(args.allow_unused),
            "hf_config": hf_cfg,
            "weights_from": args.weights_from,
            "optimizer_layout": layout,
            "family": args.model_type_hf,
            "replicas": args.replicas,
            "iteration": args.iteration,
            "source_ckpt_format": args.source_ckpt_format,
        },
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    import ckpt_ir.api as ck
    from ckpt_ir.io.hub import resolve
    from ckpt_ir.ir.printer import render

    ckpt = ck.load(
        args.path,
        allow_unused=tuple(args.allow_unused),
        hf_config=args.hf_config and resolve(args.hf_config, weights=False),
        weights_from=args.weights_from,
        optimizer=args.optimizer,
        family=args.model_type_hf,
        replicas=args.replicas,
        iteration=args.iteration,
        source_ckpt_format=args.source_ckpt_format,
    )
    if ckpt.meta.get("family_from_args"):
        print(f"ckpt-ir: {ckpt.meta['family_from_args']}", file=sys.stderr)
    sys.stdout.write(render(ckpt, args.format))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.diff import COULD_NOT_COMPARE, diff, format_report

    try:
        report = diff(args.a, args.b, atol=args.atol, hf_config=args.hf_config, iteration=args.iteration)
    except CkptIrError as e:  # exit 1 says "they differ"
        e.exit_code = COULD_NOT_COMPARE
        raise
    except OSError as e:
        error = CkptIrError(f"{e.filename or f'{args.a} vs {args.b}'}: {e.strerror}; cannot compare")
        error.exit_code = COULD_NOT_COMPARE
        raise error from None
    if args.json:
        import json

        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0 if report["identical"] else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.verify import run

    return run(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.plan import run

    return run(args)


def cmd_passes(args: argparse.Namespace) -> int:
    from ckpt_ir.passes.manager import registry

    for name, cls in sorted(registry().items()):
        print(f"{name}\n    {cls.summary}")
        if cls.description:
            print(f"    {cls.description}")
        for o in cls.options():
            d = "" if o.required or o.default is None else f" (default {o.format(o.default)})"
            tags = ["required"] * o.required + [o.kind] * (o.allowed is not None)
            print(f"    {o.name}={o.metavar}  {o.help}{d}" + (f"  [{'; '.join(tags)}]" if tags else ""))
        print(
            f"    requires:   {cls.describe_requires()}\n    guarantees: {cls.guarantees}\n"
            f"    optimizer state: {cls.optimizer_state}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.models import run

    sys.stdout.write(run(args.format, args.coverage))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.demo import run_demo

    return run_demo(args.dir)


def cmd_convert_ckpt(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.mindspeed import run

    return run(args)


def cmd_mm_convert(args: argparse.Namespace) -> int:
    from ckpt_ir.commands.mm_convert import run

    return run(args)


COMMANDS = {
    "convert": cmd_convert,
    "inspect": cmd_inspect,
    "diff": cmd_diff,
    "verify": cmd_verify,
    "plan": cmd_plan,
    "passes": cmd_passes,
    "models": cmd_models,
    "demo": cmd_demo,
    "convert-ckpt": cmd_convert_ckpt,
    "mm-convert": cmd_mm_convert,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
