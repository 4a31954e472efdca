"""``module.compile=true`` vs eager: steady-state ms per Distillery KD step on CPU.

The medium model of ``benchmarks/overhead.py`` (MLP [2048, 2048] student, CNN1D
[64, 128, 128] teacher, ``experiment=mnist1d_kd``): each measurement fits a freshly built
run for two step counts and takes the difference over the steps, so compilation (done
in both runs, from a warm compile cache after one unrecorded round) cancels out; eager
and compiled alternate; the fastest per mode. Writes
``benchmarks/results/compile_speedup.md`` and ``.json`` (every repeat, the overrides, the
provenance: ``provenance.py``).

    python benchmarks/compile_speedup.py [--size medium] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
from overhead import ROOT, SIZES, kd_overrides, quiet, timed_run, train_teacher  # noqa: E402

MODES = {"eager": [], "compiled": ["++module.compile=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="medium")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args()
    session = provenance.Session(__file__, [args.results_dir / "compile_speedup.json"])
    quiet()
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    torch.set_num_threads(args.threads)
    few, many = SIZES[args.size]["steps"]
    work = Path(tempfile.mkdtemp(prefix="compile_bench_"))
    common = [f"paths.output_dir={work / 'run'}", f"paths.data_dir={ROOT / 'data'}",
              f"paths.artifacts_dir={work / 'artifacts'}", "extras.print_config=false"]  # fmt: skip
    ms: dict[str, list[float]] = {m: [] for m in MODES}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):

        def cfg(overrides):
            return compose(config_name="train", overrides=overrides)

        ckpt = work / "teacher.ckpt"
        train_teacher(cfg, common, SIZES[args.size]["teacher"], ckpt)
        quiet()
        base = [*kd_overrides(args.size, ckpt), *common]
        for r in range(-1, args.repeats):
            for mode, extra in MODES.items():
                t_few, t_many = (
                    timed_run(cfg, [*base, *extra], "distillery", n) for n in (few, many)
                )
                if r >= 0:  # round -1 warms the compile cache
                    ms[mode].append(1000 * (t_many["wall"] - t_few["wall"]) / (many - few))
                    print(f"{mode}: {ms[mode][-1]:.2f} ms/step", flush=True)
    eager, compiled = min(ms["eager"]), min(ms["compiled"])
    text = "\n".join([
        f"`module.compile=true` vs eager, {args.size} model of benchmarks/overhead.py "
        f"(MLP {SIZES[args.size]['student']} <- CNN1D {SIZES[args.size]['teacher']}, mnist1d_kd), "
        f"CPU, {torch.get_num_threads()} thread(s), wall ms/step by (t({many}) - t({few})) / {many - few}, "
        f"fastest of {args.repeats} alternating repeats; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| mode | ms/step (fastest) | all |",
        "|---|---|---|",
        *(f"| {m} | {min(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |" for m, v in ms.items()),
        "",
        f"Speed-up: **{eager / compiled:.2f}x** (eager / compiled).",
    ])  # fmt: skip
    raw = {"ms_per_step": ms, "steps": [few, many], "size": args.size,
           "threads": torch.get_num_threads()}  # fmt: skip
    overrides = {m: [*kd_overrides(args.size, Path("<tmp>") / "teacher.ckpt"), *extra]
                 for m, extra in MODES.items()}  # fmt: skip
    prov = session.finish(overrides=overrides)
    print(provenance.write("compile_speedup", raw, text, prov, args.results_dir))


if __name__ == "__main__":
    main()
