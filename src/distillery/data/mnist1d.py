"""MNIST-1D (Greydanus, 2020), generated offline with ``mnist1d.make_dataset``.

Splits, each generated with its own seed and cached as ``.npz`` under ``data_dir``:

* train / test: the standard 4000 / 1000 split of ``make_dataset`` at ``seed``;
* val: 1000 labeled samples generated at ``seed + 1`` (the standard split has none);
* transfer: ``transfer_size`` extra inputs at ``seed + 2``, labels dropped.

The download path of the ``mnist1d`` package is never used.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np

from distillery.data.base import ClassificationDataModule
from distillery.data.batch import TensorDictDataset

# sample_id ranges of the splits, so ids are unique across splits
ID_OFFSETS = {"train": 0, "test": 1_000_000, "val": 2_000_000, "transfer": 3_000_000}


def generate(num_samples: int, seed: int, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """Run mnist1d's generator without disturbing the global RNG state."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        k: d[k].astype(np.float32 if k.startswith("x") else np.int64)
        for k in ("x", "y", "x_test", "y_test")
    }


def cached(path: Path, make) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path) as f:
            return dict(f)
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


class MNIST1DDataModule(ClassificationDataModule):
    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data/",
        seed: int = 42,
        num_samples: int = 5000,
        val_size: int = 1000,
        transfer_size: int = 0,
        num_classes: int = 10,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes != 10:
            raise ValueError(f"data.num_classes: this dataset has 10 classes, got {num_classes}")
        if transfer_size < 0 or val_size < 10:
            raise ValueError("data.transfer_size must be >= 0 and data.val_size >= 10")
        self.data_dir = Path(data_dir) / "mnist1d"
        self.seed, self.num_samples = seed, num_samples
        self.val_size, self.transfer_size = val_size, transfer_size
        self.input_shape = (40,)

    def prepare_data(self) -> None:
        self._splits()

    def _splits(self) -> dict[str, dict[str, np.ndarray]]:
        d = self.data_dir
        out = {
            "main": cached(
                d / f"main_n{self.num_samples}_s{self.seed}.npz",
                lambda: generate(self.num_samples, self.seed),
            )
        }
        out["val"] = cached(
            d / f"val_n{self.val_size}_s{self.seed + 1}.npz",
            lambda: generate(self.val_size, self.seed + 1, train_split=1.0),
        )
        if self.transfer_size:
            out["transfer"] = cached(
                d / f"transfer_n{self.transfer_size}_s{self.seed + 2}.npz",
                lambda: generate(self.transfer_size, self.seed + 2, train_split=1.0),
            )
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        s = self._splits()

        def ds(x, y, split):
            return TensorDictDataset(x, y, ID_OFFSETS[split] + np.arange(len(x)))

        self.train_set = ds(s["main"]["x"], s["main"]["y"], "train")
        self.test_set = ds(s["main"]["x_test"], s["main"]["y_test"], "test")
        self.val_set = ds(s["val"]["x"], s["val"]["y"], "val")
        if self.transfer_size:
            self.transfer_set = ds(s["transfer"]["x"], None, "transfer")
