"""What a remote teacher answered, kept in the teacher-cache format (``teacher=remote``,
``teacher.cache_dir``): a rerun, a resumed run or another student asks the server nothing
twice.

Layout: ``<cache_dir>/cache.json`` records what the rows are (the served model, its
weights hash when the server reports one, the tokenizer's hash, ``k``, the vocabulary
size) and, as provenance, the endpoint that wrote them first. Every process writes its own
subdirectory (``w<time>-<pid>/``: a :class:`~distillery.teacher_cache.store.CacheWriter`,
so several runs or DDP ranks never write the same file) of ragged rows: per row its
positions, per position the top-``k`` log-probabilities (fp32), their ids and the rest of
the mass, keyed by the row's tokens (:func:`~distillery.teacher_cache.keys.ragged_row_keys`).
A process reads every subdirectory's finished shards (memory-mapped) plus the rows it has
not written yet (kept in memory until ``flush_rows`` of them are pending, and flushed at
the end of a run and when a checkpoint is saved). A row is read back exactly as the
teacher cache reads it (:func:`~distillery.teacher_cache.codec.expand`): the rest of the mass
spread over the other ``V - k`` tokens; positions past a row's end read a uniform
distribution (no loss reads them: their labels are -100).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from distillery.teacher_cache.codec import expand, padded
from distillery.teacher_cache.store import CacheWriter, Shard

META = "cache.json"
IDENTITY = ("source", "model", "weights_sha256", "tokenizer_sha256", "k", "vocab")


class RowStore:
    def __init__(self, root: str | Path, meta: dict, key: str, flush_rows: int = 1024):
        self.root, self.key, self.flush_rows = Path(root).expanduser(), key, flush_rows
        self.vocab = int(meta["vocab"])
        self.meta = {**meta, "layout": "remote_rows"}
        self.root.mkdir(parents=True, exist_ok=True)
        recorded = self.root / META
        if recorded.is_file():
            old = json.loads(recorded.read_text())
            diffs = [f"{k} ({old.get(k)!r} there, {meta.get(k)!r} here)" for k in IDENTITY
                     if old.get(k) != meta.get(k)]  # fmt: skip
            if diffs or old.get("layout") != "remote_rows":
                raise ValueError(
                    f"{key}: {self.root} holds rows of another teacher or setting: "
                    f"{', '.join(diffs) or 'not a remote-teacher cache'}; choose another {key}"
                )
        else:
            tmp = self.root / f".{META}.tmp"
            tmp.write_text(json.dumps(self.meta, indent=2))
            os.replace(tmp, recorded)
        self.shards: list[Shard] = []
        self.where: dict[int, tuple[int, int]] = {}  # row key -> (shard, row in shard)
        for file in sorted(self.root.glob("*/shard_*.safetensors")):
            self._open(file)
        self.pending: dict[int, dict[str, Tensor]] = {}  # answered, not written yet
        self.writer: CacheWriter | None = None
        self.asked = 0  # rows this process asked the server for (added)

    def _open(self, file: Path) -> None:
        shard = Shard(file, self.key, pad_id=-1, vocab=self.vocab)  # ragged rows
        index = len(self.shards)
        self.shards.append(shard)
        for row, k in enumerate(shard.keys.tolist()):
            self.where.setdefault(k, (index, row))

    def __contains__(self, key: int) -> bool:
        return key in self.where or key in self.pending

    def __len__(self) -> int:
        return len(self.where) + len(self.pending)

    def add(self, key: int, row: dict[str, Tensor]) -> None:
        """One answered row: ``values`` / ``indices`` ``[L, k]``, ``rest`` ``[L]``."""
        if key in self:
            return
        self.pending[key] = row
        self.asked += 1
        if len(self.pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one shard of this process's subdirectory."""
        if not self.pending:
            return
        if self.writer is None:
            name = f"w{time.time_ns()}-{os.getpid()}"
            self.writer = CacheWriter(self.root / name, self.meta, shard_rows=2**62)
        keys = list(self.pending)
        rows = [self.pending[k] for k in keys]
        stored = {n: torch.cat([r[n] for r in rows]) for n in ("values", "indices", "rest")}
        stored["positions"] = torch.tensor([len(r["rest"]) for r in rows], dtype=torch.int32)
        self.writer.add(keys, stored)
        self.writer.close()  # writes the shard and marks the subdirectory's rows complete
        self._open(self.writer.path / f"shard_{self.writer.next_shard - 1:05d}.safetensors")
        self.pending = {}

    def read(self, keys: list[int], lengths: Tensor, width: int, device) -> Tensor:
        """``[B, width, V]`` float32 log-probabilities of the rows ``keys`` (all held): their
        stored top-k gathered and padded, then expanded in one pass over the output."""
        rows: list[dict[str, Tensor] | None] = [self.pending.get(k) for k in keys]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            if rows[i] is None:
                shard, local = self.where[k]
                by_shard.setdefault(shard, []).append((i, local))
        for shard, items in by_shard.items():
            stored, counts = self.shards[shard].stored_rows(torch.tensor([r for _, r in items]))
            parts = {n: t.split(counts.tolist()) for n, t in stored.items()}
            for j, (i, _) in enumerate(items):
                rows[i] = {n: p[j] for n, p in parts.items()}
        lengths = torch.tensor([len(r["rest"]) for r in rows])
        stored = {n: torch.cat([r[n] for r in rows]) for n in ("values", "indices", "rest")}
        stored = padded(stored, lengths, width, self.vocab)
        return expand({n: t.to(device) for n, t in stored.items()}, self.vocab)
