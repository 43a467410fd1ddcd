"""The registry of relevance methods and rule sets: one entry per method, one per rule set.

A **method** declares what it reads (``Needs``: attention matrices from block s, their
gradients from block s, a relevance pass of a rule set, to the input pixels or not), its
options (default, check, help) and how it reads its map from those records (``readout``,
and ``on_block`` for what it reads from every block of a relevance pass). The planner
(``methods.py``) knows no method by name: per request it runs one recorded forward pass,
at most one gradient pass (with respect to the attention matrices only) and one relevance
pass per explicit rule set, from the lowest block any requested method needs.

A **rule set** is a table of per-layer rules:

- explicit rule sets (``chefer``: Chefer et al.'s rules; ``lrp``: plain LRP) run backwards
  over the recorded forward (``rules.py``): the head/pooling rule, the block rule (Linear,
  LayerNorm, activation, attention matmuls, residual; a family may supply its own block
  rule) and the patch-embedding rule;
- Gradient x Input rule sets (``attnlrp``, ``cp_lrp``: ``lrp_gradient.RULE_SETS``) are one
  more functional forward with rule-carrying ops and one input gradient.

Adding a method: ``register_method(Method(...))`` (see docs/relevance.md, "Adding a
method"); ``explain``, ``explain_many``, ``METHODS``, the explanation callback and
``explain.py`` pick it up.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import torch

from vitlens.relevance import lrp_gradient, rules


# ------------------------------------------------------------------------------ rule sets


@dataclass(frozen=True)
class RuleSet:
    """A table of per-layer relevance rules.

    - ``form``: ``"explicit"`` (a backward pass over the recorded forward, ``rules.py``) or
      ``"gradient"`` (Gradient x Input: ``gradient`` holds the rule-carrying ops).
    - ``head``: ``(bb, trace, targets) -> (R at the final tokens, readout row (B, N))``.
    - ``block``: ``(bb, w, block_trace, R, *, to_input, rows) -> (R at the block input,
      relevance of the attention matrix (B, H, N, N))``; the family's ``block_rule`` is used
      when it has one (called with ``rules=``).
    - ``patch_embedding``: ``(bb, trace, R_tokens) -> R at the pixels (B, H, W)``.
    - ``layers``: an explicit rule set's per-layer rules (``rules.LayerRules``: Linear,
      residual, fork, norm, activation, softmax; ``rules.CHEFER``, ``rules.PLAIN_LRP``).
    - ``compact_records``: the rules may read the Linear inputs rounded to the matmul dtype
      (halves the records with bf16 matmuls; the plain rules lose accuracy from it).
    """

    name: str
    help: str
    form: str = "explicit"
    layers: rules.LayerRules = rules.CHEFER
    compact_records: bool = True
    gradient: lrp_gradient.GradientRuleSet | None = None

    def head(self, bb, trace, targets):
        return rules.head_rule(bb, trace, targets, rules=self.layers)

    def block(self, bb, w, t, R, *, to_input: bool, rows: int | None):
        block_rule = getattr(bb.family, "block_rule", None) or rules.block_rule
        return block_rule(bb, w, t, R, rules=self.layers, to_input=to_input, rows=rows)

    def patch_embedding(self, bb, trace, R):
        with bb.exact():  # cheap, and its z^B denominators can cancel
            return rules.patch_embedding_rule(bb, trace, R)  # norm_pre: identity


RULE_SETS: dict[str, RuleSet] = {}


def register_rule_set(rule_set: RuleSet) -> RuleSet:
    """Add ``rule_set`` (replacing one of the same name). Explicit passes run in registration order."""
    if rule_set.form not in ("explicit", "gradient"):
        raise ValueError(f"rule set {rule_set.name!r}: form must be 'explicit' or 'gradient', got {rule_set.form!r}")
    if rule_set.form == "gradient" and rule_set.gradient is None:
        raise ValueError(f"rule set {rule_set.name!r}: a gradient-form rule set needs its ops (gradient=)")
    RULE_SETS.pop(rule_set.name, None)
    RULE_SETS[rule_set.name] = rule_set
    return rule_set


# ------------------------------------------------------------------------------ methods


class Needs(NamedTuple):
    """What one method reads, for its options and a model of ``depth`` blocks (None: nothing).

    - ``attention``: the lowest block whose attention matrix (B, H, N, N) it reads;
    - ``gradients``: the lowest block whose gradient of the explained logit with respect to
      the attention matrix it reads (``Records.gradients``);
    - ``relevance``: the rule set of the relevance pass it reads (``RULE_SETS``);
    - ``relevance_from``: the lowest block whose attention relevance it reads (``on_block``
      is called for the blocks from the top down to this one; explicit rule sets; None: the
      top block only, or every block with ``to_input``);
    - ``to_input``: it reads the relevance at the input pixels (``Records.input_relevance``).
      A method of a Gradient x Input rule set reads only that (its pass records nothing).
    """

    attention: int | None = None
    gradients: int | None = None
    relevance: str | None = None
    relevance_from: int | None = None
    to_input: bool = False


@dataclass(frozen=True)
class Option:
    """One method option: its default, a check ``(value, depth) -> error text or None``
    (the text names the option), and one line of help."""

    default: Any
    help: str
    check: Callable[[Any, int], str | None] | None = None


@dataclass
class Records:
    """What a readout reads: the recorded pass (``trace``), the explained classes, the
    attention gradients (block -> (B, H, N, N); a method may ``pop`` the ones it consumes in
    ``on_block``), the classifier's pooling row, and, during and after a relevance pass, the
    pass's readout row and the relevance at the input pixels."""

    bb: Any
    images: torch.Tensor
    targets: torch.Tensor
    trace: Any = None
    gradients: dict = field(default_factory=dict)
    pass_readout: torch.Tensor | None = None  # (B, N): the head rule's share of each token
    input_relevance: torch.Tensor | None = None  # (B, H, W) pixels (padded size)
    _pooling: torch.Tensor | None = None

    @property
    def depth(self) -> int:
        return len(self.bb.blocks)

    @property
    def batch(self) -> int:
        return self.images.shape[0]

    def attention(self, i: int) -> torch.Tensor:
        """The softmax attention (B, H, N, N) of block ``i`` (detached)."""
        return self.trace.blocks[i].attn

    @property
    def pooling(self) -> torch.Tensor:
        """(B, N) weights of the classifier's pooling over tokens (``rules.pooling_readout``)."""
        if self._pooling is None:
            self._pooling = rules.pooling_readout(self.bb, self.trace)
        return self._pooling

    def grid(self, row: torch.Tensor) -> torch.Tensor:
        """(B, N) token row -> (B, grid_h, grid_w) patch map (prefix tokens dropped)."""
        gh, gw = self.trace.embedding.grid
        return row[:, self.bb.num_prefix_tokens:].reshape(self.batch, gh, gw)

    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel relevance at the images' size (the patch embedding may have padded them)."""
        H, W = self.images.shape[-2:]
        return pixels[:, :H, :W]


def chain(r: torch.Tensor, layers) -> torch.Tensor:
    """``r @ (I + M_top) ... (I + M_bottom)``, top-down, in vector form."""
    for M in layers:
        r = r + torch.bmm(r[:, None], M)[:, 0]
    return r


@dataclass(frozen=True)
class Method:
    """One relevance method.

    - ``needs(options, depth) -> Needs``: what it reads.
    - ``readout(records, options, state) -> map``: its map (``state``: what ``on_block``
      returned last, else None). Methods without a relevance pass read their map before
      any pass runs; the others after their pass.
    - ``on_block(records, options, state, i, R_attn) -> state``: called for each block ``i``
      from the top down to ``needs.relevance_from`` during the rule set's pass, with the
      relevance of that block's attention matrix (B, H, N, N) (read it, never modify it).
    - ``options``: name -> ``Option``.
    - ``resolution``: ``"patch"`` (B, grid_h, grid_w), ``"pixel"`` (B, H, W), or ``"option"``
      (the ``resolution`` option says which).
    - ``float64_in_float32``: a float32 request runs it in float64 (its records too) and
      casts the map back (rules whose denominators cancel, see ``BUILTIN`` notes).
    - ``class_agnostic``: its map does not depend on the explained class (the metrics then
      reuse the predicted class's map for the true class).
    """

    name: str
    help: str
    needs: Callable[[dict, int], Needs]
    readout: Callable[[Records, dict, Any], torch.Tensor]
    on_block: Callable | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    resolution: str = "patch"
    float64_in_float32: bool = False
    class_agnostic: bool = False

    def defaults(self) -> dict:
        return {k: o.default for k, o in self.options.items()}


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` (replacing one of the same name); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a vitlens.relevance.Method, got {type(method).__name__}")
    if method.resolution not in ("patch", "pixel", "option"):
        raise ValueError(f"method {method.name!r}: resolution must be 'patch', 'pixel' or 'option', "
                         f"got {method.resolution!r}")
    _METHODS.pop(method.name, None)
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove the method ``name`` from the registry; returns it."""
    if name not in _METHODS:
        raise KeyError(f"no relevance method {name!r} is registered")
    return _METHODS.pop(name)


def get_method(name: str) -> Method:
    """The registered method ``name``, else a ValueError listing the registered ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown relevance method {name!r}; choose one of {', '.join(_METHODS)}") from None


def registered() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def class_agnostic(name: str) -> bool:
    """The method's map does not depend on the explained class."""
    return get_method(name).class_agnostic


class MethodNames(Sequence):
    """The names of the registered methods, live (``vitlens.relevance.METHODS``)."""

    def __getitem__(self, i):
        return tuple(_METHODS)[i]

    def __len__(self):
        return len(_METHODS)

    def __contains__(self, name):
        return name in _METHODS

    def __iter__(self):
        return iter(tuple(_METHODS))

    def __repr__(self):
        return repr(tuple(_METHODS))

    def __eq__(self, other):
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, MethodNames)) else other)

    __hash__ = None


METHODS = MethodNames()


def with_options(methods: Sequence[str], method_options: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """``methods`` and per-method options -> the mapping ``explain_many`` takes
    (``{method: options}``). Options of a method not in ``methods``, an unknown method or an
    unknown option are errors naming them."""
    method_options = dict(method_options or {})
    out = {}
    for m in methods:
        out[m] = dict(method_options.get(m, {}))
    for m, opts in method_options.items():
        method = get_method(m)
        if m not in out:
            raise ValueError(f"options are given for method {m!r}, which is not among the methods "
                             f"({', '.join(out) or 'none'})")
        if not isinstance(opts, Mapping):
            raise TypeError(f"the options of method {m!r} must be a mapping name -> value, got {type(opts).__name__}")
        unknown = set(opts) - set(method.options)
        if unknown:
            raise TypeError(f"method {m!r} takes no option {', '.join(sorted(map(repr, unknown)))}"
                            f"{'; its options: ' + ', '.join(method.options) if method.options else ''}")
    return out


def describe() -> list[dict]:
    """One entry per registered method: name, help, resolution, options (default, help),
    flags; what ``explain.py methods`` prints."""
    return [{"name": m.name, "help": m.help, "resolution": m.resolution,
             "options": {k: {"default": o.default, "help": o.help} for k, o in m.options.items()},
             "class_agnostic": m.class_agnostic, "float64_in_float32": m.float64_in_float32}
            for m in _METHODS.values()]


def parse_option(text: str) -> tuple[str, str, Any]:
    """``"METHOD.NAME=VALUE"`` -> (method, option, value) for command lines: the value is
    parsed as an int, a float, or kept as text; unknown methods and options are errors."""
    head, sep, raw = text.partition("=")
    method, dot, name = head.partition(".")
    if not sep or not dot or not method or not name:
        raise ValueError(f"--option takes METHOD.NAME=VALUE (e.g. transformer_attribution.start_layer=0), got {text!r}")
    m = get_method(method)
    if name not in m.options:
        raise ValueError(f"method {method!r} takes no option {name!r}"
                         f"{'; its options: ' + ', '.join(m.options) if m.options else ''}")
    value: Any = raw
    for convert in (int, float):
        try:
            value = convert(raw)
            break
        except ValueError:
            pass
    return method, name, value


# ------------------------------------------------------------------------------ the built-ins


def _start_layer(default: int) -> Option:
    def check(s, depth):
        if not (isinstance(s, numbers.Integral) and 0 <= s < depth):
            return f"start_layer must be an int in [0, {depth - 1}], got {s!r}"
        return None
    return Option(default, "lowest block the map reads (0: all blocks)", check)


def _gamma(name: str, default: float, what: str) -> Option:
    def check(g, depth):
        if not isinstance(g, numbers.Real) or g < 0:
            return f"{name} must be a number >= 0, got {g!r}"
        return None
    return Option(default, f"gamma of the gamma rule at {what}", check)


def _resolution_check(r, depth):
    if r not in ("pixel", "patch"):
        return f"resolution must be 'pixel' or 'patch', got {r!r}"
    return None


_RESOLUTION = Option("pixel", "'pixel': (B, H, W); 'patch': the sum over each patch", _resolution_check)


def _transformer_attribution_block(rec, o, r, i, R_attn):
    r = rec.pass_readout if r is None else r
    return chain(r, [rec.gradients.pop(i).mul_(R_attn).clamp_(min=0).mean(1)])


def _lrp_rollout_block(rec, o, r, i, R_attn):
    r = rec.pass_readout if r is None else r
    return chain(r, [R_attn.clamp(min=0).mean(1)])


def _partial_lrp_block(rec, o, state, i, R_attn):
    return torch.bmm(rec.pass_readout[:, None], R_attn.clamp(min=0).mean(1))[:, 0]


def _raw_attention(rec, o, state):
    return rec.grid(torch.bmm(rec.pooling[:, None], rec.attention(-1).mean(1))[:, 0])


def _attn_gradcam(rec, o, state):
    L, p = rec.depth, rec.bb.num_prefix_tokens
    A, G, pool = rec.attention(L - 1), rec.gradients[L - 1], rec.pooling
    a_row = torch.einsum("bn,bhnm->bhm", pool, A)[..., p:]
    g_row = torch.einsum("bn,bhnm->bhm", pool, G)[..., p:]
    cam = (g_row.mean(-1, keepdim=True) * a_row).mean(1).clamp(min=0)
    gh, gw = rec.trace.embedding.grid
    return cam.reshape(rec.batch, gh, gw)


def _rollout(rec, o, state):
    r = rec.pooling
    for i in reversed(range(o["start_layer"], rec.depth)):
        Abar = rec.attention(i).mean(1)
        r = r / (1 + Abar.sum(-1))  # rows of I + Abar normalised to sum 1
        r = chain(r, [Abar])
    return rec.grid(r)


def _grad_rollout(rec, o, state):
    G = rec.gradients
    return rec.grid(chain(rec.pooling, ((G[i] * rec.attention(i)).clamp(min=0).mean(1)
                                        for i in reversed(range(o["start_layer"], rec.depth)))))


def _gradient_form(rec, o, state):
    r = rec.crop(rec.input_relevance)
    return lrp_gradient.patch_grid(r, rec.bb.patch_size) if o["resolution"] == "patch" else r


def _random(rec, o, state):
    # drawn on the images' device (a host-to-GPU copy would synchronise), so the same seed
    # gives different noise on CPU and GPU; a meta device has no generator
    shape = (rec.batch, *rec.trace.embedding.grid)
    dev = rec.images.device
    if dev.type == "meta":
        return torch.empty(shape, dtype=rec.bb.dtype, device=dev)
    g = torch.Generator(device=dev).manual_seed(int(o["seed"]))
    return torch.rand(shape, generator=g, dtype=rec.bb.dtype, device=dev)


def _seed_check(s, depth):
    if not isinstance(s, numbers.Integral):
        return f"seed must be an int, got {s!r}"
    return None


# Methods whose float32 maps are computed in float64 (their records too): the bare z-rules of
# full_lrp and the paper rules' lrp_rollout divide by pre-activations and residual sums that
# cancel to ~1e-5 of their terms, so float32 rounding of the forward pass (1e-7 relative)
# moved their maps by up to 40% (full_lrp) / 17% (lrp_rollout) / 0.5% (partial_lrp) of the
# map's max on a trained toy-birds ViT (32 val images); no stabiliser that keeps the authors'
# float64 maps (1e-8) cures that. In float64 they are within 6e-8 of the float64 maps.
# transformer_attribution reads the same paper rules (the residual z-rule): 3.3% off on the
# worst of 128 real toy-birds val images (2 of 128 over 1e-3, median 2e-6;
# benchmarks/float32_check.py) and 0.9% on random inputs to the seeded test ViT; it stays in
# float32 (float64 would double its memory, ViT-B/16 batch 64 > 12 GiB, and its time) - open.
# Its float64 map itself moves by 1e-3..8e-3 when the weights move by one float32 rounding,
# and float64 records (the only fix found) cost ~2.4x on CPU (BENCHMARKS.md, "Why, and what
# a fix costs"; benchmarks/records64_cost.py).

def _builtins() -> None:
    register_rule_set(RuleSet("chefer", "Chefer et al. (CVPR 2021): alpha=1 beta=0 Linear rule, residual "
                                        "z-rule rescaled to conserve relevance, attention matmuls z-rule halved"))
    register_rule_set(RuleSet("lrp", "plain LRP: Linear sign branches normalised separately, bare residual "
                                     "z-rule", layers=rules.PLAIN_LRP, compact_records=False))
    for name, help_ in (("attnlrp", "AttnLRP (Achtibat et al., ICML 2024), Gradient x Input form"),
                        ("cp_lrp", "CP-LRP (Ali et al., ICML 2022), Gradient x Input form")):
        register_rule_set(RuleSet(name, help_, form="gradient", gradient=lrp_gradient.RULE_SETS[name]))

    last = lambda o, L: L - 1  # noqa: E731
    register_method(Method(
        "transformer_attribution",
        "Chefer et al. (CVPR 2021): relevance x gradient of each attention map, rolled out",
        needs=lambda o, L: Needs(gradients=o["start_layer"], relevance="chefer",
                                 relevance_from=o["start_layer"]),
        readout=lambda rec, o, r: rec.grid(r), on_block=_transformer_attribution_block,
        options={"start_layer": _start_layer(1)}))
    register_method(Method(
        "grad_rollout", "gradient-weighted attention rollout (Chefer et al.'s Grad-Rollout baseline)",
        needs=lambda o, L: Needs(attention=o["start_layer"], gradients=o["start_layer"]),
        readout=_grad_rollout, options={"start_layer": _start_layer(0)}))
    register_method(Method(
        "rollout", "attention rollout (Abnar & Zuidema 2020)",
        needs=lambda o, L: Needs(attention=o["start_layer"]), readout=_rollout,
        options={"start_layer": _start_layer(1)}, class_agnostic=True))
    register_method(Method(
        "raw_attention", "the last block's attention from the pooled tokens, mean over heads",
        needs=lambda o, L: Needs(attention=last(o, L)), readout=_raw_attention, class_agnostic=True))
    register_method(Method(
        "attn_gradcam", "GradCAM on the last block's attention (Chefer et al.'s baseline)",
        needs=lambda o, L: Needs(attention=last(o, L), gradients=last(o, L)), readout=_attn_gradcam))
    register_method(Method(
        "partial_lrp", "plain LRP relevance of the last block's attention (Voita et al. 2019)",
        needs=lambda o, L: Needs(relevance="lrp", relevance_from=L - 1),
        readout=lambda rec, o, row: rec.grid(row), on_block=_partial_lrp_block,
        float64_in_float32=True))
    register_method(Method(
        "full_lrp", "plain LRP down to the pixels (B, H, W), summed over colour channels",
        needs=lambda o, L: Needs(relevance="lrp", relevance_from=0, to_input=True),
        readout=lambda rec, o, state: rec.crop(rec.input_relevance), resolution="pixel",
        float64_in_float32=True))
    register_method(Method(
        "lrp_rollout", "Chefer et al.'s rules, relevance of each attention map rolled out (no gradient)",
        needs=lambda o, L: Needs(relevance="chefer", relevance_from=o["start_layer"]),
        readout=lambda rec, o, r: rec.grid(r), on_block=_lrp_rollout_block,
        options={"start_layer": _start_layer(0)}, float64_in_float32=True))
    gamma_options = {"gamma_linear": _gamma("gamma_linear", 0.05, "Linear layers"),
                     "gamma_conv": _gamma("gamma_conv", 0.25, "the patch embedding"),
                     "resolution": _RESOLUTION}
    register_method(Method(
        "attnlrp", "AttnLRP (Achtibat et al., ICML 2024): pixels, or patches with resolution='patch'",
        needs=lambda o, L: Needs(relevance="attnlrp", to_input=True), readout=_gradient_form,
        options=gamma_options, resolution="option"))
    register_method(Method(
        "cp_lrp", "CP-LRP (Ali et al., ICML 2022): no relevance through the attention scores",
        needs=lambda o, L: Needs(relevance="cp_lrp", to_input=True), readout=_gradient_form,
        options=gamma_options, resolution="option"))
    register_method(Method(
        "random", "uniform noise, seeded: the chance level of every metric",
        needs=lambda o, L: Needs(), readout=_random,
        options={"seed": Option(0, "seed of the noise (drawn on the images' device)", _seed_check)},
        class_agnostic=True))


_builtins()
