"""Framework overhead of a Distillery KD step: Distillery vs a hand-written PyTorch loop.

Three ways to train the same student from the same teacher on the same batches
(``experiment=mnist1d_kd``: Hinton KD from a CNN1D teacher into an MLP student,
64 labeled + 256 transfer samples per step), for a small and a medium model pair:

* Distillery: ``build_run`` then ``trainer.fit`` (the module's ``training_step``:
  task adapter, objective, non-finite guard, logging, Lightning's loop);
* hand loop: plain PyTorch on the same student, teacher and optimizer type and
  hyperparameters, over the datamodule's own training loaders combined as Lightning
  combines them (the labeled loader cycled under the transfer loader): concatenate,
  teacher forward under no_grad, student forward, CE on the labeled rows + T^2 KL on
  all rows (the config's weights and temperature), backward, step;
* teacher forward + student step: the same batches, teacher forward under no_grad and
  a student forward/backward/step with a trivial loss (the mean logit), no KD.

Every timed run starts on a freshly built run (``build_run``, the same seed: the same
initial weights and batches for all three; the hand loops take its modules) and a
garbage collection, and glibc's malloc keeps freed memory (``steady_allocator``;
``--default-allocator`` leaves it as it is): a student trained on across runs, or the
allocation history of the process (page faults at every step, or none), changed the
step time by up to 10% whichever way of training ran. Each way is timed at two step counts; steady-state ms/step is the
difference of the two times over the difference of the step counts, so set-up costs
(trainer, optimizer, loaders, first allocations) cancel. The repeats interleave the three
ways (the order reversed every other repeat), so machine noise hits them alike; the
tables give the median ms/step over the repeats and the median and range of the
per-repeat ratios, by the CPU time of this process (the robust clock on a shared
machine: time spent descheduled for other jobs does not count) and by wall time.
One torch thread by default: with two threads on a 2-core machine that also runs other
jobs, a parallel region waits for whichever thread is descheduled, and step times were
erratic (negative differences included). For the step itself to be compared, the
Distillery runs have no validation, loggers, callbacks (checkpoints, model summary) or
progress bar. The teachers are trained here for a few batches (their weights do not
change the time). Writes benchmarks/results/overhead.md.

    python benchmarks/overhead.py [--steps FEW MANY] [--repeats 7] [--sizes small medium]
        [--threads 1] [--default-allocator] [--profile small|medium]

``--profile small|medium`` also prints a cProfile of one Distillery fit of that size
(its larger step count): where the time outside the models goes. ``--steps`` sets the
step counts of every size (defaults: 20 and 120 small, 10 and 40 medium).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

provenance.go_offline()
ROOT = Path(__file__).resolve().parents[1]

# student MLP hidden widths, teacher CNN1D channels (small: mnist1d_kd's own models) and
# the two step counts timed (at most one epoch: 195 steps)
SIZES = {
    "small": {"student": [100, 100], "teacher": [32, 64, 64], "steps": (20, 120)},
    "medium": {"student": [2048, 2048], "teacher": [64, 128, 128], "steps": (10, 40)},
}
# the Distillery runs time the step alone: no validation, loggers, callbacks, progress bar
QUIET = ["++trainer.limit_val_batches=0", "~logger", "callbacks=none",
         "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]  # fmt: skip
METHODS = ("distillery", "hand", "base")
LABELS = {
    "distillery": "Distillery",
    "hand": "hand loop",
    "base": "teacher fwd + student step",
}
GOALS = {"hand": 1.03, "base": 1.05}  # Distillery / method, on the medium model
CLOCKS = ("cpu", "wall")  # CPU time of this process, wall time


def quiet() -> None:
    import lightning  # noqa: F401 - sets its loggers' levels on import

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "distillery"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_teacher(compose, common: list[str], channels: list[int], ckpt: Path) -> None:
    """A CNN1D teacher trained for a few batches, exported to ``ckpt``."""
    from distillery.train import train

    train(compose([
        "experiment=mnist1d_teacher", f"student.channels={channels}", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2", "test=false", "~logger",
        "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
        f"export_ckpt={ckpt}", *common,
    ]))  # fmt: skip


def kd_overrides(size: str, ckpt: Path) -> list[str]:
    return ["experiment=mnist1d_kd", f"teacher.ckpt_path={ckpt}",
            f"student.hidden={SIZES[size]['student']}", *QUIET]  # fmt: skip


def steady_allocator() -> bool:
    """glibc's malloc: serve blocks up to 32 MB (the medium student's gradients are 16 MB)
    from the heap and keep freed memory, instead of mapping them afresh and faulting their
    pages in at every step. Whether that churn happens otherwise depends on the process's
    allocation history (up to ~6000 page faults and ~10 ms of kernel time per medium step
    in one run, none in the next), whichever way of training runs. False: not applied."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):  # not glibc
        return False


def clocks() -> dict[str, float]:
    """CPU time of this process and wall time, in seconds."""
    return {"cpu": time.process_time(), "wall": time.perf_counter()}


def since(start: dict[str, float]) -> dict[str, float]:
    now = clocks()
    return {clock: now[clock] - start[clock] for clock in start}


def combined(loaders):
    """(labeled, transfer) batches as Lightning's ``max_size_cycle`` gives them: one pass
    over the transfer loader, the labeled loader restarted when it runs out."""
    labeled = iter(loaders["labeled"])
    for transfer in loaders["transfer"]:
        try:
            batch = next(labeled)
        except StopIteration:
            labeled = iter(loaders["labeled"])
            batch = next(labeled)
        yield batch, transfer


def hand_steps(datamodule, module, cfg, steps: int, kd: bool) -> None:
    """``steps`` steps in plain PyTorch on the modules of a built run: the KD step
    (``kd=True``), or teacher forward + student step with a trivial loss (``kd=False``)."""
    import torch
    import torch.nn.functional as F

    student, norm = module.student, module.student_norm
    teacher = module.teacher.model  # Sequential(InputNorm, CNN1D): frozen, eval mode
    temp = float(cfg.distill.terms.kd.temperature)
    w_task, w_kd = float(cfg.distill.weights.task), float(cfg.distill.weights.kd)
    student.train()
    opt = module.optimizer_factory(params=student.parameters())  # AdamW(lr, weight_decay)
    datamodule.prepare_data()
    datamodule.setup("fit")
    for labeled, transfer in itertools.islice(combined(datamodule.train_dataloader()), steps):
        x = torch.cat([labeled["inputs"], transfer["inputs"]])
        opt.zero_grad()
        with torch.no_grad():
            t = teacher(x)
        s = student(norm(x))
        if kd:
            ce = F.cross_entropy(s[: len(labeled["labels"])], labeled["labels"])
            log_p, log_q = F.log_softmax(t / temp, -1), F.log_softmax(s / temp, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            loss = w_task * ce + w_kd * temp**2 * kl
        else:
            loss = s.mean()
        loss.backward()
        opt.step()


def timed_run(compose, overrides: list[str], method: str, steps: int) -> dict[str, float]:
    """CPU and wall seconds of ``steps`` steps of ``method`` on a freshly built run (the
    same seed: the same initial weights and batches for every method), timed from a
    garbage collection on."""
    from distillery.engine.builder import build_run

    cfg = compose([*overrides, f"++trainer.max_steps={steps}"])
    datamodule, module, trainer, _ = build_run(cfg)
    gc.collect()
    start = clocks()
    if method == "distillery":
        trainer.fit(module, datamodule=datamodule)
    else:
        hand_steps(datamodule, module, cfg, steps, kd=method == "hand")
    elapsed = since(start)
    if method == "distillery":
        assert trainer.global_step == steps, (trainer.global_step, steps)
    return elapsed


def measure(compose, common, ckpts, sizes, steps: dict, repeats) -> tuple[dict, dict]:
    """({(size, method, clock): [ms/step per repeat]}, {size: (student, teacher) params}),
    the three methods interleaved, after one unrecorded warm-up round (first calls:
    kernels, lazy imports and initialisations)."""
    from distillery.engine.builder import build_run
    from distillery.engine.module import count_params

    per_step: dict = {}
    params = {}
    for size in sizes:
        datamodule, module, _, _ = build_run(compose([*kd_overrides(size, ckpts[size]), *common]))
        datamodule.setup("fit")
        batches, many = len(datamodule.train_dataloader()["transfer"]), steps[size][1]
        assert many <= batches, f"--steps: at most {batches} (one epoch), got {many}"
        params[size] = (count_params(module.student), count_params(module.teacher))
    for r in range(-1, repeats):
        for size in sizes:
            overrides = [*kd_overrides(size, ckpts[size]), *common]
            few, many = steps[size]
            if r < 0:  # warm-up
                for m in METHODS:
                    timed_run(compose, overrides, m, few)
                continue
            # each method's two runs back to back; the order reversed every other repeat,
            # so a drift in the machine's load falls on all three alike
            for m in METHODS if r % 2 == 0 else METHODS[::-1]:
                t_few, t_many = (timed_run(compose, overrides, m, n) for n in (few, many))
                for clock in CLOCKS:
                    ms = 1000 * (t_many[clock] - t_few[clock]) / (many - few)
                    per_step.setdefault((size, m, clock), []).append(ms)
            print(f"repeat {r + 1}/{repeats} {size}: " + ", ".join(
                f"{m} {per_step[size, m, 'cpu'][-1]:.2f} ({per_step[size, m, 'wall'][-1]:.2f} wall)"
                for m in METHODS) + " ms/step", flush=True)  # fmt: skip
    return per_step, params


def ratio(per_step, size: str, method: str, clock: str) -> tuple[float, list[float]]:
    """Distillery / ``method``: the median of the per-repeat ratios, and those ratios."""
    ours, theirs = per_step[size, "distillery", clock], per_step[size, method, clock]
    each = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(each), each


def clock_table(per_step, params, sizes, steps: dict, clock: str) -> list[str]:
    lines = [
        "| model | student params | teacher params | steps | Distillery | hand loop | teacher fwd + "
        "student step | Distillery - hand loop | Distillery / hand loop | Distillery / "
        "(teacher fwd + student step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        student, teacher = params[size]
        medians = {m: statistics.median(per_step[size, m, clock]) for m in METHODS}
        ms = [f"{medians[m]:.2f}" for m in METHODS]
        ms.append(f"{medians['distillery'] - medians['hand']:+.2f}")
        ratios = []
        for m in ("hand", "base"):
            value, each = ratio(per_step, size, m, clock)
            ratios.append(f"{value:.3f} ({min(each):.3f}-{max(each):.3f})")
        arch = f"MLP {SIZES[size]['student']} <- CNN1D {SIZES[size]['teacher']}"
        lines.append(
            f"| {size}: {arch} | {student:,} | {teacher:,} | {steps[size][1]} - "
            f"{steps[size][0]} | " + " | ".join(ms + ratios) + " |"
        )
    return lines


def report(per_step, params, sizes, steps, repeats, threads, load, allocator: bool) -> str:
    lines = [
        f"Steady-state ms/step of a KD step (`experiment=mnist1d_kd`: 64 labeled + 256 "
        f"transfer samples, float32, CPU): the time of the longer run minus that of the "
        f"shorter over the difference in steps (column steps), each run freshly built, median "
        f"of {repeats} interleaved repeats after a warm-up round; "
        f"ratios: the median of the per-repeat ratios (in brackets: their range). Machine: "
        f"{os.cpu_count()} CPU cores, {threads} torch thread(s), 1-minute load average "
        f"{load[0]:.1f} at the start and {load[1]:.1f} at the end (other jobs included); "
        f"{'steady' if allocator else 'default'} allocator (glibc malloc thresholds: "
        f"{'fixed, see steady_allocator' if allocator else 'dynamic'}). "
        f"Distillery runs without validation, loggers, callbacks (checkpoints, model summary) "
        f"and progress bar; the hand loops use the same student, teacher, optimizer "
        f"(type, lr, weight decay), loss weights, temperature and batches.",
        "",
        "CPU time of this process (what the step costs, whatever else the machine runs):",
        "",
        *clock_table(per_step, params, sizes, steps, "cpu"),
        "",
        "Wall time (moves with the machine's other load):",
        "",
        *clock_table(per_step, params, sizes, steps, "wall"),
    ]
    if "medium" in sizes:
        lines.append("")
        for m, goal in GOALS.items():
            verdicts = []
            for clock in CLOCKS:
                value, _ = ratio(per_step, "medium", m, clock)
                verdicts.append(
                    f"{'met' if value <= goal else 'not met'} by {clock} time ({value:.3f})"
                )
            lines.append(
                f"- Goal Distillery / {LABELS[m]} <= {goal:.2f} on the medium model: "
                + ", ".join(verdicts)
                + "."
            )
    return "\n".join(lines) + "\n"


def profile(compose, overrides: list[str], steps: int) -> None:
    """cProfile of one Distillery fit, the functions with the most own time."""
    import cProfile
    import pstats

    from distillery.engine.builder import build_run

    datamodule, module, trainer, _ = build_run(
        compose([*overrides, f"++trainer.max_steps={steps}"])
    )
    prof = cProfile.Profile()
    prof.runcall(trainer.fit, module, datamodule=datamodule)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("FEW", "MANY"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); on a shared machine one thread "
                             "keeps a parallel region from waiting on a descheduled thread")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc malloc's thresholds as they are (see steady_allocator)")  # fmt: skip
    parser.add_argument("--profile", choices=list(SIZES), default=None,
                        help="also print a cProfile of one Distillery fit of this size")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead.md")
    args = parser.parse_args()
    session = provenance.Session(__file__, [args.out])
    allocator = not args.default_allocator and steady_allocator()
    quiet()
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = {size: tuple(args.steps or SIZES[size]["steps"]) for size in SIZES}
    load = [os.getloadavg()[0]]
    tmp = tempfile.TemporaryDirectory(prefix="overhead_")
    work = Path(tmp.name)
    common = [f"paths.output_dir={work / 'run'}", f"paths.data_dir={args.data_dir}",
              f"paths.artifacts_dir={work / 'artifacts'}", "extras.print_config=false"]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):

        def cfg(overrides):
            return compose(config_name="train", overrides=overrides)

        ckpts = {}
        for size in args.sizes:
            ckpts[size] = work / f"teacher_{size}.ckpt"
            train_teacher(cfg, common, SIZES[size]["teacher"], ckpts[size])
            quiet()  # the runs reset Lightning's loggers
        measured = measure(cfg, common, ckpts, args.sizes, steps, args.repeats)
        if args.profile:
            size = args.profile
            if size not in ckpts:
                ckpts[size] = work / f"teacher_{size}.ckpt"
                train_teacher(cfg, common, SIZES[size]["teacher"], ckpts[size])
            profile(cfg, [*kd_overrides(size, ckpts[size]), *common], steps[size][1])
    tmp.cleanup()
    load.append(os.getloadavg()[0])
    text = report(
        *measured, args.sizes, steps, args.repeats, torch.get_num_threads(), load, allocator
    )
    per_step, params = measured
    raw = {"ms_per_step": {f"{size}/{m}/{clock}": v for (size, m, clock), v in per_step.items()},
           "params": {size: {"student": p[0], "teacher": p[1]} for size, p in params.items()},
           "steps": {size: steps[size] for size in args.sizes}, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "steady_allocator": allocator}  # fmt: skip
    overrides = {size: [*kd_overrides(size, Path("<tmp>") / f"teacher_{size}.ckpt"),
                        "paths.output_dir=<tmp>/run"] for size in args.sizes}  # fmt: skip
    prov = session.finish(overrides=overrides)
    print(provenance.write(args.out.stem, raw, text, prov, args.out.parent))


if __name__ == "__main__":
    main()
