"""Export the student alone: ``python -m distillery.export ckpt_path=... format=...``.

Formats (teacher and any projector/objective state are never exported):

* ``state_dict``: ``model.safetensors``, the student's weights (safetensors: loading them
  runs no code; for a timm student they load into ``timm.create_model(name)``), with
  ``student.yaml`` (how to build it) and ``input_norm.json`` (the normalisation it
  expects on raw inputs);
* ``torchscript``: ``model.torchscript.pt``, normalisation included, raw inputs in;
* ``onnx``: ``model.onnx`` (opset 17, dynamic batch), normalisation included;
* ``int8``: ``model.int8.torchscript.pt``, the student with its ``nn.Linear`` layers
  dynamically quantised to int8 (weights int8, activations quantised on the fly; CPU
  inference), normalisation included; checked to ``int8_tolerance`` (the largest output
  difference relative to the largest float output) instead of ``atol``;
* ``hf``: an ``hf/`` Hugging Face directory for language-model and sentence-encoder
  students: ``save_pretrained`` weights (safetensors), config and the run's tokenizer;
  causal LMs also get a ``generation_config.json`` and load with
  ``AutoModelForCausalLM.from_pretrained``; sentence encoders are written in the
  sentence-transformers layout (transformer, pooling, the linear map, normalisation) and
  load with ``SentenceTransformer(path)`` (or ``AutoModel`` for the transformer alone).

None needs the teacher or Distillery to load, except ``state_dict`` for a student class
defined in Distillery (``student.yaml`` names it). Every export is reloaded and checked
against the trained student on test inputs before it is reported done; a failed check
removes the export. A ``MODEL_CARD.md`` goes next to it.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillery.config import ConfigError, exit_on_config_error, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)
FORMATS = {
    "state_dict": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "int8": "model.int8.torchscript.pt",
    "hf": "hf",
}


class HFExported(nn.Module):
    """An ``hf`` export directory behind the student's call convention (token ids in):
    a causal LM's logits, or a sentence-transformers model's embeddings."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        if (self.path / "modules.json").is_file():
            from sentence_transformers import SentenceTransformer

            self.model, self.sentence = SentenceTransformer(str(self.path), device="cpu"), True
            self.pad_token_id = self.model.tokenizer.pad_token_id or 0
        else:
            from transformers import AutoModelForCausalLM

            self.model, self.sentence = AutoModelForCausalLM.from_pretrained(str(self.path)), False
        self.model.eval()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.size_mb = sum(f.stat().st_size for f in self.path.rglob("*.safetensors")) / 2**20

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        if self.sentence:
            mask = (input_ids != self.pad_token_id).long()
            return self.model({"input_ids": input_ids, "attention_mask": mask})[
                "sentence_embedding"
            ]
        return self.model(input_ids=input_ids).logits


def save_hf(student: nn.Module, config: dict, out: Path) -> None:
    """``format=hf``: the student's transformer, the run's tokenizer and, for sentence
    encoders, the sentence-transformers modules around it."""
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

    from distillery.models.hf import HFCausalLM, HFSentenceEncoder

    hf = getattr(student, "model", None)
    if not isinstance(student, (HFCausalLM, HFSentenceEncoder)) or not isinstance(
        hf, PreTrainedModel
    ):
        raise ValueError(
            f"format: hf takes Hugging Face language-model or sentence-encoder students, "
            f"not {type(student).__name__}; use state_dict, torchscript, onnx or int8"
        )
    tokenizer_path = (config.get("data") or {}).get("tokenizer")
    if not tokenizer_path:
        raise ValueError(
            "format: hf needs the run's tokenizer, and its data.tokenizer is not recorded"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    if isinstance(student, HFCausalLM):
        hf.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        generation = GenerationConfig.from_model_config(hf.config)
        generation.eos_token_id = tokenizer.eos_token_id
        generation.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        generation.save_pretrained(out)
        return
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    inner = out / "transformer.tmp"
    hf.save_pretrained(inner, safe_serialization=True)
    tokenizer.save_pretrained(inner)
    modules = [Transformer(str(inner)), Pooling(hf.config.hidden_size, student.pooling)]
    if isinstance(student.proj, nn.Linear):
        lin = student.proj
        modules.append(Dense(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             activation_function=nn.Identity(), init_weight=lin.weight.detach(),
                             init_bias=None if lin.bias is None else lin.bias.detach()))  # fmt: skip
    if student.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    shutil.rmtree(inner)


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

    from distillery.models.input_norm import InputNorm

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return HFExported(p)
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
        f"not an exported student: {p} (expected .safetensors, .torchscript.pt, .onnx or an "
        f"hf directory)"
    )


def load_any(path: str | Path, key: str) -> nn.Module:
    """A student from a run checkpoint (.ckpt) or an export."""
    from distillery.engine.checkpoint import load_student

    return load_student(path, key) if str(path).endswith(".ckpt") else load_exported(path)


def export_student(
    ckpt_path: str,
    fmt: str,
    out_dir: Path,
    example: torch.Tensor,
    atol: float = 1e-5,
    int8_tolerance: float = 0.05,
) -> Path:
    from distillery.engine.checkpoint import META_KEY, read_checkpoint
    from distillery.engine.checkpoint import load_student as load

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
    elif fmt == "int8":
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
        torch.jit.trace(quantized, example[:2], check_trace=False).save(str(path))
    elif fmt == "hf":
        save_hf(student, read_checkpoint(ckpt_path)[META_KEY]["config"], path)
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
    limit, what = atol, "atol"
    if fmt == "int8":  # relative to the outputs' scale
        err, limit, what = (
            err / max(float(want.abs().max()), 1e-12),
            int8_tolerance,
            "int8_tolerance",
        )
    if err > limit:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise RuntimeError(
            f"format={fmt}: the reloaded export differs from the student by {err:.2e} > {what}={limit}"
        )
    log.info("exported %s (difference on reload %.2e, %s %s)", path, err, what, limit)
    return path


def inherited_lines(inherited: dict | None, teacher: dict | None, gate: dict | None) -> list[str]:
    """The model card's "What the student inherited": each probe's numbers for the
    student beside the teacher's (``distillery.evaluate inherited=...``), and the gate."""

    def cell(x) -> str:
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = []
    if inherited:
        lines = ["", "## What the student inherited", "", "| section | metric | student | teacher |",
                 "|---|---|---|---|"]  # fmt: skip
    for section, values in (inherited or {}).items():
        ref = (teacher or {}).get(section, {})
        for k, v in values.items():
            if v is None or (isinstance(v, int | float | str) and not isinstance(v, bool)):
                lines.append(f"| {section} | {k} | {cell(v)} | {cell(ref.get(k))} |")
    if gate is not None:  # this model's checks only
        failed = [c for c in gate["checks"] if not c["passed"]]
        lines += [
            "",
            f"Release gate ({len(gate['checks'])} checks): " + ("FAILED:" if failed else "passed."),
        ]
        lines += [f"- {c['metric']} = {c['value']} ({c['bound']} {c['limit']})" for c in failed]
    return lines


def model_card(
    ckpt: dict[str, Any],
    export_path: Path,
    metrics: dict | None,
    inherited: dict | None = None,
    teacher_inherited: dict | None = None,
    gate: dict | None = None,
) -> str:
    from distillery.engine.checkpoint import META_KEY

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
    lines += inherited_lines(inherited, teacher_inherited, gate)
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
    from distillery.engine.checkpoint import META_KEY, read_checkpoint
    from distillery.tasks import task_for

    if cfg.format not in FORMATS:
        raise ConfigError([f"format: expected one of {sorted(FORMATS)}, got {cfg.format!r}"])
    ckpt = read_checkpoint(cfg.ckpt_path)
    data = build(OmegaConf.create(ckpt[META_KEY]["config"]["data"]), "data (recorded in ckpt_path)")
    data.prepare_data()
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    example = task_for(data.output_kind).model_input(batch)[:16]
    out_dir = Path(cfg.output_dir)
    path = export_student(
        cfg.ckpt_path, cfg.format, out_dir, example, cfg.atol, cfg.int8_tolerance
    )  # removes a bad export
    if cfg.get("report"):
        report = json.loads(Path(cfg.report).read_text())
        names = [
            n for n, p in report.get("checkpoints", {}).items() if Path(p) == Path(cfg.ckpt_path)
        ]
        if not names:
            raise ValueError(f"report: {cfg.report} has no model for ckpt_path {cfg.ckpt_path}")
        metrics = report["models"][names[0]]
        inherited = report.get("inherited", {})
        gate = report.get("gate")
        if gate is not None:
            gate = {"checks": [c for c in gate["checks"] if c["model"] == names[0]]}
        card = model_card(
            ckpt, path, metrics, inherited.get(names[0]), inherited.get("teacher"), gate
        )
    else:
        card = model_card(ckpt, path, None)
    (out_dir / "MODEL_CARD.md").write_text(card)
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: export(cfg))


if __name__ == "__main__":
    main()
