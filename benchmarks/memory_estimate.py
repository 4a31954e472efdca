"""The preflight on the shipped experiments: its memory estimate against one real step's
peak, and the time its checks take.

For each experiment of :data:`EXPERIMENTS`, in a fresh process (one run's allocator state
kept out of the next): its teacher is trained for 2 steps by ``distillery.train`` (the
teacher's weights decide nothing here: its architecture, dtype and outputs' shapes are
the shipped ones), then ``distillery.preflight.preflight`` runs as
``python -m distillery.preflight experiment=<name> measure=true`` does: the checks of
``engine/preflight.py``, the estimate of ``engine/memory.py`` per device and strategy,
and two real training steps on this CPU, the second one's peak (live tensors at its
start + the CPU allocator's highest point during it) measured. Recorded per experiment:
the single-device estimate and its parts, the measured peak, the estimate's error
relative to it, the batch the step ran, and the wall time of each call of
``engine.preflight.run_checks`` (the checks ``distillery.train`` runs before its first
step: tokenizers and model configs, no forward; the preflight builds the run twice,
once to estimate and once to measure). Memory does not depend on the machine's load;
the checks' time does (the load is recorded).

    python benchmarks/memory_estimate.py [--experiments arith_kd mnist1d_kd ...]

Writes ``benchmarks/results/memory_estimate.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT
MiB = 2**20
# student experiment -> its teacher's experiment (None: the teacher ships, nothing to train)
EXPERIMENTS: dict[str, str | None] = {
    "arith_kd": "arith_teacher",
    "mnist1d_kd": "mnist1d_teacher",
    "digits_kd": "digits_teacher",
    "bert_hidden_attention": "digits_bert_teacher",
    "text_lm_kd": "text_lm_teacher",
    "minilm_embed_kd": None,
}
TEACHER_STEPS = ("++trainer.max_steps=2", "++trainer.val_check_interval=1",
                 "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1")  # fmt: skip
TEACHER_EXTRA = {"arith_teacher": ("scheduler.warmup_steps=1",)}  # warm-up within 2 steps


def teacher_command(teacher: str, work: Path) -> list[str]:
    """The 2-step teacher run whose exported checkpoint the student reads."""
    return [sys.executable, "-m", "distillery.train", f"experiment={teacher}", *TEACHER_STEPS, *TEACHER_EXTRA.get(teacher, ()),
            f"paths.output_dir={work / 'teacher'}", f"paths.artifacts_dir={work / 'artifacts'}",
            f"export_ckpt={work / 'teacher.ckpt'}", "extras.print_config=false"]  # fmt: skip


def measure(experiment: str, work: Path, has_teacher: bool) -> dict:
    """In this process: ``preflight(measure=true)`` of ``experiment``, its checks timed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR
    from distillery.engine import preflight as checks
    from distillery.preflight import preflight

    overrides = [f"experiment={experiment}", "measure=true", f"paths.output_dir={work / 'run'}",
                 f"paths.artifacts_dir={work / 'artifacts'}", "extras.print_config=false"]  # fmt: skip
    if has_teacher:
        overrides.append(f"teacher.ckpt_path={work / 'teacher.ckpt'}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("preflight", overrides)
    seconds, run_checks = [], checks.run_checks

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return run_checks(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    checks.run_checks = timed
    try:
        out = preflight(cfg)
    finally:
        checks.run_checks = run_checks
    est, measured = out["estimate"], out["measured"]
    single = est.rows["single"]
    return {
        "estimate": est.total("single"), "estimate_parts": dict(single),
        "measured": measured["peak"], "measured_baseline": measured["baseline"],
        "measured_delta": measured["delta"], "batch_shape": measured.get("shape"),
        "estimated_batch": list(est.batch),  # (rows, tokens) the estimate scaled to
        "error": (est.total("single") - measured["peak"]) / measured["peak"],
        "checks_seconds": seconds,
        "findings": [f.line() for f in out["findings"]],
    }  # fmt: skip


def table(results: dict) -> str:
    lines = ["| experiment | estimate MiB | measured peak MiB | estimate - measured | "
             "checks (ms per call) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        ms = " / ".join(f"{s * 1e3:.1f}" for s in r["checks_seconds"])
        lines.append(f"| `{name}` | {r['estimate'] / MiB:.1f} | {r['measured'] / MiB:.1f} | "
                     f"{round(r['error'] * 100) + 0:+d} % | {ms} |")  # fmt: skip
    return ("`python -m distillery.preflight experiment=<name> measure=true` on the shipped "
            "configs, single device (the estimate of `engine/memory.py`; the measured peak of "
            "the second real training step on this CPU; the checks of `engine/preflight.py`, "
            "timed at each of the preflight's two builds of the run):\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS),
                        default=list(EXPERIMENTS))  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child: name, work, teacher?
    args = parser.parse_args()
    if args.one:
        name, work, has_teacher = args.one
        print("RESULT " + json.dumps(measure(name, Path(work), has_teacher == "1")))
        return
    out = args.results_dir / "memory_estimate.json"
    session = provenance.Session(__file__, [out])
    env = provenance.offline_env(OMP_NUM_THREADS="1")
    results, records = {}, []
    for name in args.experiments:
        teacher = EXPERIMENTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if teacher:
                cmd = teacher_command(teacher, work)
                with session.run(f"{name}/teacher", None, cmd) as run:
                    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(
                        f"{teacher} (2 steps) failed:\n{(done.stdout + done.stderr)[-3000:]}"
                    )
                records.append(run.record)
            cmd = [sys.executable, __file__, "--one", name, str(work), "1" if teacher else "0"]
            with session.run(name, None, cmd) as run:
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(
                    f"{name}: the preflight failed:\n{(done.stdout + done.stderr)[-3000:]}"
                )
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[name] = json.loads(line[len("RESULT ") :])
            records.append(run.record)
            print(name, {k: results[name][k] for k in ("estimate", "measured", "error")},
                  flush=True)  # fmt: skip
    prov = session.finish(records)
    print(provenance.write("memory_estimate", results, table(results), prov, args.results_dir))


if __name__ == "__main__":
    main()
