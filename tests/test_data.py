"""Datamodules honour the batch contract; generation is offline and side-effect free."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.contract import UNLABELED
from distillery.data.batch import merge_sources
from distillery.data.digits import DigitsDataModule
from distillery.data.images import ImageDataModule
from distillery.data.mnist1d import MNIST1DDataModule


def test_mnist1d_splits_ids_and_transfer_set(data_dir):
    np.random.seed(123)
    random.seed(123)
    state = (np.random.get_state()[1].copy(), random.getstate())
    dm = MNIST1DDataModule(
        data_dir=str(data_dir), num_samples=1000, val_size=200, transfer_size=300, batch_size=32
    )
    dm.prepare_data()
    dm.setup("fit")
    assert np.array_equal(np.random.get_state()[1], state[0]) and random.getstate() == state[1]
    assert (len(dm.train_set), len(dm.test_set), len(dm.val_set), len(dm.transfer_set)) == (
        800,
        200,
        200,
        300,
    )
    ids = torch.cat(
        [d.sample_ids for d in (dm.train_set, dm.test_set, dm.val_set, dm.transfer_set)]
    )
    assert len(ids.unique()) == len(ids)
    assert (dm.transfer_set.labels == UNLABELED).all() and (dm.train_set.labels >= 0).all()
    loaders = dm.train_dataloader()
    labeled, transfer = next(iter(loaders["labeled"])), next(iter(loaders["transfer"]))
    batch = merge_sources({"labeled": labeled, "transfer": transfer})
    assert batch["inputs"].shape == (64, 40) and (batch["labels"] == UNLABELED).sum() == 32
    # Cached: a second module reads the same data back.
    dm2 = MNIST1DDataModule(
        data_dir=str(data_dir), num_samples=1000, val_size=200, transfer_size=300
    )
    dm2.setup()
    assert torch.equal(dm.train_set.inputs, dm2.train_set.inputs)


def test_digits_unlabeled_fraction():
    dm = DigitsDataModule(unlabeled_fraction=0.5)
    dm.setup()
    n_train, n_transfer = len(dm.train_set), len(dm.transfer_set)
    assert abs(n_train - n_transfer) <= 1
    total = n_train + n_transfer + len(dm.val_set) + len(dm.test_set)
    assert total == 1797
    ids = torch.cat(
        [
            dm.train_set.sample_ids,
            dm.transfer_set.sample_ids,
            dm.val_set.sample_ids,
            dm.test_set.sample_ids,
        ]
    )
    assert len(ids.unique()) == 1797
    assert dm.train_set.inputs.max() <= 1.0


def test_cifar_missing_files_error_names_data_root(tmp_path):
    dm = ImageDataModule(dataset="cifar100", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.root"):
        dm.setup("fit")


def make_image_folder(root, classes=3, per_class=2, size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def test_image_folder_yields_raw_tensors(tmp_path):
    make_image_folder(tmp_path)
    dm = ImageDataModule(
        dataset="imagefolder", root=str(tmp_path), image_size=8, num_classes=3, eval_batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert (
        batch["inputs"].shape == (2, 3, 8, 8)
        and 0 <= batch["inputs"].min()
        and batch["inputs"].max() <= 1
    )
    with pytest.raises(ValueError, match="data.num_classes"):
        ImageDataModule(dataset="imagefolder", root=str(tmp_path), num_classes=5).setup()
