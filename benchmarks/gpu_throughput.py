"""Steady-state training throughput of three distillation runs on one device (the
accelerator check's benchmark, run by scripts/gpu_check.sh).

Workloads, each a real ``distillery.train`` run built in this process:

* ``mnist1d_kd``: MLP student, CNN teacher (trained here for a few steps), batch 256;
* ``vit_attention``: ViT-Ti/4 student, ViT-S/4 teacher (random weights, a state-dict
  file), last-block attention maps + KD, on a generated 32x32 image folder;
* ``text_lm_kd`` dense and fused (``task.fused=true distill=token_kd_fused``): GPT-2
  pair on the pydoc corpus (teacher trained here for a few steps).

Each run is timed at two step counts, after a discarded warm-up run at the smaller one
(costs paid once per process, e.g. CUDA's context and kernel caches, would otherwise
fall on the first timed run alone); steady-state ms/step is the difference divided by
the difference in steps (each run's start-up and data set-up cancel). A difference at or
below zero is reported as not measured, a failed workload by its error (exit 1).
Prints a table and writes it to ``--out`` (markdown, with the provenance stamp) and the
raw numbers, each workload's overrides and the provenance (commit, machine, load, times)
to the ``.json`` beside it (``provenance.py``).

    python benchmarks/gpu_throughput.py [--device cuda|cpu] [--steps 20 60] [--out FILE]

``--device cpu --steps 2 4 --small`` runs the same code here, in a minute or two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

provenance.go_offline()
ROOT = Path(__file__).resolve().parents[1]


def image_folder(root: Path, classes: int, per_class: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def timed_fit(compose, overrides: list[str], steps: int) -> float:
    from distillery.train import build_run

    cfg = compose([*overrides, "trainer.max_epochs=-1", f"++trainer.max_steps={steps}",
                   "++trainer.limit_val_batches=0", "test=false", "callbacks=none"])  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if module.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 60])
    parser.add_argument("--small", action="store_true", help="tiny models and data (CPU check)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.md"
    )
    args = parser.parse_args()
    session = provenance.Session(__file__, [args.out])
    warnings.filterwarnings("ignore")
    import torch
    from hydra import compose, initialize_config_dir

    from distillery.config.resolvers import CONFIG_DIR
    from distillery.train import train

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    trainer = ["trainer=gpu"] if args.device == "cuda" else ["trainer.accelerator=cpu"]
    common = [f"paths.output_dir={work / 'run'}", f"paths.data_dir={work / 'data'}",
              f"paths.artifacts_dir={work / 'artifacts'}", "extras.print_config=false", *trainer]  # fmt: skip
    small = args.small
    mnist = (
        ["data.num_samples=2000", "data.val_size=200", "data.transfer_size=2000"] if small else []
    )
    text = ["data.seq_len=64", "student.config.n_positions=64"] if small else []
    image_folder(work / "imgs", classes=10, per_class=8 if small else 64)
    vit_pth = work / "vit_s.pth"
    raw, failed = [], []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):

        def cfg(overrides):
            return compose("train", [*overrides, *common])

        # teachers: a few steps each, exported where the students' configs look
        train(cfg(["experiment=mnist1d_teacher", *mnist[:2], "trainer.max_epochs=1",
                   f"export_ckpt={work / 'artifacts' / 'mnist1d_teacher.ckpt'}"]))  # fmt: skip
        train(cfg(["experiment=text_lm_teacher", *text, "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=10", "+trainer.limit_val_batches=2",
                   f"export_ckpt={work / 'artifacts' / 'text_lm_teacher.ckpt'}"]))  # fmt: skip
        import timm

        depth = 2 if small else 12
        teacher = timm.create_model("vit_small_patch16_224", num_classes=10, img_size=32,
                                    patch_size=4, depth=depth)  # fmt: skip
        torch.save(teacher.state_dict(), vit_pth)
        vit = ["experiment=vit_attention", "data=imagefolder", f"data.root={work / 'imgs'}",
               "data.num_classes=10", "data.image_size=32", "data.num_workers=2", "data.batch_size=128",
               f"teacher.checkpoint_path={vit_pth}", f"teacher.model_kwargs.depth={depth}",
               f"student.depth={depth}", f"taps.student.attn.path=blocks.{depth - 1}.attn",
               f"taps.teacher.attn.path=blocks.{depth - 1}.attn"]  # fmt: skip
        if args.device == "cpu":
            vit.append("trainer.precision=32-true")
        workloads = {
            "mnist1d_kd (MLP <- CNN, batch 256)": ["experiment=mnist1d_kd", *mnist],
            "vit_attention (ViT-Ti/4 <- ViT-S/4, batch 128)": vit,
            "text_lm_kd dense": ["experiment=text_lm_kd", *text],
            "text_lm_kd fused": [
                "experiment=text_lm_kd",
                *text,
                "task=causal_lm",
                "task.fused=true",
                "distill=token_kd_fused",
            ],  # fmt: skip
        }
        few, many = args.steps
        for name, overrides in workloads.items():
            entry = {"workload": name, "ms_per_step": None,
                     "overrides": [str(o).replace(str(work), "<tmp>") for o in overrides]}  # fmt: skip
            try:  # one broken workload is reported, and the others still run
                timed_fit(cfg, overrides, few)  # warm-up: once-per-process costs
                t_few = timed_fit(cfg, overrides, few)
                t_many = timed_fit(cfg, overrides, many)
            except Exception as error:  # noqa: BLE001 - reported in the table and the exit code
                entry["error"] = f"{type(error).__name__}: {error}"[:500]
                failed.append(name)
                print(f"{name}: FAILED {entry['error']}", flush=True)
            else:
                ms = 1000 * (t_many - t_few) / (many - few)
                entry.update(ms_per_step=ms, seconds=[t_few, t_many])
                print(f"{name}: {ms:.1f} ms/step", flush=True)
            raw.append(entry)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"Steady-state training step time on {device} (difference of {few}- and "
             f"{many}-step runs{', small sizes' if small else ''}).", "",
             "| workload | ms / step |", "|---|---|",
             *(f"| {r['workload']} | {cell(r)} |" for r in raw)]  # fmt: skip
    prov = session.finish(device=device, steps=[few, many], small=small)
    print(provenance.write(args.out.stem, raw, "\n".join(lines), prov, args.out.parent))
    if failed:
        sys.exit(f"gpu_throughput: {len(failed)} workload(s) failed: {', '.join(failed)}")


def cell(entry: dict) -> str:
    """A workload's table cell: its ms/step; a difference at or below zero (start-up noise
    larger than the extra steps' time) is not a step time and says so; a failure names
    its error."""
    if entry.get("error"):
        return f"failed: {entry['error'].splitlines()[0][:120]}"
    ms = entry["ms_per_step"]
    return f"{ms:.1f}" if ms > 0 else f"not measured ({ms:.1f}: noise above the extra steps' time)"


if __name__ == "__main__":
    main()
