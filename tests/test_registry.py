"""The method registry: a registered method is picked up by explain, explain_many, METHODS,
the explanation callback, the metrics and explain.py, and leaves with unregister_method."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.relevance import (
    METHODS,
    Method,
    Needs,
    Option,
    explain,
    explain_many,
    get_method,
    register_method,
    unregister_method,
)
from vitlens.relevance.registry import RULE_SETS, describe, parse_option, with_options

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "token" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.double().eval()


def _check_scale(s, depth):
    return None if isinstance(s, (int, float)) and s > 0 else f"scale must be a number > 0, got {s!r}"


def _top_relevance(rec, opts, state, i, R_attn):
    """The Chefer rules' relevance of the top block's attention, read from the pooled tokens."""
    return torch.bmm(rec.pass_readout[:, None], R_attn.clamp(min=0).mean(1))[:, 0]


TOY_ATTENTION = Method(
    "toy_attention", "the last block's attention from the pooled tokens, scaled",
    needs=lambda o, depth: Needs(attention=depth - 1),
    readout=lambda rec, o, state: o["scale"] * rec.grid(
        torch.bmm(rec.pooling[:, None], rec.attention(-1).mean(1))[:, 0]),
    options={"scale": Option(1.0, "a factor", _check_scale)}, class_agnostic=True)
TOY_RELEVANCE = Method(
    "toy_top_relevance", "Chefer rules, the top block's attention relevance",
    needs=lambda o, depth: Needs(relevance="chefer", relevance_from=depth - 1),
    readout=lambda rec, o, row: rec.grid(row), on_block=_top_relevance)


@pytest.fixture
def toys():
    before = tuple(METHODS)
    register_method(TOY_ATTENTION)
    register_method(TOY_RELEVANCE)
    try:
        yield
    finally:
        unregister_method("toy_attention")
        unregister_method("toy_top_relevance")
    assert tuple(METHODS) == before


def test_a_registered_method_runs_through_explain_and_explain_many(toys):
    assert "toy_attention" in METHODS and METHODS[-1] == "toy_top_relevance"
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    # the toy reads what raw_attention reads: the same map, scaled
    raw = explain(model, x, "raw_attention")
    assert torch.equal(explain(model, x, "toy_attention"), raw)
    assert torch.equal(explain(model, x, "toy_attention", scale=2.0), 2.0 * raw)
    # its relevance hook sees the Chefer pass: lrp_rollout from the top block (whose readout
    # row is zero on the patches under class-token pooling) is the same map
    top = explain(model, x, "lrp_rollout", start_layer=2)
    assert torch.equal(explain(model, x, "toy_top_relevance"), top)
    # sharing the recorded pass with the built-ins changes none of them (up to rounding: the
    # blocks whose attention is recorded run it unfused)
    many = explain_many(model, x, ["transformer_attribution", "toy_top_relevance", "toy_attention", "rollout"])
    assert list(many.maps) == ["transformer_attribution", "toy_top_relevance", "toy_attention", "rollout"]
    for m, ref in (("transformer_attribution", explain(model, x)), ("rollout", explain(model, x, "rollout")),
                   ("toy_top_relevance", top), ("toy_attention", raw)):
        assert torch.allclose(many.maps[m], ref, rtol=1e-10, atol=1e-14), m
    # every method at once, the toys included
    everything = explain_many(model, x, METHODS)
    assert set(everything.maps) == set(METHODS)


def test_a_registered_method_checks_its_options(toys):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="toy_attention: scale must be a number > 0, got -1"):
        explain(model, x, "toy_attention", scale=-1)
    with pytest.raises(TypeError, match="method 'toy_attention' takes no option 'start_layer'; its options: scale"):
        explain(model, x, "toy_attention", start_layer=0)


def test_after_unregistering_a_method_is_unknown():
    register_method(TOY_ATTENTION)
    unregister_method("toy_attention")
    assert "toy_attention" not in METHODS
    with pytest.raises(ValueError, match="unknown relevance method 'toy_attention'"):
        explain(tiny_vit(), torch.randn(1, 3, 32, 32, dtype=torch.float64), "toy_attention")
    with pytest.raises(KeyError, match="no relevance method 'toy_attention' is registered"):
        unregister_method("toy_attention")


def test_a_method_needing_an_unregistered_rule_set_is_a_clear_error():
    register_method(Method("toy_bad", "needs a rule set nobody registered",
                           needs=lambda o, depth: Needs(relevance="nope", relevance_from=0),
                           readout=lambda rec, o, s: s))
    try:
        with pytest.raises(ValueError, match="needs the rule set 'nope', which is not registered"):
            explain(tiny_vit(), torch.randn(1, 3, 32, 32, dtype=torch.float64), "toy_bad")
    finally:
        unregister_method("toy_bad")


def test_the_builtins_declare_their_flags():
    assert tuple(METHODS)[:3] == ("transformer_attribution", "grad_rollout", "rollout")
    assert {m for m in METHODS if get_method(m).class_agnostic} == {"rollout", "raw_attention", "random"}
    assert {m for m in METHODS if get_method(m).float64_in_float32} == {"full_lrp", "lrp_rollout", "partial_lrp"}
    assert {m: get_method(m).defaults() for m in ("transformer_attribution", "attnlrp")} == {
        "transformer_attribution": {"start_layer": 1},
        "attnlrp": {"gamma_linear": 0.05, "gamma_conv": 0.25, "resolution": "pixel"}}
    assert list(RULE_SETS) == ["chefer", "lrp", "attnlrp", "cp_lrp"]
    names = [e["name"] for e in describe()]
    assert names == list(METHODS)


def test_options_from_the_command_line():
    assert parse_option("transformer_attribution.start_layer=0") == ("transformer_attribution", "start_layer", 0)
    assert parse_option("attnlrp.gamma_linear=0.1") == ("attnlrp", "gamma_linear", 0.1)
    assert parse_option("attnlrp.resolution=patch") == ("attnlrp", "resolution", "patch")
    with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
        parse_option("start_layer=0")
    with pytest.raises(ValueError, match="method 'rollout' takes no option 'seed'; its options: start_layer"):
        parse_option("rollout.seed=1")
    with pytest.raises(ValueError, match="options are given for method 'rollout', which is not among the methods"):
        with_options(["transformer_attribution"], {"rollout": {"start_layer": 0}})
    assert with_options(["rollout", "random"], {"random": {"seed": 3}}) == {"rollout": {}, "random": {"seed": 3}}


def _explain_cli():
    spec = importlib.util.spec_from_file_location("explain_cli", ROOT / "explain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_explain_py_methods_lists_registered_methods(toys, capsys):
    assert _explain_cli().main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"{name}  (" in out
    assert "--option toy_attention.scale=1.0" in out and "--option transformer_attribution.start_layer=1" in out
    assert "class-agnostic" in out


def test_explain_py_option_errors_are_one_line(tmp_path):
    env_cmd = [sys.executable, str(ROOT / "explain.py"), "maps", "--ckpt", str(tmp_path / "none.ckpt"),
               "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    for option, message in (("rollout.start_layer=0", "options are given for method 'rollout'"),
                            ("transformer_attribution.seed=1", "takes no option 'seed'"),
                            ("start_layer", "METHOD.NAME=VALUE")):
        result = subprocess.run([*env_cmd, "--option", option], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_explain_py_maps_applies_the_options(tiny_classifier_checkpoint, tiny_dataset_dir, tmp_path):
    from vitlens.models import load_classifier

    images = sorted((tiny_dataset_dir / "images" / "val").rglob("*.png"))[:1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "explain.py"), "maps", "--ckpt", str(tiny_classifier_checkpoint),
         "--images", str(images[0]), "--out", str(tmp_path), "--methods", "transformer_attribution", "rollout",
         "--option", "transformer_attribution.start_layer=0", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = np.load(next(tmp_path.glob("*.transformer_attribution.npy")))
    # the same image through the API, with and without the option
    from vitlens.data import eval_transform, read_image

    model = load_classifier(tiny_classifier_checkpoint)
    size = int(model.model.patch_embed.img_size[0])
    t = eval_transform(size, model.mean, model.std, "resize")
    x = torch.from_numpy(t(image=read_image(images[0]), bboxes=np.zeros((0, 4), np.float32), box_ids=[])["image"])
    x = x.permute(2, 0, 1)[None]
    start0 = explain(model, x, "transformer_attribution", start_layer=0, precision="float32")[0].numpy()
    start1 = explain(model, x, "transformer_attribution", precision="float32")[0].numpy()
    assert np.allclose(saved, start0, rtol=1e-5, atol=1e-7)
    assert not np.allclose(saved, start1, rtol=1e-3, atol=0)


def test_the_callback_takes_method_options(toys):
    from vitlens.callbacks import ExplanationCallback

    with pytest.raises(ValueError, match="ExplanationCallback: method_options: .*takes no option 'start_layer'"):
        ExplanationCallback(methods=("toy_attention",), method_options={"toy_attention": {"start_layer": 1}})
    with pytest.raises(ValueError, match="options are given for method 'rollout'"):
        ExplanationCallback(methods=("toy_attention",), method_options={"rollout": {"start_layer": 1}})
    cb = ExplanationCallback(methods=("toy_attention", "transformer_attribution"), batch_size=2,
                             method_options={"toy_attention": {"scale": 3.0},
                                             "transformer_attribution": {"start_layer": 0}, "random": {"seed": 5}})
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    maps, logits = cb._explain(model, x, None)  # what the callback computes every epoch, in chunks of 2
    assert list(maps) == ["toy_attention", "transformer_attribution", "random"]
    opts = {"toy_attention": {"scale": 3.0}, "transformer_attribution": {"start_layer": 0}, "random": {"seed": 5}}
    chunks = [explain_many(model, x[i:i + 2], opts) for i in (0, 2)]
    for m in maps:
        assert torch.equal(maps[m], torch.cat([c.maps[m].float() for c in chunks]))
    # two callbacks with the same methods but other options keep their own checkpoint state
    plain = ExplanationCallback(methods=("toy_attention", "transformer_attribution"))
    assert plain.state_key != cb.state_key


def test_the_evaluation_runs_a_registered_method_with_its_options(toys):
    from vitlens.metrics.evaluate import evaluate_explanations

    model = tiny_vit().float()
    torch.manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}]
    report = evaluate_explanations(model, batches, ["toy_attention"], (0.5,) * 3, (0.5,) * 3, n_resamples=0,
                                   progress=False, method_options={"toy_attention": {"scale": 2.0}})
    assert "toy_attention" in report.methods


def test_the_docs_table_lists_the_registry():
    """docs/relevance.md's method table: every registered built-in, with its defaults."""
    import re

    rows = {}
    for line in (ROOT / "docs" / "relevance.md").read_text().splitlines():
        found = re.match(r"\| `(\w+)` \|([^|]*)\|", line)
        if found and found.group(1) in METHODS:
            rows[found.group(1)] = found.group(2)
    assert set(rows) == set(METHODS)
    for name, options in rows.items():
        for key, default in get_method(name).defaults().items():
            if options.strip() != "as `attnlrp`":
                assert f"{key}={default!r}".replace("'", '"') in options, (name, key)


def test_an_explicit_rule_set_is_a_table_of_layer_rules():
    """A rule set made from a table: the shipped tables' copies give the shipped maps exactly,
    and changing one entry (the residual rule) changes the map through the one relevance pass."""
    import dataclasses
    from functools import partial

    from vitlens.relevance import rules
    from vitlens.relevance.registry import RuleSet, register_rule_set

    calls = []

    def counted_residual(u, v, z, R):
        calls.append(tuple(R.shape))
        return rules.residual_rule(u, v, z, R, plain=True)

    tables = {"chefer_copy": dataclasses.replace(rules.CHEFER, name="chefer_copy"),
              "lrp_copy": dataclasses.replace(rules.PLAIN_LRP, name="lrp_copy"),
              "chefer_bare_residual": dataclasses.replace(rules.CHEFER, name="chefer_bare_residual",
                                                          residual=counted_residual)}
    for name, table in tables.items():
        register_rule_set(RuleSet(name, name, layers=table, compact_records=name != "lrp_copy"))
    base = get_method("lrp_rollout")
    for name in tables:
        register_method(dataclasses.replace(base, name=f"rollout_{name}", help=name,
                                            needs=lambda o, L, n=name: base.needs(o, L)._replace(relevance=n)))
    try:
        model, x = tiny_vit(), torch.randn(3, 3, 32, 32, dtype=torch.float64)
        out = explain_many(model, x, ["lrp_rollout", "rollout_chefer_copy", "rollout_lrp_copy",
                                      "rollout_chefer_bare_residual", "full_lrp"])
        assert torch.equal(out.maps["rollout_chefer_copy"], out.maps["lrp_rollout"])
        # the plain table through lrp_rollout's readout: not the Chefer map
        assert not torch.allclose(out.maps["rollout_lrp_copy"], out.maps["lrp_rollout"])
        bare = out.maps["rollout_chefer_bare_residual"]
        assert calls and len(calls) == 2 * 3  # two residual adds per block, three blocks
        assert not torch.allclose(bare, out.maps["lrp_rollout"], rtol=1e-6)
        # one entry changed: the map moves but stays the same kind of map (finite, same shape)
        assert bare.shape == out.maps["lrp_rollout"].shape and torch.isfinite(bare).all()
    finally:
        for name in tables:
            unregister_method(f"rollout_{name}")
            RULE_SETS.pop(name)
