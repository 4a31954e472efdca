"""Export the student alone: ``python -m distillery.export ckpt_path=... format=...``.

Formats (teacher and any projector/objective state are never exported):

* ``state_dict``: ``model.safetensors``, the student's weights (safetensors: loading them
  runs no code; for a timm student they load into ``timm.create_model(name)``), with
  ``student.yaml`` (how to build it) and ``input_norm.json`` (the normalisation it
  expects on raw inputs);
* ``torchscript``: ``model.torchscript.pt``, normalisation included, raw inputs in;
* ``onnx``: ``model.onnx`` (opset 17, dynamic batch), normalisation included.

Every export is reloaded and checked against the trained student on test inputs
(``atol``) before it is reported done; a failed check removes the export. A
``MODEL_CARD.md`` goes next to it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillery.config import exit_on_config_error, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)
FORMATS = {
    "state_dict": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
}


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime behind the nn.Module call convention."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        import onnx

        self.num_params = sum(
            int(torch.tensor(i.dims).prod()) for i in onnx.load(str(self.path)).graph.initializer
        )
        self.size_mb = self.path.stat().st_size / 2**20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x.long()  # token ids stay int64
        out = self.session.run(None, {self.input_name: x.numpy()})[0]
        return torch.from_numpy(out)


def load_exported(path: str | Path) -> nn.Module:
    """An exported student (a file written by :func:`export_student`), raw inputs in."""
    from hydra.utils import instantiate

    from distillery.core.input_norm import InputNorm

    p = Path(path)
    if p.suffix == ".onnx":
        return OnnxModel(p)
    if p.name.endswith(".torchscript.pt"):
        model = torch.jit.load(str(p), map_location="cpu").eval()
        model.size_mb = p.stat().st_size / 2**20
        return model
    if p.suffix in (".safetensors", ".pt"):  # .pt: state dicts exported before safetensors
        student = instantiate(OmegaConf.load(p.parent / "student.yaml"))
        if p.suffix == ".safetensors":
            from safetensors.torch import load_model

            load_model(student, str(p))
        else:
            student.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        norm = json.loads((p.parent / "input_norm.json").read_text())
        return nn.Sequential(InputNorm(norm["mean"], norm["std"]), student).eval()
    raise ValueError(
        f"not an exported student: {p} (expected .safetensors, .torchscript.pt or .onnx)"
    )


def load_any(path: str | Path, key: str) -> nn.Module:
    """A student from a run checkpoint (.ckpt) or an export."""
    from distillery.core.checkpoint import load_student

    return load_student(path, key) if str(path).endswith(".ckpt") else load_exported(path)


def export_student(
    ckpt_path: str, fmt: str, out_dir: Path, example: torch.Tensor, atol: float = 1e-5
) -> Path:
    from distillery.core.checkpoint import META_KEY, read_checkpoint
    from distillery.core.checkpoint import load_student as load

    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    model = load(ckpt_path)
    norm, student = model[0], model[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    if fmt == "state_dict":
        from safetensors.torch import save_model

        save_model(student, str(path))  # tied weights stored once
        config = read_checkpoint(ckpt_path)[META_KEY]["config"]["student"]
        (out_dir / "student.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        (out_dir / "input_norm.json").write_text(
            json.dumps({"mean": norm.mean.tolist(), "std": norm.std.tolist()})
        )
    elif fmt == "torchscript":
        torch.jit.trace(model, example[:2]).save(str(path))
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example[:2],),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["inputs"],
                output_names=["logits"],
                dynamic_axes={
                    "inputs": {0: "batch"}
                    if example.is_floating_point()
                    else {0: "batch", 1: "tokens"},  # token ids: any sequence length
                    "logits": {0: "batch"},
                },
            )
    with torch.no_grad():
        want = model(example)
        got = load_exported(path)(example)
    err = float((got - want).abs().max())
    if err > atol:
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"format={fmt}: the reloaded export differs from the student by {err:.2e} > atol={atol}"
        )
    log.info("exported %s (max abs difference on reload %.2e)", path, err)
    return path


def model_card(ckpt: dict[str, Any], export_path: Path, metrics: dict | None) -> str:
    from distillery.core.checkpoint import META_KEY

    meta = ckpt[META_KEY]
    cfg, teacher = meta["config"], meta.get("teacher")
    lines = [
        f"# Model card: {cfg.get('task_name', 'student')}",
        "",
        f"Exported student: `{export_path.name}`; architecture `{cfg['student'].get('_target_')}` "
        f"with {meta['params']['student']:,} parameters.",
        "",
        "## Teacher lineage",
        "",
    ]
    if teacher:
        t_cfg = teacher.get("config", {})
        lines += [
            f"- source: {teacher.get('source')} ({t_cfg.get('_target_')})",
            f"- weights sha256: `{teacher.get('sha256')}`",
            f"- teacher parameters: {meta['params']['teacher']:,}",
            *(f"- {k}: `{v}`" for k, v in t_cfg.items() if k != "_target_"),
        ]
    else:
        lines.append("- none: trained on labels alone (a teacher or a baseline)")
    data = cfg.get("data", {})
    lines += [
        "",
        "## Data",
        "",
        f"- datamodule: `{data.get('_target_')}`",
        *(f"- {k}: `{v}`" for k, v in data.items() if k != "_target_" and not isinstance(v, dict)),
        "",
        "## Objective",
        "",
    ]
    distill = cfg.get("distill", {})
    for name, term in (distill.get("terms") or {}).items():
        args = ", ".join(f"{k}={v}" for k, v in term.items() if k != "_target_")
        lines.append(
            f"- {name}: `{term.get('_target_')}` ({args}), weight {distill.get('weights', {}).get(name, 1.0)}"
        )
    if cfg.get("views"):
        lines.append(f"- views: `{json.dumps(cfg['views'])}`")
    lines += [
        "",
        f"Optimizer `{cfg.get('optimizer', {}).get('_target_')}`, seed {cfg.get('seed')}, "
        f"trainer max_epochs={cfg.get('trainer', {}).get('max_epochs')} max_steps={cfg.get('trainer', {}).get('max_steps')}.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += [
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in metrics.items()),
        ]
    else:
        lines.append("No report given (run `python -m distillery.evaluate` and pass `report=`).")
    lines += [
        "",
        "## Caveat",
        "",
        "A distilled student learns to imitate its teacher: it inherits the teacher's biases and errors "
        "along with its skill, and can add errors of its own where it disagrees with the teacher. "
        "Check the report's disagreement analysis and evaluate on data that matters for your use "
        "before shipping it.",
    ]
    return "\n".join(lines) + "\n"


def export(cfg: DictConfig) -> Path:
    validate(cfg, top_level={})
    from distillery.config import build
    from distillery.core.checkpoint import META_KEY, read_checkpoint

    ckpt = read_checkpoint(cfg.ckpt_path)
    data = build(OmegaConf.create(ckpt[META_KEY]["config"]["data"]), "data (recorded in ckpt_path)")
    data.prepare_data()
    data.setup("test")
    example = next(iter(data.test_dataloader()))["inputs"][:64]
    out_dir = Path(cfg.output_dir)
    path = export_student(
        cfg.ckpt_path, cfg.format, out_dir, example, atol=cfg.atol
    )  # removes a bad export
    metrics = None
    if cfg.get("report"):
        report = json.loads(Path(cfg.report).read_text())
        names = [
            n for n, p in report.get("checkpoints", {}).items() if Path(p) == Path(cfg.ckpt_path)
        ]
        if not names:
            raise ValueError(f"report: {cfg.report} has no model for ckpt_path {cfg.ckpt_path}")
        metrics = report["models"][names[0]]
    (out_dir / "MODEL_CARD.md").write_text(model_card(ckpt, path, metrics))
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: export(cfg))


if __name__ == "__main__":
    main()
