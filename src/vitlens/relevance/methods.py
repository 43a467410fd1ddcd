"""``explain()`` / ``explain_many()``: relevance maps for timm Vision Transformers, batched.

The planner: it knows no method by name. Each method declares what it reads
(``registry.Needs``); per request one recorded forward pass, at most one
``torch.autograd.grad`` call (with respect to the attention matrices only, never into
parameters) and at most one relevance pass per explicit rule set serve every requested
method, and each Gradient x Input method gets its own forward/backward. Blocks below the
lowest layer a method needs run without autograd and with fused attention. See
``docs/relevance.md``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from vitlens.relevance import families, lrp_gradient, registry
from vitlens.relevance.forward import forward
from vitlens.relevance.precision import PRECISIONS, Precision, float32_precision, plan as precision_plan
from vitlens.relevance.registry import METHODS, Needs, Records, get_method
from vitlens.relevance.weights import Backbone

__all__ = ["METHODS", "PRECISIONS", "Explanation", "Explanations", "explain", "explain_many"]

class Explanation(NamedTuple):
    """``explain(..., return_logits=True)``: the map, the logits of the same forward pass and
    the explained class of every image."""

    relevance: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class Explanations(NamedTuple):
    """``explain_many``: one map per method (name -> tensor), logits, explained classes."""

    maps: dict[str, torch.Tensor]
    logits: torch.Tensor
    targets: torch.Tensor


def explain(model: nn.Module, images: torch.Tensor, method: str = "transformer_attribution",
            targets=None, *, precision: str | None = None, return_logits: bool = False,
            **options):
    """Relevance of every patch for the explained class, ``(B, grid_h, grid_w)`` raw values
    (``full_lrp``, ``attnlrp``, ``cp_lrp``: pixel level, ``(B, H, W)``, summed over colour
    channels; ``attnlrp`` / ``cp_lrp`` with ``resolution="patch"``: the sum over each patch,
    ``lrp_gradient.patch_grid``).

    Args:
        model: a timm VisionTransformer (ViT, DeiT incl. distilled, MAE-style average pooling,
            register tokens) or a module whose ``.model`` is one (``ViTClassifier``).
        images: normalised batch ``(B, 3, H, W)`` on the model's device.
        method: one of ``METHODS`` (the registered methods, ``register_method``).
        targets: ``None`` (the predicted class), an int, or one class per image.
        precision: ``None`` (the model's dtype), ``"float64"``, ``"float32"``, ``"tf32"``
            (TF32 matmuls on Ampere+ GPUs; float32 elsewhere) or ``"bf16"`` (bfloat16
            matmuls). Float32 means full float32 whatever torch's global TF32 / ``"medium"``
            matmul setting: those would put transformer_attribution maps 10-140% off. With
            ``"tf32"`` / ``"bf16"`` the forward pass that the LRP rules read stays in float32
            and only the rules and the gradient pass round; methods without LRP rules
            (grad_rollout, rollout, raw_attention, attn_gradcam, random) run their forward
            pass rounded too, so the explained (predicted) class can differ in near-ties.
        return_logits: return an ``Explanation(relevance, logits, targets)`` instead of the
            map: the logits come from the same forward pass.
        **options: the method's options (``registry.Method.options``; ``python explain.py
            methods`` lists every method's): for the built-ins ``start_layer``
            (transformer_attribution: 1, rollout: 1, lrp_rollout: 0, grad_rollout: 0), ``seed``
            (random: 0), ``gamma_linear`` (0.05), ``gamma_conv`` (0.25) and ``resolution``
            (``"pixel"`` | ``"patch"``) for attnlrp / cp_lrp.

    The model is left exactly as found (modes, flags, hooks, gradients); works under
    ``torch.no_grad()`` and ``torch.inference_mode()``.
    """
    out = explain_many(model, images, {method: options}, targets, precision=precision)
    relevance = out.maps[method]
    return Explanation(relevance, out.logits, out.targets) if return_logits else relevance


def explain_many(model: nn.Module, images: torch.Tensor,
                 methods: Sequence[str] | Mapping[str, Mapping] = ("transformer_attribution",),
                 targets=None, *, precision: str | None = None) -> Explanations:
    """Several methods from one shared forward pass (and one gradient / relevance pass).

    ``methods``: names, or a mapping name -> options (e.g.
    ``{"transformer_attribution": {"start_layer": 0}, "rollout": {}}``). Returns
    ``Explanations(maps, logits, targets)``.
    """
    requested = _check_methods(methods)
    vit = families.unwrap(model)
    plan = precision_plan(precision, next(vit.parameters()).dtype)
    device = images.device if isinstance(images, torch.Tensor) else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if device is not None and torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        bb = families.read(vit, dtype=plan.dtype, mm_dtype=plan.mm_dtype, rounding=plan.rounding,
                           tf32=plan.tf32)
        checked = _check_images(images, bb, vit)
        wide = {m: o for m, o in requested.items() if get_method(m).float64_in_float32}
        if plan != Precision(torch.float32, torch.float32, False, False) or not wide:
            return _run(bb, checked, requested, targets, plan)
        # float32: the bare z-rule methods run in float64 (``Method.float64_in_float32``)
        maps, logits, t = {}, None, None
        rest = {m: o for m, o in requested.items() if m not in wide}
        if rest:
            maps, logits, t = _run(bb, checked, rest, targets, plan)
            maps = dict(maps)
        plan64 = precision_plan("float64", torch.float64)
        bb64 = families.read(vit, dtype=torch.float64, mm_dtype=torch.float64, rounding=False,
                             tf32=False)
        out = _run(bb64, images.detach().to(torch.float64), wide,
                   targets if t is None else t, plan64)
        maps.update({m: r.to(torch.float32) for m, r in out.maps.items()})
        if logits is None:
            logits, t = out.logits.to(torch.float32), out.targets
        return Explanations({m: maps[m] for m in requested}, logits, t)


# --------------------------------------------------------------------------------------------


def _check_methods(methods) -> dict[str, dict]:
    if isinstance(methods, str):
        methods = [methods]
    items = methods.items() if isinstance(methods, Mapping) else ((m, {}) for m in methods)
    requested = {}
    for name, opts in items:
        allowed = get_method(name).defaults()
        unknown = set(opts) - set(allowed)
        if unknown:
            raise TypeError(
                f"method {name!r} takes no option {', '.join(sorted(map(repr, unknown)))}"
                f"{'; its options: ' + ', '.join(allowed) if allowed else ''}"
            )
        requested[name] = {**allowed, **opts}
    if not requested:
        raise ValueError(f"no relevance method requested; choose from {', '.join(METHODS)}")
    return requested


def _check_options(req: dict[str, dict], depth: int) -> dict[str, Needs]:
    """Every option's check, then what each method needs (for a model of ``depth`` blocks)."""
    needs = {}
    for name, opts in req.items():
        method = get_method(name)
        for key, option in method.options.items():
            problem = option.check(opts[key], depth) if option.check is not None else None
            if problem:
                raise ValueError(f"{name}: {problem}")
        n = method.needs(opts, depth)
        if n.relevance is not None:
            if n.relevance not in registry.RULE_SETS:
                raise ValueError(f"method {name!r} needs the rule set {n.relevance!r}, which is not registered; "
                                 f"registered: {', '.join(registry.RULE_SETS)}")
            if n.relevance_from is None:  # the top block only, or every block on the way to the input
                n = n._replace(relevance_from=0 if n.to_input else depth - 1)
        needs[name] = n
    return needs


def _gradient_form(n: Needs) -> bool:
    return n.relevance is not None and registry.RULE_SETS[n.relevance].form == "gradient"


def _check_images(images, bb: Backbone, vit) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (B, C, H, W), got {type(images).__name__}")
    in_chans = bb.patch_weight.shape[1]
    if images.dim() != 4 or images.shape[1] != in_chans:
        raise ValueError(
            f"images must be (B, {in_chans}, H, W) normalised tensors, got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (normalised), got {images.dtype}")
    if images.device != bb.device:
        raise ValueError(f"images are on {images.device} but the model is on {bb.device}")
    out = images.detach().to(bb.dtype)
    if out.is_inference():  # created under torch.inference_mode(): cannot enter autograd
        out = out.clone()
    return out


def _targets(targets, logits: torch.Tensor) -> torch.Tensor:
    B, C = logits.shape
    if targets is None:
        return logits.argmax(dim=-1)

    def check(values):
        bad = [v for v in values if not 0 <= v < C]
        if bad:
            raise ValueError(f"target class {bad[0]} is out of range for a model with {C} classes")

    if isinstance(targets, numbers.Integral):
        check([int(targets)])
        return torch.full((B,), int(targets), dtype=torch.long, device=logits.device)
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must hold integer class indices, got {targets.dtype}")
        t = targets.reshape(-1).to(device=logits.device, dtype=torch.long)
        if targets.dim() == 0:
            t = t.expand(B)
        if targets.device.type == "cpu":  # no host-device sync for device tensors
            check(targets.reshape(-1).tolist())
    else:
        values = [int(v) for v in targets]
        check(values)
        t = torch.tensor(values, dtype=torch.long, device=logits.device)
    if t.shape[0] != B:
        raise ValueError(f"got {t.shape[0]} targets for a batch of {B} images")
    return t


def _run(bb: Backbone, images: torch.Tensor, req: dict[str, dict], targets,
         plan: Precision) -> Explanations:
    """The recorded pass for the record-reading methods, then one Gradient x Input pass per
    gradient-form method (its own forward/backward: the rules live in the backward)."""
    needs = _check_options(req, len(bb.blocks))
    grad_form = {m: o for m, o in req.items() if _gradient_form(needs[m])}
    rest = {m: o for m, o in req.items() if m not in grad_form}
    maps, logits, t = {}, None, None
    if rest:
        out = _run_records(bb, images, rest, {m: needs[m] for m in rest}, targets, plan)
        maps, logits, t = dict(out.maps), out.logits, out.targets
    with float32_precision(False):
        for name, o in grad_form.items():
            rs = registry.RULE_SETS[needs[name].relevance].gradient
            fixed = t
            r, lg, tt = lrp_gradient.relevance(
                bb, rs, images,
                (lambda l: _targets(targets, l)) if fixed is None else (lambda l: fixed),
                gamma_linear=float(o[rs.linear_gamma_option]), gamma_conv=float(o[rs.conv_gamma_option]))
            if logits is None:
                logits, t = lg, tt
            rec = Records(bb, images, t, input_relevance=r)
            maps[name] = get_method(name).readout(rec, o, None)
    return Explanations({m: maps[m].detach() for m in req}, logits, t)


def _lowest(values, default: int) -> int:
    return min((v for v in values if v is not None), default=default)


def _run_records(bb: Backbone, images: torch.Tensor, req: dict[str, dict], needs: dict[str, Needs],
                 targets, plan: Precision) -> Explanations:
    L = len(bb.blocks)
    methods = {m: get_method(m) for m in req}
    # the explicit relevance passes, in rule-set registration order: rule set -> lowest block
    passes = {}
    for name, rs in registry.RULE_SETS.items():
        users = [m for m in req if needs[m].relevance == name]
        if users:
            to_input = any(needs[m].to_input for m in users)
            passes[name] = 0 if to_input else _lowest((needs[m].relevance_from for m in users), L - 1)
    grad_from = _lowest((n.gradients for n in needs.values()), L)
    attn_from = _lowest((n.attention for n in needs.values()), L)
    lrp_from = min(passes.values(), default=L)

    # The LRP rules read the forward's records as denominators: then the forward runs in full
    # precision. Without them (attention and gradient methods) it may round like the rules.
    fast = plan.rounding and lrp_from == L
    compact = bb.mm_dtype != bb.dtype and all(registry.RULE_SETS[r].compact_records for r in passes)
    with float32_precision(plan.tf32 and fast):
        trace = forward(bb, images, attn_from=min(attn_from, lrp_from), lrp_from=lrp_from,
                        grad_from=grad_from, fast=fast, compact=compact)
    logits = trace.logits.detach()
    t = _targets(targets, logits)
    grads = {}
    if grad_from < L:
        wanted = list(range(grad_from, L))
        selected = trace.logits.gather(1, t[:, None]).sum()
        with float32_precision(plan.tf32):
            dA = torch.autograd.grad(selected, [trace.blocks[i].attn for i in wanted],
                                     allow_unused=True)
        grads = {i: (torch.zeros_like(trace.blocks[i].attn) if g is None else g)
                 for i, g in zip(wanted, dA)}
        del dA, selected

    maps: dict[str, torch.Tensor] = {}
    rec = Records(bb, images, t, trace=trace, gradients=grads)
    with torch.no_grad(), float32_precision(plan.tf32):
        for blk in trace.blocks:  # attention matrices are used as values from here on
            if blk.attn is not None:
                blk.attn = blk.attn.detach()
        # methods without a relevance pass read the records first (passes consume them)
        for m, method in methods.items():
            if needs[m].relevance is None:
                maps[m] = method.readout(rec, req[m], None)
        # the head gives relevance to the pooled tokens only: under class-token pooling the top
        # block's relevance pass runs on its first rows only (every other row's relevance is
        # exactly 0; the per-sample sums then add fewer zeros: float64 maps move by ~1e-16)
        top_rows = {"token": 1, "distilled": 2}.get(bb.pool)
        order = list(passes)
        for k, name in enumerate(order):
            if not any(needs[m].gradients is not None for p in order[k:] for m in req
                       if needs[m].relevance == p):
                grads.clear()  # no pass from here on reads them
            rs, lowest = registry.RULE_SETS[name], passes[name]
            users = {m: needs[m] for m in req if needs[m].relevance == name}
            keep_below = min((passes[p] for p in order[k + 1:]), default=L)  # a later pass reads these
            to_input = any(n.to_input for n in users.values())
            state = dict.fromkeys(users)
            R, rec.pass_readout = rs.head(bb, trace, t)
            for i in reversed(range(lowest, L)):
                R, R_attn = rs.block(bb, bb.blocks[i], trace.blocks[i], R, to_input=i > lowest or to_input,
                                     rows=top_rows if i == L - 1 else None)
                for m, n in users.items():
                    if methods[m].on_block is not None and i >= n.relevance_from:
                        state[m] = methods[m].on_block(rec, req[m], state[m], i, R_attn)
                del R_attn
                if i < keep_below:
                    trace.blocks[i] = None  # free what no later pass needs
            if to_input:
                rec.input_relevance = rs.patch_embedding(bb, trace, R)
            del R
            for m in users:
                maps[m] = methods[m].readout(rec, req[m], state[m])
            rec.pass_readout = rec.input_relevance = None
        grads.clear()
    ordered = {m: maps[m].detach() for m in req}
    return Explanations(ordered, logits, t)
