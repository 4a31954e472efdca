"""The offline teacher-output cache, measured: training speed and storage.

1. Classifier (``mnist1d_kd``: CNN teacher, MLP student, 64 labeled + 256 transfer
   inputs per step): ms per optimizer step of the student alone (``control=true``),
   with the live teacher, and with ``teacher.cache`` (full fp32 logits): in each run of
   ``trainer.fit`` in this process (validation, checkpoints, loggers and the progress
   bar off) the wall time from one batch's start to the next (loading, forwards,
   backward, optimizer, logging) of every step after the first ``WARMUP``, and the
   run's median of them; the three runs take turns step by step (:func:`lockstep_ms`),
   so the bursts of other load on a shared machine, which slow the whole CPU for
   seconds, fall on every mode alike; repeated, each ratio to the student alone taken
   within a repeat and the median of those reported;
   the same three with a pool of 8 augmented views per sample (``views=augment_signal_pool``,
   the pool's cache holding every view), and the same three with the overhead
   benchmark's medium student (MLP 2048 x 2048). Goal: cached <= 1.10 x student alone.
2. Language model (``text_lm_kd``, GPT-2 teacher over the pydoc BPE vocabulary): for
   ``k`` = 16, 64 and 256, stored values fp16 / q8 and ids plain / delta-coded, bytes per
   token on disk (shards included, keys included), KL(teacher || read-back) per
   position, mean over a sample of training sequences, and the time to read a batch. Goal: <= 300 bytes per token at k = 64.

    python benchmarks/teacher_cache.py [--steps 200] [--repeats 5] [--threads 1]
        [--text-teacher <text_lm_teacher ckpt>]   (default: train one briefly)

Writes ``benchmarks/results/teacher_cache_classifier.md`` and ``teacher_cache_lm.md``
(``--parts``: one or both), each with a ``.json`` beside it: the raw numbers (every
repeat), the overrides of each mode and the provenance (commit, machine, load, times:
``provenance.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT
provenance.go_offline()

QUIET = ["extras.print_config=false", "~logger", "callbacks=none", "+trainer.enable_progress_bar=false",
         "+trainer.limit_val_batches=0", "+trainer.enable_model_summary=false"]  # fmt: skip


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


WARMUP = 10  # steps of each run not timed (allocator, caches, first page reads)


def lockstep_ms(modes: dict[str, list[str]], steps: int) -> dict[str, float]:
    """Median ms per step of each mode's ``trainer.fit`` of ``steps`` optimizer steps, the
    runs taking turns step by step: each runs in its own thread, and a thread runs only
    in its turn, from one batch's start to its next batch's start (loading, forwards,
    backward, optimizer, logging, Lightning's loop), timed, then hands the turn on. A
    shared machine's load, which slows the whole CPU for seconds at a time, then falls on
    every mode alike; the first ``WARMUP`` steps of each run are not timed."""
    import threading

    import lightning as L

    from distillery.engine.builder import build_run

    names = list(modes)
    turn = threading.Condition()
    state = {"turn": 0, "done": set()}
    times: dict[str, list[float]] = {m: [] for m in names}

    def hand_on(i: int) -> None:  # the next mode still running gets the turn
        for j in range(1, len(names) + 1):
            k = (i + j) % len(names)
            if names[k] not in state["done"]:
                state["turn"] = k
                break
        turn.notify_all()

    class Turns(L.Callback):
        def __init__(self, i: int):
            self.i, self.start = i, None

        def wait(self) -> None:
            with turn:
                turn.wait_for(lambda: state["turn"] == self.i)
            self.start = time.perf_counter()

        def on_train_start(self, *args) -> None:
            self.wait()

        def on_train_batch_start(self, *args) -> None:
            if self.start is not None and len(times[names[self.i]]) < steps:
                times[names[self.i]].append(time.perf_counter() - self.start)
            with turn:
                hand_on(self.i)
            self.wait()

    errors: list[BaseException] = []

    def fit(i: int, trainer, module, datamodule) -> None:
        try:
            trainer.fit(module, datamodule=datamodule)
        except BaseException as e:  # noqa: BLE001 - re-raised below; the others go on
            errors.append(e)
        finally:  # out of the rotation; the turn moves on if this run held it
            with turn:
                state["done"].add(names[i])
                if state["turn"] == i:
                    hand_on(i)

    runs = []
    for i, overrides in enumerate(modes.values()):  # built one after another, here
        cfg = compose(
            "train", [*overrides, f"+trainer.max_steps={steps}", "trainer.max_epochs=1000", *QUIET]
        )
        datamodule, module, trainer, _ = build_run(cfg)
        trainer.callbacks.append(Turns(i))
        runs.append(
            threading.Thread(target=fit, args=(i, trainer, module, datamodule), daemon=True)
        )
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    if errors:
        raise errors[0]
    # times[m][j]: from the start of one turn to the next batch start; the first is setup
    return {m: 1000 * statistics.median(t[1 + WARMUP :]) for m, t in times.items()}


def train_teacher(experiment: str, out: Path, overrides: list[str]) -> Path:
    from distillery.train import train

    ckpt = out / f"{experiment}.ckpt"
    train(compose("train", [f"experiment={experiment}", *overrides, f"paths.output_dir={out / experiment}",
                            f"export_ckpt={ckpt}", "extras.print_config=false"]))  # fmt: skip
    return ckpt


def write_cache(overrides: list[str], cache: Path, out: Path, *options: str) -> None:
    from distillery.cache import write_cache as write

    write(compose("cache", [*overrides, f"cache.dir={cache}", f"paths.output_dir={out / 'cache_run'}",
                            "extras.print_config=false", *options]))  # fmt: skip


MEDIUM_STEPS = 50


def classifier(out: Path, steps: int, repeats: int, raw: dict | None = None) -> list[str]:
    """The classifier part's lines; ``raw`` receives the numbers and overrides."""
    raw = {} if raw is None else raw
    common = [f"paths.data_dir={out / 'data'}", f"paths.output_dir={out / 'runs'}"]
    teacher = train_teacher("mnist1d_teacher", out, [*common, "trainer.max_epochs=3"])
    run = [
        "experiment=mnist1d_kd",
        *common,
        "data.transfer_size=50000",
        f"teacher.ckpt_path={teacher}",
    ]
    pooled = [*run, "views=augment_signal_pool"]  # 8 augmented views per sample
    written = {}
    for name, overrides in (("mnist1d_cache", run), ("mnist1d_pool_cache", pooled)):
        start = time.perf_counter()
        write_cache(overrides, out / name, out)
        rows = json.loads((out / name / "cache.json").read_text())["rows"]
        written[name] = (rows, time.perf_counter() - start)
    modes = {
        "student alone (control=true)": [*run, "control=true"],
        "live teacher": run,
        "teacher.cache": [*run, f"teacher.cache={out / 'mnist1d_cache'}"],
        "views pool: student alone (control=true)": [*pooled, "control=true"],
        "views pool: live teacher": pooled,
        "views pool: teacher.cache": [*pooled, f"teacher.cache={out / 'mnist1d_pool_cache'}"],
    }
    medium = [*run, "student.hidden=[2048,2048]"]  # the overhead benchmark's medium student
    modes |= {
        "medium student: student alone (control=true)": [*medium, "control=true"],
        "medium student: live teacher": medium,
        "medium student: teacher.cache": [*medium, f"teacher.cache={out / 'mnist1d_cache'}"],
    }
    ms: dict[str, list[float]] = {m: [] for m in modes}
    groups = [[m for m in modes if m.startswith(p)] for p in ("views pool: ", "medium student: ")]
    groups.insert(0, [m for m in modes if not any(m in g for g in groups)])
    for _ in range(repeats):
        for group in groups:  # the modes of a group take turns step by step
            n = MEDIUM_STEPS if group[0].startswith("medium") else steps
            for mode, value in lockstep_ms({m: modes[m] for m in group}, n).items():
                ms[mode].append(value)
                print(f"{mode}: {value:.2f} ms/step", flush=True)
    read_ms = cache_read_ms([*run, f"teacher.cache={out / 'mnist1d_cache'}"])
    raw |= {"ms_per_step": ms, "read_ms": read_ms, "steps": steps, "medium_steps": MEDIUM_STEPS,
            "repeats": repeats, "cache_rows": {k: v[0] for k, v in written.items()},
            "cache_write_seconds": {k: v[1] for k, v in written.items()},
            "overrides": {m: [str(o).replace(str(out), "<out>") for o in v] for m, v in modes.items()}}  # fmt: skip
    (rows, seconds), (pool_rows, pool_seconds) = written.values()
    lines = [
        "### Classifier: `mnist1d_kd` (50 000 transfer inputs), ms per optimizer step\n",
        f"Each measurement: the modes of a row group run {steps} steps each, taking turns step by "
        f"step (one thread per run, one running at a time), and a mode's value is the median wall "
        f"time from one of its batch starts to the next over its steps after the first {WARMUP}; "
        f"{repeats} repeats; validation, checkpoints, loggers, progress bar off. Ratios: the median "
        f"over the repeats of each repeat's ratio to the student alone (in brackets: their range). "
        f"Writing the cache "
        f"({rows} rows, full fp32 logits) took {seconds:.1f} s; the cache of a pool of 8 augmented views "
        f"per training sample (`views=augment_signal_pool`, no mixing: {pool_rows} rows) {pool_seconds:.1f} s. "
        f"Each mode's ratio is to the student alone with the same views and student; the medium student "
        f"(MLP 2048 x 2048, 4.3M parameters, the overhead benchmark's) runs {MEDIUM_STEPS} steps.\n",
        "| mode | ms/step (median of the runs) | each run | / student alone (paired) |",
        "|---|---|---|---|",
    ]
    goals = []
    for mode, values in ms.items():
        prefix = next((p for p in ("views pool: ", "medium student: ") if mode.startswith(p)), "")
        base = ms[f"{prefix}student alone (control=true)"]
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        ratio = statistics.median(ratios)
        lines.append(f"| {mode} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} "
                     f"| {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
        if mode.endswith("teacher.cache"):
            goals.append(f"Goal cached <= 1.10 x student alone{f' ({prefix[:-2]})' if prefix else ''}: "
                         f"**{'met' if ratio <= 1.10 else 'not met'}** ({ratio:.2f}x).")  # fmt: skip
    return [*lines, "", *goals, "",
            f"Of the cached step's extra time over the student alone, reading the teacher's outputs for "
            f"one training batch (hashing its rows, finding and expanding them) takes {read_ms:.2f} ms "
            f"(fastest of 50); the rest is the distillation itself (the KD term and its gradient; "
            f"the term's value is logged only on the steps the logger writes), which the "
            f"student-alone control does not compute.", ""]  # fmt: skip


def cache_read_ms(overrides: list[str]) -> float:
    """ms for the cached teacher to answer one training batch (fastest of 50)."""
    import torch

    from distillery.data.batch import merge_sources
    from distillery.engine.builder import build_run

    datamodule, module, _, _ = build_run(compose("train", [*overrides, *QUIET]))
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batch = merge_sources(
        {k: next(iter(v)) for k, v in loader.items()}
        if isinstance(loader, dict)
        else next(iter(loader))
    )
    x, times = batch["inputs"], []
    with torch.no_grad():
        for _ in range(50):
            start = time.perf_counter()
            module.teacher(x)
            times.append(time.perf_counter() - start)
    return 1000 * min(times)


READER = """
import sys, torch
from distillery.teacher_cache.store import CachedOutputs
def rss(kind):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(kind)) / 1024
anon, file = rss('RssAnon'), rss('RssFile')
read = CachedOutputs(sys.argv[1])
opened = rss('RssAnon') - anon
with torch.no_grad():
    for i in range(0, len(read.order), 64):  # every row once: the shards' pages are mapped in
        b = read.order[i : i + 64]
        for j, shard in enumerate(read.shards):
            shard.read(read.row_in_shard[b][read.shard_of[b] == j], None, 'cpu')
print(f'{opened:.1f} {rss("RssFile") - file:.1f}')
"""


def reader_memory(cache: Path) -> tuple[float, float]:
    """MB of private memory a fresh reader process holds after opening ``cache``, and
    the file-backed resident MB that reading every row once adds (the mapped shards:
    page cache, shared between processes)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", READER, str(cache)], capture_output=True,
                         text=True, check=True, env=env).stdout.split()  # fmt: skip
    return tuple(float(v) for v in out)


def language_model(out: Path, text_teacher: Path | None, data_dir: Path | None,
                   raw: dict | None = None) -> list[str]:  # fmt: skip
    """The language-model part's lines; ``raw`` receives the numbers."""
    raw = {} if raw is None else raw
    raw.setdefault("rows", [])
    import torch

    from distillery.config import build
    from distillery.engine.teacher import from_run_checkpoint
    from distillery.teacher_cache.store import CachedOutputs, bytes_per_row

    common = [f"paths.data_dir={data_dir or out / 'data'}", f"paths.output_dir={out / 'runs'}"]
    if text_teacher is None:
        text_teacher = train_teacher("text_lm_teacher", out, [*common, "trainer.max_epochs=3"])
    run = ["experiment=text_lm_kd", *common, f"teacher.ckpt_path={text_teacher}"]
    cfg = compose("train", run)
    data = build(cfg.data, "data")
    data.prepare_data()
    data.setup("fit")
    ids = torch.stack(
        [
            data.train_set[i]["input_ids"]
            for i in range(0, len(data.train_set), max(1, len(data.train_set) // 64))
        ][:64]
    )
    teacher = from_run_checkpoint(str(text_teacher))
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).float(), -1)
    entropy = float(-(p.exp() * p).sum(-1).mean())
    vocab, seq_len = p.shape[-1], ids.shape[1]
    lines = [
        f"### Language model: `text_lm_kd` teacher (vocabulary {vocab}, {seq_len} tokens per row)\n",
        f"Bytes per token: shard bytes / rows / {seq_len} (the 8-byte key per row and safetensors headers "
        f"included). KL(teacher || read-back), nats per position, mean over {len(ids)} training "
        f"sequences; the teacher's entropy there is {entropy:.2f} nats.\n",
        "| k | values | ids | bytes/token | KL per position | read ms per batch of 16 rows |",
        "|---|---|---|---|---|---|",
    ]
    for k in (16, 64, 256):
        for dtype, indices in (
            ("fp16", "plain"),
            ("q8", "plain"),
            ("fp16", "delta"),
            ("q8", "delta"),
        ):
            cache = out / f"lm_k{k}_{dtype}_{indices}"
            write_cache(
                run, cache, out, f"cache.k={k}", f"cache.dtype={dtype}", f"cache.indices={indices}"
            )
            read = CachedOutputs(cache)
            with torch.no_grad():
                q = read(ids)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    read(ids[:16])
                    times.append(time.perf_counter() - start)
            kl = float((p.exp() * (p - q)).sum(-1).mean())
            ids_label = "int16" if indices == "plain" else "delta (LEB128)"
            raw["rows"].append({"k": k, "values": dtype, "ids": indices, "kl": kl, "read_s": times,
                                "bytes_per_token": bytes_per_row(cache) / seq_len})  # fmt: skip
            lines.append(f"| {k} | {dtype} | {ids_label} | {bytes_per_row(cache) / seq_len:.0f} | {kl:.4f} "
                         f"| {1000 * min(times):.1f} |")  # fmt: skip
            print(lines[-1], flush=True)
    lines += [
        "\nMemory of a reader process (`CachedOutputs`: shards memory-mapped, only the keys in "
        "private memory), each in a fresh process: private (anonymous) MB after opening the cache, "
        "and the file-backed resident MB that reading every row once adds (page cache, shared by "
        "every process reading the cache, e.g. DDP ranks on one host; it also counts the library "
        "code the first reads load, about 10 MB here):\n",
        "| cache | shards MB | rows | private MB after open | file-backed MB after reading all |",
        "|---|---|---|---|---|",
    ]
    for name in ("lm_k64_q8_delta", "lm_k256_fp16_plain"):
        cache = out / name
        size = sum(f.stat().st_size for f in cache.glob("shard_*")) / 2**20
        opened, mapped = reader_memory(cache)
        rows = json.loads((cache / "cache.json").read_text())["rows"]
        raw.setdefault("reader_memory", []).append({"cache": name, "shards_mb": size, "rows": rows,
                                                    "private_mb": opened, "file_backed_mb": mapped})  # fmt: skip
        lines.append(f"| {name} | {size:.1f} | {rows} | {opened:.1f} | {mapped:.1f} |")
        print(lines[-1], flush=True)
    lines.append(
        f"\nThe full distribution in fp32 would be {4 * vocab} bytes per token. Goal <= 300 bytes per token "
        f"at k = 64 (fp16 values, int16 ids, float32 remaining mass). Delta-coded ids are lossless (the "
        f"same KL as plain ids with the same values); q8 values are the lossy part. Read time: the fastest "
        f"of 5 reads of 16 rows, expanded to the full vocabulary (what a training step of 16 rows waits for)."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-teacher", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="paths.data_dir (the tokenizer --text-teacher was trained with; "
                        "default: a fresh one under --out)")  # fmt: skip
    parser.add_argument(
        "--parts", nargs="+", choices=["classifier", "lm"], default=["classifier", "lm"]
    )
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, an oversubscribed thread "
                        "pool makes every parallel op wait for a descheduled thread)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="distillery_cache_bench_"))
    teacher = (f" --text-teacher <{args.text_teacher.name}> --data-dir <its data dir>"
               if args.text_teacher else "")  # fmt: skip
    header = (
        f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
        f"`python benchmarks/teacher_cache.py --parts {{part}}{{teacher}}`\n"
    )
    raw: dict[str, dict] = {"classifier": {}, "lm": {}}
    parts = {
        "classifier": lambda: classifier(out, args.steps, args.repeats, raw["classifier"]),
        "lm": lambda: language_model(out, args.text_teacher, args.data_dir, raw["lm"]),
    }
    for part in args.parts:  # one results file per part
        stem = f"teacher_cache_{part}"
        session = provenance.Session(__file__, [args.results_dir / f"{stem}.json"])
        text = "\n".join(
            [header.format(part=part, teacher=teacher if part == "lm" else ""), *parts[part]()]
        )
        print(provenance.write(stem, raw[part], text, session.finish(), args.results_dir))


if __name__ == "__main__":
    main()
