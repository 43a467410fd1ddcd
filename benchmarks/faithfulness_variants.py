"""Variants of CP-LRP against LXT's maps on both perturbation tests (issue 13's "beat LXT").

vitlens ``cp_lrp`` / ``attnlrp`` with default gammas are LXT 2.1's CP-LRP / AttnLRP maps
(float64 golden match ~3e-15), so those rows are LXT's. The other rows: other gammas, the
positive part, a blur, products and sums with the patch-level grad_rollout /
transformer_attribution (bilinearly upsampled) and with attnlrp (each map scaled by its
max |value|). All maps explain the predicted class and are scored together with
``vitlens.metrics.perturbation_aucs`` at pixel resolution (pos: lower better; neg: higher).
Protocol: pick a variant on one checkpoint's val images, then test only that variant on a
checkpoint of another training seed and the test split (results: BENCHMARKS.md).

    python benchmarks/faithfulness_variants.py <ckpt> '<images glob>' <num images> [map,map,...]
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from faithfulness import load
from vitlens.metrics.perturbation import perturbation_aucs
from vitlens.relevance import explain, explain_many
class A: pass
a = A(); a.checkpoint, a.images, a.num_images = sys.argv[1], sys.argv[2], int(sys.argv[3])
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
torch.set_grad_enabled(True)
clf, images, labels = load(a)
model = clf.model
with torch.no_grad():
    preds = torch.cat([model(images[i:i+64]).argmax(-1) for i in range(0, len(images), 64)])
print("acc", (preds == labels).float().mean().item(), "n", len(images), "load", os.getloadavg(), flush=True)
H = images.shape[-1]
req = {"cp_lrp": {}, "attnlrp": {}, "grad_rollout": {}, "transformer_attribution": {}}
gam = {"cp_g0": dict(gamma_linear=0.0, gamma_conv=0.0), "cp_gl0.25": dict(gamma_linear=0.25),
       "cp_gl1": dict(gamma_linear=1.0), "cp_gc1": dict(gamma_conv=1.0), "cp_gc0": dict(gamma_conv=0.0),
       "cp_gl0.25_gc1": dict(gamma_linear=0.25, gamma_conv=1.0), "cp_gl0": dict(gamma_linear=0.0)}
base = {}
for i in range(0, len(images), 32):
    x = images[i:i+32]
    out = explain_many(model, x, req, preds[i:i+32])
    for k, v in out.maps.items(): base.setdefault(k, []).append(v)
    for k, o in gam.items():
        base.setdefault(k, []).append(explain(model, x, "cp_lrp", preds[i:i+32], **o))
base = {k: torch.cat(v).float() for k, v in base.items()}
def up(m): return F.interpolate(m[:, None], size=(H, H), mode="bilinear", align_corners=False)[:, 0]
def nrm(m): return m / m.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
def blur(m, k=3):
    return F.avg_pool2d(m[:, None], k, 1, k // 2, count_include_pad=False)[:, 0]
cp, gr, ta, at = base["cp_lrp"], up(base["grad_rollout"]), up(base["transformer_attribution"]), base["attnlrp"]
maps = dict(base)
maps["grad_rollout"], maps["transformer_attribution"] = gr, ta
maps["cp*gr"] = cp * nrm(gr).clamp_min(0)
maps["cp*ta"] = cp * nrm(ta).clamp_min(0)
maps["cp_pos"] = cp.clamp_min(0)
maps["cp+0.1gr"] = nrm(cp) + 0.1 * nrm(gr)
maps["cp+0.3gr"] = nrm(cp) + 0.3 * nrm(gr)
maps["cp_blur3"] = blur(cp, 3)
maps["cp_blur5"] = blur(cp, 5)
maps["cp+at"] = nrm(cp) + nrm(at)
maps["cp_g0*gr"] = maps["cp_g0"] * nrm(gr).clamp_min(0)
if only: maps = {k: v for k, v in maps.items() if k in only}
t0 = time.time()
res = perturbation_aucs(model, images, maps, labels, clf.mean, clf.std, targets=preds, batch_size=256)
print(f"scored {len(maps)} maps in {time.time()-t0:.0f}s")
print("| map | pos AUC | neg AUC |\n|---|---|---|")
for k, r in res.items():
    print(f"| {k} | {r.pos_auc:.2f} | {r.neg_auc:.2f} |", flush=True)
