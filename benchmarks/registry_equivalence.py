"""Bit-exactness guard for refactors of the relevance engine (``vitlens.relevance.methods``).

Computes the maps, logits and targets of a fixed set of method combinations over several
model layouts and every precision, plus the peak tensor memory of ViT-B/16 (batch 16, meta
device, ``vitlens.profiling.TensorMemory``), and either saves them or compares them with a
saved run (``torch.equal`` on every tensor; memory peaks equal or lower):

    PYTHONPATH=src python benchmarks/registry_equivalence.py --save /tmp/engine_before.pt
    # ... change the engine ...
    PYTHONPATH=src python benchmarks/registry_equivalence.py --compare /tmp/engine_before.pt

Layouts: the golden float64 ViT of ``tests/data/chefer_vit_tiny_f64.npz``; seeded tiny
models (class token + LayerScale + q/k norm, DeiT distilled, average pooling with register
tokens and no class token, average pooling including the prefix). Precisions: float64,
float32, tf32 (with ``EmulatedTF32``, so that the CPU rounds as an Ampere GPU would), bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from vitlens.profiling import EmulatedTF32, TensorMemory
from vitlens.relevance import explain, explain_many

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("float64", "float32", "tf32", "bf16")
ALL = ("transformer_attribution", "grad_rollout", "rollout", "raw_attention", "attn_gradcam",
       "partial_lrp", "full_lrp", "lrp_rollout", "attnlrp", "cp_lrp", "random")
COMBOS = {
    **{f"alone:{m}": {m: {}} for m in ALL},
    "all": {m: {} for m in ALL},
    "mixed_start": {"transformer_attribution": {"start_layer": 0}, "grad_rollout": {"start_layer": 2},
                    "lrp_rollout": {"start_layer": 1}, "rollout": {"start_layer": 2},
                    "attn_gradcam": {}},
    "lxt_patch": {"attnlrp": {"resolution": "patch", "gamma_linear": 0.1},
                  "cp_lrp": {"resolution": "patch", "gamma_conv": 0.0}},
    "plain_and_paper": {"full_lrp": {}, "partial_lrp": {}, "transformer_attribution": {}},
    "attention_only": {"raw_attention": {}, "attn_gradcam": {}, "random": {"seed": 3},
                       "rollout": {"start_layer": 0}},
    "paper_late": {"transformer_attribution": {"start_layer": 2}, "lrp_rollout": {"start_layer": 2},
                   "partial_lrp": {}},
}


def tiny(cls=VisionTransformer, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    model = cls(**{**options, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "token" in name or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def layouts():
    z = np.load(ROOT / "tests" / "data" / "chefer_vit_tiny_f64.npz")
    golden = VisionTransformer(**json.loads(str(z["config"]))).double()
    golden.load_state_dict({k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd.")})
    yield "golden", golden.eval(), torch.from_numpy(z["inputs"])[:4]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    yield "token_ls_qknorm", tiny(init_values=0.5, qk_norm=True), x
    yield "distilled", tiny(VisionTransformerDistilled, seed=2), x
    yield "avg_registers", tiny(seed=3, class_token=False, global_pool="avg", reg_tokens=2,
                                fc_norm=True), x
    yield "avg_with_prefix", tiny(seed=4, global_pool="avg", reg_tokens=1, no_embed_class=True), x


def run_maps() -> dict[str, torch.Tensor]:
    out = {}
    for layout, model, x in layouts():
        for precision in PRECISIONS:
            for combo, methods in COMBOS.items():
                for tname, targets in (("pred", None), ("fixed", torch.arange(len(x)) % 3)):
                    if tname == "fixed" and not combo.startswith(("all", "mixed")):
                        continue
                    key = f"{layout}/{precision}/{combo}/{tname}"
                    if precision == "tf32":
                        with EmulatedTF32():
                            r = explain_many(model, x, methods, targets, precision=precision)
                    else:
                        r = explain_many(model, x, methods, targets, precision=precision)
                    for m, v in r.maps.items():
                        out[f"{key}/map:{m}"] = v
                    out[f"{key}/logits"] = r.logits
                    out[f"{key}/targets"] = r.targets
    return out


def run_memory() -> dict[str, int]:
    import timm

    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224").eval()
    x = torch.empty(16, 3, 224, 224, device="meta")
    sets = {"transformer_attribution": ["transformer_attribution"], "full_lrp": ["full_lrp"],
            "attnlrp": ["attnlrp"], "grad_rollout": ["grad_rollout"], "all": list(ALL)}
    peaks = {}
    for precision in ("float32", "bf16"):
        for name, methods in sets.items():
            with TensorMemory() as mem:
                explain_many(base, x, methods, precision=precision)
            peaks[f"{precision}/{name}"] = mem.peak_bytes
        with TensorMemory() as mem:
            explain(base, x, precision=precision)
        peaks[f"{precision}/explain_default"] = mem.peak_bytes
    return peaks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--compare", type=Path)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    maps = run_maps()
    peaks = {} if args.no_memory else run_memory()
    if args.save:
        torch.save({"maps": maps, "peaks": peaks}, args.save)
        print(f"saved {len(maps)} tensors and {len(peaks)} memory peaks to {args.save}")
        for k, v in peaks.items():
            print(f"  peak {k}: {v / 2**30:.3f} GiB")
        return 0
    ref = torch.load(args.compare)
    bad = [k for k in ref["maps"] if k not in maps or not torch.equal(maps[k], ref["maps"][k])]
    extra = sorted(set(maps) - set(ref["maps"]))
    print(f"{len(ref['maps']) - len(bad)} of {len(ref['maps'])} tensors torch.equal; "
          f"{len(bad)} differ{'' if not extra else f'; {len(extra)} new'}")
    def rel(k):  # max |diff| / max |before| (inf: missing or a different shape / dtype)
        if k not in maps or maps[k].shape != ref["maps"][k].shape or maps[k].dtype != ref["maps"][k].dtype:
            return float("inf")
        a, b = maps[k].double(), ref["maps"][k].double()
        return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item() if b.numel() else 0.0
    for k in bad[:20]:
        print(f"  DIFFERS: {k}  (max |diff| / max |before| = {rel(k):.1e})")
    if bad:
        worst = max(bad, key=rel)
        print(f"largest relative difference: {rel(worst):.1e} ({worst})")
    worse = []
    for k, before in ref["peaks"].items():
        after = peaks.get(k)
        if after is None:
            continue
        print(f"  peak {k}: {before / 2**30:.3f} -> {after / 2**30:.3f} GiB")
        if after > before:
            worse.append(k)
    if worse:
        print("  HIGHER PEAK:", ", ".join(worse))
    return 1 if bad or worse else 0


if __name__ == "__main__":
    sys.exit(main())
