"""Images from torchvision datasets: CIFAR-10/100 files on disk, or an ImageFolder tree.

Images are yielded as raw tensors in [0, 1]; normalisation is ``data.input_norm``
(see ``distillery.models.input_norm``). Train augmentation (random crop with padding and
horizontal flip) is applied once per sample in the dataset, so teacher and student
see the very same augmented tensor.

* ``dataset: cifar10 | cifar100``: the python-version archives under ``root``
  (``root/cifar-100-python/...``). With ``download: false`` (the default) missing
  files are an error naming ``data.root``. Validation uses the test split, as in the
  CRD/RepDistiller protocol, unless ``val_size > 0`` carves it from train.
* ``dataset: imagefolder``: ``root/train/<class>/*.png`` and ``root/val/<class>/...``
  (and ``root/test`` when present, else ``val`` doubles as test).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from distillery.data.base import ClassificationDataModule

CIFAR_MEAN = {"cifar10": [0.4914, 0.4822, 0.4465], "cifar100": [0.5071, 0.4865, 0.4409]}
CIFAR_STD = {"cifar10": [0.2470, 0.2435, 0.2616], "cifar100": [0.2673, 0.2564, 0.2762]}


class DictView(Dataset):
    """(image, target) dataset -> batch-contract dicts with stable sample ids."""

    def __init__(self, base: Dataset, id_offset: int = 0):
        self.base, self.id_offset = base, id_offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        x, y = self.base[i]
        return {
            "inputs": x,
            "labels": torch.tensor(int(y)),
            "sample_id": torch.tensor(self.id_offset + i),
        }


class ImageDataModule(ClassificationDataModule):
    def __init__(
        self,
        dataset: str = "cifar100",
        root: str = "data/",
        download: bool = False,
        image_size: int = 32,
        augment: bool = True,
        val_size: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if dataset not in ("cifar10", "cifar100", "imagefolder"):
            raise ValueError(
                f"data.dataset must be cifar10, cifar100 or imagefolder, got {dataset!r}"
            )
        self.dataset, self.root, self.download = dataset, Path(root).expanduser(), download
        self.image_size, self.augment, self.val_size, self.seed = (
            image_size,
            augment,
            val_size,
            seed,
        )
        self.num_classes = num_classes or {"cifar10": 10, "cifar100": 100}.get(dataset, 0)
        self.input_shape = (3, image_size, image_size)

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        ops = (
            []
            if self.dataset.startswith("cifar")
            else [T.Resize((self.image_size, self.image_size))]
        )
        if train and self.augment:
            ops += [
                T.RandomCrop(self.image_size, padding=self.image_size // 8),
                T.RandomHorizontalFlip(),
            ]
        return T.Compose([*ops, T.ToTensor()])

    def prepare_data(self) -> None:
        if self.dataset.startswith("cifar") and self.download:
            self._cifar(train=True, transform=None, download=True)
            self._cifar(train=False, transform=None, download=True)

    def _cifar(self, train: bool, transform, download: bool = False):
        from torchvision import datasets

        cls = datasets.CIFAR100 if self.dataset == "cifar100" else datasets.CIFAR10
        try:
            return cls(str(self.root), train=train, transform=transform, download=download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"data.root: {self.dataset} files not found or corrupted under {self.root} ({e}). "
                f"Put the python-version archive contents there or set data.download=true."
            ) from e

    def _folder(self, split: str, transform):
        from torchvision import datasets

        path = self.root / split
        if not path.is_dir():
            raise FileNotFoundError(f"data.root: image folder split '{split}' not found at {path}")
        ds = datasets.ImageFolder(str(path), transform=transform)
        if self.num_classes and len(ds.classes) != self.num_classes:
            raise ValueError(
                f"data.num_classes is {self.num_classes} but {path} has {len(ds.classes)} class folders"
            )
        self.num_classes = len(ds.classes)
        return ds

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset.startswith("cifar"):
            train, train_plain = (
                self._cifar(True, self._transforms(True)),
                self._cifar(True, self._transforms(False)),
            )
            test = self._cifar(False, self._transforms(False))
        else:
            train, train_plain = (
                self._folder("train", self._transforms(True)),
                self._folder("train", self._transforms(False)),
            )
            test_split = "test" if (self.root / "test").is_dir() else "val"
            test = self._folder(test_split, self._transforms(False))
        if self.val_size > 0:
            perm = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(self.seed)
            ).tolist()
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self.train_set = Subset(DictView(train), train_idx)
            self.val_set = Subset(DictView(train_plain), val_idx)
        else:
            self.train_set = DictView(train)
            val = (
                test
                if self.dataset.startswith("cifar")
                else self._folder("val", self._transforms(False))
            )
            self.val_set = DictView(val, id_offset=2_000_000)
        self.test_set = DictView(test, id_offset=1_000_000)
