"""The offline teacher-output cache: the teacher run once, its outputs read back as a
:class:`~distillery.engine.teacher.Teacher` (``teacher.cache=<dir>`` on any teacher).

Written by ``python -m distillery.cache experiment=...`` (:class:`CacheWriter`) over
every input a run shows its teacher: the training sets (each source once), validation,
test and the dry-run example. Read by :class:`CachedOutputs`, the cached teacher's
``model`` (shards memory-mapped, :func:`map_shard`: a process keeps the row keys in
memory and reads the rows a batch needs): it maps each input row to the stored outputs
by the row's content (:func:`row_keys`: a hash of its dtype, shape and bytes), so the Teacher contract, the
task adapters and the losses are unchanged, and an input the cache does not hold (other
data, random views) is an error, not a silent wrong target (up to a 64-bit hash
collision: ~3e-8 for a million rows; rows differing in one byte never collide). Runs
whose inputs change per step, whose teacher generates, or whose teacher reads padding are
refused (:func:`unsupported`).

What is stored per row: ``teacher_cache/codec.py``; how a row is found: ``teacher_cache/keys.py``.

Tapped teacher features: when the run has ``taps.teacher``, the writer stores each
tap's capture per row beside the outputs (fixed rows only), and a run's teacher taps
become ``engine.taps.CachedTaps``, filled by each read with the stored features of the same
tap specs (a tap the cache does not hold, or holds for another module, is refused by
key); a run without teacher taps reads the outputs alone.

Augmented views (``views.augment``) are cached when they come from a pool
(``views.pool: N``, ``recipes/views.py``): the writer stores the teacher's outputs for
all N views of every training sample (view v of sample i augmented with the seed
``i * N + v``), which a run's steps then draw from; mixing is refused (a mixed input
depends on its batch partner).

Right-padded rows of different lengths (``data.format: prompt_response``, a causal LM;
the datamodule names its ``pad_id``): a row is its tokens up to the last that is not
``pad_id`` (:func:`content_lengths`; the writer checks this equals the batch's
attention mask, so a row ending in real pad-id tokens is refused, not cut), keyed by
those tokens alone (:func:`ragged_row_keys`: the key does not depend on the padding), and
the outputs of those positions only are stored (per-position tensors with each row's
``positions``); a read fills a batch's padding positions with a uniform distribution
(a causal teacher's outputs there are never a target: their labels are -100).

Layout: ``<dir>/cache.json`` (provenance: the teacher's config and provenance, the data
and views configs, the task, ``k``, ``dtype``, ``indices``, ``pad_id``, rows, ``complete``) and ``shard_<i>.safetensors``
files, each written to a temporary file and renamed. A writer finds the shards already
there and skips their rows (resumable); a cache of another teacher, data or format is
refused. A run refuses a cache whose teacher or data config differs from its own
(batch sizes and workers aside), naming the keys (``engine.teacher.cached_teacher``).
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.teacher_cache.codec import (
    FEATURE,
    RAGGED,
    delta_decode,
    dequantized,
    expand,
    padded,
    ragged_rows,
)
from distillery.teacher_cache.keys import content_lengths, ragged_row_keys, row_keys

FORMAT = 1
META = "cache.json"
SHARD_BYTES = 2**30  # a shard is cut at shard_rows rows or 1 GiB, whichever comes first


def unsupported(cfg, task) -> list[str]:
    """Why a run cannot read its teacher from a cache (one problem per config key): its
    teacher inputs change from step to step, its batches pad rows to their longest one
    (a row's bytes then depend on its batch), its teacher's outputs depend on the batch,
    or it needs more of the teacher than its outputs."""
    problems = []
    views = cfg.get("views")
    if views is not None and views.get("mix"):
        problems.append("views.mix: a mixed input depends on its batch partner, so no cache can "
                        "hold it (views.mix=null, or the live teacher)")  # fmt: skip
    if views is not None and views.get("augment") and not views.get("pool"):
        problems.append("views.augment: random augmentation draws new teacher inputs every step; "
                        "set views.pool=N (N views per sample, all cached) or use the live teacher")  # fmt: skip
    data = cfg.get("data") or {}
    if data.get("augment"):
        problems.append("data.augment: random crops/flips draw new teacher inputs every step; "
                        "a teacher cache holds outputs for fixed inputs")  # fmt: skip
    if task.name == "generative_lm":
        problems.append("task: generative_lm has the teacher generate (validation answers, "
                        "on-policy and preference samples); a teacher cache holds outputs for "
                        "fixed inputs (use the live teacher)")  # fmt: skip
    elif task.name == "embedding" or (
        data.get("format") == "prompt_response" and task.name != "causal_lm"
    ):
        key = "task" if task.name == "embedding" else "data.format"
        problems.append(f"{key}: batches pad rows to their longest one and this task's teacher reads "
                        f"the padding (not a causal LM); the teacher cache stores outputs per "
                        f"row (use the live teacher)")  # fmt: skip
    if (cfg.get("teacher") or {}).get("bn_mode") == "batch_stats":
        problems.append("teacher.bn_mode: batch_stats makes the teacher's outputs depend on the "
                        "whole batch; a cache stores one output per input")  # fmt: skip
    if (cfg.get("taps") or {}).get("teacher") and data.get("format") == "prompt_response":
        problems.append("taps.teacher: the cache stores tapped features per row, and "
                        "prompt/response rows are right-padded per batch (drop the teacher "
                        "taps or use the live teacher)")  # fmt: skip
    if getattr(task, "fused", False):
        problems.append("task.fused: the fused loss needs the teacher's hidden states and "
                        "output layer; a teacher cache holds its outputs (task.fused=false)")  # fmt: skip
    return problems


LOADER_KEYS = {"batch_size", "transfer_batch_size", "eval_batch_size", "num_workers"}


def without_loader_keys(node: Any) -> Any:
    """A data config without what only changes how it is batched (not which inputs)."""
    if isinstance(node, dict):
        return {k: without_loader_keys(v) for k, v in node.items() if k not in LOADER_KEYS}
    return node


def read_meta(path: Path, key: str) -> dict[str, Any]:
    meta = path / META
    if not meta.is_file():
        raise FileNotFoundError(
            f"{key}: no teacher cache at {path} ({META} missing); write one with python -m distillery.cache"
        )
    return json.loads(meta.read_text())


def write_meta(path: Path, meta: dict) -> None:
    tmp = path / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / META)


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("shard_*.safetensors"))


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}  # fmt: skip


def map_shard(file: Path, key: str) -> dict[str, Tensor]:
    """A shard's tensors as read-only views of the memory-mapped safetensors file (8-byte
    header length, JSON header, data): nothing is read until a row is, and every process
    mapping the file shares its pages (DDP ranks on one host hold one copy in the page
    cache, not one each). A file shorter than its header says is refused."""
    try:
        with open(file, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        size = int.from_bytes(mapped[:8], "little")
        header = json.loads(bytes(mapped[8 : 8 + size]))
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if 8 + size + end > len(mapped):
                raise ValueError(f"{name} ends at byte {8 + size + end} of {len(mapped)}")
            count = (end - begin) // dtype.itemsize
            if count == 0:
                tensors[name] = torch.empty(info["shape"], dtype=dtype)
                continue
            with warnings.catch_warnings():  # read-only on purpose: nothing writes a shard
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + size + begin)
            tensors[name] = flat.view(info["shape"])
        return tensors
    except Exception as e:  # noqa: BLE001 - re-raised naming the key and file
        raise ValueError(
            f"{key}: cannot read cache shard {file} (truncated or not safetensors: {e})"
        ) from e


class CacheWriter:
    """Appends teacher outputs to ``path`` in shards of ``shard_rows`` rows (or 1 GiB);
    rows whose key is already stored are skipped (a rerun resumes)."""

    def __init__(self, path: Path, meta: dict, shard_rows: int = 65536):
        self.path, self.shard_rows = Path(path), shard_rows
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta = {**meta, "format": FORMAT}
        self.seen: set[int] = set()
        if (self.path / META).is_file():
            from distillery.config import config_differences, upgrade_targets

            old = upgrade_targets(read_meta(self.path, "cache.dir"))  # moved _target_ paths

            diffs = config_differences(
                {k: v for k, v in old.items() if k not in ("rows", "complete")},
                {k: v for k, v in self.meta.items() if k not in ("rows", "complete")},
            )
            if diffs:
                raise ValueError(
                    f"cache.dir: {self.path} holds a cache of another run ({', '.join(diffs[:6])} "
                    f"differ); choose another cache.dir or delete it"
                )
            for file in shards(self.path):
                self.seen.update(map_shard(file, "cache.dir")["keys"].tolist())
        self.next_shard = max((int(f.stem.split("_")[1]) + 1 for f in shards(self.path)), default=0)
        self.rows = len(self.seen)
        self.pending: list[tuple[list[int], dict[str, Tensor]]] = []
        self.pending_rows = self.pending_bytes = 0
        write_meta(self.path, {**self.meta, "rows": self.rows, "complete": False})

    def new_rows(self, keys: list[int]) -> list[int]:
        """Positions of ``keys`` (:func:`row_keys` as a list) not stored yet (the first
        occurrence of each)."""
        fresh, taken = [], set()
        for i, key in enumerate(keys):
            if key not in self.seen and key not in taken:
                fresh.append(i)
                taken.add(key)
        return fresh

    def add(self, keys: list[int], stored: dict[str, Tensor]) -> None:
        self.seen.update(keys)
        self.pending.append((keys, stored))
        self.pending_rows += len(keys)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        if self.pending_rows >= self.shard_rows or self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        tensors = {
            "keys": torch.tensor([k for keys, _ in self.pending for k in keys], dtype=torch.int64)
        }
        for name in self.pending[0][1]:
            tensors[name] = torch.cat([s[name] for _, s in self.pending]).contiguous()
        file = self.path / f"shard_{self.next_shard:05d}.safetensors"
        tmp = self.path / f".{file.name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, file)
        self.next_shard += 1
        self.rows += len(tensors["keys"])
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        write_meta(self.path, {**self.meta, "rows": self.rows, "complete": False})

    def close(self) -> dict:
        self.flush()
        meta = {**self.meta, "rows": self.rows, "complete": True}
        write_meta(self.path, meta)
        return meta


class Shard:
    """One shard's rows, read from its memory-mapped file (:func:`map_shard`): per row
    everything (fixed rows) or its counts (ragged rows: ``positions``; delta-coded ids:
    ``index_code_lengths``), the rest found by offsets from those counts."""

    def __init__(self, file: Path, key: str, pad_id: int | None, vocab: int | None):
        tensors = map_shard(file, key)
        self.keys = tensors.pop("keys")
        self.features = {n: tensors.pop(n) for n in list(tensors) if n.startswith(FEATURE)}
        self.pad_id, self.vocab = pad_id, vocab
        self.codes = tensors.pop(RAGGED, None)
        counts = ("positions", "index_code_lengths")
        self.per_row = {n: tensors.pop(n) for n in counts if n in tensors}
        if pad_id is None:  # fixed rows: every stored tensor is per row
            self.per_row, tensors = {**self.per_row, **tensors}, {}
        self.per_position = tensors
        self.starts = {n: torch.cumsum(t.long(), 0) - t.long() for n, t in self.per_row.items()
                       if n in counts}  # fmt: skip
        codes_ok = self.codes is None or int(
            self.per_row["index_code_lengths"].long().sum()
        ) == len(self.codes)
        rows_ok = pad_id is None or int(self.per_row["positions"].long().sum()) == len(
            tensors["values"]
        )
        if not (codes_ok and rows_ok):
            raise ValueError(f"{key}: cache shard {file} is corrupt (its stored positions or index "
                             f"codes do not match their row lengths); rewrite the cache")  # fmt: skip

    def read(
        self, rows: Tensor, width: int | None, device, features: tuple[str, ...] = ()
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Rows ``rows`` of this shard as float32 outputs on ``device`` (ragged rows:
        padded to ``width`` positions, the padding a uniform distribution), and the
        stored ``features`` of those rows (float32)."""
        feats = {n: self.features[n][rows].to(device, torch.float32) for n in features}
        stored, lengths = self.stored_rows(rows)
        stored = dequantized(stored)
        if lengths is not None:  # padding positions read uniform (no loss reads them: labels -100)
            stored = padded(stored, lengths, width, self.vocab)
        return expand({n: t.to(device) for n, t in stored.items()}, self.vocab), feats

    def stored_rows(self, rows: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """What is stored of ``rows`` (ids decoded; ragged rows: their positions
        concatenated) and, for ragged rows, each row's number of positions."""
        stored = {n: t[rows] for n, t in self.per_row.items()}
        lengths = stored.pop("positions", None)
        if lengths is not None:
            starts = self.starts["positions"][rows]
            stored.update(
                {n: ragged_rows(t, starts, lengths) for n, t in self.per_position.items()}
            )
        if self.codes is not None:
            starts, counts = (
                self.starts["index_code_lengths"][rows],
                stored.pop("index_code_lengths"),
            )
            stored["indices"] = delta_decode(
                ragged_rows(self.codes, starts, counts), tuple(stored["values"].shape)
            )
        return stored, lengths


class CachedOutputs(nn.Module):
    """The cached teacher's model: input rows -> stored outputs (float32). The shards
    stay on disk, memory-mapped (:func:`map_shard`): a process holds the row keys (16
    bytes a row) and reads the rows a batch needs; keys are computed on the CPU (one copy
    of the teacher inputs to the host per step on an accelerator) and the rows are sent
    to the inputs' device."""

    def __init__(self, path: str | Path, key: str = "teacher.cache"):
        super().__init__()
        self.path, self.key = Path(path), key
        meta = read_meta(self.path, key)
        if not meta.get("complete"):
            raise ValueError(
                f"{key}: the cache at {self.path} is incomplete ({meta.get('rows', 0)} rows); "
                f"rerun python -m distillery.cache to finish it"
            )
        self.vocab = meta.get("vocab")
        self.pad_id = meta.get("pad_id")  # set: rows of different lengths (right-padded)
        self.taps: dict[str, dict] = meta.get("taps") or {}  # tapped features it stores
        self.sink: Any = (
            None  # the run's teacher taps (engine.taps.CachedTaps), filled by each read
        )
        self.shards = [Shard(f, key, self.pad_id, self.vocab) for f in shards(self.path)]
        if not self.shards or sum(len(s.keys) for s in self.shards) != meta["rows"]:
            raise ValueError(
                f"{key}: {self.path} should hold {meta['rows']} rows in its shards; a shard is missing"
            )
        keys = torch.cat([s.keys for s in self.shards])
        self.shard_of = torch.cat(
            [torch.full((len(s.keys),), i) for i, s in enumerate(self.shards)]
        )
        self.row_in_shard = torch.cat([torch.arange(len(s.keys)) for s in self.shards])
        self.sorted_keys, self.order = keys.sort()

    def forward(self, x: Tensor) -> Tensor:
        lengths = None if self.pad_id is None else content_lengths(x, self.pad_id)
        keys = row_keys(x) if lengths is None else ragged_row_keys(x, lengths)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp(max=len(self.sorted_keys) - 1)
        missing = int((self.sorted_keys[pos] != keys).sum())
        if missing:
            raise ValueError(
                f"{self.key}: {missing} of {len(keys)} teacher inputs are not in the cache at "
                f"{self.path} (written for other data, or the inputs change each step: random "
                f"views); rewrite it with python -m distillery.cache"
            )
        rows = self.order[pos]  # the compressed rows travel; the expansion happens there
        shard, local = self.shard_of[rows], self.row_in_shard[rows]
        width = None if lengths is None else x.shape[1]
        sink = self.sink if self.sink is not None and self.sink.active else None
        wanted = sink.stored_names() if sink is not None else ()
        counts = torch.bincount(shard, minlength=len(self.shards)).tolist()
        if max(counts) == len(rows):  # one shard holds the whole batch
            out, feats = self.shards[counts.index(len(rows))].read(local, width, x.device, wanted)
        else:
            by_shard = torch.argsort(shard, stable=True)  # read shard by shard, then reorder
            chunks = local[by_shard].split(counts)
            parts = [
                self.shards[i].read(c, width, x.device, wanted)
                for i, c in enumerate(chunks)
                if len(c)
            ]
            back = torch.argsort(by_shard).to(x.device)
            out = torch.cat([o for o, _ in parts])[back]
            feats = {n: torch.cat([f[n] for _, f in parts])[back] for n in wanted}
        if sink is not None:
            sink.receive(feats)
        return out


def bytes_per_row(path: Path) -> float:
    """Shard bytes per cached row (the benchmark's bytes per sequence or sample)."""
    meta = read_meta(path, "cache.dir")
    total = sum(f.stat().st_size for f in shards(path))
    return total / max(1, meta["rows"])
