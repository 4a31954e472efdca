"""Loading never runs code from a file the user did not write; credentials are never
written down."""

from __future__ import annotations

import pathlib

import pytest
import torch

from conftest import SMALL_MNIST1D, compose_cfg
from distillery.config import ConfigError
from distillery.engine.checkpoint import read_checkpoint


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a malicious checkpoint does."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def evil(tmp_path, mnist1d_teacher_ckpt):
    """A real run checkpoint with a code-running pickle inside, and the file it would make."""
    marker = tmp_path / "code_ran"
    ckpt = torch.load(mnist1d_teacher_ckpt, weights_only=True)
    ckpt["extra"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    state = tmp_path / "evil_state.pt"
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, state)
    return path, state, marker


def test_the_payload_runs_when_loaded_unsafely(evil):
    path, _, marker = evil
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()  # so the tests below can fail


def test_checkpoints_with_code_are_refused_everywhere(evil, train_cfg, tmp_path):
    from distillery.evaluate import evaluate
    from distillery.export import load_exported
    from distillery.train import build_run

    path, state, marker = evil
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ConfigError, match="ckpt_path"):  # resume
        build_run(train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, f"ckpt_path={path}"))
    with pytest.raises(ConfigError, match="teacher"):  # a run-checkpoint teacher
        build_run(train_cfg("experiment=mnist1d_kd", *SMALL_MNIST1D, f"teacher.ckpt_path={path}"))
    with pytest.raises(ConfigError, match="teacher.path"):  # a state-dict teacher
        build_run(train_cfg(*SMALL_MNIST1D, "distill=kd", "teacher=state_dict",
                            "+teacher.model._target_=distillery.models.CNN1D", f"teacher.path={state}"))  # fmt: skip
    with pytest.raises(ValueError, match="ckpt_path"):  # the report card
        evaluate(compose_cfg("evaluate", [f"ckpt_path={path}", f"paths.output_dir={tmp_path}/r"]))
    with pytest.raises(Exception, match="Unsupported global|weights_only"):  # an old .pt export
        (tmp_path / "student.yaml").write_text("_target_: torch.nn.Identity\n")
        (tmp_path / "input_norm.json").write_text('{"mean": [0.0], "std": [1.0]}')
        load_exported(state)
    assert not marker.exists()


def test_credentials_never_reach_checkpoints_or_logs(train_cfg, tmp_path, monkeypatch):
    from distillery.train import train

    secret = "wandb-secret-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=1",
        "+extras.wandb_api_key=${oc.env:WANDB_API_KEY}",  # by key
        "+extras.note=key ${oc.env:WANDB_API_KEY} here",  # by value
    )  # fmt: skip
    metrics = train(cfg)
    recorded = read_checkpoint(metrics["best_ckpt"])["distillery"]["config"]["extras"]
    assert recorded["wandb_api_key"] == "<redacted>" and recorded["note"] == "key <redacted> here"
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
