"""Issue 9, in-process: bad user data and settings found before epoch 1, one line each, naming the culprit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from userdata import CLASSES, csv_manifest, photo, photo_folder
from vitlens.data import DataError, ImageDataModule, read_image
from vitlens.data.sources import describe_source, index_source
from vitlens.preflight import PreflightError, preflight


def _data(path, **kwargs) -> ImageDataModule:
    return ImageDataModule(str(path), **{"image_size": 32, "batch_size": 4, "num_workers": 0, **kwargs})


def _findings(data, model=None, callbacks=()) -> list[str]:
    with pytest.raises(PreflightError) as error:
        preflight(data, model, callbacks)
    return error.value.findings


def test_clean_photo_folder_passes(tmp_path):
    data = _data(photo_folder(tmp_path / "birds"))
    preflight(data)  # no finding
    assert data.class_names == list(CLASSES)
    assert len(data.train_dataset) + len(data.val_dataset) == 20


# observed 3: a NaN box became a full-image box (pointing game 100%, for `random` too)
def test_nan_box_is_an_error_naming_the_row(tmp_path):
    csv = csv_manifest(tmp_path, rows=["img/robin_000.jpg,robin,nan,8,20,16"])
    with pytest.raises(DataError, match=r"birds\.csv line 22: box x,y,w,h = nan,8,20,16 is not finite"):
        _data(csv).setup()


def test_box_outside_the_image_and_wrong_size_mask(tmp_path):
    csv = csv_manifest(tmp_path, rows=["img/robin_000.jpg,robin,30,8,20,16"])
    findings = _findings(_data(csv))
    assert len(findings) == 1 and "robin_000.jpg: box x,y,w,h = 30,8,20,16 reaches outside the 40x32 image" in findings[0]
    # a mask of the wrong size
    root = tmp_path / "m"
    photo(root / "a.jpg", 0)
    photo(root / "b.jpg", 1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "a_mask.png")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "b_mask.png")
    lines = ["path,label,split,mask"] + [f"{n}.jpg,{c},{s},{n}_mask.png" for n, c in (("a", "robin"), ("b", "wren"))
                                          for s in ("train", "val")]
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    findings = _findings(_data(root / "m.csv", batch_size=1))
    assert findings and all("a_mask.png: mask is 10x10 px but its image" in f and "40x32" in f for f in findings)


# observed 4: .jfif / .heic / trailing spaces dropped without a word; EXIF orientation ignored
def test_unsupported_files_are_counted_and_odd_names_are_read(tmp_path):
    root = photo_folder(tmp_path / "birds")
    photo(root / "robin" / "phone.jfif", 0)  # a JPEG under another name
    Image.open(photo(tmp_path / "x.jpg", 0)).save(root / "wren" / "trailing.jpg ", format="JPEG")
    for i in range(3):
        (root / "robin" / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    info = describe_source(root)
    samples = index_source(info)["train"]
    names = {Path(s.path).name for s in samples}
    assert {"phone.jfif", "trailing.jpg "} <= names
    assert len(info.unsupported[".heic"]) == 3
    findings = _findings(_data(root))
    assert len(findings) == 1 and "3 .heic file(s) this reader cannot decode" in findings[0]
    assert "IMG_0.HEIC" in findings[0] and "convert them to JPEG" in findings[0]
    data = _data(root, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skip_corrupt: skipping .*3 .heic"):
        preflight(data)


def test_exif_orientation_is_applied(tmp_path):
    path = photo(tmp_path / "phone.jpg", 0, size=(40, 32), exif_orientation=6)  # "rotate 90 CW to view"
    assert read_image(path).shape == (40, 32, 3)  # shown upright: 32 wide, 40 high
    assert read_image(photo(tmp_path / "plain.jpg", 0, size=(40, 32))).shape == (32, 40, 3)


# observed 8: corrupt images were found only when the loader reached them
def test_corrupt_image_found_before_training(tmp_path):
    root = photo_folder(tmp_path / "birds")
    (root / "wren" / "005.jpg").write_bytes(b"not a jpeg at all")
    findings = _findings(_data(root))
    assert len(findings) == 1 and findings[0].startswith(str(root / "wren" / "005.jpg") + ": not a readable image")
    assert "skip_corrupt" in findings[0]


def test_one_class_is_an_error(tmp_path):
    root = photo_folder(tmp_path / "birds", classes=("robin",))
    findings = _findings(_data(root))
    assert any("only one class (robin)" in f for f in findings)


# observed 5: image size vs patch size, methods vs depth: the callback switched itself off after epoch 1
def test_image_size_and_callback_against_the_model(tmp_path):
    from vitlens.callbacks import ExplanationCallback
    from vitlens.models import ViTClassifier

    data = _data(photo_folder(tmp_path / "birds", per_class=20), image_size=36)
    model = ViTClassifier("vit_tiny_patch16_224", class_names=list(CLASSES), img_size=40,
                          backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
    callback = ExplanationCallback(methods=["transformer_attribution"], num_samples=20, perturbation_samples=4)
    findings = _findings(data, model, [callback])
    assert any(f.startswith("data.image_size=36 is not a multiple of the model's patch size 8") for f in findings)
    assert not any("num_samples" in f for f in findings)  # a small val split is a note, not an error (below)
    # depth 1 < transformer_attribution's start_layer 1 (needs a block after it)
    data = _data(tmp_path / "birds", image_size=32)
    model = ViTClassifier("vit_tiny_patch16_224", class_names=list(CLASSES), img_size=32,
                          backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
    callback = ExplanationCallback(methods=["transformer_attribution", "grad_rollout"], num_samples=4, perturbation_samples=4)
    findings = _findings(data, model, [callback])
    assert len(findings) == 1 and "method 'transformer_attribution' cannot run on this model (depth 1" in findings[0]
    assert "start_layer" in findings[0]


# observed (issue 9): a folder with fewer than 8 val images failed the default callback settings
def test_val_split_smaller_than_the_probe_set_is_a_note_not_an_error(tmp_path, capsys):
    from vitlens.callbacks import ExplanationCallback
    from vitlens.models import ViTClassifier

    data = _data(photo_folder(tmp_path / "birds", per_class=20), image_size=32)
    model = ViTClassifier("vit_tiny_patch16_224", class_names=list(CLASSES), img_size=32,
                          backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))
    preflight(data, model, [ExplanationCallback(methods=["grad_rollout"], num_samples=20, perturbation_samples=4)])
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "note: the val split has 8 images, fewer than ExplanationCallback's num_samples=20: all 8 are explained "
        "every epoch (more val images give steadier explanation metrics)"]
    preflight(data, model, [ExplanationCallback(methods=["grad_rollout"], num_samples=8, perturbation_samples=8)])
    assert capsys.readouterr().err == ""  # nothing to say when the split is large enough


def test_the_dry_run_uses_the_callbacks_method_options(tmp_path):
    """An option the model cannot take is found before training, not after epoch 1."""
    from vitlens.callbacks import ExplanationCallback
    from vitlens.models import ViTClassifier

    data = _data(photo_folder(tmp_path / "birds", per_class=20), image_size=32)
    model = ViTClassifier("vit_tiny_patch16_224", class_names=list(CLASSES), img_size=32,
                          backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))
    ok = ExplanationCallback(methods=["transformer_attribution"], num_samples=4, perturbation_samples=4,
                             method_options={"transformer_attribution": {"start_layer": 0}})
    preflight(data, model, [ok])  # no finding
    bad = ExplanationCallback(methods=["transformer_attribution"], num_samples=4, perturbation_samples=4,
                              method_options={"transformer_attribution": {"start_layer": 2}})
    findings = _findings(data, model, [bad])
    assert len(findings) == 1 and "start_layer must be an int in [0, 1], got 2" in findings[0]
