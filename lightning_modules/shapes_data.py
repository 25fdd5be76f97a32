"""`ShapesBenchmark`: the embedded benchmark (`data.shapes`) as a DataModule, drawn on the fly.

    vtprune validate -c configs/experiment/demo.yaml                   # val/test: questions, images
    vtprune fit -c configs/experiment/train_tiny_llava.yaml            # train: + scene targets

Nothing is read from disk: every sample is a pure function of (seed, split, index), so workers draw
the images themselves and a subsample is as cheap as its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.jsonl import Record
from data.shapes import SPLIT_SIZES, make_sample
from data.shapes_dialogue import conversation
from data.shapes_scene import IMAGE_SIZE
from data.shapes_targets import scene_targets

from .datamodule import BenchmarkDataModule, collate


class ShapesDataset(Dataset):
    """Samples `indices` of one split: id, image (PIL), question, answer, task, and optionally the
    scene's pre-training targets (`data.shapes_targets`), when `turns` > 1 a training conversation of
    that many (question, answer) turns (`data.shapes_dialogue`); without `images` no image is drawn."""

    def __init__(
        self,
        seed: int,
        split: str,
        indices: list[int],
        targets: bool = False,
        noise: bool = False,
        turns: int = 1,
        images: bool = True,
    ) -> None:
        self.seed, self.split, self.indices, self.targets, self.noise = seed, split, indices, targets, noise
        self.turns, self.images = turns, images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        sample = make_sample(self.seed, self.split, self.indices[i])
        item = {"id": sample.id, "question": sample.question, "answer": sample.answer, "task": sample.task}
        if self.images:
            item["image"] = noise_image(sample.pixel_seed) if self.noise else sample.image()
        if self.targets:
            item["targets"] = scene_targets(sample)
        if self.turns > 1:
            item["turns"] = conversation(sample, self.turns, sample.pixel_seed)
        return item


def noise_image(seed: int) -> Image.Image:
    """Uniform RGB noise of the benchmark's size: the image of the "does it need the image?" check."""
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def collate_train(samples: list[dict]) -> dict:
    """Like `collate`, with the targets stacked into one tensor per head."""
    batch = collate([{k: v for k, v in s.items() if k != "targets"} for s in samples])
    if "targets" in samples[0]:
        batch["targets"] = {k: torch.stack([s["targets"][k] for s in samples]) for k in samples[0]["targets"]}
    return batch


class ShapesBenchmark(BenchmarkDataModule):
    """The shapes benchmark: train drawn at random from SPLIT_SIZES["train"] scenes, val and test in order.

    Args:
        split: what `vtprune validate` / `test` scores: "val" or "test".
        seed: the benchmark seed (the training configs use 0).
        size: questions in `split` (default: SPLIT_SIZES[split], 3,000 for test).
        train_size: scenes in the train split.
        fit_val_size: questions of val scored during `fit`.
        turns: questions per training conversation: the planned one, then ones derived from the same
            scene (`data.shapes_dialogue`); 1 trains on the planned question alone.
        noise_images: replace every val/test image by uniform noise (the benchmark must then fall
            to chance: its questions need the image).
        targets: give fit's batches the scenes' pre-training targets (`data.shapes_targets`), which
            only the vision stage reads; drawing them costs as much as the image.
        images: draw the images; the grounded stage (`lightning_modules.grounded_pretraining`) reads
            only the targets.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        split: str = "test",
        seed: int = 0,
        size: int | None = None,
        train_size: int = SPLIT_SIZES["train"],
        fit_val_size: int = 300,
        noise_images: bool = False,
        targets: bool = True,
        images: bool = True,
        turns: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, limit=limit, shuffle_seed=shuffle_seed)
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test' (train is only for fit), got {split!r}")
        for name, value in (
            ("size", size),
            ("train_size", train_size),
            ("fit_val_size", fit_val_size),
            ("turns", turns),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.split, self.seed, self.train_size, self.fit_val_size = split, seed, train_size, fit_val_size
        self.size = SPLIT_SIZES[split] if size is None else size
        self.noise_images, self.turns = noise_images, turns
        self.targets, self.images = targets, images
        self.training = False

    collate = staticmethod(collate_train)

    @property
    def name(self) -> str:
        return f"shapes:{self.split}:seed{self.seed}" + (":noise" if self.noise_images else "")

    def load_records(self) -> list[Record]:
        samples = (make_sample(self.seed, self.split, i) for i in range(self.size))
        return [Record(s.id, Path(s.id), s.question, s.answer, s.task) for s in samples]

    def setup(self, stage: str | None = None) -> None:
        # During fit, val scores a small slice of the val split (the test split stays unseen).
        if stage == "fit" and not self.training:
            self.training, self.split, self.size, self.records = True, "val", self.fit_val_size, None
        super().setup(stage)

    def eval_dataset(self) -> Dataset:
        indices = [int(r.id.rsplit("-", 1)[1]) for r in self.records]
        return ShapesDataset(self.seed, self.split, indices, targets=self.training and self.targets,
                             noise=self.noise_images, images=self.images)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            ShapesDataset(self.seed, "train", list(range(self.train_size)), targets=self.targets, turns=self.turns,
                          images=self.images),  # fmt: skip
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_train,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )
