"""What the two Megatron frontends (the ``torch`` rank files and ``torch_dist``) share once their
tensors are named: reading the model from ``args`` (:func:`spec_from_args`), completing the tensor
sets as the IR has them (:func:`complete_tensors`), and building the Checkpoint with what the files
say about layout, dtype, LoRA and training state (:func:`checkpoint`)."""

from __future__ import annotations

import os
from typing import Any, overload

import attrs

from ckpt_ir.errors import CoverageError, FormatError, setting
from ckpt_ir.families import by_name, for_hf_config
from ckpt_ir.io.side_files import side_file_name, side_files
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, add_mtp_copies
from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import is_lora
from ckpt_ir.ir.roles import canonical_order
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import infer
from ckpt_ir.megatron.keys import MCORE_HF_DIR, TOKENIZER_DIR, add_fixed, iteration_of, mla_down_parts


class ArgReader:
    """Typed access to Megatron ``args``: every bad value is a FormatError naming the file and key."""

    def __init__(self, args: dict[str, Any], where: str) -> None:
        self.args, self.where = args, where

    @overload
    def size(self, key: str, default: int = 1, limit: int = 1 << 16) -> int: ...
    @overload
    def size(self, key: str, default: None, limit: int = 1 << 16) -> int | None: ...

    def size(self, key: str, default: int | None = 1, limit: int = 1 << 16) -> int | None:
        """``args.<key>``, an integer from 1 to ``limit``; ``default`` when args lack it."""
        v = self.args.get(key)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
            raise FormatError(f"{self.where}: args.{key} must be an integer from 1 to {limit}, got {v!r}")
        return v

    def layers(self, key: str) -> tuple[int, ...] | None:
        v = self.args.get(key)
        if v in (None, False, ""):
            return None
        try:
            out = megatron_args.int_list(v)
        except (ValueError, TypeError):
            out = None
            bad = True
        else:
            bad = out is None or any(i < 0 for i in out)
        if bad:
            raise FormatError(f"{self.where}: args.{key} must list layer numbers like '2,6', got {v!r}")
        return out


def spec_from_args(
    args: dict[str, Any],
    hf_config: dict[str, Any] | None,
    where: str,
    family: str | None = None,
    config_name: str | None = None,
) -> tuple[ModelSpec, dict[str, Any] | None, str | None]:
    """(ModelSpec, HF config, why) of a Megatron checkpoint from its ``args``: from ``hf_config``
    (named ``config_name`` in errors) when given, from the HF config ckpt-ir or MindSpeed-LLM copied into the args, else (plain
    Megatron-LM args) for ``family`` or the family inferred from the args (``why`` says which
    and why; None when nothing was inferred)."""
    a = ArgReader(args, where)
    named = args.get("ckpt_ir_family") or args.get("model_type_hf")
    why = None
    cfg: dict[str, Any] | None
    if hf_config is None and infer.MEGATRON.name in (family, named):
        spec, cfg = infer.megatron_spec(args, where), None
        why = "family megatron (Megatron targets only): the model is described by its args alone"
    elif hf_config is not None:
        cfg, fam = hf_config, for_hf_config(hf_config, config_name or setting("hf_config"))
    elif (
        named
        or args.get("ckpt_ir_hf_config") is not None
        or args.get("model_type")
        or args.get("architectures")
    ):
        try:  # an HF config ckpt-ir or MindSpeed-LLM copied into the args
            cfg = megatron_args.hf_config_from_args(args)
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        fam = by_name(named) if named else for_hf_config(cfg, where)
    elif family:
        fam = by_name(family)
        cfg = infer.hf_config_for(fam, args, where)
        why = f"family {fam.name} ({setting('family')}); HF config built from args"
    else:
        try:
            fam, cfg, why = infer.infer(args, where)
        except infer.NoFamily as e:
            # resharding needs no HF family: the args describe every tensor Megatron wrote
            spec, cfg, why = infer.megatron_spec(args, where), None, infer.args_only(e.detail)
    if cfg is not None and hf_config is None:
        try:  # args keep the config under Megatron's names, not always all of it
            spec = fam.spec_from_config(cfg, where=f"{where} (args)")
        except FormatError as e:
            raise FormatError(
                f"{e}; pass {setting('hf_config', metavar='DIR')} with the model's HF config"
            ) from None
    elif cfg is not None:
        spec = fam.spec_from_config(cfg, where=f"{where} (args)")
    if args.get("mtp_num_layers") is not None:
        layers = a.size("mtp_num_layers", 0, 64) if args["mtp_num_layers"] else 0
        spec = attrs.evolve(spec, mtp_layers=layers)
    return spec, cfg, why


def padded(layout: Layout, spec: ModelSpec, tensors: dict[str, TensorNode]) -> Layout:
    """``layout`` with the padded vocabulary size the embedding's rows give (when they are more
    than the vocabulary)."""
    rows = tensors["embed.weight"].shape[0] if "embed.weight" in tensors else spec.vocab_size
    return attrs.evolve(layout, padded_vocab=rows) if rows != spec.vocab_size else layout


def norm_names(te_norms: bool, te_fc1: bool) -> str:
    """The Layout's norm naming from what the keys showed: Transformer Engine's norms fused into
    linear_qkv (``te_norms``) and into linear_fc1 (``te_fc1``), or local norm modules."""
    return "te" if te_fc1 else "te-input" if te_norms else "local"


def fuse_mla(spec: ModelSpec, nodes: dict[str, TensorNode]) -> None:
    """Megatron-Core's own MLA modules lifted (``attn.q_a`` or ``attn.q``, and ``attn.kv_a``, TP
    shards gathered) as the ``attn.qkv_a`` a Megatron layout holds (MindSpeed-LLM's fused
    linear_qkv, whole on every rank); a layer without both parts is left as it is."""
    from ckpt_ir.ir import expr as E
    from ckpt_ir.ir.checkpoint import gather_exprs
    from ckpt_ir.ir.names import layer_name
    from ckpt_ir.ir.rules import mla_rule

    roles = mla_down_parts(spec)
    for i in range(spec.total_layers):
        names = {p: layer_name(i, c) for p, c in roles.items()}
        if not all(n in nodes for n in names.values()):
            continue
        parts = {p: nodes.pop(n) for p, n in names.items()}
        exprs = {p: gather_exprs(n.shards, n.split) if n.split else n.shards[0] for p, n in parts.items()}
        name = layer_name(i, "attn.qkv_a.weight")
        nodes[name] = TensorNode.whole(name, E.simplify(mla_rule(spec).fuse(exprs)))


def unknown_tensors(unknown: list[str], where: str = "") -> CoverageError:
    """The error for Megatron tensors no table gives a meaning (``where``: the directory)."""
    shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
    return CoverageError(
        f"{len(unknown)} Megatron tensor(s){f' in {where}' if where else ''} have no known meaning and "
        f"would be lost: {shown}; pass {setting('allow_unused', metavar='PATTERN')} to drop them on purpose"
    )


def complete_tensors(
    spec: ModelSpec,
    tensors: dict[str, TensorNode],
    sets: dict[str, dict[str, TensorNode]],
    dropped: dict[str, str],
) -> None:
    """The weights and each optimizer-state set as the IR has them: the tensors whose value the
    architecture fixes are re-created, MTP layers get their canonical copies of the shared
    embedding / output layer, and a tied model's output layer (Megatron's copy of the embedding on
    the last stage) is dropped."""
    add_fixed(spec, tensors)  # what Megatron's modules fix and do not store (xIELU's beta, eps)
    for s in (tensors, *sets.values()):
        add_mtp_copies(spec, s)
        if spec.tied_embeddings and s.pop("lm_head.weight", None) is not None and s is tensors:
            dropped["output_layer.weight"] = "copy of the tied embedding on the last pipeline stage"


def checkpoint(
    path: str,
    spec: ModelSpec,
    layout: Layout,
    tensors: dict[str, TensorNode],
    sets: dict[str, dict[str, TensorNode]],
    *,
    args: dict[str, Any],
    cfg: dict[str, Any] | None,
    dropped: dict[str, str],
    meta: dict[str, Any],
    iteration_dir: str | None,
) -> Checkpoint:
    """The Checkpoint of a lifted Megatron model: the padded vocabulary, dtype and LoRA rank read
    off the tensors, tensors in canonical order, and the HF side files of ``hf/``, the run's
    tokenizer files that Megatron-LM saved in ``iteration_dir``'s ``tokenizer/`` replacing those
    of ``hf/`` (``iteration_dir`` None: a model in memory, no files beside it)."""
    layout = padded(layout, spec, tensors)
    weights = [t for n, t in tensors.items() if not is_lora(n)]
    spec = attrs.evolve(spec, dtype=weights[0].dtype if weights else spec.dtype)
    lora_a = [t for n, t in tensors.items() if n.endswith(".lora_a.weight")]
    if lora_a:
        alpha = args.get("lora_alpha")
        spec = attrs.evolve(
            spec, lora_rank=lora_a[0].shape[0], lora_alpha=None if alpha is None else float(alpha)
        )
    ordered = dict(sorted(tensors.items(), key=lambda kv: canonical_order(kv[0])))
    return Checkpoint(
        spec=spec,
        layout=layout,
        tensors=ordered,
        dropped=dropped,
        hf_config=cfg,
        source=path,
        aux_files=() if iteration_dir is None else _side_files(path, iteration_dir),
        # the HF naming a ckpt-ir output recorded (DeepSeek-V4 as transformers saves it)
        meta={**meta, "hf_naming": args["ckpt_ir_hf_naming"]} if args.get("ckpt_ir_hf_naming") else meta,
        states={k: {n: v[n] for n in ordered if n in v} for k, v in sets.items()},
    )


def bridge_lora_alpha(iteration_dir: str) -> float | None:
    """The LoRA alpha Megatron-Bridge recorded for a checkpoint: ``peft.alpha`` of the
    ``run_config.yaml`` in its iteration directory or the directory above, where Bridge's own
    export looks (models/conversion/auto_bridge.py:1640-1646; LoRA.alpha, peft/lora.py:147); None
    where there is none."""
    for d in (iteration_dir, os.path.dirname(iteration_dir.rstrip(os.sep))):
        f = os.path.join(d, "run_config.yaml")
        if not os.path.isfile(f):
            continue
        import yaml  # type: ignore[import-untyped]

        class _Loader(yaml.SafeLoader):  # Bridge's config may tag values (dtypes, callables): read as None
            pass

        _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
        with open(f, encoding="utf-8") as fh:
            cfg = yaml.load(fh, Loader=_Loader)  # noqa: S506 -- a SafeLoader
        peft = cfg.get("peft") if isinstance(cfg, dict) else None
        alpha = peft.get("alpha") if isinstance(peft, dict) else None
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            return float(alpha)
        return None
    return None


def _side_files(path: str, iteration_dir: str) -> tuple[str, ...]:
    """The side files of ``hf/`` at the checkpoint's root (``path``, or the save directory of an
    ``iter_N`` / ``release`` directory given itself), and every file of the iteration's
    ``tokenizer/`` in place of the same-named ones."""
    root = os.path.abspath(path)
    if root == os.path.abspath(iteration_dir) and iteration_of(os.path.basename(root)) is not None:
        root = os.path.dirname(root)
    files = {side_file_name(f): f for f in side_files(os.path.join(root, MCORE_HF_DIR), config=True)}
    tokenizer = side_files(os.path.join(iteration_dir, TOKENIZER_DIR), patterns=("*",))
    files.update((side_file_name(f), f) for f in tokenizer)
    return tuple(files[name] for name in sorted(files))


def check_config_fits(
    config_name: str | None,
    path: str,
    spec,
    layout: Layout,
    tensors: dict[str, TensorNode],
    unknown: list[str],
) -> None:
    """An HF config given for a Megatron checkpoint (``--hf-config``) must describe its tensors: a
    tensor the config's model has no place for (``unknown``: Megatron keys no rule of the family
    maps), one it needs that the checkpoint lacks, or a shape they disagree on is a one-line error
    naming the config and the first disagreement (not "incomplete", nor a hint to drop tensors,
    nor tensors written beside a config that leaves them out)."""
    from ckpt_ir.ir.roles import expected_names, expected_shape

    layout = padded(layout, spec, tensors)
    model = f"a {spec.family} model as the config describes it"
    expected = expected_names(spec, layout)
    weights = {n for n in tensors if not is_lora(n)}
    extra = unknown or sorted(weights - expected, key=canonical_order)
    missing = sorted(expected - weights, key=canonical_order)
    what = None
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        what = f"the checkpoint holds {extra[0]}{more}, which {model} has no place for"
    elif missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        what = f"{model} has {missing[0]}{more}, which the checkpoint lacks"
    else:
        for name in sorted(weights, key=canonical_order):
            want, got = expected_shape(spec, layout, name), tensors[name].shape
            if want is not None and got != want:
                what = f"{name} is {list(got)} in the checkpoint but {list(want)} in {model}"
                break
    if what:
        raise FormatError(
            f"{config_name or 'the given HF config'}: this config does not describe the checkpoint "
            f"{path}: {what}; pass the config of the model the checkpoint holds"
        )
