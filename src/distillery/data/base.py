from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from distillery.data.sampling import EpochSampler, ResumableLoader


def make_loader(
    ds: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    weights: torch.Tensor | None = None,
    num_samples: int | None = None,
    **kwargs,
) -> DataLoader:
    """The project's DataLoader. Training loaders draw their order from an
    :class:`~distillery.data.sampling.EpochSampler` (a function of the run's seed, the
    epoch and the pass; ``weights``: ``num_samples`` weighted draws with replacement), so a
    single-process run resumed from any checkpoint, mid-epoch included, sees the batches
    the straight run sees; they drop a last partial batch, so every batch has the same size and per-batch
    means stay comparable across steps and under gradient accumulation."""
    # A loader of its own generator: creating an iterator (every epoch, every validation)
    # would otherwise draw from the global RNG, which dropout and the views use.
    kwargs.setdefault("generator", torch.Generator().manual_seed(torch.initial_seed()))
    if not train:
        return DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                          persistent_workers=num_workers > 0, **kwargs)  # fmt: skip
    sampler = EpochSampler(len(ds), weights=weights, num_samples=num_samples)
    return ResumableLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(sampler) > batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def read_jsonl(
    path: str, key: str, fields: tuple[str, ...], nonempty: tuple[str, ...] = (), hint: str = ""
) -> list[dict]:
    """The rows of a jsonl file, each checked to hold ``fields`` (and non-blank
    ``nonempty`` ones); a :class:`~distillery.config.ConfigError` names the config ``key``,
    the file and the line: the first row that is not JSON or lacks a field, else the first
    row with a blank field and how many rows have one (``hint``: what to do about it)."""
    import json
    from pathlib import Path

    from distillery.config import ConfigError

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: file not found: {p}")
    rows, blank = [], []  # blank: (line, its blank fields, row)
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError([f"{key}: line {n} of {p} is not JSON ({e})"]) from e
        if not isinstance(row, dict):
            raise ConfigError([f"{key}: line {n} of {p} is not a JSON object: {line[:80]!r}"])
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(
                [f"{key}: line {n} of {p} lacks {missing} (needs {list(fields)}; keys: {sorted(row)})"]
            )  # fmt: skip
        empty = [f for f in nonempty if f in row and (row[f] is None or not str(row[f]).strip())]
        if empty:
            blank.append((n, empty, row))
        rows.append(row)
    if blank:
        n, empty, row = blank[0]
        shown = ", ".join(f"{f!r} is {row[f]!r}" for f in empty)
        raise ConfigError(
            [f"{key}: line {n} of {p} has a blank {' and '.join(map(repr, empty))} ({shown}); "
             f"{len(blank)} of its {len(rows)} rows have a blank {'/'.join(nonempty)}"
             + (f"; {hint}" if hint else "")]
        )  # fmt: skip
    return rows


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """A deterministic shuffle of ``range(n)`` cut into ``{"val", "test", "train"}``
    index tensors (val and test get at least one item each)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = max(1, int(n * val_fraction)), max(1, int(n * test_fraction))
    return {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }


class ClassificationDataModule(L.LightningDataModule):
    """Shared loader logic; subclasses fill ``train_set``, ``val_set``, ``test_set``
    and optionally ``transfer_set`` (unlabeled) in ``setup`` and set
    ``num_classes`` and ``input_shape`` in ``__init__``.

    With a transfer set, each training batch holds ``batch_size`` labeled and
    ``transfer_batch_size`` unlabeled samples (a fixed mix, so per-batch means are
    comparable across steps and under gradient accumulation); an epoch is one pass
    over the larger of the two sets.
    """

    output_kind = "logits"  # what the models output: logits over num_classes
    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 128,
        transfer_batch_size: int | None = None,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        input_norm: dict | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.transfer_batch_size = transfer_batch_size or batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.input_norm = input_norm
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.transfer_set: Dataset | None = None

    def example_input(self, n: int = 2):
        """A dummy batch of raw inputs for shape dry runs (token datamodules give ids)."""
        import torch

        return torch.zeros(n, *self.input_shape)

    def _loader(self, ds: Dataset, batch_size: int, train: bool) -> DataLoader:
        return make_loader(ds, batch_size, train, self.num_workers)

    def train_dataloader(self):
        labeled = self._loader(self.train_set, self.batch_size, train=True)
        if self.transfer_set is None or len(self.transfer_set) == 0:
            return labeled
        return {
            "labeled": labeled,
            "transfer": self._loader(self.transfer_set, self.transfer_batch_size, train=True),
        }

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, train=False)

    def test_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size, train=False)
