"""``explain()`` / ``explain_many()``: relevance maps for timm Vision Transformers, batched.

One recorded forward pass, at most one ``torch.autograd.grad`` call (with respect to the
attention matrices only, never into parameters) and at most one relevance pass per rule set
serve every requested method. Blocks below the lowest layer a method needs run without
autograd and with fused attention. See ``docs/relevance.md``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from vitlens.relevance import lrp_gradient, rules
from vitlens.relevance import families
from vitlens.relevance.forward import forward
from vitlens.relevance.precision import PRECISIONS, Precision, float32_precision, plan as precision_plan
from vitlens.relevance.weights import Backbone

METHODS = (
    "transformer_attribution",
    "grad_rollout",
    "rollout",
    "raw_attention",
    "attn_gradcam",
    "partial_lrp",
    "full_lrp",
    "lrp_rollout",
    "attnlrp",
    "cp_lrp",
    "random",
)

# option name -> default, per method
_OPTIONS = {
    "transformer_attribution": {"start_layer": 1},
    "grad_rollout": {"start_layer": 0},
    "rollout": {"start_layer": 1},
    "lrp_rollout": {"start_layer": 0},
    "random": {"seed": 0},
    "attnlrp": {"gamma_linear": 0.05, "gamma_conv": 0.25, "resolution": "pixel"},
    "cp_lrp": {"gamma_linear": 0.05, "gamma_conv": 0.25, "resolution": "pixel"},
}

# Methods whose float32 maps are computed in float64 (their records too): the bare z-rules of
# full_lrp and the paper rules' lrp_rollout divide by pre-activations and residual sums that
# cancel to ~1e-5 of their terms, so float32 rounding of the forward pass (1e-7 relative)
# moved their maps by up to 40% (full_lrp) / 17% (lrp_rollout) / 0.5% (partial_lrp) of the
# map's max on a trained toy-birds ViT (32 val images); no stabiliser that keeps the authors'
# float64 maps (1e-8) cures that. In float64 they are within 6e-8 of the float64 maps.
# transformer_attribution reads the same paper rules (the residual z-rule): 1.3e-4 off on
# real images, but 0.9% on random inputs to the seeded test ViT (4% in the run); it
# stays in float32 (float64 would double its memory: ViT-B/16 batch 64 > 12 GiB) - open.
_FLOAT64_IN_FLOAT32 = frozenset({"full_lrp", "lrp_rollout", "partial_lrp"})

# methods that are one Gradient x Input pass of a rule set (``lrp_gradient.RULE_SETS``):
# method name -> rule set name
_GRADIENT_FORM = {"attnlrp": "attnlrp", "cp_lrp": "cp_lrp"}


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
        method: one of ``METHODS``.
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
        **options: ``start_layer`` (transformer_attribution: 1, rollout: 1, lrp_rollout: 0,
            grad_rollout: 0), ``seed`` (random: 0), ``gamma_linear`` (0.05), ``gamma_conv``
            (0.25) and ``resolution`` (``"pixel"`` | ``"patch"``) for attnlrp / cp_lrp.

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
        wide = {m: o for m, o in requested.items() if m in _FLOAT64_IN_FLOAT32}
        if plan != Precision(torch.float32, torch.float32, False, False) or not wide:
            return _run(bb, checked, requested, targets, plan)
        # float32: the bare z-rule methods run in float64 (see _FLOAT64_IN_FLOAT32)
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
        if name not in METHODS:
            raise ValueError(f"unknown relevance method {name!r}; choose one of {', '.join(METHODS)}")
        allowed = _OPTIONS.get(name, {})
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
    rule-set method (its own forward/backward: the rules live in the backward)."""
    grad_form = {m: o for m, o in req.items() if m in _GRADIENT_FORM}
    for name, o in grad_form.items():
        if o["resolution"] not in ("pixel", "patch"):
            raise ValueError(f"{name}: resolution must be 'pixel' or 'patch', got {o['resolution']!r}")
        for g in ("gamma_linear", "gamma_conv"):
            if not isinstance(o[g], numbers.Real) or o[g] < 0:
                raise ValueError(f"{name}: {g} must be a number >= 0, got {o[g]!r}")
    rest = {m: o for m, o in req.items() if m not in grad_form}
    maps, logits, t = {}, None, None
    if rest:
        out = _run_records(bb, images, rest, targets, plan)
        maps, logits, t = dict(out.maps), out.logits, out.targets
    with float32_precision(False):
        for name, o in grad_form.items():
            fixed = t
            r, lg, tt = lrp_gradient.relevance(
                bb, _GRADIENT_FORM[name], images,
                (lambda l: _targets(targets, l)) if fixed is None else (lambda l: fixed),
                gamma_linear=float(o["gamma_linear"]), gamma_conv=float(o["gamma_conv"]))
            if logits is None:
                logits, t = lg, tt
            H, W = images.shape[-2:]
            r = r[:, :H, :W]
            maps[name] = lrp_gradient.patch_grid(r, bb.patch_size) if o["resolution"] == "patch" else r
    return Explanations({m: maps[m].detach() for m in req}, logits, t)


def _run_records(bb: Backbone, images: torch.Tensor, req: dict[str, dict], targets,
                 plan: Precision) -> Explanations:
    L = len(bb.blocks)
    for name, opts in req.items():
        s = opts.get("start_layer")
        if s is not None and not (isinstance(s, numbers.Integral) and 0 <= s < L):
            raise ValueError(f"{name}: start_layer must be an int in [0, {L - 1}], got {s!r}")
    start = {m: o.get("start_layer") for m, o in req.items()}
    # lowest block each kind of record is needed from
    grad_from = min([start[m] for m in ("transformer_attribution", "grad_rollout") if m in req]
                    + ([L - 1] if "attn_gradcam" in req else []), default=L)
    paper_from = min([start[m] for m in ("transformer_attribution", "lrp_rollout") if m in req], default=L)
    plain_from = min(([0] if "full_lrp" in req else []) + ([L - 1] if "partial_lrp" in req else []),
                     default=L)
    attn_from = min([start[m] for m in ("rollout", "grad_rollout") if m in req]
                    + ([L - 1] if {"raw_attention", "attn_gradcam"} & req.keys() else []), default=L)
    lrp_from = min(paper_from, plain_from)

    # The LRP rules read the forward's records as denominators: then the forward runs in full
    # precision. Without them (attention and gradient methods) it may round like the rules.
    fast = plan.rounding and lrp_from == L
    with float32_precision(plan.tf32 and fast):
        trace = forward(bb, images, attn_from=min(attn_from, lrp_from), lrp_from=lrp_from,
                        grad_from=grad_from, fast=fast,
                        compact=bb.mm_dtype != bb.dtype and plain_from == L)
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
    block_rule = getattr(bb.family, "block_rule", None) or rules.block_rule
    p = bb.num_prefix_tokens
    gh, gw = trace.embedding.grid
    B = images.shape[0]

    def grid(row):  # (B, N) readout row -> (B, gh, gw) patch map
        return row[:, p:].reshape(B, gh, gw)

    def chain(r, layers):  # r @ (I + M_top) ... (I + M_bottom), top-down, vector form
        for M in layers:
            r = r + torch.bmm(r[:, None], M)[:, 0]
        return r

    with torch.no_grad(), float32_precision(plan.tf32):
        for blk in trace.blocks:  # attention matrices are used as values from here on
            if blk.attn is not None:
                blk.attn = blk.attn.detach()
        pool_r = rules.pooling_readout(bb, trace)
        if "raw_attention" in req:
            maps["raw_attention"] = grid(torch.bmm(pool_r[:, None], trace.blocks[-1].attn.mean(1))[:, 0])
        if "attn_gradcam" in req:
            A, G = trace.blocks[-1].attn, grads[L - 1]
            a_row = torch.einsum("bn,bhnm->bhm", pool_r, A)[..., p:]
            g_row = torch.einsum("bn,bhnm->bhm", pool_r, G)[..., p:]
            cam = (g_row.mean(-1, keepdim=True) * a_row).mean(1).clamp(min=0)
            maps["attn_gradcam"] = cam.reshape(B, gh, gw)
        if "rollout" in req:
            r = pool_r
            for i in reversed(range(start["rollout"], L)):
                Abar = trace.blocks[i].attn.mean(1)
                r = r / (1 + Abar.sum(-1))  # rows of I + Abar normalised to sum 1
                r = chain(r, [Abar])
            maps["rollout"] = grid(r)
        if "grad_rollout" in req:
            s = start["grad_rollout"]
            r = chain(pool_r, ((grads[i] * trace.blocks[i].attn).clamp(min=0).mean(1)
                               for i in reversed(range(s, L))))
            maps["grad_rollout"] = grid(r)
        # the head gives relevance to the pooled tokens only: under class-token pooling the top
        # block's relevance pass runs on its first rows only (low-precision matmuls only, so
        # that float32 / float64 maps keep their exact rounding)
        top_rows = {"token": 1, "distilled": 2}.get(bb.pool) if bb.rounding else None
        if paper_from < L:
            R, readout = rules.head_rule(bb, trace, t)
            r_ta = readout if "transformer_attribution" in req else None
            r_lr = readout if "lrp_rollout" in req else None
            for i in reversed(range(paper_from, L)):
                R, R_attn = block_rule(bb, bb.blocks[i], trace.blocks[i], R,
                                             to_input=i > paper_from,
                                             rows=top_rows if i == L - 1 else None)
                if r_ta is not None and i >= start["transformer_attribution"]:
                    r_ta = chain(r_ta, [grads.pop(i).mul_(R_attn).clamp_(min=0).mean(1)])
                if r_lr is not None and i >= start["lrp_rollout"]:
                    r_lr = chain(r_lr, [R_attn.clamp(min=0).mean(1)])
                del R_attn
                if i < plain_from:
                    trace.blocks[i] = None  # free what no later pass needs
            if r_ta is not None:
                maps["transformer_attribution"] = grid(r_ta)
            if r_lr is not None:
                maps["lrp_rollout"] = grid(r_lr)
            del R
        grads.clear()
        if plain_from < L:
            R, readout = rules.head_rule(bb, trace, t, plain=True)
            for i in reversed(range(plain_from, L)):
                full = "full_lrp" in req
                R, R_attn = block_rule(bb, bb.blocks[i], trace.blocks[i], R, plain=True,
                                             to_input=full, rows=top_rows if i == L - 1 else None)
                if i == L - 1 and "partial_lrp" in req:
                    row = torch.bmm(readout[:, None], R_attn.clamp(min=0).mean(1))[:, 0]
                    maps["partial_lrp"] = grid(row)
                del R_attn
                trace.blocks[i] = None
                if not full:
                    break
            if "full_lrp" in req:
                with bb.exact():  # cheap, and its z^B denominators can cancel
                    R = rules.patch_embedding_rule(bb, trace, R)  # norm_pre: identity
                H, W = images.shape[-2:]
                maps["full_lrp"] = R[:, :H, :W]
        if "random" in req:
            # drawn on the images' device (a host-to-GPU copy would synchronise), so the same
            # seed gives different noise on CPU and GPU; a meta device has no generator
            dev = images.device
            if dev.type == "meta":
                maps["random"] = torch.empty((B, gh, gw), dtype=bb.dtype, device=dev)
            else:
                g = torch.Generator(device=dev).manual_seed(int(req["random"]["seed"]))
                maps["random"] = torch.rand((B, gh, gw), generator=g, dtype=bb.dtype, device=dev)
    ordered = {m: maps[m].detach() for m in req}
    return Explanations(ordered, logits, t)
