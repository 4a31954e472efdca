"""Write a run's teacher-output cache: ``python -m distillery.cache experiment=...``.

The run's teacher runs once over every input the run will show it: each training
source (labeled set, transfer pool sources) in order, validation, test and the dry-run
example. Train with ``teacher.cache=<cache.dir>`` (same experiment): the teacher's
forward becomes a read. With ``taps.teacher`` the tapped features are stored too.
Format, keys and checks: ``distillery/teacher_cache/store.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distillery.config import ConfigError, build, exit_on_config_error, to_record, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def input_loaders(datamodule, batch_size: int) -> dict:
    """Every loader of inputs the run's teacher sees, in a fixed order: the training
    sources (not shuffled, each sample once), validation and test."""
    from torch.utils.data import DataLoader

    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    train = train if isinstance(train, dict) else {"train": train}
    loaders = {
        f"train/{name}": DataLoader(
            loader.dataset, batch_size=batch_size, collate_fn=loader.collate_fn
        )
        for name, loader in train.items()
    }
    loaders["val"] = datamodule.val_dataloader()
    datamodule.setup("test")
    loaders["test"] = datamodule.test_dataloader()
    return loaders


def write_cache(cfg: DictConfig) -> dict:
    from distillery.engine.builder import build_task, build_teacher, connect_remote_teacher
    from distillery.engine.taps import Taps
    from distillery.teacher_cache.codec import (
        DTYPES,
        INDEX_CODINGS,
        compress,
        compress_features,
        compress_ragged,
    )
    from distillery.teacher_cache.keys import content_lengths, ragged_row_keys, row_keys
    from distillery.teacher_cache.store import CacheWriter, unsupported

    options = cfg.cache
    run = cfg.copy()
    with open_dict(run):
        del run["cache"]
    validate(run)
    problems = []
    if run.get("teacher") is None:
        problems.append("teacher: null; the cache holds a teacher's outputs (choose a teacher)")
    elif run.teacher.get("cache") is not None:
        problems.append("teacher.cache: set; the cache command runs the live teacher (drop it)")
    if options.dtype not in DTYPES:
        problems.append(f"cache.dtype: {options.dtype!r} is not one of {sorted(DTYPES)}")
    if options.k is not None and (not isinstance(options.k, int) or options.k < 1):
        problems.append(f"cache.k: {options.k!r} is not a positive integer or null")
    if options.dtype == "q8" and options.k is None:
        problems.append("cache.dtype: q8 quantises top-k log-probabilities; set cache.k")
    if options.indices not in INDEX_CODINGS:
        problems.append(f"cache.indices: {options.indices!r} is not one of {list(INDEX_CODINGS)}")
    elif options.indices == "delta" and options.k is None:
        problems.append("cache.indices: delta codes top-k token ids; set cache.k")
    if problems:
        raise ConfigError(problems)
    if run.get("seed") is not None:
        torch.manual_seed(run.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if options.device == "auto"
        else options.device
    )
    datamodule = build(run.data, "data")
    teacher = build_teacher(run).to(device)
    task = build_task(run, datamodule)
    connect_remote_teacher(teacher, task, datamodule)  # teacher=remote: cache what it serves
    if problems := unsupported(run, task):
        raise ConfigError(problems)
    datamodule.prepare_data()
    datamodule.setup("fit")
    pad_id = getattr(datamodule, "pad_id", None)  # rows right-padded to their batch's longest
    example = datamodule.example_input(2)
    outputs = teacher(example.to(device))
    vocab = int(outputs.shape[-1])
    if options.k is not None and options.k >= vocab:
        raise ConfigError(
            [f"cache.k: {options.k} is not below the teacher's {vocab} outputs per position; "
             f"k: null stores them all"]
        )  # fmt: skip
    meta = {
        "teacher_config": teacher.provenance["config"],
        "teacher_provenance": teacher.provenance,
        "data": to_record(run.data),
        "views": to_record(run.views) if run.get("views") is not None else None,
        "paths": to_record(run.paths),
        "task": task.name,
        "k": options.k,
        "dtype": options.dtype,
        "indices": options.indices,
        "vocab": vocab,
        "pad_id": pad_id,
    }
    taps = None
    if tap_specs := (run.get("taps") or {}).get("teacher"):  # features stored beside outputs
        if pad_id is not None:
            raise ConfigError(
                ["taps.teacher: the cache stores tapped features per row, and this data's rows "
                 "are right-padded per batch (drop the teacher taps or use the live teacher)"]
            )  # fmt: skip
        try:
            taps = Taps(teacher.network, tap_specs, "teacher", detach=True)
        except (ValueError, TypeError) as e:
            raise ConfigError([str(e)]) from e
        meta["taps"] = {
            name: {**asdict(spec), "targets": len(taps.targets[name])}
            for name, spec in taps.specs.items()
        }
    views = build(run.get("views"), "views")  # before anything is written
    pool = getattr(views, "pool", None)  # training inputs: every view of the pool
    writer = CacheWriter(Path(options.dir), meta, options.shard_rows)
    dtype = DTYPES[options.dtype]

    def add(x: torch.Tensor, mask: torch.Tensor | None = None) -> int:
        if pad_id is None:
            keys = row_keys(x).tolist()
        else:
            lengths = content_lengths(x, pad_id)
            if mask is not None and not torch.equal(lengths, mask.long().sum(1).cpu()):
                raise ConfigError([
                    f"data: a row's attention mask covers more than its tokens up to the last "
                    f"that is not the pad id {pad_id} (left padding, or text ending in the pad "
                    f"token); the teacher cache finds a row's length by its right padding"
                ])  # fmt: skip
            keys = ragged_row_keys(x, lengths).tolist()
        fresh = writer.new_rows(keys)
        if fresh:
            if taps is not None:
                taps.clear()
            out = teacher(x[fresh].to(device))
            if pad_id is None:
                stored = compress(out, options.k, dtype, options.indices)
            else:
                stored = compress_ragged(out, lengths[fresh], options.k, dtype, options.indices)
            if taps is not None:
                if silent := sorted(set(taps.specs) - set(taps.captured)):
                    raise ConfigError(
                        [f"taps.teacher.{n}: the tapped module did not run in the teacher's "
                         f"forward, so there is no feature to cache" for n in silent]
                    )  # fmt: skip
                try:
                    stored |= compress_features(taps.captured, len(fresh), dtype)
                except ValueError as e:
                    raise ConfigError([str(e)]) from e
            writer.add([keys[i] for i in fresh], stored)
        return len(fresh)

    def add_batch(name: str, batch: dict) -> int:
        x = task.model_input(batch)
        if pool is None or not name.startswith("train/"):
            return add(x, batch.get("attention_mask"))
        return sum(add(views.pooled(x, batch["sample_id"], v)) for v in range(pool))

    start = time.perf_counter()
    if taps is not None:
        taps.attach()
    try:
        add(example)
        for name, loader in input_loaders(datamodule, options.batch_size).items():
            written = sum(add_batch(name, b) for b in loader)
            log.info("%s: %d new rows (%.0f s)", name, written, time.perf_counter() - start)
    finally:
        if taps is not None:
            taps.remove()
    meta = writer.close()
    log.info(
        "teacher cache: %d rows in %s (%.0f s)",
        meta["rows"],
        options.dir,
        time.perf_counter() - start,
    )
    return meta


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="cache")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    exit_on_config_error(lambda: write_cache(cfg))


if __name__ == "__main__":
    main()
