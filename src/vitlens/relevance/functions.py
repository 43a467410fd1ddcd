"""Custom autograd functions used by the functional forward pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F

class LowPrecisionGradLinear(torch.autograd.Function):
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
