"""Plugin points: a user adds a loss, a model, a datamodule and a teacher source by
writing one class (or function) and one YAML file each, outside Distillery's code."""

import sys
import textwrap

import pytest

from conftest import compose_cfg
from distillery.train import train

USER_CODE = '''
import torch
from torch import nn

from distillery.data.digits import DigitsDataModule
from distillery.contract import LossTerm
from distillery.engine.teacher import Teacher


class L1Logits(LossTerm):
    """loss_i = mean_c |z_S - z_T|"""

    needs_teacher = True

    def forward(self, out):
        return (out.student.float() - out.teacher.float()).abs().mean(-1)


class TinyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


class FirstHalfDigits(DigitsDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        self.test_set.inputs = self.test_set.inputs[: len(self.test_set) // 2]
        self.test_set.labels = self.test_set.labels[: len(self.test_set.inputs)]
        self.test_set.sample_ids = self.test_set.sample_ids[: len(self.test_set.inputs)]


def random_teacher(seed: int = 0):
    torch.manual_seed(seed)
    return Teacher(TinyNet(32), {"source": "user_random", "seed": seed})
'''

YAMLS = {
    "distill/l1.yaml": """
        _target_: distillery.losses.objective.Objective
        terms:
          task: {_target_: distillery.losses.CrossEntropy}
          l1: {_target_: user_plugins.L1Logits}
        weights: {task: 1.0, l1: 0.5}
    """,
    "student/tiny.yaml": "_target_: user_plugins.TinyNet\nwidth: 8\n",
    "data/half_digits.yaml": "defaults: [digits, _self_]\n_target_: user_plugins.FirstHalfDigits\n",
    "teacher/random.yaml": "_target_: user_plugins.random_teacher\nseed: 3\n",
}


def install_plugin(tmp_path, monkeypatch, module: str, code: str, yamls: dict) -> str:
    """A user's module and config files outside Distillery; returns the search-path override."""
    (tmp_path / f"{module}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    for rel, text in yamls.items():
        path = tmp_path / "conf" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_user_plugins_without_editing_distillery(tmp_path, data_dir, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "user_plugins", USER_CODE, YAMLS)
    cfg = compose_cfg(
        "train",
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "data=half_digits",
            "student=tiny",
            "teacher=random",
            "distill=l1",
            "debug=fdr",
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.data_dir={data_dir}",
        ],
    )
    metrics = train(cfg)
    assert "train/loss/l1" in metrics and metrics["train/loss/l1"] > 0
    sys.modules.pop("user_plugins", None)


MODALITY_CODE = '''
import torch
from torch import nn
from torchmetrics import MeanMetric

from distillery.contract import LossTerm, Outputs
from distillery.tasks import Task
from distillery.data.digits import DigitsDataModule


class BrightnessDigits(DigitsDataModule):
    """Digits images; the target is each image's mean brightness."""

    output_kind = "brightness"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.num_classes = None


class BrightnessTask(Task):
    """Regress an image's mean brightness: outputs [B, 1]."""

    name, output_kind, reduction = "brightness", "brightness", "sample"
    report_keys, quality_key = ("mse", "mse_to_teacher"), "mse"

    def outputs(self, module, batch, capture, epoch=0.0):
        x = batch["inputs"]
        student, teacher, extras = module.forward_both((x,), x, capture=capture)
        return Outputs(student, self.labels(batch), teacher, epoch=epoch, extras=extras)

    def training_outputs(self, module, batch, epoch):
        return self.outputs(module, batch, True, epoch)

    def eval_outputs(self, module, batch):
        return self.outputs(module, batch, False)

    def model_input(self, batch):
        return batch["inputs"]

    def labels(self, batch):
        return batch["inputs"].float().mean(1, keepdim=True)

    def metrics(self, num_classes, with_teacher):
        return RegressionMetrics()

    def quality(self, values, teacher):
        return dict(values)


class RegressionMetrics(nn.Module):
    def __init__(self):
        super().__init__()
        self.mse, self.mse_to_teacher = MeanMetric(), MeanMetric()

    def update(self, student, labels, teacher, sample_id=None):
        self.mse.update((student.float() - labels).pow(2).mean(-1))
        self.mse_to_teacher.update((student.float() - teacher.float()).pow(2).mean(-1))

    def items(self):
        return [("mse", self.mse), ("mse_to_teacher", self.mse_to_teacher)]


class SquaredError(LossTerm):
    """loss_i = mean_j (s_ij - y_ij)^2, y = the target (``to: labels``) or the teacher."""

    def __init__(self, to: str = "labels"):
        super().__init__()
        self.to, self.needs_teacher = to, to == "teacher"

    def forward(self, out):
        y = out.labels if self.to == "labels" else out.teacher
        return (out.student.float() - y.float()).pow(2).mean(-1)


def brightness_teacher():
    torch.manual_seed(0)
    from distillery.engine.teacher import Teacher

    return Teacher(nn.Linear(64, 1), {"source": "user_random"})
'''

MODALITY_YAMLS = {
    "data/brightness.yaml": "defaults: [digits, _self_]\n_target_: user_modality.BrightnessDigits\n",
    "task/brightness.yaml": "_target_: user_modality.BrightnessTask\n",
    "student/regressor.yaml": "_target_: torch.nn.Linear\nin_features: 64\nout_features: 1\n",
    "teacher/brightness.yaml": "_target_: user_modality.brightness_teacher\n",
    "distill/regression_kd.yaml": """
        _target_: distillery.losses.objective.Objective
        terms:
          target: {_target_: user_modality.SquaredError, to: labels}
          teacher: {_target_: user_modality.SquaredError, to: teacher}
    """,
}


def test_a_new_modality_is_one_adapter_plus_configs(tmp_path, data_dir, monkeypatch):
    """A regression task: the adapter, its metrics, a datamodule flavour, configs. It trains,
    logs its metrics, checkpoints without its teacher and gets a report card."""
    from distillery.evaluate import evaluate

    search = install_plugin(tmp_path, monkeypatch, "user_modality", MODALITY_CODE, MODALITY_YAMLS)
    cfg = compose_cfg("train", [
        search, "data=brightness", "task=brightness", "student=regressor", "teacher=brightness",
        "distill=regression_kd", "trainer.max_epochs=2", "callbacks.model_checkpoint.monitor=val/mse",
        "callbacks.model_checkpoint.mode=min", f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={data_dir}", "extras.print_config=false",
    ])  # fmt: skip
    metrics = train(cfg)
    assert metrics["train/loss/teacher"] > 0 and 0 < metrics["test/mse"] < 1
    report = evaluate(compose_cfg("evaluate", [
        search, f"ckpt_path={metrics['best_ckpt']}", f"paths.output_dir={tmp_path / 'report'}",
    ]))  # fmt: skip
    student = report["models"]["student"]
    assert report["task"] == "brightness" and student["mse"] == pytest.approx(
        metrics["test/mse"], abs=1e-6
    )
    assert report["models"]["teacher"]["mse_to_teacher"] == 0
    sys.modules.pop("user_modality", None)
