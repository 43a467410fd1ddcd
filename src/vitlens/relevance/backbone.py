"""Read a timm Vision Transformer's weights and run its eval-mode forward pass functionally.

``explain()`` never calls the model's modules and never changes them: it reads their weights
(detached) and recomputes the forward pass with plain tensor functions, recording what the
relevance rules need (the attention matrices, the inputs of every Linear layer, ...). So the
model's fused attention flag, train/eval mode, hooks, ``requires_grad`` flags and ``.grad``
are untouched by construction, and the attention matrix is available without switching
timm's fused attention off. Tests check that this forward pass gives the model's logits.

Supported: timm ``VisionTransformer`` (and ``VisionTransformerDistilled``, DeiT) built from
``Block`` / ``Attention`` / ``Mlp`` with LayerNorm and GELU, any number of prefix tokens
(class, distillation, register), ``global_pool`` ``"token"`` or ``"avg"`` (with ``fc_norm``),
LayerScale, q/k norm, attention-output norm, pre-norm, ``no_embed_class``,
``dynamic_img_size`` / ``dynamic_img_pad``. Anything else raises ``UnsupportedModelError``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED = (
    "timm VisionTransformer / VisionTransformerDistilled (ViT, DeiT, DeiT-distilled, MAE with "
    "global_pool='avg', register tokens) made of timm Block/Attention/Mlp with LayerNorm and GELU, "
    "or a module whose `.model` attribute is one (vitlens ViTClassifier)"
)


class UnsupportedModelError(TypeError):
    """The model is not a Vision Transformer that vitlens.relevance can explain."""


def unwrap(model: nn.Module) -> nn.Module:
    """The timm ViT inside ``model`` (itself, or its ``.model`` attribute), else a clear error."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, VisionTransformer):
        return inner
    name = type(inner if isinstance(inner, nn.Module) else model).__name__
    raise UnsupportedModelError(f"cannot explain a {name}: vitlens.relevance supports {SUPPORTED}")


# --------------------------------------------------------------------------------------------
# numerics

# torch's float32 precision switches (torch >= 2.9): matmuls and convolutions, per backend
_FP32_SWITCHES = ("cuda.matmul", "cudnn.conv", "mkldnn.matmul", "mkldnn.conv")


@contextlib.contextmanager
def float32_precision(tf32: bool):
    """Float32 matmuls and convolutions in full precision (``tf32=False``) or TF32 for the
    duration of the block, whatever torch's global setting (``set_float32_matmul_precision``,
    ``allow_tf32``, ``cudnn.allow_tf32`` which is on by default); each switch is restored to
    exactly what it was. Not thread-safe: the switches are process-wide."""
    switches = []
    for path in _FP32_SWITCHES:
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            switches.append(obj)
    if not switches:  # older torch: the legacy switches
        old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old[0])
            torch.backends.cudnn.allow_tf32 = old[1]
        return
    saved = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = "tf32" if tf32 else "ieee"
        yield
    finally:
        for s, value in zip(switches, saved):
            s.fp32_precision = value


# --------------------------------------------------------------------------------------------
# weights


@dataclass
class Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


@dataclass
class Linear:
    weight: torch.Tensor  # (out, in), compute dtype
    bias: torch.Tensor | None
    mm_weight: torch.Tensor  # weight in the matmul dtype (same tensor when they agree)
    _abs: torch.Tensor | None = field(default=None, repr=False)
    _signs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def abs_weight(self) -> torch.Tensor:
        """|W| in the matmul dtype, built on first use (LRP only)."""
        if self._abs is None:
            self._abs = self.mm_weight.abs()
        return self._abs

    @property
    def sign_weight(self) -> torch.Tensor:
        """``[W+, W-]`` (out, 2 * in) in the matmul dtype, built once on first use (the Linear
        rule with low-precision matmuls)."""
        if self._signs is None:
            W = self.mm_weight
            self._signs = torch.cat([W.clamp(min=0), W.clamp(max=0)], dim=1)
        return self._signs


@dataclass
class BlockWeights:
    norm1: Norm | None
    qkv: Linear
    q_norm: Norm | None
    k_norm: Norm | None
    attn_norm: Norm | None
    proj: Linear
    ls1: torch.Tensor | None
    norm2: Norm | None
    fc1: Linear
    gelu_approximate: str
    mlp_norm: Norm | None
    fc2: Linear
    ls2: torch.Tensor | None
    num_heads: int
    head_dim: int
    scale: float


@dataclass
class Backbone:
    """Detached weights and layout of one timm ViT, in the dtype relevance is computed in."""

    dtype: torch.dtype
    mm_dtype: torch.dtype
    device: torch.device
    patch_weight: torch.Tensor  # (D, C, ph, pw)
    patch_bias: torch.Tensor | None
    patch_size: tuple[int, int]
    patch_norm: Norm | None
    img_size: tuple[int, int] | None
    grid_size: tuple[int, int]
    dynamic_img_size: bool
    dynamic_img_pad: bool
    prefix_tokens: torch.Tensor | None  # (1, p, D): class, (distillation | registers)
    num_prefix_tokens: int
    pos_embed: torch.Tensor | None
    no_embed_class: bool
    norm_pre: Norm | None
    blocks: list[BlockWeights]
    norm: Norm | None
    pool: str  # "token" | "avg" | "distilled"
    pool_include_prefix: bool
    fc_norm: Norm | None
    head: Linear
    head_dist: Linear | None

    # True when the relevance rules' matmuls round their inputs (bf16, fp16 or TF32): the rules
    # then use formulations that stay accurate under rounding (``rules._linear_rule_lowp``).
    rounding: bool = False
    tf32: bool = False  # the rounding is TF32's: set around the rules by the caller

    def exact(self):
        """Full float32 matmuls and convolutions inside (a no-op unless the rules run in
        TF32): for the z-rule denominators that can cancel, which must be the forward's."""
        return float32_precision(False) if self.tf32 else contextlib.nullcontext()

    # The forward pass that the LRP rules read runs in the compute dtype: the z-rule
    # denominators are built from its records, and low-precision records make them
    # ill-conditioned (bf16 or TF32 records put transformer_attribution maps of a random ViT-S
    # off by 40-100%). ``mm_dtype`` applies to the relevance rules' matmuls, to the input
    # gradients of the Linear layers in the gradient pass (``_LinearLowpGrad``) and, with
    # ``fast=True`` (no LRP rule reads the records), to the forward's Linear layers too.
    def linear(self, x: torch.Tensor, layer: Linear, fast: bool = False) -> torch.Tensor:
        if self.mm_dtype != self.dtype and (fast or (x.requires_grad and torch.is_grad_enabled())):
            return _LinearLowpGrad.apply(x, layer.weight, layer.bias, layer.mm_weight, fast)
        return F.linear(x, layer.weight, layer.bias)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class _LinearLowpGrad(torch.autograd.Function):
    """``F.linear`` whose input gradient ``g W`` runs in the matmul dtype; with ``fast`` the
    forward matmul does too (the output and the bias add stay in the compute dtype)."""

    @staticmethod
    def forward(x, weight, bias, mm_weight, fast):
        if not fast:
            return F.linear(x, weight, bias)
        y = (x.to(mm_weight.dtype) @ mm_weight.T).to(x.dtype)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mm_weight = inputs[3]

    @staticmethod
    def backward(ctx, g):
        w = ctx.mm_weight
        return (g.to(w.dtype) @ w).to(g.dtype), None, None, None, None


def _norm(module: nn.Module, where: str, dtype) -> Norm | None:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm):
        w = None if module.weight is None else module.weight.detach().to(dtype)
        b = None if module.bias is None else module.bias.detach().to(dtype)
        return Norm(w, b, module.eps)
    raise UnsupportedModelError(
        f"{where} is a {type(module).__name__}; vitlens.relevance supports LayerNorm only "
        f"(it supports {SUPPORTED})"
    )


def _linear(module: nn.Module, where: str, dtype, mm_dtype) -> Linear:
    if type(module) is not nn.Linear:
        raise UnsupportedModelError(
            f"{where} is a {type(module).__name__}, expected nn.Linear (supported: {SUPPORTED})"
        )
    w = module.weight.detach().to(dtype)
    b = None if module.bias is None else module.bias.detach().to(dtype)
    return Linear(w, b, w if mm_dtype == dtype else w.to(mm_dtype))


def _gelu(module: nn.Module, where: str) -> str:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(module) is QuickGELU:  # x * sigmoid(1.702 x), OpenAI CLIP: the same rule as GELU
        return "quick"
    if isinstance(module, nn.GELU):
        return module.approximate
    if type(module) is GELU:
        return "none"
    if type(module) is GELUTanh:
        return "tanh"
    raise UnsupportedModelError(
        f"{where} is a {type(module).__name__}; vitlens.relevance supports GELU MLPs "
        f"(supported: {SUPPORTED})"
    )


def _identity_in_eval(module: nn.Module, where: str) -> None:
    from timm.layers import DropPath, PatchDropout

    if not isinstance(module, (nn.Identity, nn.Dropout, DropPath, PatchDropout)):
        raise UnsupportedModelError(
            f"{where} is a {type(module).__name__}, expected Identity/Dropout/DropPath "
            f"(supported: {SUPPORTED})"
        )


def _layer_scale(module: nn.Module, where: str, dtype) -> torch.Tensor | None:
    from timm.layers import LayerScale

    if isinstance(module, nn.Identity):
        return None
    if type(module) is LayerScale:
        return module.gamma.detach().to(dtype)
    raise UnsupportedModelError(f"{where} is a {type(module).__name__}, expected timm LayerScale")


def _block(blk: nn.Module, i: int, dtype, mm_dtype) -> BlockWeights:
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    where = f"blocks.{i}"
    if type(blk) is not Block:
        raise UnsupportedModelError(
            f"{where} is a {type(blk).__name__}; vitlens.relevance supports timm's pre-norm Block "
            f"(supported: {SUPPORTED})"
        )
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(
            f"{where}.attn is a {type(attn).__name__}{' with a gate' if type(attn) is Attention else ''}; "
            f"vitlens.relevance supports timm Attention (supported: {SUPPORTED})"
        )
    if type(mlp) is not Mlp or isinstance(mlp.fc1, nn.Conv2d):
        raise UnsupportedModelError(
            f"{where}.mlp is a {type(mlp).__name__}; vitlens.relevance supports timm Mlp with GELU "
            f"(supported: {SUPPORTED})"
        )
    for name in ("drop_path1", "drop_path2"):
        _identity_in_eval(getattr(blk, name), f"{where}.{name}")
    return BlockWeights(
        norm1=_norm(blk.norm1, f"{where}.norm1", dtype),
        qkv=_linear(attn.qkv, f"{where}.attn.qkv", dtype, mm_dtype),
        q_norm=_norm(attn.q_norm, f"{where}.attn.q_norm", dtype),
        k_norm=_norm(attn.k_norm, f"{where}.attn.k_norm", dtype),
        attn_norm=_norm(getattr(attn, "norm", nn.Identity()), f"{where}.attn.norm", dtype),
        proj=_linear(attn.proj, f"{where}.attn.proj", dtype, mm_dtype),
        ls1=_layer_scale(blk.ls1, f"{where}.ls1", dtype),
        norm2=_norm(blk.norm2, f"{where}.norm2", dtype),
        fc1=_linear(mlp.fc1, f"{where}.mlp.fc1", dtype, mm_dtype),
        gelu_approximate=_gelu(mlp.act, f"{where}.mlp.act"),
        mlp_norm=_norm(mlp.norm, f"{where}.mlp.norm", dtype),
        fc2=_linear(mlp.fc2, f"{where}.mlp.fc2", dtype, mm_dtype),
        ls2=_layer_scale(blk.ls2, f"{where}.ls2", dtype),
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=attn.scale,
    )


def read_backbone(vit: nn.Module, *, dtype: torch.dtype, mm_dtype: torch.dtype,
                  rounding: bool | None = None, tf32: bool = False) -> Backbone:
    """Detached weights of ``vit`` (a timm VisionTransformer) cast to ``dtype``; checks support.
    ``rounding``: the rules' matmuls round their inputs (default: ``mm_dtype != dtype``)."""
    from timm.layers import PatchEmbed
    from timm.models.deit import VisionTransformerDistilled

    pe = vit.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise UnsupportedModelError(
            f"patch_embed is a {type(pe).__name__}; vitlens.relevance supports timm PatchEmbed "
            f"(supported: {SUPPORTED})"
        )
    if getattr(vit, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"global_pool={vit.global_pool!r} (attention pooling) is not supported; "
            "use 'token' or 'avg'"
        )
    distilled = isinstance(vit, VisionTransformerDistilled)
    if distilled:
        pool = "distilled"
    elif vit.global_pool in ("token", "avg"):
        pool = vit.global_pool
    else:
        raise UnsupportedModelError(
            f"global_pool={vit.global_pool!r} is not supported; vitlens.relevance explains "
            "classifiers with global_pool 'token' or 'avg'"
        )
    if not isinstance(vit.head, nn.Linear):
        raise UnsupportedModelError(
            f"the model has no classifier head (head is {type(vit.head).__name__}); "
            "build it with num_classes > 0"
        )
    for name in ("pos_drop", "patch_drop", "head_drop"):
        _identity_in_eval(getattr(vit, name), name)

    prefix = [t for t in (vit.cls_token, getattr(vit, "dist_token", None) if distilled else None,
                          None if distilled else vit.reg_token) if t is not None]
    prefix_tokens = torch.cat([t.detach().to(dtype) for t in prefix], dim=1) if prefix else None
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    if n_prefix != vit.num_prefix_tokens:
        raise UnsupportedModelError(
            f"{type(vit).__name__} has {vit.num_prefix_tokens} prefix tokens but vitlens found "
            f"{n_prefix} (class/distillation/register); this layout is not supported"
        )
    pw = pe.proj
    if tuple(pw.stride) != tuple(pw.kernel_size) or any(pw.padding):
        raise UnsupportedModelError("patch_embed.proj must be a non-overlapping patch convolution")
    return Backbone(
        dtype=dtype,
        mm_dtype=mm_dtype,
        rounding=mm_dtype != dtype if rounding is None else rounding,
        tf32=tf32,
        device=pw.weight.device,
        patch_weight=pw.weight.detach().to(dtype),
        patch_bias=None if pw.bias is None else pw.bias.detach().to(dtype),
        patch_size=tuple(pw.kernel_size),
        patch_norm=_norm(pe.norm, "patch_embed.norm", dtype),
        img_size=None if pe.img_size is None else tuple(pe.img_size),
        grid_size=tuple(pe.grid_size) if pe.grid_size is not None else None,
        dynamic_img_size=bool(vit.dynamic_img_size),
        dynamic_img_pad=bool(pe.dynamic_img_pad),
        prefix_tokens=prefix_tokens,
        num_prefix_tokens=n_prefix,
        pos_embed=None if vit.pos_embed is None else vit.pos_embed.detach().to(dtype),
        no_embed_class=bool(vit.no_embed_class),
        norm_pre=_norm(vit.norm_pre, "norm_pre", dtype),
        blocks=[_block(b, i, dtype, mm_dtype) for i, b in enumerate(vit.blocks)],
        norm=_norm(vit.norm, "norm", dtype),
        pool=pool,
        pool_include_prefix=bool(getattr(vit, "pool_include_prefix", False)),
        fc_norm=_norm(vit.fc_norm, "fc_norm", dtype),
        head=_linear(vit.head, "head", dtype, mm_dtype),
        head_dist=_linear(vit.head_dist, "head_dist", dtype, mm_dtype) if distilled else None,
    )


# --------------------------------------------------------------------------------------------
# forward


def layer_norm(x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    if norm is None:
        return x
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


@dataclass
class Embedding:
    images: torch.Tensor  # the (padded) input of the patch convolution
    patches: torch.Tensor  # (B, P, D) patch tokens after the patch norm, before position embedding
    tokens: torch.Tensor  # (B, N, D) after position embedding (block 0 input before norm_pre)
    grid: tuple[int, int]


def embed(bb: Backbone, images: torch.Tensor) -> Embedding:
    """Patch embedding + prefix tokens + position embedding (timm ``_pos_embed``)."""
    from timm.layers import resample_abs_pos_embed

    H, W = images.shape[-2:]
    ph, pw = bb.patch_size
    if bb.dynamic_img_pad:
        images = F.pad(images, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
    elif not bb.dynamic_img_size and bb.img_size is not None and (H, W) != bb.img_size:
        raise ValueError(
            f"images are {H}x{W} but the model was built for {bb.img_size[0]}x{bb.img_size[1]}; "
            "build it with dynamic_img_size=True to explain other sizes"
        )
    elif H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    x = F.conv2d(images, bb.patch_weight, bb.patch_bias, stride=bb.patch_size)
    grid = tuple(x.shape[-2:])
    patches = layer_norm(x.flatten(2).transpose(1, 2), bb.patch_norm)
    B = patches.shape[0]
    pos = bb.pos_embed
    if pos is not None and grid != bb.grid_size:
        pos = resample_abs_pos_embed(
            pos, new_size=grid, old_size=bb.grid_size,
            num_prefix_tokens=0 if bb.no_embed_class else bb.num_prefix_tokens,
        )
    prefix = [] if bb.prefix_tokens is None else [bb.prefix_tokens.expand(B, -1, -1)]
    if pos is None:
        tokens = torch.cat(prefix + [patches], dim=1)
    elif bb.no_embed_class:
        tokens = torch.cat(prefix + [patches + pos], dim=1)
    else:
        tokens = torch.cat(prefix + [patches], dim=1) + pos
    return Embedding(images=images, patches=patches, tokens=tokens, grid=grid)


@dataclass
class BlockTrace:
    """What one block's forward pass leaves for the relevance rules (None: not recorded)."""

    attn: torch.Tensor | None = None  # (B, H, N, N) softmax output
    x: torch.Tensor | None = None  # block input
    h1: torch.Tensor | None = None  # qkv input (in the matmul dtype: see ``_record``)
    qkv: torch.Tensor | None = None  # qkv output (B, N, 3 * H * d), kept only with q/k norm
    q: torch.Tensor | None = None  # (B, H, N, d) after q_norm, unscaled
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    heads: torch.Tensor | None = None  # (B, H, N, d) = attn @ v
    o: torch.Tensor | None = None  # proj input (B, N, H * d), in the matmul dtype
    proj: torch.Tensor | None = None  # proj output
    a: torch.Tensor | None = None  # attention branch output (after LayerScale)
    x_mid: torch.Tensor | None = None
    h2: torch.Tensor | None = None  # fc1 input, in the matmul dtype
    f1: torch.Tensor | None = None  # fc1 output (not kept with low-precision matmuls)
    g: torch.Tensor | None = None  # fc2 input, in the matmul dtype
    f2: torch.Tensor | None = None  # fc2 output
    m: torch.Tensor | None = None  # MLP branch output (after LayerScale)
    x_out: torch.Tensor | None = None


def block_forward(bb: Backbone, w: BlockWeights, x: torch.Tensor, *, keep_attn: bool,
                  keep_all: bool, fast: bool = False,
                  compact: bool = False) -> tuple[torch.Tensor, BlockTrace]:
    """timm ``Block.forward`` in eval mode. Fused attention unless the matrix is kept.
    ``fast``: Linear layers in the matmul dtype (see ``Backbone.linear``); ``compact``: see
    ``_record``."""
    B, N, _ = x.shape
    t = BlockTrace()
    h1 = layer_norm(x, w.norm1)
    qkv = bb.linear(h1, w.qkv, fast)
    qkv_heads = qkv.view(B, N, 3, w.num_heads, w.head_dim).permute(2, 0, 3, 1, 4)
    if keep_attn or keep_all:  # contiguous q, k, v: every attention matmul reads them
        qkv_heads = qkv_heads.contiguous()
    q, k, v = qkv_heads.unbind(0)
    q, k = layer_norm(q, w.q_norm), layer_norm(k, w.k_norm)
    if keep_attn or keep_all:
        # scale the scores, not q (as the authors' code does): autograd then keeps no scaled q
        attn = bb.mm(q, k.transpose(-2, -1)).mul_(w.scale).softmax(dim=-1)
        heads = bb.mm(attn, v)
        t.attn = attn
    else:
        heads = F.scaled_dot_product_attention(q, k, v)
    o = layer_norm(heads.transpose(1, 2).reshape(B, N, -1), w.attn_norm)
    proj = bb.linear(o, w.proj, fast)
    a = proj if w.ls1 is None else proj * w.ls1
    x_mid = x + a
    h2 = layer_norm(x_mid, w.norm2)
    f1 = bb.linear(h2, w.fc1, fast)
    act = f1 * torch.sigmoid(1.702 * f1) if w.gelu_approximate == "quick" else F.gelu(f1, approximate=w.gelu_approximate)
    g = layer_norm(act, w.mlp_norm)
    f2 = bb.linear(g, w.fc2, fast)
    m = f2 if w.ls2 is None else f2 * w.ls2
    x_out = x_mid + m
    if keep_all:
        _record(bb, w, t, compact, x=x, h1=h1, qkv=qkv, q=q, k=k, v=v, heads=heads, o=o, proj=proj, a=a,
                x_mid=x_mid, h2=h2, f1=f1, g=g, f2=f2, m=m, x_out=x_out)
    return x_out, t


def _record(bb: Backbone, w: BlockWeights, t: BlockTrace, compact: bool,
            **r: torch.Tensor) -> None:
    """Keep what the relevance rules read, and no more (memory: ViT-B/16 at batch 64 keeps
    ~0.6 GiB per block).

    - The inputs of the Linear layers (h1, o, h2, g) are read only by the Linear rules. With
      ``compact`` (bf16 matmuls and only the paper's rules to run) they are kept cast to the
      matmul dtype: the paper's low-precision Linear rule casts them first anyway, so the maps
      are the same at half the size. The plain rules (partial/full LRP) multiply by them in
      float32 and lose accuracy when they are rounded (partial_lrp 4.6% -> 9.8% off float64).
    - The Linear outputs are the float32/float64 Linear rule's denominators. With
      low-precision matmuls that rule rebuilds its denominators, so qkv and f1 are dropped
      (autograd frees f1 after the gradient pass). Without q/k norm the qkv output is q, k, v,
      which the rule reassembles (``qkv_output``).
    - ``heads`` is a view of ``o`` when there is no attention-output norm (o is heads
      rearranged).
    """
    low = bb.rounding
    cast = (lambda a: a.to(bb.mm_dtype)) if compact else (lambda a: a)
    t.x, t.q, t.k, t.v, t.a, t.x_mid, t.m, t.x_out = (
        r["x"], r["q"], r["k"], r["v"], r["a"], r["x_mid"], r["m"], r["x_out"])
    t.proj, t.f2 = r["proj"], r["f2"]  # the same tensors as a and m without LayerScale
    t.h1, t.h2, t.g = cast(r["h1"]), cast(r["h2"]), cast(r["g"])
    o, heads = r["o"], r["heads"]
    if compact or w.attn_norm is not None:
        t.o, t.heads = cast(o), heads
    else:
        B, H, N, d = heads.shape
        t.o, t.heads = o, o.view(B, N, H, d).transpose(1, 2)
    if not low:
        t.f1 = r["f1"]
        if w.q_norm is not None or w.k_norm is not None:
            t.qkv = r["qkv"]


def qkv_output(t: BlockTrace) -> torch.Tensor:
    """The qkv Linear's output (B, N, 3 * H * d): recorded, or reassembled from q, k, v."""
    if t.qkv is not None:
        return t.qkv
    B, H, N, d = t.q.shape
    out = t.q.new_empty(B, N, 3, H, d)
    parts = out.permute(2, 0, 3, 1, 4)
    for i, part in enumerate((t.q, t.k, t.v)):
        parts[i].copy_(part)
    return out.view(B, N, 3 * H * d)


@dataclass
class Trace:
    """A recorded forward pass: embedding, per-block traces, final features and logits."""

    embedding: Embedding
    blocks: list[BlockTrace]
    features: torch.Tensor  # (B, N, D) final norm output
    pooled: torch.Tensor  # (B, D) or (B, 2, D) for the distilled head: head input(s)
    head_outputs: tuple[torch.Tensor, ...]  # per head logits (one, or class + distillation)
    logits: torch.Tensor


def forward(bb: Backbone, images: torch.Tensor, *, attn_from: int, lrp_from: int,
            grad_from: int, fast: bool = False, compact: bool = False) -> Trace:
    """Eval-mode forward pass recording attention from block ``attn_from`` and everything the
    LRP rules need from block ``lrp_from``; autograd tracks blocks from ``grad_from`` on (the
    input of that block becomes a graph leaf, so nothing below is differentiated).
    ``fast``: Linear layers in the matmul dtype (only when no LRP rule reads the records);
    ``compact``: Linear inputs recorded in the matmul dtype (see ``_record``)."""
    L = len(bb.blocks)
    with torch.no_grad():
        emb = embed(bb, images)
        x = layer_norm(emb.tokens, bb.norm_pre)
    traces = []
    for i, w in enumerate(bb.blocks):
        if i == grad_from:
            x = x.detach().requires_grad_(True)
        with torch.set_grad_enabled(i >= grad_from):
            x, t = block_forward(bb, w, x, keep_attn=i >= attn_from, keep_all=i >= lrp_from,
                                 fast=fast, compact=compact)
        traces.append(t)
    with torch.set_grad_enabled(grad_from < L):
        feats = layer_norm(x, bb.norm)
        p = bb.num_prefix_tokens
        if bb.pool == "token":
            pooled = layer_norm(feats[:, 0], bb.fc_norm)
            outs = (bb.linear(pooled, bb.head, fast),)
            logits = outs[0]
        elif bb.pool == "avg":
            pooled = layer_norm((feats if bb.pool_include_prefix else feats[:, p:]).mean(dim=1), bb.fc_norm)
            outs = (bb.linear(pooled, bb.head, fast),)
            logits = outs[0]
        else:  # distilled: mean of head(class token) and head_dist(distillation token)
            pooled = feats[:, :2]  # timm's distilled head applies no fc_norm
            outs = (bb.linear(pooled[:, 0], bb.head, fast), bb.linear(pooled[:, 1], bb.head_dist, fast))
            logits = (outs[0] + outs[1]) / 2
    return Trace(emb, traces, feats, pooled, outs, logits)
