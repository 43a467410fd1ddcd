"""The eval-mode forward pass, recomputed functionally from ``weights.Backbone``.

``explain()`` never calls the model's modules and never changes them: it reads their weights
(detached) and recomputes the forward pass with plain tensor functions, recording what the
relevance rules need (the attention matrices, the inputs of every Linear layer, ...). So the
model's fused attention flag, train/eval mode, hooks, ``requires_grad`` flags and ``.grad``
are untouched by construction, and the attention matrix is available without switching
timm's fused attention off. Tests check that this forward pass gives the model's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlens.relevance.weights import AttentionPoolWeights, Backbone, BlockWeights, Norm



def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """The MLP activation: GELU (``approximate`` "none" / "tanh"), OpenAI CLIP's QuickGELU
    (``"quick"``: ``x * sigmoid(1.702 x)``) or SiLU (``"silu"``: the gate of EVA-02's SwiGLU)."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    if approximate == "silu":
        return F.silu(x)
    return F.gelu(x, approximate=approximate)


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
    """What one block's forward pass leaves for the relevance rules (None: not recorded).

    The pre-norm block, in these names::

        x            = the block input
        qkv_input    = norm1(x)
        qkv          = qkv Linear(qkv_input)  ->  q, k (after q/k norm), v   (B, H, N, d)
        attn         = softmax(q k^T * scale)                                  (B, H, N, N)
        heads        = attn @ v                                                (B, H, N, d)
        proj_input   = attention-output norm(heads, rearranged to (B, N, H * d))
        proj_output  = proj Linear(proj_input)
        attn_branch  = ls1 * proj_output          (LayerScale; proj_output without it)
        x_after_attn = x + attn_branch
        fc1_input    = norm2(x_after_attn)
        fc1_output   = fc1 Linear(fc1_input)
        fc2_input    = mlp norm(activation(fc1_output))
        fc2_output   = fc2 Linear(fc2_input)
        mlp_branch   = ls2 * fc2_output
        x_after_mlp  = x_after_attn + mlp_branch   (the block output)

    Renamed 2026-12 (old -> new): h1 -> qkv_input, o -> proj_input, proj -> proj_output,
    h2 -> fc1_input, f1 -> fc1_output, g -> fc2_input, f2 -> fc2_output, a -> attn_branch,
    m -> mlp_branch, x_mid -> x_after_attn, x_out -> x_after_mlp.
    """

    attn: torch.Tensor | None = None  # (B, H, N, N) softmax output
    x: torch.Tensor | None = None  # block input
    qkv_input: torch.Tensor | None = None  # norm1 output (in the matmul dtype: see ``_record``)
    qkv: torch.Tensor | None = None  # qkv output (B, N, 3 * H * d), kept only with q/k norm
    q: torch.Tensor | None = None  # (B, H, N, d) after q_norm, unscaled
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    heads: torch.Tensor | None = None  # (B, H, N, d) = attn @ v
    proj_input: torch.Tensor | None = None  # (B, N, H * d), in the matmul dtype
    proj_output: torch.Tensor | None = None
    attn_branch: torch.Tensor | None = None  # attention branch output (after LayerScale)
    x_after_attn: torch.Tensor | None = None  # x + attn_branch
    fc1_input: torch.Tensor | None = None  # norm2 output, in the matmul dtype
    fc1_output: torch.Tensor | None = None  # (not kept with low-precision matmuls)
    fc2_input: torch.Tensor | None = None  # in the matmul dtype
    fc2_output: torch.Tensor | None = None
    mlp_branch: torch.Tensor | None = None  # MLP branch output (after LayerScale)
    x_after_mlp: torch.Tensor | None = None  # the block output


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
    g = layer_norm(gelu(f1, w.gelu_approximate), w.mlp_norm)
    f2 = bb.linear(g, w.fc2, fast)
    m = f2 if w.ls2 is None else f2 * w.ls2
    x_out = x_mid + m
    if keep_all:
        _record(bb, w, t, compact, x=x, qkv_input=h1, qkv=qkv, q=q, k=k, v=v, heads=heads, proj_input=o,
                proj_output=proj, attn_branch=a, x_after_attn=x_mid, fc1_input=h2, fc1_output=f1, fc2_input=g,
                fc2_output=f2, mlp_branch=m, x_after_mlp=x_out)
    return x_out, t


def _record(bb: Backbone, w: BlockWeights, t: BlockTrace, compact: bool,
            **r: torch.Tensor) -> None:
    """Keep what the relevance rules read, and no more (memory: ViT-B/16 at batch 64 keeps
    ~0.6 GiB per block).

    - The inputs of the Linear layers (qkv_input, proj_input, fc1_input, fc2_input) are read
      only by the Linear rules. With ``compact`` (bf16 matmuls and only the paper's rules to run) they are kept cast to the
      matmul dtype: the paper's low-precision Linear rule casts them first anyway, so the maps
      are the same at half the size. The plain rules (partial/full LRP) multiply by them in
      float32 and lose accuracy when they are rounded (partial_lrp 4.6% -> 9.8% off float64).
    - The Linear outputs are the float32/float64 Linear rule's denominators. With
      low-precision matmuls that rule rebuilds its denominators, so qkv and fc1_output are
      dropped (autograd frees fc1_output after the gradient pass). Without q/k norm the qkv
      output is q, k, v, which the rule reassembles (``qkv_output``).
    - ``heads`` is a view of ``proj_input`` when there is no attention-output norm
      (proj_input is heads rearranged).
    """
    low = bb.rounding
    cast = (lambda a: a.to(bb.mm_dtype)) if compact else (lambda a: a)
    t.x, t.q, t.k, t.v, t.attn_branch, t.x_after_attn, t.mlp_branch, t.x_after_mlp = (
        r["x"], r["q"], r["k"], r["v"], r["attn_branch"], r["x_after_attn"], r["mlp_branch"], r["x_after_mlp"])
    # without LayerScale these are the same tensors as the branches
    t.proj_output, t.fc2_output = r["proj_output"], r["fc2_output"]
    t.qkv_input, t.fc1_input, t.fc2_input = cast(r["qkv_input"]), cast(r["fc1_input"]), cast(r["fc2_input"])
    o, heads = r["proj_input"], r["heads"]
    if compact or w.attn_norm is not None:
        t.proj_input, t.heads = cast(o), heads
    else:
        B, H, N, d = heads.shape
        t.proj_input, t.heads = o, o.view(B, N, H, d).transpose(1, 2)
    if not low:
        t.fc1_output = r["fc1_output"]
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
class PoolTrace:
    """The attention pool's forward (``global_pool="map"``), all recorded (one query: small)."""

    tokens: torch.Tensor  # (B, M, D) the pooled tokens (before the pool's position embedding)
    kv_in: torch.Tensor  # (B, M, D) kv input (tokens + pool position embedding)
    kv: torch.Tensor  # (B, M, 2 * H * d) kv output
    q: torch.Tensor  # (B, H, 1, d) the latent's query (after q_norm, unscaled)
    k: torch.Tensor  # (B, H, M, d) after k_norm
    v: torch.Tensor
    attn: torch.Tensor  # (B, H, 1, M) softmax output: the latent's attention row
    heads: torch.Tensor  # (B, H, 1, d) = attn @ v
    o: torch.Tensor  # (B, H * d) proj input
    y: torch.Tensor  # (B, D) proj output
    h: torch.Tensor  # (B, D) fc1 input (the pool's norm output)
    f1: torch.Tensor  # fc1 output
    g: torch.Tensor  # fc2 input
    m: torch.Tensor  # (B, D) fc2 output: the MLP branch
    out: torch.Tensor  # (B, D) y + m: the pooled feature (before fc_norm)


def attention_pool(bb: Backbone, pw: AttentionPoolWeights, tokens: torch.Tensor,
                   fast: bool = False) -> PoolTrace:
    """timm ``AttentionPoolLatent.forward`` in eval mode (one latent, ``pool_type="token"``)."""
    B, M, _ = tokens.shape
    H, d = pw.num_heads, pw.head_dim
    kv_in = tokens if pw.pos_embed is None else tokens + pw.pos_embed
    latent = pw.latent.expand(B, -1, -1)
    q = latent if pw.q is None else bb.linear(latent, pw.q, fast)
    q = layer_norm(q.view(B, 1, H, d).transpose(1, 2), pw.q_norm)
    kv = bb.linear(kv_in, pw.kv, fast)
    k, v = kv.view(B, M, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    k = layer_norm(k, pw.k_norm)
    attn = bb.mm(q, k.transpose(-2, -1)).mul_(pw.scale).softmax(dim=-1)
    heads = bb.mm(attn, v)
    o = heads.transpose(1, 2).reshape(B, H * d)
    y = bb.linear(o, pw.proj, fast)
    h = layer_norm(y, pw.norm)
    f1 = bb.linear(h, pw.fc1, fast)
    g = layer_norm(gelu(f1, pw.gelu_approximate), pw.mlp_norm)
    m = bb.linear(g, pw.fc2, fast)
    return PoolTrace(tokens=tokens, kv_in=kv_in, kv=kv, q=q, k=k, v=v, attn=attn, heads=heads,
                     o=o, y=y, h=h, f1=f1, g=g, m=m, out=y + m)


@dataclass
class Trace:
    """A recorded forward pass: embedding, per-block traces, final features and logits."""

    embedding: Embedding
    blocks: list[BlockTrace]
    features: torch.Tensor  # (B, N, D) final norm output
    pooled: torch.Tensor  # (B, D) or (B, 2, D) for the distilled head: head input(s)
    head_outputs: tuple[torch.Tensor, ...]  # per head logits (one, or class + distillation)
    logits: torch.Tensor
    pool: PoolTrace | None = None  # the attention pool (pool == "map")


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
    run_block = getattr(bb.family, "block_forward", None) or block_forward
    for i, w in enumerate(bb.blocks):
        if i == grad_from:
            x = x.detach().requires_grad_(True)
        with torch.set_grad_enabled(i >= grad_from):
            x, t = run_block(bb, w, x, keep_attn=i >= attn_from, keep_all=i >= lrp_from,
                                 fast=fast, compact=compact)
        traces.append(t)
    with torch.set_grad_enabled(grad_from < L):
        feats = layer_norm(x, bb.norm)
        p = bb.num_prefix_tokens
        pool_trace = None
        if bb.pool == "token":
            pooled = layer_norm(feats[:, 0], bb.fc_norm)
            outs = (bb.linear(pooled, bb.head, fast),)
            logits = outs[0]
        elif bb.pool == "map":
            pool_trace = attention_pool(bb, bb.attn_pool, feats if bb.pool_include_prefix else feats[:, p:], fast)
            pooled = layer_norm(pool_trace.out, bb.fc_norm)
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
    return Trace(emb, traces, feats, pooled, outs, logits, pool_trace)
