"""``ckpt-ir verify A B``: prove two checkpoints hold the same model by running it.

Each side is lifted and brought to HF layout by the standard pipeline, lazily (Megatron layouts
are gathered by expressions, nothing is read yet).  The transformers model of the family is built
with its parameters on the meta device; a forward hook pair on every top-level unit (embedding,
each decoder layer, final norm, lm_head) materialises that unit's weights from the IR just before
it runs and returns them to the meta device right after, so peak memory is about one layer plus
activations.  The model's own forward (rotary embeddings, masks, family quirks) runs unchanged;
checkpoint names become module parameters through transformers' own weight-conversion rules (fused
MoE experts), so the oracle shares no layout code with the converter.  The hidden state after
every unit is recorded for both sides and compared.

A vision-language model runs the prompt with one generated image (:func:`image_inputs`, laid out
as the family's ``Tower.image`` says its processor lays one out); any module holding a stack of
layers is split the same way, so the tower's patch embedding, each of its blocks and its merger or
projector are units too, reported by their canonical names (``vision.layers.1``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Iterator
from typing import Any

import attrs

from ckpt_ir.errors import CkptIrError, FormatError, UsageError

# machine epsilon per IR dtype
EPS = {"F32": 2.0**-23, "BF16": 2.0**-7, "F16": 2.0**-10, "F64": 2.0**-52}
# default tolerance when the two sides' arithmetic differs, relative to a layer's max |value|: this many
# epsilons of the coarsest dtype involved, and never below fp32's reordering noise over a deep stack
RTOL_EPS, RTOL_FLOOR = 16, 1e-5


@attrs.frozen
class Row:
    """One compared point of the forward: a unit's output on both sides."""

    name: str
    max_abs_diff: float
    scale: float  # max |value| over both sides, for relative tolerances
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


# where a PEFT wrapper keeps the module it wraps (a LoRA layer's base_layer, nested once per wrapped
# parameter; a modules_to_save wrapper's original_module): removed, a wrapped name becomes the base's
PEFT_BASE = re.compile(r"(?<![^.])(?:base_layer|original_module)\.")


def is_adapter(name: str) -> bool:
    """Whether a module or parameter name is part of a PEFT adapter: LoRA factors, DoRA magnitudes,
    and the trained copies of modules_to_save (the base weights they wrap are not)."""
    return "lora_" in name or "modules_to_save" in name


def hf_side(path: str, hf_config: dict | str | None = None, iteration: int | str | None = None):
    """``path`` lifted and lowered to HF layout lazily: (checkpoint, [(HF name, expression)]).
    ``iteration``: the one read when ``path`` is a Megatron save directory (default its latest)."""
    import ckpt_ir.api as ck
    from ckpt_ir.backends.hf import hf_tensors
    from ckpt_ir.families import by_name
    from ckpt_ir.frontends import MEGATRON_FORMATS, detect
    from ckpt_ir.io.hub import resolve

    path = resolve(path)  # a Hub id: its cached snapshot
    megatron = detect(path, iteration) in MEGATRON_FORMATS
    src = ck.load(path, hf_config=hf_config, iteration=iteration if megatron else None)
    ck.check_family(src, ck.Target(to="hf"))  # transformers computes HF families only
    out = ck.run(src, ck.derive_pipeline(src, ck.Target(to="hf")))
    return out, hf_tensors(out, by_name(out.spec.family))


def transformers_config(ckpt) -> Any:
    """The transformers config of ``ckpt``'s model (as the HF backend would write it); refuses a
    family whose architecture transformers does not implement (remote code)."""
    import transformers

    from ckpt_ir.families import by_name

    family = by_name(ckpt.spec.family)
    cfg = family.config_from_spec(ckpt.spec, ckpt.hf_config)
    # a vision-language model_type transformers ports to a class of its own (Kimi-K2.5's
    # Kimi_K25ForConditionalGeneration for the release's remote KimiK25ForConditionalGeneration)
    # is what from_pretrained builds without remote code
    ported = ckpt.spec.vision is not None and cfg.get("model_type") in image_text_models()
    if not ported and (cfg.get("auto_map") or not hasattr(transformers, family.architecture)):
        raise UsageError(
            f"verify: {family.architecture} ({ckpt.spec.family}) is not implemented by transformers "
            f"{transformers.__version__} (remote code is never run); verify needs a built-in class"
        )
    if cfg.get("model_type") not in transformers.CONFIG_MAPPING:
        raise UsageError(
            f"verify: {ckpt.source} is {ckpt.spec.family} in the {cfg.get('model_type')} naming, which transformers "
            f"{transformers.__version__} has no config for; verify a checkpoint in transformers' naming"
        )
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "auto_map")}
    # config.json spells an infinite float {"__float__": "Infinity"} (Mamba's time_step_limit):
    # decoded as transformers' from_pretrained decodes it
    cfg = transformers.PretrainedConfig._decode_special_floats(cfg)
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def image_text_models() -> Any:
    """transformers' model_type -> class name of its image-text-to-text models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device but real buffers (rotary
    frequencies are computed at construction and needed by the forward)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_model(config, dtype, device, adapter: str | None, *, image: bool = False):
    """The causal-LM model (``image``: the image-text-to-text model) with meta parameters; with
    ``adapter`` wrapped by PEFT (its LoRA weights loaded, they are small) so the adapter is applied
    at run time as peft does."""
    import transformers

    auto = transformers.AutoModelForImageTextToText if image else transformers.AutoModelForCausalLM
    with parameters_on_meta():
        model = auto.from_config(config, dtype=dtype)
    model.eval()
    for name, buf in model.named_buffers():
        if not buf.is_meta and buf.device != device:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(device)
    if adapter is None:
        return model
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    # peft created the adapter's modules on the base layers' device (meta here) and copied nothing
    # into them; load again with peft's own key mapping (LoRA factors, DoRA magnitudes, modules_to_save
    # copies, transformers-5 conversions), assigning the tensors instead of copying them into meta
    weights = {
        k: v.to(device=device, dtype=dtype) for k, v in load_peft_weights(adapter, device="cpu").items()
    }
    peft_model.load_state_dict = functools.partial(  # type: ignore[method-assign]
        peft_model.load_state_dict, assign=True
    )
    try:
        result: Any = set_peft_model_state_dict(peft_model, weights)
    finally:
        del peft_model.load_state_dict
    if result.unexpected_keys:
        raise FormatError(f"{adapter}: adapter tensor {result.unexpected_keys[0]} has no place in the model")
    for name, p in peft_model.named_parameters():
        if is_adapter(name) and p.is_meta:
            raise FormatError(f"{adapter}: the adapter has no tensor for {name}; it does not match the model")
    return peft_model.base_model.model


@attrs.frozen(eq=False)
class Unit:
    """Weights materialised at once: a module's whole state (``own`` False), or only its own
    parameters (``own`` True) while its forward runs (a module split into units, such as a vision
    tower keeping a class embedding beside its layers)."""

    prefix: str  # the module's name and a dot ("" for the model itself)
    module: Any
    own: bool = False

    def wanted(self) -> dict[str, Any]:
        """The unit's parameters and buffers still on the meta device, by name within the module."""
        if self.own:
            return {k: v for k, v in self.module._parameters.items() if v is not None and v.is_meta}
        return {k: v for k, v in self.module.state_dict().items() if v.is_meta}


def units(model) -> list[Unit]:
    """The units materialised one at a time, in module order: a module that holds a stack of
    layers (a ModuleList: decoder layers, vision blocks) is split, each layer one unit, every other
    child holding weights one unit (embedding, final norm, LM head, patch embedding, merger), its
    own parameters one more; modules without such a stack are units whole."""
    import torch

    def has_meta(m) -> bool:
        return any(p.is_meta for p in m.parameters())

    def stacked(m) -> bool:
        return any(isinstance(c, torch.nn.ModuleList) and has_meta(c) for c in m.modules())

    out: list[Unit] = []

    def split(prefix: str, module) -> None:
        if any(p is not None and p.is_meta for p in module._parameters.values()):
            out.append(Unit(prefix, module, own=True))
        for name, child in module.named_children():
            if not has_meta(child):
                continue
            if isinstance(child, torch.nn.ModuleList):
                out.extend(Unit(f"{prefix}{name}.{i}.", layer) for i, layer in enumerate(child))
            elif stacked(child):
                split(f"{prefix}{name}.", child)
            else:
                out.append(Unit(f"{prefix}{name}.", child))

    split("", model)
    return out


def conversion(model):
    """transformers' checkpoint -> module rules for this model (renamings, fused-expert converters,
    and what from_pretrained adds or strips: the base model's prefix, by the model's own names)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    known = dict.fromkeys(model.state_dict(), True)
    return renamings, converters, model.base_model_prefix, known


def module_key(rules, key: str) -> tuple[str, str | None]:
    """A checkpoint tensor's module name and the converter pattern it matched, as from_pretrained
    renames it (core_model_loading.py convert_and_load_state_dict_in_model: a key the renamings
    take out of the model but that is already a module name stays one)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters, base, known = rules
    new, pattern = rename_source_key(key, renamings, converters, base, known)
    if new not in known and key in known:
        new, pattern = rename_source_key(key, [], [], base, known)
    return new, pattern


def convert_names(model, rules, tensors: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint tensors (full HF names) -> module state (full module names), as from_pretrained does."""
    import copy

    from transformers.core_model_loading import WeightRenaming

    renamings, converters = rules[:2]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, Any] = {}
    for key in sorted(tensors):
        new, pattern = module_key(rules, key)
        if pattern is None:
            op, pattern = pending.setdefault(new, WeightRenaming(key, new)), key
        else:
            op = pending.setdefault(new, copy.deepcopy(by_pattern[pattern]))
        op.add_tensor(new, key, pattern, tensors[key])
    out: dict[str, Any] = {}
    for first, op in pending.items():
        for name, value in op.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


class Materialiser:
    """Hooks that give a unit its weights from the IR just before it runs and take them back after."""

    def __init__(
        self, model, exprs: list[tuple[str, Any]], reader, dtype, device, tied: bool, parts: list[Unit]
    ) -> None:
        self.model, self.reader, self.dtype, self.device = model, reader, dtype, device
        self.exprs = dict(exprs)
        self.rules = conversion(model)
        # each checkpoint tensor's module name (GPT-NeoX's embed_out is the module lm_head, a
        # vision-language checkpoint's visual.* model.visual.*)
        self.module_of = {n: module_key(self.rules, n)[0] for n in self.exprs}
        if tied and "lm_head.weight" not in self.module_of.values():
            # the input embedding's own name (embed_tokens for most families, BLOOM's word_embeddings)
            embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
            source = next((n for n, m in self.module_of.items() if m == f"{embed}.weight"), None)
            if source is None:
                raise FormatError(f"verify: the checkpoint has no {embed}.weight for the tied LM head")
            self.exprs["lm_head.weight"] = self.exprs[source]
            self.module_of["lm_head.weight"] = "lm_head.weight"
        # each checkpoint tensor's unit: the one holding its parameter directly, else the one with
        # the longest prefix of its module name
        own = {u.prefix + leaf: u for u in parts if u.own for leaf in u.module._parameters}
        by_prefix = sorted((u for u in parts if not u.own), key=lambda u: -len(u.prefix))
        self.names: dict[Unit, list[str]] = {u: [] for u in parts}
        for n, m in self.module_of.items():
            unit = own.get(m) or next((u for u in by_prefix if m.startswith(u.prefix)), None)
            if unit is not None:
                self.names[unit].append(n)
        self.used: set[str] = set()

    def load(self, unit: Unit) -> None:
        from ckpt_ir.ir import expr as E

        names, prefix, module = self.names[unit], unit.prefix, unit.module
        self.used.update(names)
        tensors = {
            n: E.evaluate(self.exprs[n], self.reader).to(device=self.device, dtype=self.dtype) for n in names
        }
        state = {k[len(prefix) :]: v for k, v in convert_names(self.model, self.rules, tensors).items()}
        del tensors
        wanted = unit.wanted()
        want = set(wanted)
        wrapped = {PEFT_BASE.sub("", k): k for k in want}  # a PEFT wrapper holds the base one level down
        state = {wrapped.get(k, k): v for k, v in state.items()}
        have = set(module._parameters) if unit.own else set(module.state_dict())
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - have)
        if missing or unexpected:
            raise FormatError(
                f"verify: {prefix.rstrip('.') or 'the model'}: the checkpoint does not fill the transformers "
                f"module (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        bad = next((k for k, v in state.items() if k in wanted and v.shape != wanted[k].shape), None)
        if bad is not None:
            raise FormatError(
                f"verify: {prefix}{bad}: the checkpoint's is {list(state[bad].shape)} but transformers builds "
                f"{list(wanted[bad].shape)} from the config; write the config in transformers' keys for "
                f"{type(self.model).__name__}"
            )
        module.load_state_dict(state, strict=False, assign=True)

    @staticmethod
    def unload(module, own: bool = False) -> None:
        """Every parameter of ``module`` back to the meta device (``own``: only its own)."""
        import torch

        for path, sub in [("", module)] if own else module.named_modules():
            if is_adapter(path):  # PEFT adapter weights stay loaded (they are small)
                continue
            for leaf, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[leaf] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand the freed unit's heap pages back to the OS (glibc keeps blocks under its 32 MB mmap
    threshold, such as one projection's weight, in the heap), so resident memory falls back
    after every unit instead of staying at its high-water mark."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already uses (glibc)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def run_side(
    side, prompt, dtype, device, *, adapter: str | None = None, image: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Forward ``prompt`` (with ``image``: the model's image inputs, from :func:`image_inputs`)
    unit by unit through the model of ``side`` (from :func:`hf_side`); returns ({unit: output},
    unit names in order)."""
    import torch

    from ckpt_ir.families import by_name
    from ckpt_ir.ir import expr as E

    ckpt, exprs = side
    config = transformers_config(ckpt)
    model = build_model(config, dtype, device, adapter, image=image is not None)
    outputs: dict[str, Any] = {}
    order: list[str] = []
    handles = []
    parts = units(model)
    with E.Reader() as reader:
        mat = Materialiser(model, exprs, reader, dtype, device, ckpt.spec.tied_embeddings, parts)
        labels = unit_labels(model, mat, by_name(ckpt.spec.family), ckpt.spec)
        early = early_embedding(model, parts, mat)
        if early is not None:
            handles.append(early)
        for unit in parts:
            label = labels[unit]

            def pre(mod, _args, unit=unit):
                if not unit.own and not unit.wanted():  # loaded early (early_embedding)
                    return
                mat.load(unit)

            def post(mod, _args, out, unit=unit, label=label):
                if label != "lm_head" and not unit.own:  # its output is the logits (before any soft-capping)
                    h = out.to_tuple() if hasattr(out, "to_tuple") else out  # a ModelOutput
                    h = h[0] if isinstance(h, tuple) else h
                    name = label if label not in outputs else f"{label} (call {order.count(label) + 1})"
                    outputs[name] = h.detach().to("cpu", torch.float32)
                    order.append(name)
                mat.unload(mod, unit.own)

            handles += [unit.module.register_forward_pre_hook(pre), unit.module.register_forward_hook(post)]
        try:
            with torch.no_grad():
                logits = model(input_ids=prompt.to(device), use_cache=False, **to(image or {}, device)).logits
        finally:
            for h in handles:
                h.remove()
    outputs["logits"] = logits.detach().to("cpu", torch.float32)
    order.append("logits")
    family = by_name(ckpt.spec.family)
    unused = [
        n
        for n, _ in exprs
        if n not in mat.used
        and not _layer_at_least(n, model.base_model_prefix, ckpt.spec.num_layers)
        and not _canonical_layer_at_least(family, ckpt.spec, n)
    ]
    if unused:
        raise FormatError(
            f"verify: {ckpt.source}: tensor(s) {', '.join(unused[:3])} have no place in the transformers "
            f"model; verify cannot account for them"
        )
    return outputs, order


def early_embedding(model, parts: list[Unit], mat: Materialiser) -> Any:
    """A hook on the module holding the input embedding that materialises the embedding when that
    module is given token ids, before its forward runs: a module that reads the embedding's device
    for its ids (Llama 4's text model: ``input_ids.to(self.embed_tokens.weight.device)``) would
    otherwise move them to the meta device.  Returns the hook's handle (None: no such unit)."""
    embed = model.get_input_embeddings()
    unit = next((u for u in parts if u.module is embed and not u.own), None)
    if unit is None or "." not in unit.prefix.rstrip("."):
        return None
    owner = model.get_submodule(unit.prefix.rstrip(".").rpartition(".")[0])

    def load(mod, args, kwargs):
        if kwargs.get("input_ids", args[0] if args else None) is not None and unit.wanted():
            mat.load(unit)

    return owner.register_forward_pre_hook(load, with_kwargs=True)


def to(tensors: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in tensors.items()}


def _layer_at_least(name: str, base: str, first: int) -> bool:
    """Whether ``name`` belongs to a decoder layer numbered ``first`` or later (MTP layers)."""
    prefix = f"{base}.layers."
    return name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) >= first


def _canonical_layer_at_least(family, spec, name: str) -> bool:
    """Whether HF tensor ``name`` is canonically a language-model layer numbered ``num_layers`` or
    later (MTP layers the family keeps under names of their own: Qwen3.5's top-level ``mtp.*``)."""
    m = re.match(r"layers\.(\d+)\.", canonical_name(family, spec, name) or "")
    return m is not None and int(m[1]) >= spec.num_layers


def unit_labels(model, mat: Materialiser, family, spec) -> dict[Unit, str]:
    """Each unit's name in the report: a tower's units by their tensors' canonical names
    (``vision.layers.1``, ``vision.merger``), the language model's as before (``layer 3``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    base = next((n for n, m in model.named_modules() if m is decoder and n), model.base_model_prefix)
    if not any(u.prefix.startswith(f"{base}.layers.") for u in mat.names):
        # a decoder that get_decoder does not name (Llama 4's is its causal LM itself): the module
        # holding the input embedding
        embed = model.get_input_embeddings()
        base = next((n for n, m in model.named_modules() if m is embed), base).rpartition(".")[0] or base
    stacks = {t.stack for t in family.towers}
    out = {}
    for unit, names in mat.names.items():
        canon = [c for n in names if (c := canonical_name(family, spec, n)) is not None]
        if canon and len(canon) == len(names) and all(c.split(".", 1)[0] in stacks for c in canon):
            out[unit] = common_prefix(canon)
        else:
            out[unit] = unit_label(unit.prefix, base)
    return out


def canonical_name(family, spec, hf_name: str) -> str | None:
    """The canonical name of an HF tensor of ``family`` (a packed one's: its first part's)."""
    from ckpt_ir.ir.names import template_pattern

    key = family.table_key(hf_name, spec, False)
    canon = family.names.to_canonical(key)
    if canon is not None:
        return canon
    for p in family.packed:
        m = template_pattern(p.hf).match(key)
        if m:
            return p.parts[0].format(**m.groupdict())
    return None


def common_prefix(names: list[str]) -> str:
    """``vision.layers.1`` for the tensors of one vision layer; ``vision.patch_embed+pos_embed``
    for names that share only the stack."""
    parents = [n.rsplit(".", 1)[0].split(".") for n in names]
    common: list[str] = []
    for parts in zip(*parents):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(common) > 1:
        return ".".join(common)
    rest = sorted({p[len(common)] for p in parents if len(p) > len(common)})
    return ".".join(common) + "." + "+".join(rest)


def image_inputs(ckpt, config, text, size: tuple[int, int] | None) -> tuple[Any, dict[str, Any], str]:
    """The prompt ``text`` ([1, n] token ids) with one generated image in its middle, laid out as the
    family's :class:`~ckpt_ir.families.ImageInput` says its processor lays one out: (token ids, the
    model's image keywords, a description).  ``size``: the image's (height, width) in pixels
    (default: 2 x 3 merged patches, the smallest with rows and columns of different lengths; a tower
    of one size: that size)."""
    import torch

    from ckpt_ir.families import by_name

    family = by_name(ckpt.spec.family)
    tower = next((t for t in family.towers if t.stack == "vision"), None)
    how = tower.image if tower is not None else None
    if how is None:
        raise UsageError(
            f"verify: {ckpt.spec.family} is a vision-language model whose image inputs verify cannot build "
            f"yet (its Tower has no image); compare the tensors with `ckpt-ir diff`"
        )
    v = ckpt.spec.vision
    patch, channels = v.patch_size, v.patch_channels
    special = [getattr(config, how.image_token), *(getattr(config, k) for k in how.around or ())]
    gen = torch.Generator().manual_seed(0)
    if how.pixels == "image":
        side = _one_size(config.vision_config.image_size)
        if size is not None and size != (side, side):
            raise UsageError(
                f"--image-size: {ckpt.spec.family}'s tower takes {side}x{side} images only (its position "
                f"table), got {size[0]}x{size[1]}"
            )
        assert how.tokens is not None  # ImageInput: an "image" layout names its token count
        count = int(how.tokens(config) if callable(how.tokens) else getattr(config, how.tokens))
        image = {"pixel_values": torch.randn((1, channels, side, side), generator=gen)}
        what = f"{side}x{side} image, pixel_values [1, {channels}, {side}, {side}], {count} image tokens"
    else:
        merge = getattr(v, how.merge)
        unit = patch * merge
        h, w = size or (2 * unit, 3 * unit)
        if h % unit or w % unit or h <= 0 or w <= 0:
            raise UsageError(
                f"--image-size: {h}x{w} is not a whole number of {unit}x{unit}-pixel merged patches "
                f"({ckpt.spec.family}: patch {patch}, merge {merge})"
            )
        count = (h // unit) * (w // unit)
        if how.pixels == "sized":
            image = {
                "pixel_values": torch.randn((1, channels, h, w), generator=gen),
                "image_sizes": torch.tensor([[h, w]]),
            }
            what = f"{h}x{w} image, pixel_values [1, {channels}, {h}, {w}], {count} image tokens"
        else:
            frames = max(v.patch_temporal, 1)
            grid = (1, h // patch, w // patch)  # one frame, repeated over the temporal patch
            rows = grid[1] * grid[2]
            shape: tuple[int, ...] = (rows, channels * frames * patch * patch)
            if how.patch_rows == "chw":  # each patch as an image (Kimi's processor)
                shape = (rows, channels, patch, patch)
            image = {
                "pixel_values": torch.randn(shape, generator=gen),
                "image_grid_thw": torch.tensor([grid]),
            }
            what = (
                f"{h}x{w} image, pixel_values {list(shape)}, image_grid_thw {list(grid)}, "
                f"{count} image tokens"
            )
    if any(int(i) in special for i in text[0]):
        raise UsageError(
            f"--prompt-ids: the prompt holds an image token id ({', '.join(map(str, special))}); verify "
            f"places the image itself"
        )
    mid = text.shape[1] // 2
    start, end = ([special[1]], [special[2]]) if how.around else ([], [])
    ids = torch.tensor(
        [[*text[0, :mid].tolist(), *start, *[special[0]] * count, *end, *text[0, mid:].tolist()]]
    )
    if how.type_ids:
        image[how.type_ids] = (ids == special[0]).long()
    return ids, image, what


def _one_size(value: Any) -> int:
    """A vision config's image_size (an int, or [height, width] of a square) as one side."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UsageError(
                f"verify: the tower's image_size {list(value)} is not square; verify cannot build it"
            )
        value = value[0]
    return int(value)


def image_token_ids(ckpt, config) -> set[int]:
    """The ids the family's image input places (none where it has no tower or no image input)."""
    from ckpt_ir.families import by_name

    tower = next((t for t in by_name(ckpt.spec.family).towers if t.stack == "vision"), None)
    if tower is None or tower.image is None:
        return set()
    return {getattr(config, k) for k in (tower.image.image_token, *(tower.image.around or ()))}


def text_ids(vocab: int, tokens: int, avoid: set[int]) -> Any:
    """``tokens`` random ids (fixed seed) below ``vocab``; one in ``avoid`` (an image's ids) is
    replaced by the next id that is not."""
    import torch

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1234))
    for n, i in enumerate(ids[0].tolist()):
        while i in avoid:
            i = (i + 1) % vocab
        ids[0, n] = i
    return ids


def unit_label(prefix: str, base: str) -> str:
    p = prefix.rstrip(".")
    if p.startswith(f"{base}.layers."):
        return "layer " + p.rsplit(".", 1)[1]
    if p.endswith(".lm_head"):  # a language model's head inside a multi-module model (Llama 4's)
        return "lm_head"
    return {f"{base}.embed_tokens": "embeddings", f"{base}.norm": "final norm", "lm_head": "lm_head"}.get(
        p, p
    )


def verify(
    a: str,
    b: str,
    *,
    tokens: int = 16,
    prompt_ids: tuple[int, ...] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    atol: float | None = None,
    adapter: str | None = None,
    hf_config: dict | str | None = None,
    iteration: int | str | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run both checkpoints on the same prompt; the report says where they first diverge.
    ``iteration``: the one read from each Megatron side that is a save directory (default its
    latest).  A vision-language model also sees one generated image in the prompt's middle
    (``image_size``: its height and width in pixels), its tower compared unit by unit as well."""
    import torch

    from ckpt_ir.device import resolve_device
    from ckpt_ir.ir.dtypes import from_name, to_torch

    dev = resolve_device(device)
    if adapter is not None:
        from ckpt_ir.frontends import peft
        from ckpt_ir.io.hub import resolve

        adapter = resolve(adapter)
        if not peft.detect(adapter):
            raise UsageError(
                f"--lora-load {adapter}: verify applies PEFT adapters (a directory with "
                f"adapter_config.json); export a Megatron LoRA checkpoint with `ckpt-ir convert ... "
                f"--to peft` first"
            )
    side_a, side_b = hf_side(a, hf_config, iteration), hf_side(b, hf_config, iteration)
    ca, cb = side_a[0], side_b[0]
    if ca.spec.family != cb.spec.family:
        raise UsageError(
            f"verify: {a} is {ca.spec.family} but {b} is {cb.spec.family}; they cannot hold one model"
        )
    sa, sb = model_shape(ca.spec.summary()), model_shape(cb.spec.summary())
    differ = [k for k in sa if sa[k] != sb.get(k)]
    if differ:
        k = differ[0]
        raise UsageError(
            f"verify: {a} and {b} are different models ({k} {sa[k]} vs {sb[k]}); compare them with "
            f"`ckpt-ir diff`"
        )
    vocab = ca.spec.vocab_size
    if image_size is not None and len(image_size) != 2:
        raise UsageError(
            f"--image-size takes the height and width, H,W; got {','.join(map(str, image_size))}"
        )
    if image_size is not None and ca.spec.vision is None:
        raise UsageError(f"--image-size: {a} is {ca.spec.family}, which has no vision tower")
    config = transformers_config(ca) if ca.spec.vision is not None else None
    if prompt_ids:
        bad = [i for i in prompt_ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"--prompt-ids: {bad[0]} is outside the vocabulary [0, {vocab})")
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long)
    else:
        if tokens < 1:
            raise UsageError(f"--tokens must be at least 1, got {tokens}")
        avoid = image_token_ids(ca, config) if config is not None else set()
        prompt = text_ids(vocab, tokens, avoid)
    image, seen = None, None
    if config is not None:  # a vision-language model: the image goes in the prompt's middle
        prompt, image, seen = image_inputs(ca, config, prompt, image_size)
    compute = from_name(dtype) if dtype else (ca.spec.dtype if ca.spec.dtype == cb.spec.dtype else "F32")
    torch_dtype = to_torch(compute)
    same_math = ca.spec.dtype == cb.spec.dtype and adapter is None
    coarsest = max((ca.spec.dtype, cb.spec.dtype, compute), key=lambda d: EPS.get(d, 0.0))
    rtol = 0.0 if same_math else max(RTOL_EPS * EPS.get(coarsest, 2.0**-7), RTOL_FLOOR)
    out_a, order = run_side(side_a, prompt, torch_dtype, dev, image=image)
    del side_a
    out_b, _ = run_side(side_b, prompt, torch_dtype, dev, adapter=adapter, image=image)
    rows = []
    for label in order:
        x, y = out_a[label], out_b[label]
        if x.shape != y.shape:
            raise CkptIrError(f"verify: {label}: output shapes differ ({list(x.shape)} vs {list(y.shape)})")
        diff = float((x.double() - y.double()).abs().max())
        scale = float(max(x.abs().max(), y.abs().max()))
        tol = atol if atol is not None else rtol * max(scale, 1.0)
        rows.append(Row(label, diff, scale, tol))
    la, lb = out_a["logits"][0], out_b["logits"][0]
    agree = int((la.argmax(-1) == lb.argmax(-1)).sum())
    first_bad = next((r.name for r in rows if not r.ok), None)
    return {
        "a": a,
        "b": b,
        "family": ca.spec.family,
        "tokens": int(prompt.shape[1]),
        "image": seen,
        "compute_dtype": compute,
        "dtypes": [ca.spec.dtype, cb.spec.dtype],
        "tolerance": "atol"
        if atol is not None
        else (
            f"{rtol:.3g} x max|h| ({RTOL_EPS} x eps({coarsest}), at least {RTOL_FLOOR:g})"
            if rtol
            else "exact"
        ),
        "rows": [attrs.asdict(r) | {"ok": r.ok} for r in rows],
        "logits_max_abs_diff": rows[-1].max_abs_diff,
        "top1_agreement": agree,
        "first_divergent": first_bad,
        "ok": first_bad is None,
        "not_compared": not_compared(ca),
    }


def model_shape(summary: dict[str, Any]) -> dict[str, Any]:
    """A spec's summary without what two checkpoints of one model may differ in (the dtype, a
    merged adapter's rank and alpha), in its vision tower's summary too."""
    return {
        k: model_shape(v) if isinstance(v, dict) else v
        for k, v in summary.items()
        if k not in ("dtype", "lora_rank", "lora_alpha")
    }


def not_compared(ckpt) -> list[str]:
    """Weights the transformers model has no module for (DeepSeek's MTP layers)."""
    if ckpt.spec.mtp_layers:
        return [
            f"{ckpt.spec.mtp_layers} multi-token-prediction layer(s): transformers builds no module for them "
            f"(compare them with `ckpt-ir diff`)"
        ]
    return []


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"verify {r['a']} vs {r['b']}: {r['family']}, {r['tokens']} tokens, compute {r['compute_dtype']}, "
        f"tolerance {r['tolerance']}"
    ]
    if r.get("image"):
        lines.append(f"  with a generated {r['image']}")
    width = max(len(x["name"]) for x in r["rows"])
    for x in r["rows"]:
        mark = "ok" if x["ok"] else "DIVERGES"
        lines.append(
            f"  {x['name']:<{width}}  max|diff| {x['max_abs_diff']:.6g}  (max|h| {x['scale']:.4g}, "
            f"tol {x['tolerance']:.3g})  {mark}"
        )
    lines.append(
        f"logits max|diff| {r['logits_max_abs_diff']:.6g}, top-1 agreement {r['top1_agreement']}/{r['tokens']}"
    )
    for n in r["not_compared"]:
        lines.append(f"not compared: {n}")
    lines.append("OK: the outputs agree" if r["ok"] else f"DIVERGED: first at {r['first_divergent']}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    from ckpt_ir.commands.common import add_iteration_flag, int_list

    v = sub.add_parser(
        "verify",
        help="run two checkpoints of one model through transformers, layer by layer, and compare",
        description="Prove that A and B (any formats and layouts) hold the same "
        "model: the transformers model runs on a fixed prompt with one layer's weights in memory at "
        "a time; per-layer max |diff| of hidden states, logits max |diff| and top-1 agreement are "
        "reported. Exit 0 within the tolerance, 1 beyond it (the first divergent layer is named).",
    )
    v.add_argument("a", help="reference checkpoint directory (HF or Megatron) or Hub id org/name[@revision]")
    v.add_argument("b", help="checkpoint to check against it")
    v.add_argument(
        "--tokens", type=int, default=16, help="prompt length (default 16; random ids, fixed seed)"
    )
    v.add_argument(
        "--prompt-ids",
        type=int_list,
        default=None,
        metavar="IDS",
        help="the prompt as token ids, e.g. 1,2,3 (overrides --tokens)",
    )
    v.add_argument(
        "--dtype",
        help="compute in this dtype, e.g. fp32 (default: the checkpoints' dtype when they agree, else fp32)",
    )
    v.add_argument(
        "--device",
        default="cpu",
        help="where the forward runs: cpu (default), cuda[:N] or npu[:N] "
        "(npu needs pip install 'ckpt-ir[npu]')",
    )
    v.add_argument(
        "--atol",
        type=float,
        default=None,
        help="largest max |diff| accepted per layer (default: 0 when "
        f"both sides share a dtype and no adapter is applied, else {RTOL_EPS} x the coarsest dtype's "
        f"epsilon, at least {RTOL_FLOOR:g}, times the layer's max |value|)",
    )
    v.add_argument(
        "--lora-load",
        metavar="DIR",
        help="apply this PEFT adapter (directory or Hub id) to B at run time (peft), e.g. to "
        "check a merged A against BASE + adapter; every adapter convert --lora-load merges "
        "(LoRA, rsLoRA, rank/alpha patterns, DoRA, modules_to_save, expert LoRA)",
    )
    v.add_argument(
        "--hf-config", metavar="DIR", help="HF config.json for Megatron sides whose args carry none"
    )
    v.add_argument(
        "--image-size",
        type=int_list,
        default=None,
        metavar="H,W",
        help="a vision-language model's generated image, in pixels (default: 2 x 3 merged patches; a "
        "tower of one size, e.g. SigLIP's, takes only that size)",
    )
    v.add_argument("--json", action="store_true", help="machine-readable report")
    add_iteration_flag(v, "A or B")


def run(args) -> int:
    """The ``verify`` command."""
    import json
    import sys

    from ckpt_ir.io.hub import resolve

    hf_cfg = resolve(args.hf_config, weights=False) if args.hf_config else None  # a directory
    report = verify(
        args.a,
        args.b,
        tokens=args.tokens,
        prompt_ids=args.prompt_ids,
        dtype=args.dtype,
        device=args.device,
        atol=args.atol,
        adapter=args.lora_load,
        hf_config=hf_cfg,
        iteration=args.iteration,
        image_size=args.image_size,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return 0 if report["ok"] else 1
