"""One conversion driver, every IR change a pass: what --print-pipeline shows is what runs, a user
pipeline is checked against the target flags, requirements and options are checked where a pass
is built or run, and reversible rules are written once."""

from __future__ import annotations

import os
import re
import textwrap

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir.api as ck
from ckpt_ir.errors import UsageError, VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.rules import Stack
from tests.cli_contract import ERROR_PREFIX, cli
from tests.conftest import files_of
from tests.test_lora import make_peft_adapter


def ok(*args):
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return r


def printed_pipeline(*args) -> str:
    r = ok(*args, "--print-pipeline")
    assert r.stdout.count("\n") == 1, r.stdout  # one line: paste it into --pipeline
    return r.stdout.strip()


def assert_pipeline_round_trips(tmp_path, src, *flags):
    """Converting with the derived pipeline and with its printed text (same flags) gives
    byte-identical files, and --print-pipeline wrote nothing."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    a, b = tmp_path / "derived", tmp_path / "pasted"
    text = printed_pipeline("convert", src, a, *flags)
    assert not a.exists()
    ok("convert", src, a, *flags)
    ok("convert", src, b, *flags, "--pipeline", text)
    fa, fb = files_of(str(a)), files_of(str(b))
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    return text


@pytest.fixture(scope="module")
def mcore_src(tmp_path_factory):
    from tests.conftest import build_hf

    root = tmp_path_factory.mktemp("driver")
    hf = build_hf(str(root / "hf"), "qwen2")
    mc = str(root / "mc")
    ok("convert", hf, mc, "--to", "mcore", "--tp", "2", "--pp", "2", "--make-vocab-size-divisible-by", "48")
    return hf, mc


def test_printed_pipeline_reproduces_hf_to_mcore(mcore_src, tmp_path):
    hf, _ = mcore_src
    text = assert_pipeline_round_trips(
        tmp_path,
        hf,
        "--to",
        "mcore",
        "--tp",
        "2",
        "--pp",
        "2",
        "--dtype",
        "bf16",
        "--norm-names",
        "te",
        "--noop-layers",
        "1,4",
    )
    assert text.endswith("rename-norms{names=te}") and "cast{dtype=bf16 keep-fp32=megatron}" in text


def test_printed_pipeline_reproduces_mcore_to_hf_and_reshard(mcore_src, tmp_path):
    _, mc = mcore_src
    text = assert_pipeline_round_trips(tmp_path / "hf", mc, "--to", "hf")
    assert text.split(",")[:2] == ["gather", "unpad-vocab"]
    text = assert_pipeline_round_trips(
        tmp_path / "mc", mc, "--to", "mcore", "--tp", "1", "--pp", "4", "--vpp-layers", "1"
    )
    assert "shard{pp=4 vpp-layers=1}" in text


def test_printed_pipeline_reproduces_lora_merges(hf_cache, tmp_path):
    base = hf_cache("llama", layers=2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "mc").mkdir()
    adapter = str(tmp_path / "adapter")
    make_peft_adapter(base, adapter)
    text = assert_pipeline_round_trips(tmp_path / "hf", base, "--to", "hf", "--lora-load", adapter)
    assert text == f"attach-lora{{path={adapter}}},lora-merge"
    text = assert_pipeline_round_trips(
        tmp_path / "mc", base, "--to", "mcore", "--tp", "2", "--lora-load", adapter
    )
    assert text.startswith(f"attach-lora{{path={adapter}}},lora-merge,fuse-qkv")


def test_derived_pipeline_quotes_a_lora_path_that_needs_it(hf_cache, tmp_path):
    """An adapter directory with a space and braces: the printed pipeline quotes it, and pasted
    into --pipeline it converts to the same bytes as the derived one."""
    base = hf_cache("llama", layers=2)
    adapter = str(tmp_path / "my {lora} adapter")
    make_peft_adapter(base, adapter)
    text = assert_pipeline_round_trips(tmp_path / "hf", base, "--to", "hf", "--lora-load", adapter)
    assert text == f'attach-lora{{path="{adapter}"}},lora-merge'
    src = ck.load(base)
    derived = ck.derive_pipeline(src, ck.Target(to="hf", lora_load=adapter))
    assert ck.parse_pipeline(text) == derived


def test_a_bad_option_value_is_a_usage_error_before_the_source_is_read(tmp_path):
    """The pipeline is parsed, and its option values checked, first: the source here does not
    even exist, and the error is the option's (exit 2), not the source's."""
    missing = tmp_path / "no-such-model"
    r = cli(
        "convert",
        missing,
        tmp_path / "o",
        "--to",
        "mcore",
        "--pipeline",
        "fuse-qkv,fuse-gate-up,shard{tp=-2}",
    )
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"{ERROR_PREFIX} pipeline: pass shard: option tp=-2: expected int >= 1 at column 32"
    assert lines[-1].endswith("^") and "no-such-model" not in r.stderr


@pytest.mark.parametrize(
    "pipeline, needs",
    [
        ("fuse-qkv", "separate q/k/v and gate/up tensors (from unfuse-qkv and unfuse-gate-up)"),
        ("pad-vocab{size=192}", "an unpadded vocabulary (from unpad-vocab)"),
        ("shard{pp=2}", "a gathered checkpoint (tp=1, pp=1, ep=1) (from gather)"),
    ],
)
def test_hf_target_checks_the_layout_a_user_pipeline_leaves(hf_cache, tmp_path, pipeline, needs):
    """--to hf needs whole, unfused, unpadded tensors: a user pipeline that leaves another layout is
    a usage error from the target check (exit 2) naming what is missing, before anything is written."""
    src = hf_cache("llama")
    r = cli("convert", src, tmp_path / "o", "--to", "hf", "--pipeline", pipeline)
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"{ERROR_PREFIX} the pipeline's output differs from the target: --to hf needs {needs}"
    )
    assert "but the pipeline gives mcore tp=1" in line and line.endswith(
        "(from hf) (add the passes to the pipeline, or leave those settings out)"
    )


def test_pipeline_that_disagrees_with_target_flags_is_a_usage_error(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = tmp_path / "o"
    r = cli(
        "convert",
        src,
        dst,
        "--to",
        "mcore",
        "--tp",
        "2",
        "--pp",
        "2",
        "--dtype",
        "bf16",
        "--norm-names",
        "te",
        "--pipeline",
        "fuse-qkv,fuse-gate-up",
    )
    assert r.returncode == 2 and not dst.exists()
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(ERROR_PREFIX)
    for field in ("--tp 2", "--pp 2", "--dtype bf16", "--norm-names te"):
        assert field in line, line
    # the same pipeline with the passes the flags ask for is accepted
    ok(
        "convert",
        src,
        dst,
        "--to",
        "mcore",
        "--tp",
        "2",
        "--pp",
        "2",
        "--pipeline",
        "fuse-qkv,fuse-gate-up,shard{tp=2 pp=2}",
    )


def test_print_ir_after_all_shows_every_step(hf_cache, tmp_path):
    src = hf_cache("llama")
    r = ok(
        "convert",
        src,
        tmp_path / "o",
        "--to",
        "mcore",
        "--tp",
        "2",
        "--norm-names",
        "te",
        "--print-ir-after-all",
    )
    steps = re.findall(r"^// ----- IR after (\S+) -----$", r.stdout, flags=re.M)
    assert steps == ["fuse-qkv", "fuse-gate-up", "shard{tp=2}", "rename-norms{names=te}"]
    last_layout = re.findall(r"^// layout: (.*)$", r.stdout, flags=re.M)[-1]
    written = re.findall(r"^// layout: (.*)$", ok("inspect", tmp_path / "o").stdout, flags=re.M)
    # the same layout, in memory (lifted from the HF source) and as written
    assert [last_layout] == ["mcore tp=2 pp=1 qkv=fused gate_up=fused norms=te (from hf)"]
    assert written == ["mcore tp=2 pp=1 qkv=fused gate_up=fused norms=te"]


def test_requirements_are_checked_before_a_pass_runs(hf_cache, tmp_path):
    src = hf_cache("llama")
    r = cli("convert", src, tmp_path / "o", "--to", "hf", "--pipeline", "fuse-qkv,shard{tp=2},unfuse-qkv")
    assert r.returncode == 1 and not (tmp_path / "o").exists()
    assert "pass unfuse-qkv: needs whole tensors (tp=1)" in r.stderr and "run gather before it" in r.stderr
    listing = ok("passes").stdout
    assert re.search(
        r"^unfuse-qkv\n(?:    .*\n)*?    requires:   whole tensors \(tp=1\) \(run gather first\)$",
        listing,
        flags=re.M,
    )


def test_options_are_typed_fields_checked_at_construction():
    from ckpt_ir.passes.cast import CastPass
    from ckpt_ir.passes.parallel import Shard

    with pytest.raises(UsageError, match="pass cast: option dtype=3: expected a floating dtype"):
        CastPass(dtype=3)
    with pytest.raises(UsageError, match="pass shard: option tp='2': expected int >= 1"):
        Shard(tp="2")
    with pytest.raises(TypeError, match="unexpected keyword argument 'tpp'"):
        Shard(tpp=2)
    p = Shard(tp=2, num_layer_list=[1, 3], pp=2)  # attribute spelling and a list for a tuple option
    assert (p.tp, p.num_layer_list, p.vpp_layers) == (2, (1, 3), None)
    assert str(p) == "shard{tp=2 pp=2 num-layer-list=1,3}"
    assert str(CastPass(dtype="bf16", keep_norms=True)) == "cast{dtype=bf16 keep-norms=true}"


def _with_fake_state(c):
    """A checkpoint carrying an optimizer-state set that mirrors the weights."""
    return attrs.evolve(c, states={"exp_avg": dict(c.tensors)})


def test_optimizer_state_follows_only_passes_that_say_so(hf_cache):
    src = _with_fake_state(ck.load(hf_cache("llama")))

    def scale_head(c):  # a plain function: a value-changing pass that says nothing
        t = c.tensors["lm_head.weight"]
        return c.with_tensors({**c.tensors, "lm_head.weight": t.map(lambda e: E.Scale(e, 2.0))})

    out = ck.run(src, [scale_head])
    assert (
        out.states == {} and "not carried through pass scale-head" in out.dropped["optimizer state exp_avg"]
    )
    moved = ck.run(src, "fuse-qkv,shard{tp=2}")
    assert moved.states["exp_avg"]["layers.0.attn.qkv.weight"].tp == 2
    derived = ck.derive_pipeline(src, ck.Target(to="hf"))
    assert str(derived) == "drop-optimizer-state"
    out = ck.run(src, derived)
    assert out.states == {} and "drop-optimizer-state" in out.dropped["optimizer state exp_avg"]
    with pytest.raises(UsageError, match="add drop-optimizer-state"):
        ck.plan(src, ck.Target(to="hf"))  # nothing is dropped behind the pipeline's back


def test_api_run_takes_text_instances_and_functions(hf_cache):
    from ckpt_ir.passes.cast import CastPass

    src = ck.load(hf_cache("llama"))
    a = ck.run(src, "cast{dtype=bf16},fuse-qkv")
    b = ck.run(src, [CastPass(dtype="bf16"), ck.parse_pipeline("fuse-qkv")[0]])
    assert a.tensors == b.tensors and a.layout == b.layout
    assert repr(a).startswith("<Checkpoint llama mcore tp=1 pp=1 qkv=fused") and len(repr(a)) < 200
    text = str(a)
    assert text.startswith("// source: ") and "layers.0.attn.qkv.weight" in text
    assert (
        str(a.tensors["embed.weight"].expr)
        == "cast(model.safetensors:model.embed_tokens.weight, BF16)  128x64 BF16"
    )


def test_api_run_takes_a_list_of_pipeline_texts_pass_instances_and_functions(hf_cache):
    from ckpt_ir.passes.cast import CastPass

    src = ck.load(hf_cache("llama"))
    want = ck.run(src, "cast{dtype=bf16},fuse-qkv,fuse-gate-up")
    for pipeline in (
        ["cast{dtype=bf16}", "fuse-qkv,fuse-gate-up"],
        [CastPass(dtype="bf16"), "fuse-qkv", lambda c: ck.run(c, "fuse-gate-up")],
    ):
        got = ck.run(src, pipeline)
        assert got.tensors == want.tensors and got.layout == want.layout
    with pytest.raises(TypeError, match="pipeline step 3: expected pipeline text, a Pass or a Checkpoint"):
        ck.run(src, ["gather", 3])


def test_public_errors_are_importable_from_the_package():
    import ckpt_ir

    assert ckpt_ir.VerifyError is VerifyError and issubclass(ckpt_ir.CoverageError, ckpt_ir.CkptIrError)


# --------------------------------------------------------------------------------------------
# reversible rules: one value, both directions


def _stored(tmp_path, tensors: dict[str, torch.Tensor]) -> dict[str, E.Load]:
    path = tmp_path / "blob.bin"
    loads, blob, off = {}, b"", 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        loads[name] = E.Load(str(path), name, tuple(t.shape), "F32", off)
        blob += data
        off += len(data)
    path.write_bytes(blob)
    return loads


def _ev(e):
    with E.Reader() as r:
        return E.evaluate(e, r)


stack_cases = st.one_of(
    st.builds(
        lambda sizes, dim, cols: ("plain", [(f"p{i}", n) for i, n in enumerate(sizes)], 1, dim, cols),
        st.lists(st.integers(1, 5), min_size=1, max_size=4),
        st.integers(0, 1),
        st.integers(1, 4),
    ),
    st.builds(
        lambda sizes, groups, dim, cols: (
            "interleaved",
            [(f"p{i}", n) for i, n in enumerate(sizes)],
            groups,
            dim,
            cols,
        ),
        st.lists(st.integers(1, 3), min_size=1, max_size=3),
        st.integers(1, 4),
        st.integers(0, 1),
        st.integers(1, 3),
    ),
)


@settings(max_examples=60, deadline=None)
@given(case=stack_cases, seed=st.integers(0, 2**16))
def test_split_of_fuse_and_fuse_of_split_are_identities(tmp_path_factory, case, seed):
    kind, parts, groups, dim, cols = case
    rule = Stack.of(parts, dim) if kind == "plain" else Stack.interleaved(groups, parts, dim)
    g = torch.Generator().manual_seed(seed)

    def shaped(n):
        return (n, cols) if dim == 0 else (cols, n)

    sizes = rule.sizes()
    tmp = tmp_path_factory.mktemp("stack")
    values = {p: torch.randn(shaped(n), generator=g) for p, n in sizes.items()}
    fused_value = torch.randn(shaped(rule.size), generator=g)
    loads = _stored(tmp, {**values, "fused": fused_value})
    fused = rule.fuse({p: loads[p] for p in sizes})
    back = rule.split(fused)
    for p in sizes:
        assert torch.equal(_ev(back[p]), values[p])
        if dim == 0:  # row ranges: the simplifier folds split(fuse(x)) back to the load itself
            assert back[p] == loads[p]
    again = rule.fuse(rule.split(loads["fused"]))
    assert torch.equal(_ev(again), fused_value)
    assert dim != 0 or again == loads["fused"]


def test_megatron_qkv_rule_matches_the_documented_interleave():
    """Per query group g: its heads_per_group query heads, then key head g, then value head g."""
    from ckpt_ir.ir.rules import qkv_rule
    from ckpt_ir.ir.spec import ModelSpec

    s = ModelSpec(
        family="llama",
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        vocab_size=8,
    )
    order = [(p.part, p.start, p.size) for p in qkv_rule(s).pieces]
    assert order == [("q", 0, 4), ("k", 0, 2), ("v", 0, 2), ("q", 4, 4), ("k", 2, 2), ("v", 2, 2)]


# --------------------------------------------------------------------------------------------
# plugins from a package outside ckpt_ir


def _plugin_dir(tmp_path, module: str, code: str) -> str:
    d = tmp_path / "plugins"
    d.mkdir(exist_ok=True)
    (d / f"{module}.py").write_text(textwrap.dedent(code))
    return str(d)


def test_convert_ckpt_and_passes_load_plugins(hf_cache, tmp_path, monkeypatch):
    from tests.test_docs import code_blocks

    pass_code = code_blocks("writing-a-pass.md")[0]
    monkeypatch.setenv(
        "PYTHONPATH",
        _plugin_dir(tmp_path, "my_passes", pass_code) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    listing = ok("passes", "--plugin", "my_passes").stdout
    assert "scale-tensors\n    Multiply tensors" in listing and "optimizer state: drop" in listing
    src = hf_cache("llama")
    out = tmp_path / "mg"
    tail = "fuse-qkv,fuse-gate-up,shard{tp=2}"
    assert printed_pipeline("convert", src, tmp_path / "x", "--to", "mcore", "--tp", "2") == tail
    ok(
        "convert-ckpt",
        "--load-dir",
        src,
        "--save-dir",
        out,
        "--target-tensor-parallel-size",
        "2",
        "--plugin",
        "my_passes",
        "--pipeline",
        "scale-tensors{pattern=lm_head.weight factor=0.5}," + tail,
    )
    back = tmp_path / "back"
    ok("convert", out, back, "--to", "hf")
    from safetensors.torch import load_file

    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(str(back / "model.safetensors"))
    assert torch.equal(b["lm_head.weight"], a["lm_head.weight"] * 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "lm_head.weight")


def test_adding_a_family_example_runs_from_a_plugin_package(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.test_docs import code_blocks

    family_code = code_blocks("adding-a-family.md")[0]
    monkeypatch.setenv(
        "PYTHONPATH",
        _plugin_dir(tmp_path, "my_families", family_code) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cfg = AutoConfig.for_model(
        "helium",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # Helium's o_proj is [hidden, hidden]: heads x head_dim must be hidden
        num_hidden_layers=4,
        vocab_size=128,
        attention_bias=True,
        mlp_bias=True,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    hf = str(tmp_path / "helium")
    model.save_pretrained(hf)
    assert "helium" not in ok("models").stdout and "helium" in ok("models", "--plugin", "my_families").stdout
    r = cli("convert", hf, tmp_path / "x", "--to", "mcore")
    assert r.returncode == 1 and "model_type='helium'" in r.stderr  # unknown without the plugin
    mc, back = tmp_path / "mc", tmp_path / "back"
    ok("convert", hf, mc, "--to", "mcore", "--tp", "2", "--pp", "2", "--plugin", "my_families")
    args = torch.load(mc / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)[
        "args"
    ]
    assert (args.rotary_interleaved, args.kv_channels, args.add_qkv_bias, args.add_bias_linear) == (
        True,
        16,
        True,
        True,
    )
    ok("convert", mc, back, "--to", "hf", "--plugin", "my_families")
    assert ok("diff", hf, back, "--plugin", "my_families").returncode == 0
    reloaded = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32)
    assert reloaded.config.rms_norm_eps == 1e-8 and reloaded.config.mlp_bias is True
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_a_table_module_added_to_the_families_package_is_registered_in_name_order(tmp_path):
    """Built-in family modules are found, not listed: a module added to the families package (here
    on a second path of the package, so the source tree is not touched) is registered with no other
    edit; families are listed module by module in name order, then a plugin's (registered before
    any lookup, importing nothing else), the args-only ``megatron`` last; a plugin's family with a
    built-in's name replaces it."""
    import subprocess
    import sys

    package, plugins = tmp_path / "families", tmp_path / "plugins"
    for d, module in ((package, "aaa_first"), (package, "zzz_last"), (plugins, "my_plugin")):
        d.mkdir(exist_ok=True)
        (d / f"{module}.py").write_text(
            "from ckpt_ir.families import Family, register\n"
            f"register(Family(name='{module}', model_types=('{module}_type',), "
            f"architecture='{module}Arch', tensors=()))\n"
        )
    with open(plugins / "my_plugin.py", "a") as fh:  # and a replacement for a built-in family
        fh.write("register(Family(name='llama', model_types=('llama',), architecture='Mine', tensors=()))\n")
    code = (
        "import sys\n"
        "import ckpt_ir.families as families\n"
        "families.__path__.append(sys.argv[1])\n"
        "sys.path.append(sys.argv[2])\n"
        "import my_plugin\n"
        "print(families.for_hf_config({'model_type': 'zzz_last_type'}, 'config.json').name)\n"
        "print(families.for_hf_config({'model_type': 'llama'}, 'config.json').architecture)\n"
        "print(' '.join(f.name for f in families.all_families()))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(package), str(plugins)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    found, llama, listed = r.stdout.splitlines()
    names = listed.split()
    assert found == "zzz_last" and llama == "Mine"
    assert (
        names[0] == "aaa_first" and names[-3:] == ["zzz_last", "my_plugin", "megatron"] and "llama" in names
    )


def test_starcoder2_from_the_docs_gets_its_megatron_args_from_its_spec(tmp_path, monkeypatch):
    """The StarCoder2 plugin of docs/adding-a-family.md names no Megatron arg; the rank files'
    args still say what megatron-core must build (LayerNorm, biases on every linear layer, no
    gating), and Megatron's own reading of those args lays out exactly the tensors written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckpt_ir.io.torchzip import TorchZip
    from ckpt_ir.passes.manager import load_plugin
    from tests.test_docs import code_blocks

    plugin_dir = _plugin_dir(tmp_path, "starcoder2_family", code_blocks("adding-a-family.md")[1])
    monkeypatch.setenv("PYTHONPATH", plugin_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = AutoConfig.for_model(
        "starcoder2",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    hf, mc, back = str(tmp_path / "sc2"), tmp_path / "mc", tmp_path / "back"
    model.save_pretrained(hf)
    plugin = ("--plugin", "starcoder2_family")
    ok("convert", hf, mc, "--to", "mcore", "--tp", "2", "--pp", "2", *plugin)
    args = vars(TorchZip(str(mc / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt")).obj["args"])
    assert (args["normalization"], args["add_qkv_bias"], args["add_bias_linear"], args["swiglu"]) == (
        "LayerNorm",
        True,
        True,
        False,
    )
    assert args["position_embedding_type"] == "rope" and not args["untie_embeddings_and_output_weights"]
    ok("convert", mc, back, "--to", "hf", *plugin)
    assert ok("diff", hf, back, *plugin).returncode == 0
    reloaded = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # Megatron's reading of the args alone (no family, no HF config) reshards the same tensors
    resharded = tmp_path / "args-only"
    ok(
        "convert",
        mc,
        resharded,
        "--to",
        "mcore",
        "--tp",
        "1",
        "--pp",
        "1",
        "--model-type-hf",
        "megatron",
        *plugin,
    )
    same = tmp_path / "same"
    ok("convert", mc, same, "--to", "mcore", "--tp", "1", "--pp", "1", *plugin)
    assert (
        files_of(str(resharded / "iter_0000001" / "mp_rank_00")).keys()
        == files_of(str(same / "iter_0000001" / "mp_rank_00")).keys()
    )
    import ckpt_ir.families as families

    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))  # the plugin stays in this test
    monkeypatch.syspath_prepend(plugin_dir)
    load_plugin("starcoder2_family")
    a, b = ck.load(str(resharded)), ck.load(str(same))
    assert list(a.tensors) == list(b.tensors)
    assert all(a.tensors[n].shape == b.tensors[n].shape for n in a.tensors)
