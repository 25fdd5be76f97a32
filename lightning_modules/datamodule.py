"""Benchmark DataModules: records in, batches of PIL images and questions out.

The DataModule knows no model: the LightningModule applies the model's processor, so one
benchmark serves every model family. A new benchmark subclasses `BenchmarkDataModule` and
implements `load_records`.
"""

from __future__ import annotations

import abc
import dataclasses
import random
from pathlib import Path

import pytorch_lightning as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.jsonl import Record, read_questions


class RecordDataset(Dataset):
    """Records with their image opened as RGB on access (workers open files, not the main process)."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with Image.open(record.image) as image:
            rgb = image.convert("RGB")
        return {**dataclasses.asdict(record), "image": rgb}


def collate(samples: list[dict]) -> dict[str, list]:
    """Lists per field: images stay PIL images, text stays text."""
    return {key: [sample[key] for sample in samples] for key in samples[0]}


class BenchmarkDataModule(pl.LightningDataModule, abc.ABC):
    """Base class of every benchmark.

    Args:
        batch_size: questions per batch.
        num_workers: DataLoader worker processes.
        limit: keep only this many questions (after a seeded shuffle when `shuffle_seed` is set).
        shuffle_seed: shuffle the records with this seed before `limit`; None keeps file order.
    """

    def __init__(
        self, batch_size: int = 4, num_workers: int = 0, limit: int | None = None, shuffle_seed: int | None = None
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 or None, got {limit}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit = limit
        self.shuffle_seed = shuffle_seed
        self.records: list[Record] | None = None

    @property
    def name(self) -> str:
        """The benchmark's name, written to results.json."""
        return type(self).__name__

    @abc.abstractmethod
    def load_records(self) -> list[Record]:
        """Every record of the benchmark, in a fixed order."""

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        records = self.load_records()
        if not records:
            raise ValueError(f"benchmark {self.name} has no records")
        if self.shuffle_seed is not None:
            records = list(records)
            random.Random(self.shuffle_seed).shuffle(records)
        self.records = records[: self.limit]

    @property
    def tasks(self) -> list[str]:
        """Sorted task names of the loaded records (call after `setup`)."""
        if self.records is None:
            raise RuntimeError("call setup() before reading tasks")
        return sorted({r.task for r in self.records})

    collate = staticmethod(collate)  # batches of the val/test loaders

    def eval_dataset(self) -> Dataset:
        """The dataset behind the val and test loaders: the records with their images opened."""
        return RecordDataset(self.records)

    def _loader(self) -> DataLoader:
        if self.records is None:
            self.setup()
        return DataLoader(
            self.eval_dataset(),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class JsonlBenchmark(BenchmarkDataModule):
    """A folder with `questions.jsonl` and the images it names (see `data.jsonl`).

    Args:
        root: the folder.
        batch_size, num_workers, limit, shuffle_seed: see `BenchmarkDataModule`.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, limit=limit, shuffle_seed=shuffle_seed)
        self.root = Path(root)

    @property
    def name(self) -> str:
        return f"jsonl:{self.root}"

    def load_records(self) -> list[Record]:
        return read_questions(self.root)
