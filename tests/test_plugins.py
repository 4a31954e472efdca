"""Plugin points: a user adds a loss, a model, a datamodule and a teacher source by
writing one class (or function) and one YAML file each, outside Distillery's code."""

import sys
import textwrap

from conftest import compose_cfg
from distillery.train import train

USER_CODE = '''
import torch
from torch import nn

from distillery.data.digits import DigitsDataModule
from distillery.core.objective import LossTerm
from distillery.core.teacher import Teacher


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
        _target_: distillery.core.objective.Objective
        terms:
          task: {_target_: distillery.losses.CrossEntropy}
          l1: {_target_: user_plugins.L1Logits}
        weights: {task: 1.0, l1: 0.5}
    """,
    "student/tiny.yaml": "_target_: user_plugins.TinyNet\nwidth: 8\n",
    "data/half_digits.yaml": "defaults: [digits, _self_]\n_target_: user_plugins.FirstHalfDigits\n",
    "teacher/random.yaml": "_target_: user_plugins.random_teacher\nseed: 3\n",
}


def test_user_plugins_without_editing_distillery(tmp_path, data_dir, monkeypatch):
    (tmp_path / "user_plugins.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for rel, text in YAMLS.items():
        path = tmp_path / "conf" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
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
