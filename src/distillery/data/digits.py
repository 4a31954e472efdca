"""scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn, no download).

Images are yielded flat (64 values in [0, 1]) or as ``[1, 8, 8]`` with ``flatten: false``.
Stratified train/val/test split by ``seed``; ``unlabeled_fraction`` of the train
split loses its labels and becomes the transfer set.
"""

from __future__ import annotations

import numpy as np
import torch

from distillery.data.base import ClassificationDataModule
from distillery.data.batch import TensorDictDataset


class DigitsDataModule(ClassificationDataModule):
    num_classes = 10

    def __init__(
        self,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        unlabeled_fraction: float = 0.0,
        flatten: bool = True,
        num_classes: int = 10,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes != 10:
            raise ValueError(f"data.num_classes: this dataset has 10 classes, got {num_classes}")
        if not 0.0 <= unlabeled_fraction < 1.0:
            raise ValueError(f"data.unlabeled_fraction must be in [0, 1), got {unlabeled_fraction}")
        self.seed, self.flatten = seed, flatten
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.unlabeled_fraction = unlabeled_fraction
        self.input_shape = (64,) if flatten else (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        if not self.flatten:
            x = x.reshape(-1, 1, 8, 8)
        ids = np.arange(len(x))
        x_rest, x_test, y_rest, y_test, id_rest, id_test = train_test_split(
            x,
            d.target,
            ids,
            test_size=self.test_fraction,
            stratify=d.target,
            random_state=self.seed,
        )
        x_tr, x_val, y_tr, y_val, id_tr, id_val = train_test_split(
            x_rest,
            y_rest,
            id_rest,
            test_size=self.val_fraction,
            stratify=y_rest,
            random_state=self.seed,
        )
        self.test_set = TensorDictDataset(x_test, y_test, id_test)
        self.val_set = TensorDictDataset(x_val, y_val, id_val)
        if self.unlabeled_fraction > 0:
            x_tr, x_un, y_tr, _, id_tr, id_un = train_test_split(
                x_tr,
                y_tr,
                id_tr,
                test_size=self.unlabeled_fraction,
                stratify=y_tr,
                random_state=self.seed,
            )
            self.transfer_set = TensorDictDataset(x_un, None, id_un)
        self.train_set = TensorDictDataset(x_tr, y_tr, id_tr)


class DigitsTokensDataModule(DigitsDataModule):
    """Digits as token sequences for transformer encoders: each image becomes
    ``[CLS] p_1 ... p_64`` with pixel intensities 0..16 as tokens 2..18 (0 = padding,
    1 = CLS), 65 tokens, int64. A small, real, offline sequence-classification task."""

    VOCAB_SIZE = 19

    def __init__(self, **kwargs):
        kwargs["flatten"] = True
        super().__init__(**kwargs)
        self.input_shape = (65,)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        for ds in (self.train_set, self.val_set, self.test_set, self.transfer_set):
            if ds is not None:
                tokens = (ds.inputs * 16).round().long() + 2
                ds.inputs = torch.cat([torch.ones(len(tokens), 1, dtype=torch.long), tokens], 1)

    def example_input(self, n: int = 2):
        return torch.ones(n, *self.input_shape, dtype=torch.long)
