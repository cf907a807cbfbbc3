"""Model families: one declarative table each, mapping HF tensor names and config keys onto the
canonical vocabulary.  Adding a family is adding one :class:`Family` entry to the table module of
its architecture (``dense``, ``moe``, ``mla``, ``hybrid``, ``remote_code``; the fragments they
share are in ``blocks``); both directions (HF -> canonical on read, canonical -> HF on write)
come from the same entry.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ckpt_ir.errors import FormatError, VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.names import NameTable, template_pattern
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec


@attrs.frozen
class Packed:
    """One HF tensor that stacks several canonical tensors along dim 0 (e.g. Phi-3 ``qkv_proj`` =
    [q; k; v]).  ``sizes`` names the ModelSpec properties giving each part's row count.
    ``groups`` names the ModelSpec property counting groups when the pack repeats per group
    (InternLM2's ``wqkv``: for each key/value head, its query heads, then k, then v); each part's
    rows are then split evenly over the groups."""

    hf: str
    parts: tuple[str, ...]
    sizes: tuple[str, ...]
    groups: str | None = None
    # the stack whose spec gives the sizes (a vision tower's packed qkv: ModelSpec.vision)
    stack: str | None = None

    def row_counts(self, spec: ModelSpec) -> tuple[int, ...]:
        spec = spec.stack_spec(self.stack)
        return tuple(getattr(spec, s) for s in self.sizes)

    def rule(self, spec: ModelSpec) -> Stack:
        """The packed tensor as a reversible stack of its parts (keyed by canonical template)."""
        if self.groups is None:
            return Stack.of(zip(self.parts, self.row_counts(spec)))
        g = getattr(spec.stack_spec(self.stack), self.groups)
        return Stack.interleaved(g, ((p, n // g) for p, n in zip(self.parts, self.row_counts(spec))))


@attrs.frozen
class ExpertStack:
    """One HF tensor holding a layer's experts along dim 0; expert ``e`` of it holds ``parts``
    (canonical templates with ``{i}`` and ``{e}``) one after the other along its output dim or,
    ``interleaved``, alternating element by element (gpt-oss: gate = ``[..., 0::2]``, up =
    ``[..., 1::2]``).  ``transposed``: HF stores each expert's matrix as [in, out] (``x @ W``;
    gpt-oss ``mlp.experts.gate_up_proj`` [E, H, 2F], Llama 4's [E, H, 2F]), the parts then along
    its last dim; otherwise as the canonical [out, in], the parts along its rows (Granite MoE's
    ``input_linear`` [E, 2F, H] = per expert [gate; up]).  1-D tensors (biases) hold the parts
    along their one dim.

    Both directions are two :class:`Stack` rules (experts along dim 0, parts along one dim of a
    reshaped view), so reading and writing are each other's inverse.  ``split`` takes any
    expression of the stacked HF shape: a load of the tensor, or one computed from another
    storage of it (a dequantized MXFP4 block / scale pair)."""

    hf: str
    parts: tuple[str, ...]
    transposed: bool = False
    interleaved: bool = False

    def _by_rows(self, ndim: int) -> bool:
        """Whether each expert's parts are its rows: an [out, in] matrix (stacked ndim 3)."""
        by_rows = not self.transposed and ndim == 3
        assert not (by_rows and self.interleaved), "interleaved parts are columns of an [in, out] matrix"
        return by_rows

    def _parts_rule(self, width: int, dim: int = 1) -> Stack:
        n = width // len(self.parts)
        if self.interleaved:  # (rows * n, k): column j holds part j
            return Stack.of(((p, 1) for p in self.parts), dim=1)
        return Stack.of(((p, n) for p in self.parts), dim=dim)

    def split(self, stacked: E.Expr, spec: ModelSpec, where: str) -> list[dict[str, E.Expr]]:
        """Per expert, each part's canonical-form expression (keyed by part template)."""
        by_rows = self._by_rows(len(stacked.shape))
        k, width = len(self.parts), stacked.shape[1 if by_rows else -1]
        if stacked.shape[0] != spec.num_experts or width % k:
            raise FormatError(
                f"{where}: shape {list(stacked.shape)} does not hold {spec.num_experts} experts of "
                f"{k} equal part(s) along the {'rows' if by_rows else 'last dim'}, as config.json implies"
            )
        experts = Stack.of((str(e), 1) for e in range(spec.num_experts)).split(stacked)
        if by_rows:  # expert e is [k * n, in]: its parts one after the other along the rows
            rule = self._parts_rule(width, dim=0)
            return [
                {
                    p: E.simplify(x)
                    for p, x in rule.split(E.Reshape(experts[str(e)], stacked.shape[1:])).items()
                }
                for e in range(spec.num_experts)
            ]
        lead, n = stacked.shape[1:-1], width // k
        rows = math.prod(lead)
        out = []
        for e in range(spec.num_experts):
            view = E.Reshape(experts[str(e)], (rows * n, k) if self.interleaved else (rows, width))
            parts = {}
            for p, x in self._parts_rule(width).split(view).items():
                x = E.Reshape(x, (*lead, n))
                parts[p] = E.simplify(E.Transpose(x, 0, 1) if self.transposed and lead else x)
            out.append(parts)
        return out

    def fuse(self, experts: Sequence[Mapping[str, E.Expr]]) -> E.Expr:
        """The stacked HF tensor from each expert's canonical parts (the inverse of ``split``)."""
        blocks = []
        for parts in experts:
            first = next(iter(parts.values()))
            if self._by_rows(1 + len(first.shape)):
                fused = self._parts_rule(first.shape[0] * len(self.parts), dim=0).fuse(parts)
                blocks.append(E.Reshape(fused, (1, *fused.shape)))
                continue
            views = {}
            for p, x in parts.items():
                x = E.Transpose(x, 0, 1) if self.transposed and len(x.shape) > 1 else x
                lead, n = x.shape[:-1], x.shape[-1]
                views[p] = E.Reshape(
                    x, (math.prod(lead) * n, 1) if self.interleaved else (math.prod(lead), n)
                )
            width = n * len(self.parts)
            blocks.append(E.Reshape(self._parts_rule(width).fuse(views), (1, *lead, width)))
        stack = Stack.of((str(e), 1) for e in range(len(blocks)))
        return E.simplify(stack.fuse({str(e): b for e, b in enumerate(blocks)}))


@attrs.frozen
class Reshaped:
    """One HF tensor holding a canonical tensor's elements, in order, in another shape (ERNIE 4.5's
    router score bias ``mlp.moe_statics.e_score_correction_bias`` [1, E], canonical [E]).
    ``shape`` gives the HF shape for a ModelSpec; reading views the HF tensor in the canonical
    shape (the role's), writing views the canonical tensor in ``shape``."""

    hf: str
    canonical: str
    shape: Callable[[ModelSpec], tuple[int, ...]]


@attrs.frozen
class Joined:
    """One canonical tensor stored as several HF tensors side by side along ``dim`` (DeepSeek-V4's
    MTP ``e_proj`` and ``h_proj``, each [H, H]: the two halves of the columns of ``eh_proj``
    [H, 2H]; OLMo-Hybrid's ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``, the rows of one conv).
    ``parts``: the HF templates in order along ``dim``.  Read: the parts joined whatever their
    sizes (only their sum is checked, against the canonical shape); written: cut as torch.chunk
    cuts (:meth:`cut`), which is how transformers saves a tensor it joins on load (its
    ``Concatenate`` op reverses to ``Chunk``), so a checkpoint transformers saved comes back
    byte-identical."""

    canonical: str
    parts: tuple[str, ...]
    dim: int = 1

    def cut(self, size: int, name: str) -> list[tuple[int, int]]:
        """Each part's [start, end) along ``dim`` of ``size``: torch.chunk's pieces, ceil(size / k)
        each and the rest last; equal halves of an even size.  A size torch.chunk cuts into fewer
        pieces than there are parts is a VerifyError naming ``name``."""
        k = len(self.parts)
        step = -(-size // k)
        bounds = [(min(n * step, size), min((n + 1) * step, size)) for n in range(k)]
        if any(a >= b for a, b in bounds):
            raise VerifyError(
                f"{name}: {size} rows do not cut into {k} non-empty chunks as transformers saves "
                f"{', '.join(self.parts)}; the HF layout cannot hold this size"
            )
        return bounds


@attrs.frozen
class Swapped:
    """One HF tensor holding a canonical tensor's two halves along ``dim`` in the other order
    (MiMo's MTP ``input_proj`` [H, 2H] acts on [hidden; token embedding], Megatron's ``eh_proj``
    on [embedding; hidden]: Megatron-Bridge's mimo_bridge.py ``_swap_input_proj_halves``).
    Reading and writing swap the halves (the swap is its own inverse); an odd size is an error."""

    hf: str
    canonical: str
    dim: int = 1

    def swap(self, x: E.Expr, name: str) -> E.Expr:
        n = x.shape[self.dim]
        if n % 2:
            raise FormatError(
                f"{name}: {n} columns along dim {self.dim} do not halve; the tensor is not {self.hf}"
            )
        return E.simplify(
            E.Concat((E.Slice(x, self.dim, n // 2, n), E.Slice(x, self.dim, 0, n // 2)), self.dim)
        )


@attrs.frozen
class HfNaming:
    """Another naming of a family's HF checkpoints besides its table's (``Family.tensors``), as
    (table's name, this naming's name) template pairs; a name no pair covers is the same in both.
    DeepSeek-V4: the release's names and the ones transformers saves (``model.`` prefixes, the
    attention's ``kv_norm`` as ``norm``).  Applied after ``Family.hf_rename`` on write, before it
    on read.  ``packed``: HF tensors of this naming only that pack canonical tensors (their
    ``hf`` in this naming's names; InternVL's remote code keeps the tower's ``attn.qkv`` =
    ``[q; k; v]`` where transformers' naming has q / k / v apart).  ``model_types``: configs of
    these types are in this naming (a source read without tensor names to tell, a MindSpeed-MM
    checkpoint, is written back in it)."""

    name: str
    renames: tuple[tuple[str, str], ...]
    packed: tuple[Packed, ...] = ()
    model_types: tuple[str, ...] = ()
    # the table's templates of expert stacks (:class:`ExpertStack` ``hf``) this naming stores with
    # each expert's two matrix dims swapped (Qwen3-VL-MoE's hub releases: ``gate_up_proj``
    # [Ex, T, 2Im] and ``down_proj`` [Ex, Im, T] where transformers 5.25 saves [Ex, 2Im, T] and
    # [Ex, T, Im]); a naming with such stacks is told from the table's by the shapes
    # (:meth:`Family.naming_of`), and read and written swapped back (:meth:`as_stored`)
    transposed: tuple[str, ...] = ()

    @property
    def table(self) -> NameTable:
        return NameTable(self.renames)  # "canonical" side: this naming's names

    def as_stored(self, table_key: str, x: E.Expr) -> E.Expr:
        """``x`` with dims 1 and 2 swapped when ``table_key`` is one of the ``transposed`` stacks
        (the swap is its own inverse: the table's form of a stored tensor and back)."""
        if any(p.match(table_key) for p in _patterns(self.transposed)):
            return E.simplify(E.Transpose(x, 1, 2))
        return x

    def to_table(self, key: str) -> str:
        return self.table.from_canonical(key) or key

    def from_table(self, key: str) -> str:
        return self.table.to_canonical(key) or key


@attrs.frozen
class SplitLayers:
    """HF layers that each hold several blocks (a mixer and an MLP: Bamba, Granite-4), split in the
    IR at Megatron-Core's hybrid granularity, one block per canonical layer: HF layer ``i``'s
    sub-layer ``j`` is canonical layer ``k*i + j`` (``k = len(parts)``), and ``parts[j]`` lists
    the HF names below ``prefix`` + ``i.`` that belong to sub-layer ``j`` (each block with the
    norm before it).  The family's tensor table then names tensors ``prefix{i}.`` with ``{i}``
    the canonical layer; :meth:`Family.table_key` renumbers both ways."""

    parts: tuple[tuple[str, ...], ...]
    prefix: str = "model.layers."

    def part_of(self, rest: str) -> int | None:
        """The sub-layer an HF name below the layer (``mamba.in_proj.weight``) belongs to."""
        return next((j for j, names in enumerate(self.parts) if rest.startswith(names)), None)

    def to_table(self, key: str) -> str:
        """HF key -> the table's key (canonical layer number); a key below no sub-layer stays."""
        layer, rest = _layer_of(self.prefix, key)
        j = None if layer is None else self.part_of(rest)
        if layer is None or j is None:
            return key
        return f"{self.prefix}{len(self.parts) * layer + j}.{rest}"

    def to_hf(self, key: str) -> str:
        """The table's key -> the HF key; a tensor of the wrong sub-layer is an error."""
        layer, rest = _layer_of(self.prefix, key)
        if layer is None:
            return key
        k = len(self.parts)
        if self.part_of(rest) != layer % k:
            raise VerifyError(
                f"{key}: canonical layer {layer} is sub-layer {layer % k} of HF layer {layer // k}, which "
                f"holds {', '.join(self.parts[layer % k])}* only; the layer's blocks do not fit the HF layout"
            )
        return f"{self.prefix}{layer // k}.{rest}"


@attrs.frozen
class Renumbered:
    """HF tensors numbered by their place ``j`` in a list of a stack's layers rather than by layer
    (Qwen3-VL's DeepStack mergers: ``model.visual.deepstack_merger_list.{j}.*`` reads the output of
    vision layer ``deepstack_visual_indexes[j]``).  The family's table names them ``table`` (with
    ``{i}`` the layer) followed by the rest of the HF name; ``field`` is the ModelSpec field of
    ``stack`` (None: the language model) listing the layers in the HF order, so
    :meth:`Family.table_key` renumbers both ways given the spec."""

    hf: str
    table: str
    field: str
    stack: str | None = None

    def _layers(self, spec: ModelSpec) -> tuple[int, ...]:
        return tuple(getattr(spec.stack_spec(self.stack), self.field))

    def to_table(self, key: str, spec: ModelSpec) -> str:
        j, rest = _layer_of(self.hf, key)
        if j is None:
            return key
        layers = self._layers(spec)
        if j >= len(layers):
            raise FormatError(
                f"{key}: index {j} is past the {len(layers)} layer(s) the config lists for it "
                f"({self.field}); the checkpoint does not match its config.json"
            )
        return self.table.format(i=layers[j]) + rest

    def to_hf(self, key: str, spec: ModelSpec) -> str:
        head, _, tail = self.table.partition("{i}")
        m = re.match(re.escape(head) + r"(?P<i>\d+)" + re.escape(tail) + r"(?P<rest>.+)$", key)
        if m is None:
            return key
        layer, layers = int(m.group("i")), self._layers(spec)
        if layer not in layers:
            raise VerifyError(
                f"{key}: layer {layer} is not one of the layers {list(layers)} ({self.field}) that have it"
            )
        return f"{self.hf}{layers.index(layer)}.{m.group('rest')}"


def _layer_of(prefix: str, key: str) -> tuple[int | None, str]:
    if not key.startswith(prefix):
        return None, key
    num, _, rest = key[len(prefix) :].partition(".")
    return (int(num), rest) if num.isdigit() and rest else (None, key)


@attrs.frozen
class ConfigKey:
    """ModelSpec field <- HF config key, with a default when the key is absent (None: required).
    ``aliases``: other spellings of the key (read if the main one is absent; written back under
    whichever spelling the source config used).  ``null``: the spec value HF spells as null
    (DeepSeek-V2-Lite's ``q_lora_rank: null`` is rank 0, no q-LoRA)."""

    field: str
    hf: str | None
    default: Any = None
    aliases: tuple[str, ...] = ()
    null: Any = None

    def read(self, cfg: dict[str, Any]) -> Any:
        for k in (self.hf, *self.aliases):
            if k and cfg.get(k) is not None:
                return cfg[k]
        return None

    def write_key(self, cfg: dict[str, Any]) -> str | None:
        return next((k for k in (self.hf, *self.aliases) if k and k in cfg), self.hf)


@attrs.frozen
class MegatronTower:
    """A vision tower's keys in a Megatron-form naming (MindSpeed-MM's ``image_encoder.*``,
    Megatron-Bridge's ``vision_model.*``): its layers as a GPTModel layer's keys below ``layers``
    (norm names ``norm_names``; ``layer_keys``: (key below the layer, canonical name below the
    layer) rows that come before the GPT table's, for the tower's own modules or names), its other
    tensors by ``keys`` (key, canonical name), placed with the first pipeline place holding vision
    layers where their canonical name starts with one of ``first``, with the last one otherwise.
    ``listed``: (key with ``{j}``, canonical name below the layer) rows of tensors of the layers
    that the tower spec's field ``listed_by`` lists, ``j`` the layer's place in that list
    (Megatron-Bridge's ``deepstack_merger_list.{j}``), placed with their layer."""

    layers: str
    keys: tuple[tuple[str, str], ...]
    first: tuple[str, ...] = ("vision.patch_embed.",)
    layer_keys: tuple[tuple[str, str], ...] = ()
    norm_names: str = "local"
    listed: tuple[tuple[str, str], ...] = ()
    listed_by: str = ""
    # (key below the layer, canonical names below the layer): a key holding those tensors one
    # after the other along dim 0 ([a; b; c]: GLM-4.1V's self_attention.qkv, InternVL's
    # linear_qkv); over TP, rank r holds [a_r; b_r; c_r] (each part split by its role).  A tower
    # with packed keys is not fused (fuse-vision) for this layout
    packed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # keys below the layer held whole on every TP rank though their canonical tensors are split
    # over the tower's TP (GLM-4.1V's attention: plain nn.Linear beside a TP-split Megatron MLP)
    whole: tuple[str, ...] = ()
    # the modules (last part of a key's module path) that save an ``_extra_state`` object beside
    # their tensors in torch_dist (Transformer Engine's linears and norms in Megatron-Bridge's
    # tower); torch_dist stacks the keys below ``layers`` and below each ``listed`` list on a
    # leading axis, as a homogeneous TransformerBlock saves them
    extra_state: tuple[str, ...] = ()


@attrs.frozen
class Tower:
    """A stack of a multi-module model beside its language model (a vision tower), read from and
    written to the sub-config ``config_key`` of the HF config (``vision_config``) by ``config``
    (keys of that sub-config; ``constants``: what the family fixes), as the spec
    ``ModelSpec.<stack>``.  Its HF tensor names are rows of the family's ``tensors`` and
    ``packed`` tables (canonical names under ``<stack>.``)."""

    stack: str
    config_key: str
    config: tuple[ConfigKey, ...]
    constants: tuple[tuple[str, Any], ...] = ()
    # (Megatron-Bridge key, canonical name): tensors Megatron-Bridge keeps in a module of its own
    # rather than the tower's HF form (Gemma 3's projector), split over the language model's TP
    # as their role says; a config key derived by a callable sees the language model's settings
    # under LANGUAGE_MODEL
    bridge_keys: tuple[tuple[str, str], ...] = ()
    # MindSpeed-MM's names of the tower (its converter's), None where it has no layout for it
    mindspeed: MegatronTower | None = None
    # MindSpeed-MM's names of the tower in its "canonical" layout (--mm-keys mindspeed-canonical,
    # its converter's enable_canonical_hf_struct), None where it has none
    mindspeed_canonical: MegatronTower | None = None
    # Megatron-Bridge's names where it keeps the tower in Megatron's modules (Qwen3-VL's
    # vision_model.*: fused, split over the language model's TP, whole on pipeline stage 0); None:
    # it keeps transformers' module, the tower's HF names whole on every rank of stage 0
    bridge: MegatronTower | None = None
    # (HF prefix, Megatron-Bridge prefix): the tower's HF-form keys in Megatron-Bridge's files with
    # the one prefix replaced by the other (GLM-4.5V's model.visual.* is visual.* there); None: as in HF
    bridge_prefix: tuple[str, str] | None = None
    # the Megatron naming (Layout.mm_keys) a conversion from HF picks when none is asked:
    # "mindspeed" for a family Megatron-Bridge has no bridge for (InternVL)
    mm_keys: str = "bridge"
    # how ``ckpt-ir verify`` feeds the tower an image (None: it cannot yet, and says so)
    image: ImageInput | None = None


@attrs.frozen
class ImageInput:
    """How ``ckpt-ir verify`` gives a tower one generated image, laid out as the family's processor
    lays out a real one.  ``pixels`` "patches": ``pixel_values`` [patches, channels x frames x
    patch^2], one row per patch (``patch_rows`` "chw": [patches, channels, patch, patch], Kimi's),
    and ``image_grid_thw`` [[frames, rows, columns]] of patches (Qwen2-VL's image processor), one
    placeholder per ``merge``^2 patches; "image": ``pixel_values`` [1, channels, H, W] at the
    tower's one size (its vision_config's image_size), ``tokens`` placeholders per image; "sized":
    ``pixel_values`` [1, channels, H, W] of any whole number of ``merge`` x ``merge`` patches and
    ``image_sizes`` [[H, W]] (Pixtral's processor), one placeholder per merged patch.
    ``image_token``: the config attribute holding the placeholder's id; ``around``: the attributes
    of the ids just before and just after the placeholders; ``tokens``: a config attribute, or a
    callable of the transformers config, giving an "image" layout's placeholder count;
    ``type_ids``: the keyword of the mask that marks the image's positions with 1, which the model
    reads for its positions or its attention mask; ``merge``: the tower spec's field holding the
    side of the square of patches one placeholder stands for."""

    pixels: str
    image_token: str
    around: tuple[str, str] | None = None
    tokens: str | Callable[[Any], int] | None = None
    type_ids: str | None = None
    merge: str = "merger_size"
    patch_rows: str = "flat"

    def __attrs_post_init__(self) -> None:
        if self.pixels not in ("patches", "image", "sized") or (self.pixels == "image") != (
            self.tokens is not None
        ):
            raise ValueError(f"ImageInput: pixels {self.pixels!r} with tokens {self.tokens!r}")
        if self.patch_rows not in ("flat", "chw"):
            raise ValueError(f"ImageInput: patch_rows {self.patch_rows!r}")


# keys transformers reads from a multi-module model's top-level config, not its text_config:
# PreTrainedModel ties the output layer to the embedding by self.config.tie_word_embeddings
# (modeling_utils.py:2494); Qwen3-VL-MoE's text_config says true by default, its top level false
TOP_LEVEL_KEYS = ("tie_word_embeddings",)

# where a tower's derived config keys find the language model's settings
LANGUAGE_MODEL = "(language model)"
# where a multi-module model's derived config keys find the top level of its config (the
# language model's keys are read from text_config over it): transformers ties the embeddings as
# the top level's tie_word_embeddings says (modeling_utils.py, PreTrainedModel's tie_weights)
TOP_LEVEL = "(top level)"


@attrs.frozen
class Tested:
    """What the test suite checks for a family, as ``ckpt-ir models`` reports it.  A layout is
    ``ckpt-ir convert`` flags (``--tp 2 --pp 2 --num-layer-list 1,3``; ``--tp 1`` and ``--pp 1``
    left out).  ``tests/test_support_matrix.py`` holds every claim to the test case that makes it,
    and fails on a claim no test makes or a test case no claim names.

    ``round_trip``: HF -> Megatron-Core at the layout -> HF is bit-exact (so transformers' logits
    are equal).  ``mcore_logits``: megatron-core's ``GPTModel`` loads ckpt-ir's rank files at the
    layout and gives transformers' logits; ``mcore_missing`` says why it cannot where it cannot.
    ``mindspeed``: (case of ``bench/peers/mindspeed_v2.py``, what its rank files showed against
    MindSpeed-LLM's own converter); a comparison run by hand, CI has no MindSpeed-LLM."""

    round_trip: tuple[str, ...] = ()
    mcore_logits: tuple[str, ...] = ()
    mcore_missing: str = ""
    mindspeed: tuple[tuple[str, str], ...] = ()


@attrs.frozen(kw_only=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str
    tensors: tuple[tuple[str, str], ...]
    packed: tuple[Packed, ...] = ()
    # HF tensors that stack a layer's experts (gpt-oss, Granite MoE, Llama 4)
    stacked: tuple[ExpertStack, ...] = ()
    # HF tensors stored in another shape than their canonical one (ERNIE 4.5's [1, E] score bias)
    reshaped: tuple[Reshaped, ...] = ()
    config: tuple[ConfigKey, ...] = ()
    # spec fields fixed by the family (e.g. qwen2 always has a qkv bias)
    constants: tuple[tuple[str, Any], ...] = ()
    # MindSpeed-LLM's --model-type-hf names for this family
    mindspeed_names: tuple[str, ...] = ()
    # extra Megatron args this family's semantics need (e.g. router options), from the HF config
    megatron_args: Any = None
    # (Megatron key template, canonical template): the family's own Megatron key for a role
    megatron_keys: tuple[tuple[str, str], ...] = ()
    # (block, keys): a model with that block in a layer takes ``keys`` instead of megatron_keys
    # (Megatron-Bridge names Gemma 4's norms otherwise in its MoE model than in its dense one)
    megatron_variants: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # (key, num_layers, to_hf) -> key: HF keys outside the model.layers numbering, renamed to the
    # table's keys on read (to_hf False) and back on write (Qwen3-Next's MTP layer under mtp.*)
    hf_rename: Any = None
    # HF layers of several blocks, one canonical (Megatron hybrid) layer per block (Bamba, Granite-4)
    split_layers: SplitLayers | None = None
    # HF name globs of tensors the family's transformers class creates in fp32 whatever dtype it
    # loads in (its _keep_in_fp32_modules* attributes are read from transformers itself)
    fp32_in_transformers: tuple[str, ...] = ()
    # HF name templates of weights stored [in, out] (GPT-2's Conv1D): read transposed to the
    # canonical [out, in], written back transposed; a packed one is unpacked after the transpose
    transposed: tuple[str, ...] = ()
    # HF tensors that together hold one canonical tensor (DeepSeek-V4's MTP e_proj / h_proj)
    joined: tuple[Joined, ...] = ()
    # HF tensors holding a canonical tensor's halves swapped (MiMo's MTP input_proj)
    swapped: tuple[Swapped, ...] = ()
    # other namings of the HF checkpoint than the table's; a checkpoint read in one is written in it
    namings: tuple[HfNaming, ...] = ()
    # a multi-module model (vision-language): the HF config key that nests the language model's
    # settings (a legacy config keeping them at its top level is read there too), and the stacks
    # beside the language model (the vision tower)
    text_config: str | None = None
    # other keys of that sub-config (InternVL's remote code: llm_config), read where present
    text_config_aliases: tuple[str, ...] = ()
    towers: tuple[Tower, ...] = ()
    # (on-disk prefix, in-memory prefix): the renames transformers applies on load (its
    # conversion_mapping.py), so a module's name in the model transformers builds, which peft's
    # adapters use (``model.language_model.layers.0.self_attn.q_proj``), differs from the name
    # the checkpoint stores (``model.layers.0.self_attn.q_proj``); see memory_name / disk_name
    memory: tuple[tuple[str, str], ...] = ()
    # why a PEFT adapter (named as the modules transformers builds) cannot be read or written for
    # this family: transformers renames on load what no prefix rename says (Kimi K2.5's tower,
    # norm0 -> norm1, fc0 -> fc1: conversion_mapping.py:734-760); None: ``memory`` says it all
    peft_refused: str | None = None
    # HF tensors numbered by their place in a list of layers (Qwen3-VL's DeepStack mergers)
    renumbered: tuple[Renumbered, ...] = ()
    # what the tests verify for this family (``ckpt-ir models`` shows it)
    tested: Tested = Tested()

    def __attrs_post_init__(self) -> None:
        if self.split_layers is not None:  # every layer tensor of the table is in one sub-layer
            prefix = self.split_layers.prefix + "{i}."
            hf = [h for h, _ in self.tensors] + [p.hf for p in self.packed] + [st.hf for st in self.stacked]
            stray = [
                h for h in hf if h.startswith(prefix) and self.split_layers.part_of(h[len(prefix) :]) is None
            ]
            if stray:
                raise ValueError(
                    f"family {self.name}: {stray[0]} is in no sub-layer of its split_layers table"
                )

    @property
    def names(self) -> NameTable:
        return NameTable(self.tensors)

    def naming_of(self, keys: Iterable[str], where: str, spec: ModelSpec | None = None) -> str | None:
        """Which of ``namings`` the HF tensor names ``keys`` are in (None: the table's own); a
        checkpoint mixing two is a FormatError naming one key of each.  A naming of expert stacks
        stored transposed (``HfNaming.transposed``) is told by the shapes: ``keys`` a mapping of
        names to tensors and ``spec`` given (:meth:`_orientation`)."""
        if spec is not None and isinstance(keys, Mapping):
            for naming in self.namings:
                if naming.transposed and self._orientation(naming, keys, spec, where):
                    return naming.name
        keys = list(keys)
        for naming in self.namings:
            table = naming.table
            theirs = next((k for k in keys if table.from_canonical(k) is not None), None)
            if theirs is None:
                continue
            ours = next((k for k in keys if table.to_canonical(k) is not None), None)
            if ours is not None:
                raise FormatError(
                    f"{where}: tensor names mix the {naming.name} naming ({theirs}) with the {self.name} "
                    f"table's own ({ours}); rename them to one naming"
                )
            return naming.name
        return None

    def _orientation(self, naming: HfNaming, tensors: Mapping[str, Any], spec: ModelSpec, where: str) -> bool:
        """Whether the expert stacks in ``tensors`` are stored as ``naming`` stores them (each
        expert's matrix [in, out]) rather than as the table does ([out, in]), from their shapes.
        Every stack votes unless its expert matrix is square in its stored dims (a ``gate_up_proj``
        with hidden = 2 x expert width, a ``down_proj`` with hidden = expert width: each decides
        the other's case); stacks voting both ways, or none voting, are a FormatError."""
        from ckpt_ir.ir.layout import Layout
        from ckpt_ir.ir.roles import expected_shape

        votes: dict[bool, str] = {}
        square = None
        for st in self.stacked:
            if st.hf not in naming.transposed:
                continue
            pat = template_pattern(st.hf)
            for key, x in tensors.items():
                m = pat.match(key)
                if m is None or len(x.shape) != 3:
                    continue
                part = expected_shape(spec, Layout(format="hf"), st.parts[0].format(e=0, **m.groupdict()))
                if part is None or len(part) != 2:
                    continue
                own = (len(st.parts) * part[0], part[1])
                if own == own[::-1]:
                    square = square or key
                elif tuple(x.shape[1:]) in (own, own[::-1]):
                    votes.setdefault(tuple(x.shape[1:]) != own, key)
        if len(votes) == 2:
            raise FormatError(
                f"{where}: expert tensors mix the {naming.name} orientation ({votes[True]}) with the "
                f"{self.name} table's ({votes[False]}); store every expert stack one way"
            )
        if not votes and square is not None:
            raise FormatError(
                f"{where}: expert tensor {square} is square in its last two dims, so its orientation "
                f"(transformers' [experts, out, in] or the {naming.name} one [experts, in, out]) does not "
                f"show, and no other expert stack tells it; include the layer's other expert tensors"
            )
        return votes.get(True) is not None

    def naming_of_config(self, cfg: dict[str, Any] | None) -> HfNaming | None:
        """The naming a config's ``model_type`` implies (``HfNaming.model_types``), else None."""
        mt = (cfg or {}).get("model_type")
        return next((n for n in self.namings if mt in n.model_types), None)

    def packs(self, naming: HfNaming | None) -> tuple[Packed, ...]:
        """The packed HF tensors of the table and of ``naming``."""
        return self.packed + (naming.packed if naming else ())

    def naming(self, name: str | None) -> HfNaming | None:
        """The naming called ``name`` (None: the table's own)."""
        if name is None:
            return None
        for n in self.namings:
            if n.name == name:
                return n
        raise FormatError(
            f"the {self.name} family has no HF naming {name!r}; known: {[n.name for n in self.namings]}"
        )

    def table_key(self, key: str, spec: ModelSpec, to_hf: bool, naming: HfNaming | None = None) -> str:
        """An HF key as the family's table names it (``to_hf`` False), or back: a key in another
        ``naming`` than the table's renamed to the table's (DeepSeek-V4 as transformers saves it),
        keys outside the layer numbering (``hf_rename``, given the HF layer count), then layers of
        several blocks renumbered (:class:`SplitLayers`); writing does the same in reverse."""
        split = self.split_layers
        hf_layers = spec.num_layers // len(split.parts) if split else spec.num_layers
        if to_hf:
            key = split.to_hf(key) if split else key
            for r in self.renumbered:
                key = r.to_hf(key, spec)
            key = self.hf_rename(key, hf_layers, True) if self.hf_rename else key
            return naming.from_table(key) if naming else key
        key = naming.to_table(key) if naming else key
        key = self.hf_rename(key, hf_layers, False) if self.hf_rename else key
        for r in self.renumbered:
            key = r.to_table(key, spec)
        return split.to_table(key) if split else key

    def hf_form(
        self, spec: ModelSpec, names: Iterable[str]
    ) -> list[tuple[str, tuple[str, ...], Stack | None]]:
        """The HF tensors holding canonical tensors ``names`` (of the family's ``tensors`` and
        ``packed`` tables): (HF name, the canonical names it holds, the rule packing them, keyed
        by those names; None for a tensor of its own), in the order of ``names``.  A name no table
        row gives an HF name is a FormatError."""
        names = list(names)
        table = self.names
        out: list[tuple[str, tuple[str, ...], Stack | None]] = []
        done: set[str] = set()
        packs = [(p, template_pattern(p.parts[0])) for p in self.packed]
        for name in names:
            if name in done:
                continue
            hit = next(((p, m) for p, pat in packs if (m := pat.match(name))), None)
            if hit is not None:
                p, m = hit
                rule = p.rule(spec)
                parts = tuple(t.format(**m.groupdict()) for t in p.parts)
                pieces = tuple(attrs.evolve(pc, part=pc.part.format(**m.groupdict())) for pc in rule.pieces)
                out.append((p.hf.format(**m.groupdict()), parts, Stack(pieces, rule.dim)))
                done.update(parts)
                continue
            hf = table.from_canonical(name)
            if hf is None:
                raise FormatError(f"{name}: the {self.name} family has no HF name for this tensor")
            out.append((hf, (name,), None))
            done.add(name)
        return out

    def from_hf_form(self, spec: ModelSpec, raw: Mapping[str, E.Expr]) -> tuple[dict[str, E.Expr], list[str]]:
        """The inverse of :meth:`hf_form`: the canonical tensors of HF tensors ``raw`` (rows of the
        ``tensors`` table, or ``packed`` ones unpacked), and the HF names neither covers."""
        table, out, unknown = self.names, {}, []
        packs = [(p, template_pattern(p.hf)) for p in self.packed]
        for key, x in raw.items():
            canon = table.to_canonical(key)
            if canon is not None:
                out[canon] = x
                continue
            hit = next(((p, m) for p, pat in packs if (m := pat.match(key))), None)
            if hit is None:
                unknown.append(key)
                continue
            p, m = hit
            if x.shape[0] != sum(p.row_counts(spec)):
                raise FormatError(
                    f"{key}: {x.shape[0]} rows, but the config implies {sum(p.row_counts(spec))} "
                    f"({' + '.join(map(str, p.row_counts(spec)))})"
                )
            out.update((t.format(**m.groupdict()), e) for t, e in p.rule(spec).split(x).items())
        return out, unknown

    def memory_name(self, hf: str) -> str:
        """An HF name as the checkpoint stores it -> its name in the model transformers builds
        (``memory``; the longest matching prefix wins); names no rename covers stay."""
        hit = max((p for p in self.memory if hf.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        return hf if hit is None else hit[1] + hf[len(hit[0]) :]

    def disk_name(self, name: str) -> str:
        """The inverse of :meth:`memory_name`: a module or tensor name of the model transformers
        builds (a peft adapter's) -> the checkpoint's; a name already in the stored form stays."""
        hit = max((p for p in self.memory if name.startswith(p[1])), key=lambda p: len(p[1]), default=None)
        return name if hit is None else hit[0] + name[len(hit[1]) :]

    def renames(self, naming: HfNaming | None = None) -> bool:
        """Whether :meth:`table_key` changes any key."""
        return (
            self.split_layers is not None
            or self.hf_rename is not None
            or naming is not None
            or bool(self.renumbered)
        )

    def as_stored(self, hf_name: str, x: E.Expr) -> E.Expr:
        """``x`` with its two axes swapped when the family stores HF tensor ``hf_name`` [in, out]
        (``transposed``): the canonical form of a stored tensor, and the stored form of a
        canonical one (the swap is its own inverse)."""
        if any(p.match(hf_name) for p in _patterns(self.transposed)):
            return E.simplify(E.Transpose(x, 0, 1))
        return x

    def spec_from_config(
        self, cfg: dict[str, Any], dtype_hint: str | None = None, where: str = "config.json"
    ) -> ModelSpec:
        from ckpt_ir.ir.dtypes import from_name

        values = self._read_keys(self.config, self.constants, self.text_view(cfg), where)
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        try:
            values["dtype"] = from_name(dtype) if isinstance(dtype, str) else (dtype_hint or "F32")
        except Exception:
            raise FormatError(f"{where}: unknown dtype {dtype!r}") from None
        values["extra"] = dict(cfg)
        for tower in self.towers:
            sub = cfg.get(tower.config_key)
            if not isinstance(sub, dict):
                raise FormatError(
                    f"{where}: no {tower.config_key!r} object, which the {self.name} family's "
                    f"{tower.stack} tower is read from"
                )
            tower_where = f"{where} ({tower.config_key})"
            view = {**sub, LANGUAGE_MODEL: self.text_view(cfg)}
            tower_values = self._read_keys(tower.config, tower.constants, view, tower_where)
            values[tower.stack] = ModelSpec(
                family=self.name,
                stack=tower.stack,
                vocab_size=0,
                dtype=values["dtype"],
                extra=dict(sub),
                **tower_values,
            )
        if (
            values.get("num_experts")
            and "moe_ffn_hidden_size" in values
            and values["moe_ffn_hidden_size"] is None
        ):
            values["moe_ffn_hidden_size"] = values["ffn_hidden_size"]
        return ModelSpec(family=self.name, **values)

    def text_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The config the language model's keys are read from: the top level, with the nested
        ``text_config`` (a multi-module model's) over it."""
        key = self.text_key(cfg)
        text = cfg.get(key) if key else None
        if not isinstance(text, dict):
            return cfg
        return {**cfg, **text, **{k: cfg[k] for k in TOP_LEVEL_KEYS if k in cfg}, TOP_LEVEL: cfg}

    def text_key(self, cfg: dict[str, Any]) -> str | None:
        """The key of ``cfg`` nesting the language model's settings: ``text_config``, or the
        first of its aliases ``cfg`` holds as an object."""
        for key in (self.text_config, *self.text_config_aliases):
            if key and isinstance(cfg.get(key), dict):
                return key
        return self.text_config

    def _read_keys(
        self,
        keys: tuple[ConfigKey, ...],
        constants: tuple[tuple[str, Any], ...],
        cfg: dict[str, Any],
        where: str,
    ) -> dict[str, Any]:
        values: dict[str, Any] = dict(constants)
        for key in keys:
            if key.field in values:
                continue
            raw = key.read(cfg)
            if raw is None and callable(key.default):
                try:
                    raw = key.default(cfg)
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                    raise FormatError(
                        f"{where}: cannot derive {key.field} ({type(e).__name__}: {e}); "
                        f"check the config values"
                    ) from None
            elif raw is None:
                raw = key.default
            if raw is None:
                raise FormatError(f"{where}: missing {key.hf!r}, required for the {self.name} family")
            values[key.field] = _checked(key, raw, where)
        return values

    def config_from_spec(self, spec: ModelSpec, base: dict[str, Any] | None) -> dict[str, Any]:
        """An HF config for ``spec``: ``base`` (the source's own config) updated, or built afresh.
        A multi-module model's language-model keys go where the config keeps them (its nested
        ``text_config``, or the top level), each tower's into its own sub-config."""
        from ckpt_ir.ir.dtypes import hf_config_name

        cfg = dict(base if base is not None else spec.extra)
        cfg.setdefault("architectures", [self.architecture])
        cfg["model_type"] = (
            cfg.get("model_type") if cfg.get("model_type") in self.model_types else self.model_types[0]
        )
        key_of_text = self.text_key(cfg)
        nested = key_of_text is not None and isinstance(cfg.get(key_of_text), dict)
        text = dict(cfg[key_of_text]) if key_of_text is not None and nested else cfg
        dtype = hf_config_name(spec.dtype)
        for key in self.config:
            name = key.write_key({**cfg, **text})
            if name:
                top = name in cfg and (name not in text or name in TOP_LEVEL_KEYS)
                _write_key(cfg if top else text, name, key, spec)
        subs = [text] if nested else []
        for tower in self.towers:
            sub = dict(cfg.get(tower.config_key) or {})
            tower_spec = spec.stack_spec(tower.stack)
            for key in tower.config:
                name = key.write_key(sub)
                if name:
                    _write_key(sub, name, key, tower_spec)
            cfg[tower.config_key] = sub
            subs.append(sub)
        if key_of_text is not None and nested:
            cfg[key_of_text] = text
        cfg["dtype" if "torch_dtype" not in cfg else "torch_dtype"] = dtype
        for sub in subs:  # transformers 5 writes the dtype into each sub-config too
            for k in ("dtype", "torch_dtype"):
                if k in sub:
                    sub[k] = dtype
        return cfg


def _write_key(cfg: dict[str, Any], name: str, key: ConfigKey, spec: ModelSpec) -> None:
    value = getattr(spec, key.field)
    cfg[name] = (
        None
        if key.null is not None and value == key.null
        else list(value)
        if isinstance(value, tuple)
        else value
    )


# ModelSpec fields that must be positive integers / non-negative integers / numbers / booleans
_POSITIVE = {
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
}
_COUNTS = {
    "num_experts",
    "moe_topk",
    "moe_ffn_hidden_size",
    "shared_ffn_hidden_size",
    "zero_experts",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_dim",
    "qk_rope_dim",
    "v_head_dim",
    "mtp_layers",
    "index_heads",
    "index_head_dim",
    "linear_k_heads",
    "linear_v_heads",
    "linear_k_dim",
    "linear_v_dim",
    "linear_conv_kernel",
    "position_embeddings",
    "mamba_heads",
    "mamba_head_dim",
    "mamba_state",
    "mamba_groups",
    "mamba_conv_kernel",
    "short_conv_kernel",
    "kda_heads",
    "kda_head_dim",
    "kda_conv_kernel",
    "mamba1_inner",
    "mamba1_state",
    "mamba1_dt_rank",
    "mamba1_conv_kernel",
    "mqa_o_groups",
    "mqa_o_rank",
    "hc_mult",
    "global_head_dim",
    "global_kv_heads",
    "window_heads",
    "window_kv_heads",
    "window_head_dim",
    "ple_dim",
    "ple_vocab",
    "patch_size",
    "patch_temporal",
    "patch_channels",
    "merger_size",
    "merger_out",
    "patch_merger_size",
    "adapter_in",
    "adapter_hidden",
    "adapter_out",
    "projector_mlp_layers",
    "projector_mlp_in",
    "projector_mlp_out",
    "downsample_size",
    "merger_ffn",
    "cls_positions",
    "shuffle_size",
    "shuffle_out",
}


_LIMIT = 1 << 24  # far above any real model's sizes or counts; guards against absurd values


def _checked(key: ConfigKey, raw: Any, where: str) -> Any:
    """Reject config values of the wrong type with a message naming the file and the key."""
    name = key.hf or key.field
    if key.field in _POSITIVE or key.field in _COUNTS:
        low = 1 if key.field in _POSITIVE else 0
        if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= _LIMIT:
            kind = "a positive" if key.field in _POSITIVE else "a non-negative"
            raise FormatError(f"{where}: {name!r} must be {kind} integer up to {_LIMIT}, got {raw!r}")
    elif key.field == "norm_eps":
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or raw <= 0:
            raise FormatError(f"{where}: {name!r} must be a positive number, got {raw!r}")
    elif key.field in ("tied_embeddings", "qkv_bias") and not isinstance(raw, bool):
        raise FormatError(f"{where}: {name!r} must be true or false, got {raw!r}")
    elif key.field in (
        "dense_layers",
        "shared_index_layers",
        "linear_layers",
        "deepstack_layers",
    ) and not all(isinstance(i, int) for i in raw):
        raise FormatError(f"{where}: layer lists must hold integers, got {raw!r}")
    return raw


@functools.cache
def _patterns(templates: tuple[str, ...]) -> list[re.Pattern[str]]:
    return [template_pattern(t) for t in templates]


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to every frontend and backend (call it from the family's table
    module; a plugin package's module is imported by ``--plugin`` or its entry point).  The
    built-in families are registered first, so a plugin's come after them whatever it imports
    (a built-in table module registers its own alone: importing one directly loads no other)."""
    if not sys._getframe(1).f_globals.get("__name__", "").startswith(__name__ + "."):
        _load_builtin()
    _REGISTRY[family.name] = family
    return family


def all_families() -> list[Family]:
    """Every family in registration order, those without an HF form (``megatron``) last."""
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda f: not f.model_types)


def by_name(name: str) -> Family:
    if (
        name in _REGISTRY
    ):  # a table module asking for one it imported (loading the rest mid-import would cycle)
        return _REGISTRY[name]
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for fam in _REGISTRY.values():
        if name in fam.model_types or name in fam.mindspeed_names:
            return fam
    raise FormatError(f"unknown model family {name!r}; supported: {', '.join(sorted(_REGISTRY))}")


def for_hf_config(cfg: dict[str, Any], where: str) -> Family:
    _load_builtin()
    mt = cfg.get("model_type")
    for fam in _REGISTRY.values():
        if mt in fam.model_types:
            return fam
    archs = cfg.get("architectures") or []
    for fam in _REGISTRY.values():
        if fam.architecture in archs:
            return fam
    supported = sorted({t for f in _REGISTRY.values() for t in f.model_types})
    raise FormatError(
        f"{where}: unsupported architecture (model_type={mt!r}, architectures={archs}); "
        f"supported model types: {', '.join(supported)}"
    )


_builtin_loaded = False


def _load_builtin() -> None:
    """Register the built-in families: every module of this package, in name order (a new table
    module needs no other edit); then any that installed packages declare under the
    ``ckpt_ir.families`` entry-point group (each entry point names a module that calls
    :func:`register`, or a :class:`Family`).  ``--plugin MODULE`` imports such a module directly."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    import pkgutil
    from importlib import import_module
    from importlib.metadata import entry_points

    for name in sorted({m.name for m in pkgutil.iter_modules(__path__)}):
        import_module(f"{__name__}.{name}")

    for ep in entry_points(group="ckpt_ir.families"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the tool
            import warnings

            warnings.warn(f"ckpt-ir: could not load model-family plugin {ep.name!r} ({e})", stacklevel=2)
            continue
        if isinstance(obj, Family) and obj.name not in _REGISTRY:
            register(obj)
