"""What ``teacher.dtype=bf16`` saves: the teacher's bytes and a training step's peak memory,
float32 teacher against bfloat16 teacher, everything else equal.

Each measurement runs in a fresh process: the run is built from its experiment
(``distillery.train``'s config, any overrides), two real optimizer steps run on the CPU,
and the second step's peak is read as the preflight's ``measure=true`` reads it
(``distillery.preflight.measure_step``: the live tensors at the step's start, parameters,
buffers, gradients and optimizer state, plus the highest point of torch's CPU allocator
during the step). The teacher's bytes are those of its parameters and buffers as built.
Memory does not depend on the machine's load; one process per measurement keeps one
run's allocator state out of the next.

    python benchmarks/teacher_precision_memory.py [--runs minilm_embed_kd ...]
        [--arith-teacher <arith_teacher.ckpt>]   # adds arith_kd with that teacher

Writes ``benchmarks/results/teacher_precision_memory.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT
MiB = 2**20
# name -> overrides of distillery.train (a teacher that ships, or one given on the command line)
RUNS: dict[str, list[str]] = {
    "minilm_embed_kd": ["experiment=minilm_embed_kd"],  # all-MiniLM-L6-v2, 22.7 M parameters
}
DTYPES = ("null", "bf16")  # teacher.dtype: null = as built (float32)


def measure(overrides: list[str]) -> dict:
    """One run's second-step peak and its teacher's bytes (in this process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR
    from distillery.preflight import measure_step

    with tempfile.TemporaryDirectory() as out:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train", [*overrides, f"paths.output_dir={out}", "extras.print_config=false"]
            )
        result, module, _ = measure_step(cfg)
    teacher = module.teacher
    tensors = [*teacher.parameters(), *teacher.buffers()]
    return {
        "peak": result["peak"], "baseline": result["baseline"], "delta": result["delta"],
        "teacher_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "teacher_dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
        "student_params": sum(p.numel() for p in module.student.parameters()),
        "batch_shape": result.get("shape"),
    }  # fmt: skip


def table(results: dict) -> str:
    lines = ["| run | teacher params | teacher MiB: float32 / bf16 | step peak MiB: float32 / bf16 "
             "| peak saved | peak ratio bf16 / float32 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        f32, bf16 = r["null"], r["bf16"]
        lines.append(
            f"| `{name}` | {f32['teacher_params'] / 1e6:.2f} M | {f32['teacher_bytes'] / MiB:.1f} / "
            f"{bf16['teacher_bytes'] / MiB:.1f} | {f32['peak'] / MiB:.1f} / {bf16['peak'] / MiB:.1f} | "
            f"{(f32['peak'] - bf16['peak']) / MiB:.1f} MiB | {bf16['peak'] / f32['peak']:.2f} |"
        )
    return ("Second training step on the CPU, single device (preflight's measure: live tensors "
            "+ the allocator's peak during the step):\n\n" + "\n".join(lines) + "\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument(
        "--arith-teacher", type=Path, help="an arith_teacher checkpoint: adds arith_kd"
    )
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a child: overrides to measure
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one)))
        return
    runs = {name: RUNS[name] for name in args.runs if name in RUNS}
    unknown = [n for n in args.runs if n not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; known: {sorted(RUNS)}")
    if args.arith_teacher:
        if not args.arith_teacher.is_file():
            parser.error(f"--arith-teacher: no file {args.arith_teacher}")
        runs["arith_kd"] = [
            "experiment=arith_kd",
            f"teacher.ckpt_path={args.arith_teacher.resolve()}",
        ]
    session = provenance.Session(__file__, [args.results_dir / "teacher_precision_memory.json"])
    env = provenance.offline_env()
    results, records = {}, []
    for name, overrides in runs.items():
        results[name] = {}
        for dtype in DTYPES:
            cmd = [sys.executable, __file__, "--one", *overrides, f"teacher.dtype={dtype}"]
            with session.run(name, None, cmd, teacher_dtype=dtype) as run:
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} teacher.dtype={dtype} failed:\n{done.stderr[-3000:]}")
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[name][dtype] = json.loads(line[len("RESULT ") :])
            records.append(run.record)
            print(name, dtype, results[name][dtype], flush=True)
    prov = session.finish(records)
    print(
        provenance.write(
            "teacher_precision_memory", results, table(results), prov, args.results_dir
        )
    )


if __name__ == "__main__":
    main()
