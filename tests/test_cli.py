"""Command-line runs in subprocesses (slow: each pays the Lightning import)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from conftest import PROJECT_ROOT, SMALL_MNIST1D


def run_cli(
    module: str, *args: str, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    return processes.run(module, *args, check=check, timeout=timeout)


def common(tmp_path: Path, data_dir: Path) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.artifacts_dir={tmp_path / 'artifacts'}",
        "extras.print_config=false",
    ]


@pytest.mark.slow
def test_cli_reports_every_missing_key_and_fails(tmp_path, data_dir):
    proc = run_cli(
        "distillery.train",
        "experiment=mnist1d_kd",
        "teacher.ckpt_path=???",
        "optimizer.lr=???",
        "trainer.max_epochs=ten",
        *common(tmp_path, data_dir),
        check=False,
    )
    assert proc.returncode == 2  # a config error: one message, no traceback
    out = proc.stdout + proc.stderr
    assert "teacher.ckpt_path: missing value" in out and "optimizer.lr: missing value" in out
    assert "trainer.max_epochs: expected" in out
    assert "Traceback" not in out and out.count("invalid config") == 1
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.slow
def test_multirun_2x2(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_cli(
        "distillery.train",
        "-m",
        "experiment=mnist1d_baseline",
        *SMALL_MNIST1D,
        "debug=limit",
        "seed=1,2",
        "distill.terms.task.label_smoothing=0.0,0.1",
        f"hydra.sweep.dir={sweep}",
        *common(tmp_path, data_dir),
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "csv" / "version_0" / "metrics.csv").is_file()


@pytest.mark.slow
def test_make_distill_command_line(tmp_path, data_dir):
    """`python -m distillery.pipeline` (what `make distill` runs), shrunken."""
    shrink = ",".join(
        f"'{o}'" for o in [*SMALL_MNIST1D, "trainer.max_epochs=2", f"paths.data_dir={data_dir}"]
    )
    out = tmp_path / "distill"
    run_cli(
        "distillery.pipeline",
        f"overrides=[{shrink}]",
        f"hydra.run.dir={out}",
        f"teacher_ckpt={tmp_path / 'teacher.ckpt'}",
        "stages.student=['experiment=mnist1d_kd','data.transfer_size=500']",
        "~extra_students.kd_transfer",
        *common(tmp_path, data_dir)[1:3],
    )
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "control"]
    evaluated = run_cli(
        "distillery.evaluate",
        f"ckpt_path={report['checkpoints']['student']}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert "agreement" in evaluated.stdout
    assert (tmp_path / "eval" / "report.md").is_file()


@pytest.mark.slow
def test_seed_multirun_with_wandb_offline_then_aggregate(tmp_path, data_dir):
    sweep = tmp_path / "seeds"
    run_cli(
        "distillery.train",
        "-m",
        "experiment=mnist1d_baseline",
        *SMALL_MNIST1D,
        "debug=limit",
        "seed=0,1,2",
        "logger=[csv,wandb]",
        f"hydra.sweep.dir={sweep}",
        *common(tmp_path, data_dir),
    )
    for job in ("0", "1", "2"):  # one W&B run per job, each finished (its own offline run dir)
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
    proc = run_cli("distillery.aggregate", str(sweep))
    result = json.loads((sweep / "aggregate.json").read_text())
    assert list(result["groups"]) == ["all"] and result["groups"]["all"]["jobs"] == ["0", "1", "2"]
    assert result["groups"]["all"]["best"]["val/acc"]["n"] == 3
    assert "val/acc" in proc.stdout and (sweep / "aggregate.md").is_file()


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial(tmp_path, data_dir, mnist1d_teacher_ckpt):
    sweep = tmp_path / "optuna"
    # With this sampler seed the first trial is valid and the next two draw T = -1, which
    # the KD term rejects: the study records them as failed and still reports a best value.
    params = "{distill.terms.kd.temperature: 'choice(-1.0, 2.0, 4.0)', distill.weights.kd: 'interval(0.1, 2.0)'}"
    proc = run_cli(
        "distillery.train", "-m", "hparams_search=kd_optuna", "experiment=mnist1d_kd", *SMALL_MNIST1D,
        "data.transfer_size=300", "debug=limit", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=3", f"hydra.sweeper.params={params}",
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}", f"hydra.sweep.dir={sweep}", *common(tmp_path, data_dir),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert out.count("Failed experiment") == 2
    import yaml

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"]["distill.terms.kd.temperature"] == 2.0
    # the best value is what the one valid trial (job 0) logged last as val/acc
    rows = (sweep / "0" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    import csv

    logged = [float(r["val/acc"]) for r in csv.DictReader(rows) if r.get("val/acc")]
    assert result["best_value"] == pytest.approx(logged[-1], abs=1e-6)


@pytest.mark.slow
def test_ddp_sim_two_cpu_processes_with_feature_taps(tmp_path, data_dir, mnist1d_teacher_ckpt):
    """KD + a FitNet hint under 2-process CPU DDP: it trains, and the checkpoint holds the
    student and the projector, never the teacher."""
    out = tmp_path / "ddp_taps"
    proc = run_cli("distillery.train", "experiment=mnist1d_fitnet", "trainer=ddp_sim", *SMALL_MNIST1D,
                   "data.transfer_size=1200", "debug=limit", f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
                   f"hydra.run.dir={out}", *common(tmp_path, data_dir))  # fmt: skip
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    import torch

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # it trained
    assert "objective.terms.hint.projector.linear.weight" in ckpt["state_dict"]
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert ckpt["distillery"]["teacher"]["sha256"]


@pytest.mark.slow
def test_a_signal_stops_the_run_with_last_ckpt_and_it_resumes(tmp_path, data_dir):
    """A real signal to a real training process: it stops after the current batch, writes
    last.ckpt atomically, exits with 128 + the signal number saying how to resume, and a
    run resumed from that checkpoint ends where the uninterrupted run ends. SIGUSR1 (SLURM's
    warning) takes the whole path: it is turned into Lightning's SIGTERM handling."""
    signame = "SIGUSR1"
    import queue
    import re
    import signal
    import threading

    from distillery.engine.checkpoint import read_checkpoint

    env = processes.cli_env()
    env.pop("SLURM_JOB_ID", None)
    out = tmp_path / "run"
    args = ["experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=100000", "scheduler.T_max=50",
            f"paths.output_dir={out}", *common(tmp_path, data_dir)]  # fmt: skip
    # The run reports the end of its first epoch itself (the checkpoint callback's verbose
    # line); the epoch's file may be gone by the time a poller looks (best-k deletes it).
    proc = processes.start([sys.executable, "-m", "distillery.train", *args, "callbacks.model_checkpoint.verbose=true"],
                           cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(
            target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)]
        )
        reader.start()
        seen, ends = [], []  # the steps at which epochs 0 and 1 ended
        while len(ends) < 2:
            line = lines.get(timeout=300)
            assert line is not None, "".join(seen)[-3000:]  # the run ended before epoch 1 did
            seen.append(line)
            ends += [
                int(m.group(1)) for m in [re.search(r"Epoch [01], global step (\d+):", line)] if m
            ]
        steps_per_epoch = ends[0]
        proc.send_signal(getattr(signal, signame))  # inside epoch 2 (or at its start)
        proc.wait(timeout=120)
        while (line := lines.get(timeout=30)) is not None:
            seen.append(line)
    finally:
        processes.stop(proc)
    text = "".join(seen)
    assert proc.returncode == 128 + getattr(signal, signame), text[-3000:]
    assert f"interrupted by {signame}" in text and "resume with ckpt_path=" in text
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] > steps_per_epoch and ckpt["epoch"] >= 1
    assert not list((out / "checkpoints").glob(".*.tmp"))
    epoch = ckpt["epoch"]
    from conftest import compose_cfg
    from distillery.engine.checkpoint import load_student
    from distillery.train import train

    def finish(name, *extra):  # in-process: the same config up to epoch + 2
        train(compose_cfg("train", [*args[:-5], f"paths.output_dir={tmp_path / name}", "test=false",
                                    f"trainer.max_epochs={epoch + 2}", *extra, *common(tmp_path, data_dir)]))  # fmt: skip
        return load_student(tmp_path / name / "checkpoints" / "last.ckpt").state_dict()

    resumed, straight = finish("resumed", f"ckpt_path={last}"), finish("straight")
    diff = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert diff <= 1e-7, diff  # resuming from the interrupted run's last.ckpt is exact
