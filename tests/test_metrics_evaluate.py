"""evaluate_explanations: the deduplicated evaluation gives the same numbers as the plain one
(issue 12), costs the forwards it says, and scores signed maps as documented (issue 13)."""
from __future__ import annotations

import io

import pytest
import torch

from conftest import tiny_datamodule
from vitlens.metrics import PerturbationResult, perturbation_auc
from vitlens.metrics.evaluate import CLASS_AGNOSTIC, ProgressLine, evaluate_explanations
from vitlens.relevance import explain_many

METHODS = ["transformer_attribution", "grad_rollout", "rollout", "raw_attention", "random"]


@pytest.fixture(scope="module")
def setup(tiny_classifier_checkpoint, tiny_dataset_dir):
    from vitlens.models import load_classifier

    model = load_classifier(tiny_classifier_checkpoint)
    dm = tiny_datamodule(tiny_dataset_dir)
    dm.setup("fit")
    batches = list(torch.utils.data.DataLoader(dm.val_dataset, batch_size=8))
    return model, batches, dm.mean, dm.std


def plain_evaluation(model, batches, methods, mean, std):
    """The evaluation written the obvious way (as before issue 12): every method's map
    perturbed for the predicted class with its own clean pass; on misclassified images every
    method explained again for the true class and perturbed again. A class-agnostic method's
    true-class map is its predicted-class map."""
    pred_parts, target_parts = {m: [] for m in methods}, {m: [] for m in methods}
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        out = explain_many(model, images, methods)
        pred = out.targets
        wrong = (pred != labels).nonzero().flatten()
        out_t = explain_many(model, images[wrong], methods, labels[wrong]) if len(wrong) else None
        for m in methods:
            res = perturbation_auc(model, images, out.maps[m].float(), labels, mean, std, targets=pred)
            pred_parts[m].append(res)
            per = {k: v.clone() for k, v in res.per_image().items()}
            if out_t is not None:
                maps_t = out.maps[m][wrong] if m in CLASS_AGNOSTIC else out_t.maps[m]
                res_t = perturbation_auc(model, images[wrong], maps_t.float(), labels[wrong], mean, std)
                for k, v in res_t.per_image().items():
                    per[k][wrong] = v
            target_parts[m].append(PerturbationResult.from_per_image(res.fractions, **per))
    return ({m: PerturbationResult.concat(p) for m, p in pred_parts.items()},
            {m: PerturbationResult.concat(p) for m, p in target_parts.items()})


def test_deduplicated_evaluation_gives_the_plain_numbers(setup):
    model, batches, mean, std = setup
    report = evaluate_explanations(model, batches, METHODS, mean, std, n_resamples=0, progress=False)
    plain_pred, plain_target = plain_evaluation(model, batches, METHODS, mean, std)
    n_wrong = sum(int((explain_many(model, b["image"], ["random"]).targets != b["label"]).sum()) for b in batches)
    assert 0 < n_wrong < report.meta["n_images"]  # both kinds of image occur
    for m in METHODS:
        for ours, theirs in ((report.curves[m], plain_pred[m]), (report.curves_target[m], plain_target[m])):
            for key in ("pos_correct", "neg_correct"):
                assert torch.equal(getattr(ours, key), getattr(theirs, key)), (m, key)
            for key in ("pos_target_probability", "neg_target_probability"):
                torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-5, atol=1e-6)
            assert ours.pos_auc == theirs.pos_auc and ours.neg_auc == theirs.neg_auc
        assert report.methods[m]["pos_auc_target"] == plain_target[m].pos_auc


def test_forwards_counted(setup):
    """One clean pass per batch; a class-agnostic map is perturbed once for both classes."""
    model, batches, mean, std = setup
    rows = []
    handle = model.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        evaluate_explanations(model, batches, METHODS, mean, std, n_resamples=0, progress=False)
    finally:
        handle.remove()
    n = sum(len(b["label"]) for b in batches)
    wrong = sum(int((explain_many(model, b["image"], ["random"]).targets != b["label"]).sum()) for b in batches)
    specific = [m for m in METHODS if m not in CLASS_AGNOSTIC]
    expected = n + 18 * n * len(METHODS) + 18 * wrong * len(specific)
    assert sum(rows) == expected
    before = (19 * n + 19 * wrong) * len(METHODS)  # the plain evaluation
    assert sum(rows) < before


def test_class_agnostic_maps_do_not_depend_on_the_class(setup):
    model, batches, _, _ = setup
    images = batches[0]["image"]
    a = explain_many(model, images, sorted(CLASS_AGNOSTIC), torch.zeros(len(images), dtype=torch.long))
    b = explain_many(model, images, sorted(CLASS_AGNOSTIC), torch.arange(len(images)) % 4)
    for m in CLASS_AGNOSTIC:
        assert torch.equal(a.maps[m], b.maps[m]), m


def test_signed_maps_in_localisation(setup):
    """A map with evidence against the class elsewhere: its positive part is all on the object."""
    from vitlens.metrics import LocalizationScores
    from vitlens.relevance import heatmap

    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    signed = torch.where(mask.bool(), torch.tensor(1.0), torch.tensor(-0.2))
    scores = {}
    for how in ("raw", "positive", "absolute"):
        loc = LocalizationScores()
        loc.update(heatmap(signed, (8, 8), signed=how), mask)
        scores[how] = loc.compute()
    assert scores["positive"]["relevance_on_object"] == pytest.approx(1.0)
    assert scores["raw"]["relevance_on_object"] == pytest.approx(1.0)  # min-max: -0.2 -> 0 here
    # an LRP-like map: the object relevant, the background noise of both signs around zero and
    # one pixel of strong counter-evidence: min-max puts the zero at mid-scale
    g = torch.Generator().manual_seed(0)
    lrp = torch.where(mask.bool(), torch.tensor(1.0), (torch.rand(1, 8, 8, generator=g) - 0.5) * 0.2)
    lrp[0, 0, 0] = -1.0
    share = {}
    for how in ("raw", "positive"):
        loc = LocalizationScores()
        loc.update(heatmap(lrp, (8, 8), signed=how), mask)
        share[how] = loc.compute()["relevance_on_object"]
    assert share["raw"] < 0.45  # the background reads ~0.5 each
    assert share["positive"] > 0.9
    # evidence for the class off the object, against it on: |r| counts both
    mixed = torch.where(mask.bool(), torch.tensor(-1.0), torch.tensor(0.0))
    mixed[0, 0, 0] = 0.5
    pos = heatmap(mixed, (8, 8), signed="positive")
    ab = heatmap(mixed, (8, 8), signed="absolute")
    raw = heatmap(mixed, (8, 8), signed="raw")
    assert pos[0, 0, 0] == 1 and pos.sum() == 1  # only the positive pixel
    assert ab[0, 3, 3] == 1 and ab[0, 0, 0] == 0.5
    assert raw[0, 1, 1] == pytest.approx(2 / 3)  # zero at 2/3 of the scale under min-max


def test_non_negative_maps_score_the_same_whatever_signed(setup):
    from vitlens.relevance import heatmap

    maps = torch.rand(3, 4, 4) + 0.1
    for how in ("positive", "absolute"):
        assert torch.equal(heatmap(maps, (16, 16), signed=how), heatmap(maps, (16, 16)))


def test_evaluate_signed_option_changes_only_localisation(setup):
    model, batches, mean, std = setup
    runs = {how: evaluate_explanations(model, batches[:1], ["full_lrp"], mean, std, n_resamples=0, progress=False,
                                       signed=how) for how in ("raw", "positive")}
    raw, pos = runs["raw"].methods["full_lrp"], runs["positive"].methods["full_lrp"]
    for key in ("pos_auc", "neg_auc", "pixel_acc", "miou", "map", "pointing_game"):
        assert raw[key] == pos[key], key  # the paper's tests and the arg max do not change
    assert raw["relevance_on_object"] != pos["relevance_on_object"]
    assert runs["positive"].meta["signed"] == "positive"
    with pytest.raises(ValueError, match="signed"):
        evaluate_explanations(model, batches[:1], ["rollout"], mean, std, signed="negative", progress=False)


def test_progress_line():
    stream = io.StringIO()
    bar = ProgressLine(10, stream=stream, every=0.0)
    bar.update(4)
    bar.update(6)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("evaluating  4/10 images  ") and "img/s  ETA " in lines[0]
    assert lines[-1].startswith("evaluating  10/10 images") and "took" in lines[-1]
    assert len(lines) == 2  # the last line is not repeated
