"""Faithfulness and cost of every relevance method, vitlens's and (when installed) the peers'.

Every method explains the predicted class of the same images of one trained checkpoint; maps
are scored with ``vitlens.metrics.perturbation_auc`` (the paper's pixel perturbation test:
positive AUC, lower is better; negative AUC, higher is better) and timed (ms/image, same
batch, same process). Each row says the resolution its map has (patch grid or pixels); pixel
maps of attnlrp / cp_lrp are also scored summed to the patch grid (``resolution="patch"``),
to compare like with like. Beside them: the model's own forward + backward pass (the cost
unit; ``x fwd+bwd``).

Peers (optional extra ``peers``): LXT 2.1 AttnLRP / CP-LRP on the timm model when ``lxt`` and
``zennit`` are installed (``LXTOnTimm``: patches timm / torch classes while it runs and
restores them; reproduces shared/golden/lxt_vit_tiny_f64.npz exactly), Captum ``Saliency``
and ``IntegratedGradients`` when ``captum`` is installed. Without them only vitlens rows.

    python benchmarks/faithfulness.py --checkpoint checkpoints/<run>/last.ckpt \
        --images 'data/toybirds/images/val/*/*.png' --num-images 256 --batch-size 32
"""
from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import torch

from vitlens.metrics import perturbation_auc
from vitlens.relevance import METHODS, explain, get_method


def load(args):
    from vitlens.data import eval_transform, read_image
    from vitlens.models import load_classifier

    clf = load_classifier(args.checkpoint, map_location="cpu").eval()
    files = sorted(glob.glob(args.images, recursive=True))
    if not files:
        raise SystemExit(f"--images {args.images!r} matches no file")
    files = files[:: max(1, len(files) // args.num_images)][: args.num_images]
    transform = eval_transform(clf.model.patch_embed.img_size[0], clf.mean, clf.std, "resize", boxes=False)
    images = torch.stack([torch.from_numpy(transform(image=read_image(f))["image"]).permute(2, 0, 1)
                          for f in files])
    names = list(clf.class_names)
    labels = torch.tensor([names.index(Path(f).parent.name) if Path(f).parent.name in names else -1
                           for f in files])
    return clf, images, labels


def timed(fn, images, batch_size):
    """Maps of all images in batches, and the best-of-2 ms/image of the first batch."""
    first = images[:batch_size]
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        fn(first)
        best = min(best, time.perf_counter() - t0)
    maps = torch.cat([fn(images[i:i + batch_size]).detach().float() for i in range(0, len(images), batch_size)])
    return maps, 1000 * best / len(first)


def _lxt():
    """LXT 2.1's efficient rules and zennit patch, without ``lxt.efficient.__init__`` (which
    imports transformers for its LLM patches)."""
    import importlib
    import sys
    import types

    import lxt

    if "lxt.efficient" not in sys.modules:
        pkg = types.ModuleType("lxt.efficient")
        pkg.__path__ = [str(Path(lxt.__file__).parent / "efficient")]
        sys.modules["lxt.efficient"] = pkg
    return (importlib.import_module("lxt.efficient.rules"),
            importlib.import_module("lxt.efficient.patches"),
            importlib.import_module("lxt.efficient.zennit_patches"))


class LXTOnTimm:
    """LXT 2.1 AttnLRP / CP-LRP applied to a timm ViT as /work/shared/golden/README.md says:
    patches nn.LayerNorm, nn.GELU, timm Attention and zennit's BasicHook (class-wide!) while
    it runs, restores them afterwards."""

    def __init__(self, model, mode, gamma_linear=0.05, gamma_conv=0.25):
        self.model, self.mode, self.gl, self.gc = model, mode, gamma_linear, gamma_conv

    def __call__(self, x):
        import torch.nn as nn
        import torch.nn.functional as F
        import zennit.core
        import zennit.rules as zr
        from timm.layers import Attention
        from zennit.composites import LayerMapComposite

        rules, patches, zp = _lxt()
        mode = self.mode

        def attn_forward(self, x, attn_mask=None, is_causal=False):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if mode == "cp_lrp":
                q, k = rules.stop_gradient(q), rules.stop_gradient(k)
            else:
                q, k, v = rules.divide_gradient(q, 4), rules.divide_gradient(k, 4), rules.divide_gradient(v, 2)
            x = F.scaled_dot_product_attention(q, k, v)
            x = self.norm(x.transpose(1, 2).reshape(B, N, C))
            return self.proj_drop(self.proj(x))

        def gelu_forward(self, x):
            return rules.identity_rule_implicit(lambda t: F.gelu(t, approximate=self.approximate), x)

        # the classes the model really uses (timm's LayerNorm / GELU subclass torch's)
        norms = {type(m) for m in self.model.modules() if isinstance(m, nn.LayerNorm)}
        gelus = {type(m) for m in self.model.modules() if isinstance(m, nn.GELU)}
        saved = [(c, "forward", c.__dict__.get("forward")) for c in norms | gelus | {Attention}]
        saved += [(zennit.core.BasicHook, "forward", zennit.core.BasicHook.forward),
                  (zennit.core.BasicHook, "backward", zennit.core.BasicHook.backward)]
        for c in norms:
            c.forward = patches.layer_norm_forward
        for c in gelus:
            c.forward = gelu_forward
        Attention.forward = attn_forward
        zennit.core.BasicHook.forward, zennit.core.BasicHook.backward = zp.forward, zp.backward
        comp = LayerMapComposite([(nn.Conv2d, zr.Gamma(self.gc)), (nn.Linear, zr.Gamma(self.gl))])
        try:
            comp.register(self.model)
            x = x.clone().requires_grad_()
            y = self.model(x)
            t = y.argmax(-1)
            (g,) = torch.autograd.grad(y.gather(1, t[:, None]).sum(), x)
            return (x * g).sum(1).detach()
        finally:
            comp.remove()
            for cls, name, fn in saved:
                if fn is None:
                    delattr(cls, name)  # it inherited forward
                else:
                    setattr(cls, name, fn)


def peers(model):
    rows = {}
    try:
        _lxt()
        import zennit  # noqa: F401

        patch = model.patch_embed.patch_size
        for mode in ("cp_lrp", "attnlrp"):
            rows[f"LXT 2.1 {mode}"] = ("pixels", LXTOnTimm(model, mode))
            rows[f"LXT 2.1 {mode} (patch grid)"] = (
                "patches", lambda x, f=LXTOnTimm(model, mode): _grid(f(x), patch))
    except ImportError:
        pass
    try:
        from captum.attr import IntegratedGradients, Saliency
    except ImportError:
        return rows

    def fwd(x):
        return model(x)

    def predicted(x):
        with torch.no_grad():
            return model(x).argmax(-1)

    rows["Captum Saliency"] = ("pixels", lambda x: Saliency(fwd).attribute(
        x.clone().requires_grad_(), target=predicted(x), abs=True).sum(1))
    rows["Captum IntegratedGradients"] = ("pixels", lambda x: IntegratedGradients(fwd).attribute(
        x.clone(), target=predicted(x), n_steps=16).sum(1))
    return rows


def _grid(maps, patch):
    from vitlens.relevance.lrp_gradient import patch_grid

    return patch_grid(maps, patch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    clf, images, labels = load(args)
    model = clf.model
    with torch.no_grad():
        preds = torch.cat([model(images[i:i + 64]).argmax(-1) for i in range(0, len(images), 64)])
    known = labels >= 0
    acc = (preds[known] == labels[known]).float().mean().item() if known.any() else float("nan")
    labels = torch.where(known, labels, preds)

    rows = {}
    for m in args.methods:
        resolution = get_method(m).resolution  # "patch", "pixel", or by the resolution option (pixel default)
        rows[m] = ("patches" if resolution == "patch" else "pixels", lambda x, m=m: explain(model, x, m))
        if resolution == "option":
            rows[f"{m} (patch grid)"] = ("patches", lambda x, m=m: explain(model, x, m, resolution="patch"))
    rows.update(peers(model))

    def fwd_bwd(x):  # the cost unit: the model's own forward + backward (parameter gradients)
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        model(x).max(-1).values.sum().backward()
        model.zero_grad(set_to_none=True)
        return x.grad.sum(1)

    _, unit = timed(fwd_bwd, images, args.batch_size)
    print(f"# {args.checkpoint}: {len(images)} images, accuracy {acc:.3f}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; forward+backward {unit:.2f} ms/image")
    print("| method | map resolution | pos AUC (lower better) | neg AUC (higher better) | ms/image | x fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for name, (res, fn) in rows.items():
        maps, ms = timed(fn, images, args.batch_size)
        r = perturbation_auc(model, images, maps, labels, clf.mean, clf.std, targets=preds,
                             batch_size=64)
        print(f"| {name} | {res} | {r.pos_auc:.2f} | {r.neg_auc:.2f} | {ms:.1f} | {ms / unit:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
