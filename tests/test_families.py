"""The timm families people fine-tune today (issue 10), each as a small seeded model built
with timm's own constructor (no download): it trains a step through ViTClassifier with a real
Trainer, loads checkpoints in its original key layout through timm's checkpoint_filter_fn, and
is explained by every relevance method (DINOv2, CLIP, SigLIP, EVA-02: logits, batching, targets,
the model untouched, conservation) or refused with a clear UnsupportedModelError (Swin)."""
from __future__ import annotations

import re

import lightning as L
import pytest
import timm
import torch

from conftest import TINY_CLASSES, tiny_datamodule
from vitlens.models import ViTClassifier, create_backbone, load_backbone_weights
from vitlens.relevance import METHODS, UnsupportedModelError, explain_many

WIDTH = dict(embed_dim=32, depth=2, num_heads=2)
# name -> (timm keywords, image size)
FAMILIES = {
    "vit_small_patch14_dinov2": (dict(WIDTH), 28),
    "vit_small_patch14_reg4_dinov2": (dict(WIDTH), 28),
    "eva02_tiny_patch14_224": (dict(WIDTH), 28),
    "vit_base_patch16_clip_224": (dict(WIDTH), 32),
    "vit_base_patch16_clip_quickgelu_224": (dict(WIDTH), 32),
    "vit_base_patch16_siglip_224": (dict(WIDTH), 32),
    "swin_tiny_patch4_window7_224": (dict(patch_size=2, window_size=4, embed_dim=16, depths=(1, 2), num_heads=(1, 2)), 32),
}
EXPLAINED = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_224",
             "vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_siglip_224", "eva02_tiny_patch14_224"]
NOT_EXPLAINED = {  # name -> what the error names
    "swin_tiny_patch4_window7_224": "SwinTransformer",
}
DETERMINISTIC = [m for m in METHODS if m != "random"]
PIXEL = ("full_lrp", "attnlrp", "cp_lrp")  # methods whose maps are (B, H, W)


def family_model(name: str, num_classes: int = 4, seed: int = 0, dtype=torch.float64, **extra):
    """timm's own constructor with small widths; random non-trivial norms, biases, tokens and
    layer scales so that every part of the model is seen. ``extra``: more timm keywords."""
    kwargs, size = FAMILIES.get(name, (dict(WIDTH), 28))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size, **kwargs, **extra)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias") or "token" in n or "gamma" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval(), size


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_one_step_through_the_classifier(name, tiny_dataset_dir, tmp_path):
    kwargs, size = FAMILIES[name]
    L.seed_everything(0, verbose=False)
    model = ViTClassifier(backbone=name, class_names=TINY_CLASSES, img_size=size, backbone_kwargs=kwargs,
                          lr=1e-2, layer_decay=0.75, warmup_epochs=0.0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_dataset_dir, image_size=size, backbone=name))
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [k for k, v in model.model.state_dict().items() if v.is_floating_point() and not torch.equal(before[k], v)]
    assert any(k.startswith(("blocks.0.", "layers.0.")) for k in changed), changed
    assert any(k.startswith("head") for k in changed)
    # layer decay: the first block learns more slowly than the head, by timm's group_matcher
    groups = trainer.optimizers[0].param_groups
    first = next(g for g in groups if g["name"].startswith("01_"))
    head = next(g for g in groups if g["name"].endswith("head/wd"))
    assert first["initial_lr"] == pytest.approx(head["initial_lr"] * 0.75 ** (head["layer_id"] - 1))


# ---------------------------------------------------------------- original checkpoint layouts
def _trunk_equal(a, b, skip=("head",)):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if k.startswith(skip) or "relative_position_index" in k or "attn_mask" in k:
            continue
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


def test_dinov2_original_layout_with_registers(tmp_path):
    kwargs, size = FAMILIES["vit_small_patch14_reg4_dinov2"]
    source = create_backbone("vit_small_patch14_reg4_dinov2", 0, img_size=size, **kwargs)
    sd = source.state_dict()
    pos_cls = torch.randn(1, 1, 32)
    orig = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    orig["register_tokens"] = sd["reg_token"]
    orig["cls_token"] = sd["cls_token"] - pos_cls  # facebookresearch/dinov2: the class token has a position
    orig["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    orig["mask_token"] = torch.zeros(1, 32)
    torch.save(orig, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    target = create_backbone("vit_small_patch14_reg4_dinov2", 4, img_size=size, **kwargs)
    assert load_backbone_weights(target, tmp_path / "dinov2_vits14_reg4_pretrain.pth") == "timm"
    _trunk_equal(source, target)


def test_dinov2_original_layout_resampled_to_another_image_size(tmp_path):
    from timm.layers import resample_abs_pos_embed

    kwargs, _ = FAMILIES["vit_small_patch14_dinov2"]
    source = create_backbone("vit_small_patch14_dinov2", 0, img_size=56, **kwargs)  # 4x4 grid
    orig = dict(source.state_dict(), mask_token=torch.zeros(1, 32))
    target = create_backbone("vit_small_patch14_dinov2", 4, img_size=28, **kwargs)  # 2x2 grid
    load_backbone_weights(target, orig)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[1].ls2.gamma, source.blocks[1].ls2.gamma)


def _openai_clip_layout(sd):
    swaps = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("norm1", "ln_1"), ("norm2", "ln_2"),
             ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("blocks.", "transformer.resblocks.")]
    out = {}
    for k, v in sd.items():
        if k.startswith("head"):
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        if k.startswith("norm."):
            out["visual.ln_post." + k[len("norm."):]] = v
            continue
        for a, b in swaps:
            k = k.replace(a, b)
        out["visual." + k] = v
    out["visual.proj"] = torch.randn(32, 16)  # the image projection of the contrastive model
    out["token_embedding.weight"] = torch.randn(10, 16)  # the text tower, dropped
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(48, 16)
    out["logit_scale"] = torch.tensor(4.6)
    return out


@pytest.mark.parametrize("layout", ["openai", "open_clip_timm_trunk"])
def test_clip_original_layouts(layout, tmp_path):
    kwargs, size = FAMILIES["vit_base_patch16_clip_224"]
    source = create_backbone("vit_base_patch16_clip_224", 0, img_size=size, **kwargs)
    if layout == "openai":
        orig = _openai_clip_layout(source.state_dict())
    else:
        orig = {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}
        orig["text.token_embedding.weight"] = torch.randn(10, 16)
    torch.save(orig, tmp_path / "clip.pt")
    target = create_backbone("vit_base_patch16_clip_224", 4, img_size=size, **kwargs)
    load_backbone_weights(target, tmp_path / "clip.pt")
    _trunk_equal(source, target)


def test_eva02_mim_pretraining_layout(tmp_path):
    kwargs, size = FAMILIES["eva02_tiny_patch14_224"]
    source = create_backbone("eva02_tiny_patch14_224", 0, img_size=size, global_pool="token", **kwargs)
    orig = {}
    for k, v in source.state_dict().items():
        orig[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")] = v  # EVA-02's SwiGLU names
    orig["mask_token"] = torch.zeros(1, 1, 32)
    orig["lm_head.weight"] = torch.randn(64, 32)
    orig["lm_head.bias"] = torch.randn(64)
    orig["rope.freqs_cos"] = torch.randn(4, 8)  # a fixed buffer, not loaded
    target = create_backbone("eva02_tiny_patch14_224", 4, img_size=size, **kwargs)  # avg pooling, fc_norm
    load_backbone_weights(target, {"model": orig})
    _trunk_equal(source, target, skip=("head", "fc_norm", "norm."))
    # timm's EVA filter starts the fine-tuning fc_norm from the pre-training final norm
    torch.testing.assert_close(target.fc_norm.weight, source.norm.weight)


def test_swin_original_layout_downsample_at_the_stage_end(tmp_path):
    kwargs, size = FAMILIES["swin_tiny_patch4_window7_224"]
    source = create_backbone("swin_tiny_patch4_window7_224", 0, img_size=size, **kwargs)
    orig = {}
    for k, v in source.state_dict().items():
        # microsoft/Swin-Transformer merges patches at the end of a stage, timm at the start of the next
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        orig[k] = v
    orig["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    orig["head.weight"], orig["head.bias"] = torch.randn(1000, 32), torch.randn(1000)
    torch.save({"model": orig}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    target = create_backbone("swin_tiny_patch4_window7_224", 4, img_size=size, **kwargs)
    assert load_backbone_weights(target, tmp_path / "swin_tiny_patch4_window7_224.pth") == "mae"  # {"model": ...}
    _trunk_equal(source, target)


def test_a_checkpoint_of_another_family_still_lists_the_keys():
    kwargs, size = FAMILIES["vit_small_patch14_dinov2"]
    dinov2 = create_backbone("vit_small_patch14_dinov2", 0, img_size=size, **kwargs).state_dict()
    eva = create_backbone("eva02_tiny_patch14_224", 4, img_size=size, **FAMILIES["eva02_tiny_patch14_224"][0])
    with pytest.raises(ValueError) as err:
        load_backbone_weights(eva, dinov2)
    message = str(err.value)
    assert "\n" not in message and "does not fit the backbone" in message
    assert "missing keys" in message and "blocks.0.attn.q_bias" in message
    assert "unexpected keys" in message and "blocks.0.ls1.gamma" in message


# ---------------------------------------------------------------- relevance
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("name", EXPLAINED)
def test_explained_family_every_method_in_float64(name):
    model, size = family_model(name)
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])  # a different class per image
    before = _snapshot(model)
    out = explain_many(model, x, METHODS, targets)
    state, training, grads = _snapshot(model)
    assert training == before[1] and grads == before[2]
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert torch.allclose(out.logits, model(x), rtol=0, atol=1e-12)
    assert torch.equal(out.targets, targets)
    patch = model.patch_embed.patch_size[0]
    for m, r in out.maps.items():
        assert r.dtype == torch.float64, m
        assert r.shape == ((3, size, size) if m in PIXEL else (3, size // patch, size // patch)), m
        assert torch.isfinite(r).all(), m
        assert m == "attn_gradcam" or r.abs().sum() > 0, m
    for i in range(3):  # batch = one image at a time
        single = explain_many(model, x[i:i + 1], DETERMINISTIC, int(targets[i]))
        for m in DETERMINISTIC:
            a, b = out.maps[m][i:i + 1].flatten(), single.maps[m].flatten()
            assert (a - b).norm() <= 1e-10 * max(b.norm(), 1e-300), (name, m, i)
    # the target matters: another class gives another transformer_attribution map
    other = explain_many(model, x, ["transformer_attribution"], torch.tensor([1, 0, 2]))
    assert not torch.allclose(other.maps["transformer_attribution"], out.maps["transformer_attribution"])


@pytest.mark.parametrize("name", list(NOT_EXPLAINED))
def test_unexplained_family_is_a_clear_error(name):
    model, size = family_model(name)
    with pytest.raises(UnsupportedModelError) as err:
        explain_many(model, torch.randn(1, 3, size, size, dtype=torch.float64), ["transformer_attribution"])
    message = str(err.value)
    assert NOT_EXPLAINED[name] in message and "\n" not in message


def test_a_failing_timm_filter_still_gives_the_key_listing():
    kwargs, size = FAMILIES["swin_tiny_patch4_window7_224"]
    swin = create_backbone("swin_tiny_patch4_window7_224", 4, img_size=size, **kwargs)
    sd = dict(swin.state_dict())
    sd["layers.7.blocks.0.attn.relative_position_bias_table"] = torch.zeros(49, 1)  # a stage the model lacks
    with pytest.raises(ValueError) as err:
        load_backbone_weights(swin, sd)
    message = str(err.value)
    assert "\n" not in message
    assert "unexpected keys ['layers.7.blocks.0.attn.relative_position_bias_table']" in message
    assert "timm's timm.models.swin_transformer.checkpoint_filter_fn failed" in message


# ---------------------------------------------------------------- conservation
# The paper's rules (transformer_attribution, lrp_rollout) conserve relevance through every
# layer: the Linear rule (alpha 1, beta 0, bias ignored), the rescaled residual rule, the
# halved z-rules of attn @ v and q k^T, the identity rules of LayerNorm / GELU / SiLU, the
# uniform rule of SwiGLU's product and the z-rule of the (bias-free) rotary map. Only the
# attention pool leaks: the half of its score relevance that reaches the latent's query goes
# to the latent (a parameter, like a bias), i.e. a quarter of everything (1/2 of heads -> attn,
# 1/2 of that -> q). Bound: the 1e-9 stabilisers of the z-rule denominators (relative 1e-9 /
# |z| per layer): 1e-8 for DINOv2, 5e-6 for EVA-02, whose average pooling divides by token
# means of ~1e-4 in these random models, 2e-5 for an attention pool whose scores q k^T come
# near 0; 1e-4 here (a lost quarter or a missed rule would be off by >= 1e-2).
CONSERVED_BY_PAPER_RULES = {"map": 0.75}  # pool kind -> share reaching the tokens (else 1)


def _zero_additive_constants(model):
    """Every bias, LayerNorm shift, position embedding and prefix token set to 0: these are
    the terms that absorb relevance in the Gradient x Input rule sets (x * grad of a constant
    is lost); without them a conservative rule set conserves the logit exactly."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "pos_embed" in n or "token" in n:
                p.zero_()
    return model


@pytest.mark.parametrize("name", EXPLAINED)
def test_explained_family_conserves_relevance_in_float64(name, monkeypatch):
    from vitlens.relevance import families, lrp_gradient, rules
    from vitlens.relevance.forward import forward

    model, size = family_model(name)
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    targets = torch.tensor([2, 1])
    bb = families.read(model, dtype=torch.float64, mm_dtype=torch.float64)
    L = len(bb.blocks)
    trace = forward(bb, x, attn_from=0, lrp_from=0, grad_from=L)
    R, readout = rules.head_rule(bb, trace, targets)
    # the readout weights sum to 1 and sit on the pooled tokens
    assert torch.allclose(readout.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-6)
    outside = torch.ones(readout.shape[1], dtype=torch.bool)
    outside[rules.pooled_tokens(bb, readout.shape[1])] = False
    assert (readout[:, outside] == 0).all()
    share = CONSERVED_BY_PAPER_RULES.get(bb.pool, 1.0)
    assert torch.allclose(R.sum((1, 2)), torch.full((2,), share, dtype=torch.float64), rtol=0, atol=1e-4)
    block_rule = bb.family.block_rule or rules.block_rule
    for i in reversed(range(L)):
        R, _ = block_rule(bb, bb.blocks[i], trace.blocks[i], R)
    assert torch.allclose(R.sum((1, 2)), torch.full((2,), share, dtype=torch.float64), rtol=0, atol=1e-4)

    # CP-LRP with gamma 0 (z-rule Linear layers, no relevance through the attention scores)
    # conserves the explained logit once nothing additive can absorb relevance. The slack is
    # zennit's stabiliser of the z-rule denominators: each unit keeps y / (y + 1e-6) of its
    # relevance, 0.05% (DINOv2) to 1.5% (EVA-02, whose logits here are ~1e-4) of these random
    # models' logits; with it at 1e-12 what is left is LXT's 1e-10 input stabiliser.
    # (AttnLRP does not conserve: its softmax rule, Gradient x Input of the softmax, leaks.)
    monkeypatch.setattr(lrp_gradient, "ZENNIT_EPS", 1e-12)
    _zero_additive_constants(model)
    out = explain_many(model, x, {"cp_lrp": dict(gamma_linear=0.0, gamma_conv=0.0)}, targets)
    logit = model(x).gather(1, targets[:, None])[:, 0].detach()
    total = out.maps["cp_lrp"].sum((1, 2))
    assert torch.allclose(total, logit, rtol=1e-6, atol=0), (total, logit)


def test_eva_rotary_rule_is_the_z_rule_of_the_rotation():
    """The Chefer rule through the rotary map equals x * d(S . rope(x))/dx (the z-rule of a
    bias-free linear map) and conserves."""
    from vitlens.relevance import families, rules
    from vitlens.relevance.families import eva

    model, size = family_model("eva02_tiny_patch14_224")
    bb = families.read(model, dtype=torch.float64, mm_dtype=torch.float64)
    B, H, N, d = 2, bb.blocks[0].num_heads, bb.num_prefix_tokens + bb.rope_sin.shape[0], bb.blocks[0].head_dim
    torch.manual_seed(3)
    pre = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    post = eva.rope(bb, pre)
    R = torch.randn(B, H, N, d, dtype=torch.float64)
    (grad,) = torch.autograd.grad((post * rules.sdiv(R, post.detach())).sum(), pre)
    t = eva.EvaBlockTrace(q=post.detach(), k=post.detach(), q_pre=pre.detach(), k_pre=pre.detach())
    R_q, R_k = R.clone(), R.clone()
    eva.rope_rule(bb, t, R_q, R_k)
    p = bb.num_prefix_tokens
    assert torch.allclose(R_q[:, :, p:], (pre.detach() * grad)[:, :, p:], rtol=1e-12, atol=1e-14)
    assert torch.equal(R_q[:, :, :p], R[:, :, :p])  # the prefix tokens are not rotated
    assert torch.allclose(R_q.sum((2, 3)), R.sum((2, 3)), rtol=1e-6)  # the 1e-9 stabiliser


# EVA-02 layouts besides eva02_tiny's (fused qkv, packed SwiGLU, average pooling): the base /
# large models' separate q/k/v projections, SwiGLU with its sub-LN, LayerScale; class-token and
# attention pooling; register tokens.
EVA_LAYOUTS = {
    "base_swiglu_subln_token": ("eva02_base_patch14_224", dict(global_pool="token", init_values=0.5)),
    "base_map": ("eva02_base_patch14_224", dict(global_pool="map", scale_attn_inner=True)),
    "tiny_reg_tokens_rotate_half": ("eva02_tiny_patch14_224", dict(num_reg_tokens=2, rope_rotate_half=True)),
}


@pytest.mark.parametrize("layout", list(EVA_LAYOUTS))
def test_eva_layouts_give_the_models_logits_and_conserve(layout, monkeypatch):
    from vitlens.relevance import families, rules
    from vitlens.relevance.forward import forward

    name, extra = EVA_LAYOUTS[layout]
    model, size = family_model(name, **extra)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = explain_many(model, x, METHODS, [1, 3])
    assert torch.allclose(out.logits, model(x), rtol=0, atol=1e-12)
    for m, r in out.maps.items():
        assert torch.isfinite(r).all() and (m == "attn_gradcam" or r.abs().sum() > 0), m
    bb = families.read(model, dtype=torch.float64, mm_dtype=torch.float64)
    trace = forward(bb, x, attn_from=0, lrp_from=0, grad_from=len(bb.blocks))
    R, _ = rules.head_rule(bb, trace, out.targets)
    for i in reversed(range(len(bb.blocks))):
        R, _ = bb.family.block_rule(bb, bb.blocks[i], trace.blocks[i], R)
    share = CONSERVED_BY_PAPER_RULES.get(bb.pool, 1.0)
    assert torch.allclose(R.sum((1, 2)), torch.full((2,), share, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "eva02_tiny_patch14_224"])
def test_preflight_dry_run_passes_every_method_on_siglip_and_eva(name, tiny_dataset_dir):
    """preflight runs each of the callback's methods once on the model: SigLIP and EVA-02 used
    to be refused there (UnsupportedModelError) and now pass with every method."""
    from vitlens.callbacks import ExplanationCallback
    from vitlens.preflight import preflight

    kwargs, size = FAMILIES[name]
    model = ViTClassifier(backbone=name, class_names=TINY_CLASSES, img_size=size, backbone_kwargs=kwargs)
    data = tiny_datamodule(tiny_dataset_dir, image_size=size, backbone=name)
    preflight(data, model, [ExplanationCallback(methods=list(METHODS), num_samples=2, perturbation_samples=2)])


@pytest.mark.parametrize("extra, names", [
    (dict(dynamic_img_size=True), "dynamic_img_size=True"),
    (dict(use_post_norm=True), "blocks.0 is a EvaBlockPostNorm"),
    (dict(swiglu_mlp=False), "blocks.0.mlp is a Mlp with GELU"),
    (dict(attn_type="rope"), "blocks.0.attn is a AttentionRope"),
    (dict(global_pool="max"), "global_pool='max'"),
])
def test_eva_layouts_without_rules_are_a_clear_error(extra, names):
    model, size = family_model("eva02_tiny_patch14_224", **extra)
    with pytest.raises(UnsupportedModelError) as err:
        explain_many(model, torch.randn(1, 3, size, size, dtype=torch.float64), ["transformer_attribution"])
    assert names in str(err.value) and "\n" not in str(err.value)
