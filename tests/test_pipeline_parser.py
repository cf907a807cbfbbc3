"""Pipeline text: good pipelines parse and print back; bad ones point at the bad token."""

from __future__ import annotations

import pytest

from ckpt_ir.errors import UsageError
from ckpt_ir.passes import parse_pipeline


@pytest.mark.parametrize(
    "text",
    [
        "gather",
        "gather,unfuse-qkv,unfuse-gate-up",
        "cast{dtype=bf16}",
        "cast{dtype=bf16 keep-norms=true},select-layers{keep=0,1,-1}",
        "fuse-qkv,fuse-gate-up,pad-vocab{size=256},insert-noop-layers{layers=3,5},shard{tp=2 pp=2 vpp-layers=2}",
        "shard{tp=2 pp=2 num-layer-list=1,3}",
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
    assert p.opt("tp") == 4 and p.opt("num-layer-list") == (2, 6) and p.opt("pp") == 1


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
