"""Transfer pool: distillation inputs drawn from several sources with weights.

Wraps a labeled datamodule (``base``). Training batches hold ``base.batch_size``
labeled samples from ``base`` plus ``batch_size`` pool samples; validation and test
come from ``base`` unchanged. The pool mixes, by ``weights``:

* ``train``: the base's labeled train inputs, labels dropped (distillation only);
* any named dataset in ``sources`` yielding batch-contract dicts (labels are dropped
  too): generated MNIST-1D signals, an unlabeled image folder, ...

Each pool draw picks source ``k`` with probability ``weights[k] / sum(weights)`` and a
sample uniformly within it (with replacement); ``samples_per_epoch`` draws make an
epoch. Sample ids are offset per source (``(k + 1) * 10**9``) so they stay unique.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from distillery.contract import UNLABELED
from distillery.data.base import ClassificationDataModule, make_loader
from distillery.data.batch import TensorDictDataset

ID_STRIDE = 10**9


class Unlabeled(Dataset):
    """A source as pool samples: labels dropped, ids offset."""

    def __init__(self, base: Dataset, id_offset: int):
        self.base, self.id_offset = base, id_offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        return {
            "inputs": item["inputs"],
            "labels": torch.tensor(UNLABELED),
            "sample_id": torch.as_tensor(item["sample_id"]) + self.id_offset,
        }


class TransferPool(ClassificationDataModule):
    def __init__(
        self,
        base: ClassificationDataModule,
        weights: Mapping[str, float],
        sources: Mapping[str, Dataset] | None = None,
        samples_per_epoch: int = 50_000,
        batch_size: int = 256,
        num_workers: int = 0,
    ):
        super().__init__(
            batch_size=base.batch_size,
            transfer_batch_size=batch_size,
            eval_batch_size=base.eval_batch_size,
            num_workers=num_workers,
            input_norm=base.input_norm,
        )
        sources = dict(sources or {})
        weights = {str(k): float(v) for k, v in weights.items()}
        unknown = set(weights) - set(sources) - {"train"}
        if unknown:
            raise ValueError(
                f"data.weights: no source named {sorted(unknown)} (sources: {['train', *sources]})"
            )
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"data.weights must be non-negative with a positive sum, got {weights}"
            )
        self.base, self.sources, self.weights = base, sources, weights
        self.samples_per_epoch = samples_per_epoch
        self.num_classes, self.input_shape = base.num_classes, base.input_shape

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def example_input(self, n: int = 2):
        return self.base.example_input(n)

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)
        self.train_set, self.val_set, self.test_set = (
            self.base.train_set,
            self.base.val_set,
            self.base.test_set,
        )
        named = {"train": self.base.train_set, **self.sources}
        parts, per_sample = [], []
        for k, (name, ds) in enumerate(named.items()):
            w = self.weights.get(name, 0.0)
            if w == 0 or len(ds) == 0:
                continue
            parts.append(Unlabeled(ds, (k + 1) * ID_STRIDE))
            per_sample.append(torch.full((len(ds),), w / len(ds), dtype=torch.float64))
        self.transfer_set = ConcatDataset(parts)
        self.sample_weights = torch.cat(per_sample)

    def train_dataloader(self):
        labeled = self._loader(self.train_set, self.batch_size, train=True)
        pool = make_loader(
            self.transfer_set, self.transfer_batch_size, True, self.num_workers,
            weights=self.sample_weights, num_samples=self.samples_per_epoch,
        )  # fmt: skip
        return {"labeled": labeled, "transfer": pool}


class GeneratedMNIST1D(TensorDictDataset):
    """``size`` extra MNIST-1D inputs generated offline at ``seed`` (cached under
    ``data_dir/mnist1d``), unlabeled."""

    def __init__(self, data_dir: str, size: int, seed: int = 1042):
        from distillery.data.mnist1d import cached, generate

        path = Path(data_dir) / "mnist1d" / f"transfer_n{size}_s{seed}.npz"
        arrays = cached(path, lambda: generate(size, seed, train_split=1.0))
        super().__init__(arrays["x"], None, np.arange(len(arrays["x"])))


class UnlabeledImageFolder(Dataset):
    """Every image under ``root`` (any depth), as raw ``[3, S, S]`` tensors in [0, 1]."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

    def __init__(self, root: str, image_size: int = 32):
        from torchvision import transforms as T

        self.files = sorted(
            p for p in Path(root).expanduser().rglob("*") if p.suffix.lower() in self.EXTENSIONS
        )
        if not self.files:
            raise FileNotFoundError(f"data.sources: no images found under {root}")
        self.transform = T.Compose([T.Resize((image_size, image_size)), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            x = self.transform(img.convert("RGB"))
        return {"inputs": x, "labels": torch.tensor(UNLABELED), "sample_id": torch.tensor(i)}
