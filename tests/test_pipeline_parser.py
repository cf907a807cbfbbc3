"""Pipeline text: good pipelines parse and print back; bad ones point at the bad token."""

from __future__ import annotations

import attrs
import pytest

from ckpt_ir.errors import UsageError
from ckpt_ir.passes import Pass, option, parse_pipeline, register_pass
from ckpt_ir.passes.carry import RenameNorms
from ckpt_ir.passes.cast import CastPass
from ckpt_ir.passes.layers import DropMtp
from ckpt_ir.passes.lora import AttachLora, LoraMerge
from ckpt_ir.passes.parallel import InsertNoopLayers, Shard
from ckpt_ir.passes.vocab import PadVocab


@pytest.mark.parametrize(
    "text",
    [
        "gather",
        "gather,unfuse-qkv,unfuse-gate-up",
        "cast{dtype=bf16}",
        "cast{dtype=bf16 keep-norms=true},select-layers{keep=0,1,-1}",
        "fuse-qkv,fuse-gate-up,pad-vocab{size=256},insert-noop-layers{layers=3,5},shard{tp=2 pp=2 vpp-layers=2}",
        "shard{tp=2 pp=2 num-layer-list=1,3}",
        'attach-lora{path="my adapter"},lora-merge{targets=linear_qkv,linear_proj}',
        'attach-lora{path="a{b}c"},attach-lora{path="say \\"hi\\" \\\\ bye"},attach-lora{path=""}',
    ],
)
def test_round_trip(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert str(parse_pipeline(str(p))) == text


def test_whitespace_is_tolerated():
    assert str(parse_pipeline(" gather , cast{ dtype=fp16 } ")) == "gather,cast{dtype=fp16}"


def test_options_are_typed():
    (p,) = parse_pipeline("shard{tp=4 num-layer-list=2,6}")
    assert p.tp == 4 and p.num_layer_list == (2, 6) and p.pp == 1


@pytest.mark.parametrize(
    "text, column, fragment",
    [
        ("gathr", 1, "unknown pass 'gathr'"),
        ("gather,,cast{dtype=bf16}", 8, "expected a pass name"),
        ("gather,", 8, "expected a pass name"),
        ("cast{dtype}", 6, "expected key=value"),
        ("cast{size=3}", 6, "no option 'size'"),
        ("shard{tp=two}", 10, "expected int"),
        ("cast{dtype=bf16", 5, "unclosed"),
        ("gather unfuse-qkv", 8, "expected ','"),
        ("cast", 1, "option dtype is required"),
        ("select-layers{keep=a,b}", 20, "comma-separated list of integers"),
        ('attach-lora{path="my adapter}', 18, "unclosed '\"'"),
        ('attach-lora{path="my"adapter}', 22, "expected a space or '}' after a quoted value"),
        # values are checked where the pipeline is parsed, naming the pass, the option and what it takes
        ("gather,shard{tp=-2}", 17, "pass shard: option tp=-2: expected int >= 1"),
        ("shard{tp=2 ep=0}", 15, "pass shard: option ep=0: expected int >= 1"),
        (
            # 0 is a stage without layers (MindSpeed-MM's lists; the layout refuses it elsewhere)
            "shard{pp=2 num-layer-list=3,-1}",
            27,
            "option num-layer-list=3,-1: expected a comma-separated list of integers >= 0",
        ),
        (
            "cast{dtype=bogus}",
            12,
            "pass cast: option dtype='bogus': expected a floating dtype: bf16, fp16, fp32",
        ),
        ("cast{dtype=I32}", 12, "pass cast: option dtype='I32': expected a floating dtype"),
        ("dequantize{dtype=fp9}", 18, "pass dequantize: option dtype='fp9': expected a floating dtype"),
        (
            "rename-norms{names=TE}",
            20,
            "pass rename-norms: option names='TE': expected one of local, te, te-input",
        ),
        (
            "insert-noop-layers{layers=3,-1}",
            27,
            "option layers=3,-1: expected a comma-separated list of integers >= 0",
        ),
        ("drop-mtp{keep=-1}", 15, "pass drop-mtp: option keep=-1: expected int >= 0"),
        ("lora-merge{rank=0}", 17, "pass lora-merge: option rank=0: expected int >= 1"),
        ("pad-vocab{size=0}", 16, "pass pad-vocab: option size=0: expected int >= 1"),
        ("fuse-qkv,pad-vocab{tp=2}", 10, "pass pad-vocab: give option size= or divisible-by="),
    ],
)
def test_errors_point_at_the_bad_token(text, column, fragment):
    with pytest.raises(UsageError) as err:
        parse_pipeline(text)
    msg = str(err.value)
    assert fragment in msg
    assert f"column {column}" in msg
    caret_line = msg.splitlines()[-1]
    assert caret_line.index("^") - 2 == column - 1


def test_option_values_from_python_are_checked_when_the_pass_is_built():
    """The same checks as pipeline text, raised by the constructor (usage errors, exit 2)."""
    for build, message in (
        (lambda: Shard(tp=-2), "pass shard: option tp=-2: expected int >= 1"),
        (lambda: Shard(tp=2, etp=0), "pass shard: option etp=0: expected int >= 1"),
        (lambda: Shard(num_layer_list=[2, -1]), "pass shard: option num-layer-list=2,-1: expected"),
        (lambda: CastPass(dtype="bogus"), "pass cast: option dtype='bogus': expected a floating dtype"),
        (lambda: RenameNorms(names="TE"), "pass rename-norms: option names='TE': expected one of local, te"),
        (lambda: InsertNoopLayers(layers=(-1,)), "pass insert-noop-layers: option layers=-1: expected"),
        (lambda: DropMtp(keep=-1), "pass drop-mtp: option keep=-1: expected int >= 0"),
        (lambda: PadVocab(), "pass pad-vocab: give option size= or divisible-by="),
    ):
        with pytest.raises(UsageError) as err:
            build()
        assert str(err.value).startswith(message), str(err.value)
    # good values, widened where Python is loose (an int for a float, a list for a tuple)
    assert LoraMerge(alpha=32).alpha == 32.0 and isinstance(LoraMerge(alpha=32).alpha, float)
    assert Shard(pp=2, num_layer_list=[1, 3]).num_layer_list == (1, 3)
    assert (
        CastPass(dtype="bfloat16").dtype == "bfloat16" and RenameNorms(names="te-input").names == "te-input"
    )


def test_printed_values_are_quoted_where_pipeline_text_needs_it():
    """A value with a space, a brace or a quote prints in double quotes and parses back to it."""
    path = 'my {odd} "adapter" \\dir'
    p = AttachLora(path=path)
    assert str(p) == 'attach-lora{path="my {odd} \\"adapter\\" \\\\dir"}'
    (back,) = parse_pipeline(str(p))
    assert back == p and back.path == path
    assert str(AttachLora(path="/plain/dir,with,commas")) == "attach-lora{path=/plain/dir,with,commas}"


def test_parsed_pipeline_equals_the_one_its_text_parses_to():
    text = "cast{dtype=bf16 keep-norms=true},shard{tp=2 pp=2 num-layer-list=1,3 etp=1}"
    assert parse_pipeline(str(parse_pipeline(text))) == parse_pipeline(text)
    assert parse_pipeline(text) == [
        CastPass(dtype="bf16", keep_norms=True),
        Shard(tp=2, pp=2, num_layer_list=(1, 3), etp=1),
    ]


def test_a_pass_declares_options_as_attrs_fields():
    @attrs.frozen
    class Stride(Pass):
        name = "test-stride"
        summary = "a test pass"
        step: int = option(help="stride")
        offset: int | None = option(None, help="first index", name="from")

        def run(self, ckpt):
            return ckpt

    register_pass(Stride)
    (p,) = parse_pipeline("test-stride{step=2 from=1}")
    assert (p.step, p.offset, str(p)) == (2, 1, "test-stride{step=2 from=1}")
    assert [(o.name, o.type, o.required) for o in Stride.options()] == [
        ("step", int, True),
        ("from", int, False),
    ]
    with pytest.raises(UsageError, match="pass test-stride: option step is required"):
        parse_pipeline("test-stride")

    class OldStyle(Pass):  # the options tuple of earlier versions
        name = "test-old"
        options = ()

    with pytest.raises(TypeError, match="declare options as fields"):
        register_pass(OldStyle)

    class Undecorated(Pass):  # option fields without @attrs.frozen would be silently ignored
        name = "test-undecorated"
        step: int = option(help="stride")

    with pytest.raises(TypeError, match="needs @attrs.frozen"):
        register_pass(Undecorated)

    @attrs.frozen
    class BadType(Pass):
        name = "test-bad-type"
        ids: list[int] = option(help="a list")

    with pytest.raises(TypeError, match="option ids is list"):
        register_pass(BadType)
