"""HF frontend: lift a transformers checkpoint directory (config.json + safetensors, sharded with an
index or not, or ``pytorch_model*.bin`` through the safe unpickler) into the IR.

Nothing is read but headers: each tensor becomes a lazy load.  Packed HF tensors (Phi-3's
``qkv_proj``) become row-range loads of their parts, which costs nothing.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, cast

import attrs

from ckpt_ir.errors import CoverageError, FormatError, setting
from ckpt_ir.families import Family, HfNaming, for_hf_config
from ckpt_ir.families.runtime import to_hf_names
from ckpt_ir.io.side_files import left_behind, side_files
from ckpt_ir.io.weight_files import file_tensors
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, add_mtp_copies
from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import template_pattern
from ckpt_ir.ir.roles import canonical_order, expected_shape, is_present
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.quant import dequantize_tensors

# source tensors known to carry no information (recomputed by the model)
DROP_RULES = (
    ("*rotary_emb.inv_freq", "rotary inverse frequencies are recomputed from the config"),
    ("*rotary_pos_emb.inv_freq", "rotary inverse frequencies are recomputed from the config"),  # ChatGLM
    # GPT-2 checkpoints from before transformers dropped the buffers (openai-community/gpt2)
    ("transformer.h.*.attn.bias", "GPT-2's causal-mask buffer; transformers builds the mask itself"),
    ("transformer.h.*.attn.masked_bias", "GPT-2's masking constant; transformers builds the mask itself"),
    # ... and GPT-NeoX checkpoints of that time (Pythia)
    (
        "gpt_neox.layers.*.attention.bias",
        "GPT-NeoX's causal-mask buffer; transformers builds the mask itself",
    ),
    ("gpt_neox.layers.*.attention.masked_bias", "GPT-NeoX's masking constant; transformers builds the mask"),
)


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in os.listdir(path)
    )


def read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FormatError(
            f"{path}: no config.json; an HF checkpoint directory needs one (pass {setting('hf_config', metavar='DIR')} "
            f"to take it from elsewhere)"
        )
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: not a JSON object")
    return cfg


def weight_files(path: str) -> list[str]:
    """The weight files of ``path`` in order, validated against the index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            return _files_from_index(path, index)
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        names = sorted(n for n in os.listdir(path) if n.endswith(".bin") and n.startswith("pytorch_model"))
    if not names:
        raise FormatError(f"{path}: no *.safetensors or pytorch_model*.bin weight files found")
    return [os.path.join(path, n) for n in names]


def _files_from_index(path: str, index: str) -> list[str]:
    """The files the index names, each in ``path`` (as itself, or as a Hugging Face cache snapshot's
    link into the cache's blobs)."""
    from ckpt_ir.io.hub import is_cache_blob

    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise FormatError(f"{index}: not a valid index (expected a JSON object with a weight_map)") from None
    root = os.path.realpath(path)
    files: dict[str, None] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or os.path.isabs(name) or os.sep in name or name in ("", ".", ".."):
            raise FormatError(
                f"{index}: tensor {tensor} points to {name!r}, outside the checkpoint directory; "
                f"refusing to follow it"
            )
        full = os.path.join(root, name)
        if full in files:  # checked already (an MoE index names each shard thousands of times)
            continue
        if os.path.dirname(os.path.realpath(full)) != root and not is_cache_blob(full, root):
            raise FormatError(
                f"{index}: tensor {tensor} points to {name!r}, which resolves outside the checkpoint "
                f"directory; refusing to follow it"
            )
        if not os.path.isfile(full):
            raise FormatError(f"{index}: shard {name} (holding {tensor}) is missing; re-download it")
        files.setdefault(full, None)
    return list(files)


def lift(
    path: str,
    *,
    hf_config: dict[str, Any] | None = None,
    config_name: str | None = None,
    allow_unused: tuple[str, ...] = (),
    family: str | None = None,
    runtime: dict[str, E.Expr] | None = None,
    dropped: dict[str, str] | None = None,
) -> Checkpoint:
    """``family`` names the model family when the config's model_type does not (MindSpeed-LLM's
    --model-type-hf); a config that names a known type still wins.  ``path`` may also be one
    ``.safetensors`` file: the config and side files come from its directory.  ``hf_config``
    replaces that config (``config_name`` names it in errors).  ``runtime``: the tensors, under
    a running transformers model's names (:mod:`ckpt_ir.families.runtime`), instead of weight
    files in ``path`` (a training job's save); ``hf_config`` then describes them, and the side
    files come from its directory; ``dropped``: what the reader of ``runtime`` left out."""
    files = None
    if os.path.isfile(path):
        files, path = [os.path.abspath(path)], os.path.dirname(os.path.abspath(path))
    cfg = hf_config if hf_config is not None else read_config(path)
    where = config_name or (os.path.join(path, "config.json") if hf_config is None else "the given HF config")
    try:
        fam = for_hf_config(cfg, where)
    except FormatError:
        if family is None:
            raise
        from ckpt_ir.families import by_name

        fam = by_name(family)
    family_obj = fam
    loads: dict[str, E.Load] = {}
    for f in files or (weight_files(path) if runtime is None else ()):
        for key, load in file_tensors(f).items():
            if key in loads:
                raise FormatError(
                    f"{f}: tensor {key} also appears in {loads[key].path}; duplicate tensors are ambiguous"
                )
            loads[key] = load
    dtypes = {x.dtype for x in (loads if runtime is None else runtime).values()}
    spec = family_obj.spec_from_config(
        cfg, dtype_hint=next(iter(dtypes)) if len(dtypes) == 1 else None, where=where
    )
    # another naming than the family table's (DeepSeek-V4 as transformers saves it): read as the
    # table's names, and recorded so that an HF output is written in it again
    # (Qwen3-VL-MoE's hub releases: expert stacks transposed, told by their shapes)
    naming = (
        None
        if runtime is not None
        else family_obj.naming(family_obj.naming_of(loads, path, spec)) or family_obj.naming_of_config(cfg)
    )
    rename = family_obj.renames(naming)
    if runtime is not None:
        if len(dtypes) == 1:  # the dtype the job saved, not the one of the model it started from
            spec = attrs.evolve(spec, dtype=next(iter(dtypes)))
        raw = to_hf_names(family_obj, spec, runtime, path)
        hf_names = _table_keys(family_obj, spec, raw, path) if rename else {}
        raw = {t: raw[k] for t, k in hf_names.items()} if rename else raw
    else:
        hf_names = _table_keys(family_obj, spec, loads, path, naming) if rename else {}
        loads = {t: loads[k] for t, k in hf_names.items()} if rename else loads
        # quantized weights and their scales become one dequantize expression under the weight's name
        raw = dequantize_tensors(loads, cfg, where)
    weights = {k: family_obj.as_stored(k, x) for k, x in raw.items()}  # stored [in, out]: canonical
    if naming is not None and naming.transposed:  # expert stacks as the table stores them
        weights = {k: naming.as_stored(k, x) for k, x in weights.items()}
    tensors, unused = map_tensors(family_obj, spec, weights, allow_unused, hf_names, naming)
    dropped = {**(dropped or {}), **unused}
    from ckpt_ir.ir.names import split_layer

    # transformers neither loads nor saves MTP layers: count the ones present (Hunyuan V3's config
    # has no count at all; a layer with an MTP layer's own tensors is one)
    if spec.mtp_layers or any(split_layer(n)[1].startswith("mtp.") for n in tensors):
        present = cast("set[int]", {split_layer(n)[0] for n in tensors} - {None})
        extra = sorted(i for i in present if i >= spec.num_layers)
        spec = attrs.evolve(spec, mtp_layers=len(extra))
        # Hunyuan V3's MTP layers store no embedding / head copies: they are the main ones

        add_mtp_copies(spec, tensors)
    if spec.untied and "lm_head.weight" not in tensors:
        raise FormatError(
            f"{path}: config says embeddings are untied but there is no lm_head.weight; the "
            f"checkpoint is incomplete"
        )
    layout = Layout(format="hf")
    for name, t in tensors.items():
        want = expected_shape(spec, layout, name)
        if want is not None and t.shape != want:
            src = E.loads(t.expr)[0]
            # a packed / stacked HF tensor: name the part of it that does not fit
            what = (
                ""
                if isinstance(t.expr, E.Load) and not t.expr.rows
                else f" (shape {list(src.full_shape)}) as {name}"
            )
            raise FormatError(
                f"{src.path}: tensor {src.key}{what} has shape {list(t.shape)} but {where} implies "
                f"{list(want)}; the weights do not match the config"
            )
    if runtime is not None:  # the side files of the model the run started from
        aux = side_files(os.path.dirname(config_name)) if config_name else ()
    else:
        aux = side_files(path, config=hf_config is None)
        left = left_behind(path)
        if left:  # never lost silently: named in the report
            dropped[", ".join(left)] = (
                "not weights, config or a side file that travels with them (tokenizer, generation and "
                "processor configs, chat templates, remote code); copy them to the output yourself if wanted"
            )
    return Checkpoint(
        spec=spec,
        layout=layout,
        tensors=tensors,
        dropped=dropped,
        hf_config=cfg,
        aux_files=aux,
        source=path,
        meta={} if naming is None else {"hf_naming": naming.name},
    )


def _table_keys(family: Family, spec: ModelSpec, keys, path: str, naming=None) -> dict[str, str]:
    """The family table's key of each HF key (:meth:`Family.table_key`) -> the HF key."""
    out: dict[str, str] = {}
    for k in keys:
        t = family.table_key(k, spec, False, naming)
        if t in out:
            raise FormatError(
                f"{path}: tensors {out[t]} and {k} are the same tensor of the {family.name} layout"
            )
        out[t] = k
    return out


def map_tensors(
    family: Family,
    spec: ModelSpec,
    raw: dict[str, E.Expr],
    allow_unused: tuple[str, ...],
    hf_names: dict[str, str] | None = None,
    naming: HfNaming | None = None,
) -> tuple[dict[str, TensorNode], dict[str, str]]:
    """The canonical tensors of ``raw`` (keyed as the family's table names them, see
    :meth:`Family.table_key`), and the tensors dropped on purpose; ``hf_names`` gives a renamed
    key's HF name, which ``allow_unused``, the drop rules and the messages use."""
    hf_names = hf_names or {}
    names = family.names
    tensors: dict[str, TensorNode] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    packed = [(p, template_pattern(p.hf)) for p in family.packs(naming)]
    stacked = [(s, template_pattern(s.hf)) for s in family.stacked]
    reshaped = [(r, template_pattern(r.hf)) for r in family.reshaped]
    swapped = [(w, template_pattern(w.hf)) for w in family.swapped]
    hf = Layout(format="hf")
    raw = dict(raw)
    for joined, expr in _join(family, raw):
        tensors[joined] = TensorNode.whole(joined, expr)
    for key, load in raw.items():
        canon = names.to_canonical(key, lambda c: is_present(spec, hf, c))
        if canon is not None:
            if canon == "lm_head.weight" and spec.tied_embeddings:
                dropped[hf_names.get(key, key)] = "tied to the embedding (tie_word_embeddings=true)"
                continue
            tensors[canon] = TensorNode.whole(canon, load)
            continue
        hit = _unpack(key, load, spec, packed)
        if hit is None:
            hit = _unstack(key, load, spec, stacked)
        if hit is None:
            hit = _reshape(key, load, spec, reshaped)
        if hit is None:
            hit = next(
                (
                    [(w.canonical.format(**m.groupdict()), w.swap(load, key))]
                    for w, pat in swapped
                    if (m := pat.match(key))
                ),
                None,
            )
        if hit is not None:
            for canon, expr in hit:
                tensors[canon] = TensorNode.whole(canon, expr)
            continue
        # the rules and --allow-unused match the HF name and the table's name for it
        names_of = (key, hf_names[key]) if key in hf_names else (key,)
        key = names_of[-1]
        reason = next(
            (why for pat, why in DROP_RULES if any(fnmatch.fnmatch(n, pat) for n in names_of)), None
        )
        if reason is None and any(fnmatch.fnmatch(n, p) for p in allow_unused for n in names_of):
            reason = f"matched {setting('allow_unused')}"
        if reason is None:
            unknown.append(key)
        else:
            dropped[key] = reason
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CoverageError(
            f"{len(unknown)} source tensor(s) not understood by the {family.name} family and would "
            f"be lost: {shown}; pass {setting('allow_unused', metavar='PATTERN')} to drop them on purpose"
        )
    return dict(sorted(tensors.items(), key=lambda kv: canonical_order(kv[0]))), dropped


def _join(family: Family, raw: dict[str, E.Expr]) -> list[tuple[str, E.Expr]]:
    """The canonical tensors each stored as several HF tensors (``Family.joined``), their parts
    taken out of ``raw``; a part without the others is a FormatError naming it."""
    out = []
    for j in family.joined:
        first = template_pattern(j.parts[0])
        for key in [k for k in raw if first.match(k)]:
            groups = first.match(key).groupdict()  # type: ignore[union-attr]
            names = [p.format(**groups) for p in j.parts]
            missing = [n for n in names if n not in raw]
            if missing:
                raise FormatError(
                    f"{E.loads(raw[key])[0].path}: tensor {key} comes without {', '.join(missing)}; "
                    f"together they hold {j.canonical.format(**groups)}"
                )
            out.append(
                (j.canonical.format(**groups), E.simplify(E.Concat(tuple(raw.pop(n) for n in names), j.dim)))
            )
    return out


def _unstack(key: str, load: E.Expr, spec: ModelSpec, stacked) -> list[tuple[str, E.Expr]] | None:
    """A tensor stacking a layer's experts (gpt-oss) as each expert's canonical parts."""
    for stack, pat in stacked:
        m = pat.match(key)
        if m:
            experts = stack.split(load, spec, f"{E.loads(load)[0].path}: tensor {key}")
            return [
                (p.format(e=e, **m.groupdict()), x)
                for e, parts in enumerate(experts)
                for p, x in parts.items()
            ]
    return None


def _reshape(key: str, load: E.Expr, spec: ModelSpec, reshaped) -> list[tuple[str, E.Expr]] | None:
    """A tensor HF stores in another shape than its canonical one (ERNIE 4.5's [1, E] score
    bias), viewed in the canonical shape."""
    for r, pat in reshaped:
        m = pat.match(key)
        if not m:
            continue
        canon = r.canonical.format(**m.groupdict())
        hf_shape, want = r.shape(spec), expected_shape(spec, Layout(format="hf"), canon)
        assert want is not None, f"{r.canonical}: not a role"
        if load.shape != hf_shape:
            raise FormatError(
                f"{E.loads(load)[0].path}: tensor {key} has shape {list(load.shape)} but config.json "
                f"implies {list(hf_shape)}; the weights do not match the config"
            )
        return [(canon, E.Reshape(load, want))]
    return None


def _unpack(key: str, load: E.Expr, spec: ModelSpec, packed) -> list[tuple[str, E.Expr]] | None:
    """A packed tensor's parts; of several packs of one HF name (Granite-4's shared MLP: the dense
    MLP, or the MoE's shared experts) the first whose parts the layer has."""
    matches = [(p, m) for p, pat in packed if (m := pat.match(key))]
    hf = Layout(format="hf")
    present = [(p, m) for p, m in matches if is_present(spec, hf, p.parts[0].format(**m.groupdict()))]
    for p, m in present[:1] or matches[:1]:
        rows = p.row_counts(spec)
        if load.shape[0] != sum(rows):
            raise FormatError(
                f"{E.loads(load)[0].path}: tensor {key} has {load.shape[0]} rows, expected {sum(rows)} "
                f"({' + '.join(map(str, rows))}) from config.json"
            )
        return [(part.format(**m.groupdict()), e) for part, e in p.rule(spec).split(load).items()]
    return None
