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

Each is timed at two step counts from a fresh start (a fresh trainer, optimizer and
loader iterators); steady-state ms/step is the difference of the two times over the
difference of the step counts, so set-up costs cancel. The repeats interleave the three
ways, so machine noise hits them alike; the table gives the median of the repeats and
the range of the per-repeat ratios. For the step itself to be compared, the Distillery
runs have no validation, loggers, callbacks (checkpoints, model summary) or progress bar.
The teachers are trained here for a few batches (their weights do not change the time).
Writes benchmarks/results/overhead.md.

    python benchmarks/overhead.py [--steps 20 80] [--repeats 3] [--sizes small medium]
        [--threads N] [--profile]

``--profile`` also prints a cProfile of one medium Distillery fit (where the time goes).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]

# student MLP hidden widths and teacher CNN1D channels; small: mnist1d_kd's own models
SIZES = {
    "small": {"student": [100, 100], "teacher": [32, 64, 64]},
    "medium": {"student": [1024, 1024], "teacher": [64, 128, 128]},
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


def distillery_seconds(compose, overrides: list[str], steps: int) -> float:
    """Wall time of ``trainer.fit`` for ``steps`` steps of a freshly built run."""
    from distillery.core.builder import build_run

    datamodule, module, trainer, _ = build_run(
        compose([*overrides, f"++trainer.max_steps={steps}"])
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    assert trainer.global_step == steps, (trainer.global_step, steps)
    return elapsed


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


class HandLoop:
    """The KD step written in plain PyTorch (``kd=True``), or teacher forward + student
    step with a trivial loss (``kd=False``), on the modules of a built run."""

    def __init__(self, datamodule, module, cfg):
        self.datamodule = datamodule
        self.student, self.student_norm = module.student, module.student_norm
        self.teacher = module.teacher.model  # Sequential(InputNorm, CNN1D), frozen, eval
        self.optimizer = module.optimizer_factory  # the config's AdamW(lr, weight_decay)
        self.temperature = float(cfg.distill.terms.kd.temperature)
        self.w_task, self.w_kd = float(cfg.distill.weights.task), float(cfg.distill.weights.kd)

    def seconds(self, steps: int, kd: bool) -> float:
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        student, norm, teacher, temp = (
            self.student,
            self.student_norm,
            self.teacher,
            self.temperature,
        )
        student.train()
        opt = self.optimizer(params=student.parameters())
        batches = combined(self.datamodule.train_dataloader())
        for labeled, transfer in itertools.islice(batches, steps):
            x = torch.cat([labeled["inputs"], transfer["inputs"]])
            opt.zero_grad()
            with torch.no_grad():
                t = teacher(x)
            s = student(norm(x))
            if kd:
                ce = F.cross_entropy(s[: len(labeled["labels"])], labeled["labels"])
                log_p, log_q = F.log_softmax(t / temp, -1), F.log_softmax(s / temp, -1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
                loss = self.w_task * ce + self.w_kd * temp**2 * kl
            else:
                loss = s.mean()
            loss.backward()
            opt.step()
        return time.perf_counter() - start


def measure(compose, common, ckpts, sizes, steps, repeats) -> dict:
    """{(size, method): [ms/step per repeat]}, the three methods interleaved, after one
    unrecorded warm-up repeat (first calls: kernels, thread pools, lazy imports)."""
    from distillery.core.builder import build_run
    from distillery.core.module import count_params

    few, many = steps
    per_step: dict = {}
    setups = {}
    for size in sizes:
        overrides = [*kd_overrides(size, ckpts[size]), *common]
        cfg = compose([*overrides, f"++trainer.max_steps={many}"])
        datamodule, module, _, _ = build_run(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        batches = len(datamodule.train_dataloader()["transfer"])
        assert many <= batches, f"--steps: at most {batches} (one epoch), got {many}"
        setups[size] = (overrides, HandLoop(datamodule, module, cfg))
        per_step[size, "params"] = (count_params(module.student), count_params(module.teacher))
    for r in range(-1, repeats):
        for size in sizes:
            overrides, hand = setups[size]
            runs = {
                "distillery": lambda n, o=overrides: distillery_seconds(compose, o, n),
                "hand": lambda n, h=hand: h.seconds(n, kd=True),
                "base": lambda n, h=hand: h.seconds(n, kd=False),
            }
            if r < 0:  # warm-up
                for m in METHODS:
                    runs[m](few)
                continue
            times = {(m, n): runs[m](n) for n in (few, many) for m in METHODS}
            for m in METHODS:
                ms = 1000 * (times[m, many] - times[m, few]) / (many - few)
                per_step.setdefault((size, m), []).append(ms)
            print(f"repeat {r + 1}/{repeats} {size}: "
                  + ", ".join(f"{m} {per_step[size, m][-1]:.2f} ms/step" for m in METHODS),
                  flush=True)  # fmt: skip
    return per_step


def ratio_cell(per_step, size: str, method: str) -> tuple[float, str]:
    ours, theirs = per_step[size, "distillery"], per_step[size, method]
    median = statistics.median(ours) / statistics.median(theirs)
    each = [a / b for a, b in zip(ours, theirs, strict=True)]
    return median, f"{median:.3f} ({min(each):.3f}-{max(each):.3f})"


def table(per_step, sizes, steps, repeats, threads: int) -> str:
    few, many = steps
    lines = [
        f"Steady-state ms/step (`experiment=mnist1d_kd`, 64 labeled + 256 transfer samples per "
        f"step, float32, CPU: {os.cpu_count()} cores shared with other jobs, {threads} torch "
        f"threads): the difference of {few}- and {many}-step runs over {many - few} steps, "
        f"median of {repeats} interleaved repeats; ratios: of the medians (range of the "
        f"per-repeat ratios). Distillery runs without validation, loggers, callbacks "
        f"(checkpoints, model summary) and progress bar.",
        "",
        "| model | student params | teacher params | Distillery | hand loop | teacher fwd + "
        "student step | Distillery / hand loop | Distillery / (teacher fwd + student step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        student, teacher = per_step[size, "params"]
        ms = [f"{statistics.median(per_step[size, m]):.2f}" for m in METHODS]
        ratios = [ratio_cell(per_step, size, m)[1] for m in ("hand", "base")]
        arch = f"MLP {SIZES[size]['student']} <- CNN1D {SIZES[size]['teacher']}"
        lines.append(
            f"| {size}: {arch} | {student:,} | {teacher:,} | " + " | ".join(ms + ratios) + " |"
        )
    if "medium" in sizes:
        lines.append("")
        for m, goal in GOALS.items():
            value, _ = ratio_cell(per_step, "medium", m)
            verdict = "met" if value <= goal else "not met"
            lines.append(f"- Goal Distillery / {LABELS[m]} <= {goal:.2f} on the medium model: "
                         f"{verdict} ({value:.3f}).")  # fmt: skip
    return "\n".join(lines) + "\n"


def profile(compose, overrides: list[str], steps: int) -> None:
    """cProfile of one Distillery fit, the functions with the most own time."""
    import cProfile
    import pstats

    from distillery.core.builder import build_run

    datamodule, module, trainer, _ = build_run(
        compose([*overrides, f"++trainer.max_steps={steps}"])
    )
    prof = cProfile.Profile()
    prof.runcall(trainer.fit, module, datamodule=datamodule)
    stats = pstats.Stats(prof).sort_stats("tottime")
    stats.print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 80])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--profile", action="store_true", help="cProfile one medium Distillery fit")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead.md")
    args = parser.parse_args()
    quiet()
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="overhead_"))
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
        per_step = measure(cfg, common, ckpts, args.sizes, args.steps, args.repeats)
        if args.profile:
            size = "medium" if "medium" in args.sizes else args.sizes[0]
            profile(cfg, [*kd_overrides(size, ckpts[size]), *common], args.steps[1])
    text = table(per_step, args.sizes, args.steps, args.repeats, torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
