"""The detached weights and layout of a model, in the dtype relevance is computed in.

These dataclasses are what a family adapter (``vitlens.relevance.families``) fills in and
what the functional forward (``forward.py``) and the rules (``rules.py``) read.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitlens.relevance.functions import LowPrecisionGradLinear
from vitlens.relevance.precision import float32_precision

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
class AttentionPoolWeights:
    """timm ``AttentionPoolLatent`` (``global_pool="map"``, SigLIP): one learned latent query
    cross-attends over the tokens, then ``out = y + mlp(norm(y))`` with ``y = proj(heads)``."""

    latent: torch.Tensor  # (1, 1, latent_dim)
    q: Linear | None  # None: the latent is the query (``q_proj=False``)
    kv: Linear
    q_norm: Norm | None
    k_norm: Norm | None
    proj: Linear
    norm: Norm | None
    fc1: Linear
    gelu_approximate: str
    mlp_norm: Norm | None
    fc2: Linear
    pos_embed: torch.Tensor | None  # (N, D) added to the tokens before ``kv``
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
    pool: str  # "token" | "avg" | "distilled" | "map" (attention pooling, ``attn_pool``)
    pool_include_prefix: bool
    fc_norm: Norm | None
    head: Linear
    head_dist: Linear | None
    attn_pool: AttentionPoolWeights | None = None  # pool == "map"

    # True when the relevance rules' matmuls round their inputs (bf16, fp16 or TF32): the rules
    # then use formulations that stay accurate under rounding (``rules._linear_rule_lowp``).
    rounding: bool = False
    tf32: bool = False  # the rounding is TF32's: set around the rules by the caller
    family: object = None  # the ``families.Family`` that read it (set by ``families.read``)

    def exact(self):
        """Full float32 matmuls and convolutions inside (a no-op unless the rules run in
        TF32): for the z-rule denominators that can cancel, which must be the forward's."""
        return float32_precision(False) if self.tf32 else contextlib.nullcontext()

    # The forward pass that the LRP rules read runs in the compute dtype: the z-rule
    # denominators are built from its records, and low-precision records make them
    # ill-conditioned (bf16 or TF32 records put transformer_attribution maps of a random ViT-S
    # off by 40-100%). ``mm_dtype`` applies to the relevance rules' matmuls, to the input
    # gradients of the Linear layers in the gradient pass (``LowPrecisionGradLinear``) and, with
    # ``fast=True`` (no LRP rule reads the records), to the forward's Linear layers too.
    def linear(self, x: torch.Tensor, layer: Linear, fast: bool = False) -> torch.Tensor:
        if self.mm_dtype != self.dtype and (fast or (x.requires_grad and torch.is_grad_enabled())):
            return LowPrecisionGradLinear.apply(x, layer.weight, layer.bias, layer.mm_weight, fast)
        return F.linear(x, layer.weight, layer.bias)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

