"""`ShapesBenchmark` (the embedded benchmark as a DataModule) and the CLS pre-training targets."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.shapes import make_sample
from data.shapes_questions import FAMILIES
from data.shapes_scene import COLORS, SHAPES, TEXTS
from data.shapes_targets import GRID, HEADS, scene_targets
from lightning_modules.shapes_data import ShapesBenchmark


def test_eval_batches_are_the_generator_samples():
    dm = ShapesBenchmark(split="test", size=12, batch_size=6)
    dm.setup("validate")
    assert dm.tasks == sorted(FAMILIES)  # six consecutive questions hold every family
    batches = list(dm.val_dataloader())
    assert len(batches) == 2 and sorted(batches[0]) == ["answer", "id", "image", "question", "task"]
    sample = make_sample(0, "test", 7)
    assert batches[1]["id"][1] == sample.id and batches[1]["question"][1] == sample.question
    image = batches[1]["image"][1]
    assert isinstance(image, Image.Image) and image.tobytes() == sample.image().tobytes()


def test_limit_and_seed():
    dm = ShapesBenchmark(split="val", size=50, limit=5, seed=3)
    dm.setup("validate")
    assert [r.id for r in dm.records] == [f"val-{i:06d}" for i in range(5)]
    assert dm.records[0].question == make_sample(3, "val", 0).question
    assert dm.name == "shapes:val:seed3"


def test_noise_images_replace_the_scene_and_keep_the_questions():
    clean, noisy = ShapesBenchmark(size=6), ShapesBenchmark(size=6, noise_images=True)
    a, b = (next(iter(dm.test_dataloader())) for dm in (clean, noisy))
    assert a["question"] == b["question"] and a["answer"] == b["answer"]
    pixels = np.asarray(b["image"][0], np.float32)
    assert pixels.shape == (336, 336, 3) and abs(pixels.mean() - 127.5) < 3  # uniform noise, not a scene
    assert a["image"][0].tobytes() != b["image"][0].tobytes()
    assert noisy.name.endswith(":noise")


def test_fit_serves_train_with_targets_and_a_val_slice():
    dm = ShapesBenchmark(split="test", fit_val_size=8, batch_size=4, train_size=100)
    dm.setup("fit")
    assert dm.split == "val" and len(dm.records) == 8  # test stays unseen during training
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["image"]) == 4 and batch["id"][0].startswith("train-")
    for name, (heads, classes, kind) in HEADS.items():
        shape = (4, heads, classes) if kind == "bce" else (4, heads)
        assert batch["targets"][name].shape == shape, name
    assert "targets" in next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("kwargs", [{"split": "train"}, {"size": 0}, {"batch_size": 0}])
def test_bad_arguments_name_the_value(kwargs):
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        ShapesBenchmark(**kwargs)


def test_scene_targets_describe_the_scene():
    for index in range(30):
        sample = make_sample(0, "train", index)
        t = scene_targets(sample)
        colors = [list(COLORS).index(o.color) for o in sample.objects]
        shapes = [SHAPES.index(o.shape) for o in sample.objects]
        assert t["color_count"].tolist() == [colors.count(c) for c in range(len(COLORS))]
        assert t["shape_count"].tolist() == [shapes.count(s) for s in range(len(SHAPES))]
        pairs = {c * len(SHAPES) + s for c, s in zip(colors, shapes)}
        assert set(torch.nonzero(t["present"][0]).flatten().tolist()) == pairs
        for obj, s in zip(sample.objects, shapes):
            col, row = int(obj.center[0] * GRID // 336), int(obj.center[1] * GRID // 336)
            assert t["shape_where"][s, row * GRID + col] == 1
        assert t["shape_where"].sum() <= len(sample.objects)
        expected = 0 if sample.text is None else TEXTS.index(sample.text.text) + 1
        assert t["text"].item() == expected


def test_patch_targets_name_what_covers_each_patch():
    from data.shapes_scene import ALPHABET, PATCH
    from data.shapes_targets import PATCH_HEADS, patch_targets

    for index in range(30):
        sample = make_sample(0, "train", index)
        t = patch_targets(sample)
        assert set(t) == set(PATCH_HEADS) and all(v.shape == (576,) for v in t.values())
        assert t["patch_center"].sum() == len(sample.objects)  # one token per object: countable
        for obj in sample.objects:
            cx, cy = obj.center
            token = int(cy // PATCH) * 24 + int(cx // PATCH)
            assert t["patch_center"][token] == 1
            if obj.size >= 2 * PATCH and (sample.text is None or sample.text.where != "object"):
                assert t["patch_color"][token] == list(COLORS).index(obj.color) + 1
                assert t["patch_shape"][token] == SHAPES.index(obj.shape) + 1
        chars = t["patch_char"][t["patch_char"] > 0]
        if sample.text is None:
            assert len(chars) == 0
        else:
            assert {ALPHABET[c - 1] for c in chars.tolist()} <= set(sample.text.text)
            assert len(chars) >= len(sample.text.text)  # every character names at least one patch
        # Every patch of the label (and of its characters) names the whole code; no other patch does.
        code = t["patch_code"]
        if sample.text is None:
            assert (code == 0).all()
        else:
            assert set(code[code > 0].tolist()) == {TEXTS.index(sample.text.text) + 1}
            assert ((t["patch_char"] > 0) <= (code > 0)).all()
        assert t["patch_row"].tolist() == [i // 24 for i in range(576)]
        assert t["patch_col"].tolist() == [i % 24 for i in range(576)]
