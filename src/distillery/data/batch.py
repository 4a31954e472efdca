"""Datasets and batches under the batch contract (``distillery.contract``: ``inputs``,
``labels``, ``sample_id``, and ``attention_mask`` for padded tokens).

With a transfer set, training batches arrive as ``{"labeled": batch, "transfer":
batch}`` from Lightning's CombinedLoader; :func:`merge_sources` concatenates them.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from distillery.contract import BATCH_KEYS, UNLABELED


class TensorDictDataset(Dataset):
    """Inputs, labels (or UNLABELED) and sample ids as in the batch contract."""

    def __init__(self, inputs, labels=None, sample_ids=None, transform=None):
        self.inputs = torch.as_tensor(inputs)
        n = len(self.inputs)
        self.labels = (
            torch.full((n,), UNLABELED, dtype=torch.long)
            if labels is None
            else torch.as_tensor(labels).long()
        )
        self.sample_ids = (
            torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids).long()
        )
        if len(self.labels) != n or len(self.sample_ids) != n:
            raise ValueError("inputs, labels and sample_ids must have the same length")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        x = self.inputs[i]
        if self.transform is not None:
            x = self.transform(x)
        return {"inputs": x, "labels": self.labels[i], "sample_id": self.sample_ids[i]}


def merge_sources(batch: dict) -> dict:
    """One batch from a plain batch or a ``{source: batch}`` dict of sub-batches."""
    if "inputs" in batch:
        return batch
    parts = [b for b in batch.values() if b is not None]
    return {k: torch.cat([b[k] for b in parts]) for k in BATCH_KEYS}
