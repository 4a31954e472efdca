"""Health signals of token-level runs (evaluation/health.py) and health.stop_on."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SMALL_ARITH
from distillery.config import ConfigError
from distillery.evaluation.health import (
    UnhealthyRun,
    answer_signals,
    check_rules,
    sampled_tokens,
    token_signals,
)


def test_token_signals_on_hand_made_distributions():
    v = 8
    student = torch.zeros(1, 3, v)  # uniform: entropy log 8
    teacher = torch.full((1, 3, v), -20.0)
    teacher[0, :, 2] = 20.0  # the teacher is sure of token 2
    teacher[0, 2] = 0.0  # ... except at the last position: uniform
    mask = torch.tensor([[True, True, True]])
    sampled = torch.tensor([[2, 5, -1]])  # the student sampled 2, then 5
    out = token_signals(student, teacher, mask, sampled, top_k=4)
    assert out["student_entropy"] == pytest.approx(torch.full((3,), math.log(v)))
    assert out["teacher_entropy"][:2].max() < 1e-6 and out["teacher_entropy"][2] == pytest.approx(math.log(v))  # fmt: skip
    # KL(teacher || uniform student) = log 8 ~ 2.08 > 2 where the teacher is sure, 0 where uniform
    assert out["outlier_share"].tolist() == [1.0, 1.0, 0.0]
    assert out["teacher_mass_on_samples"] == pytest.approx(torch.tensor([1.0, 0.0]), abs=1e-6)
    assert out["teacher_tail_mass"] == pytest.approx(torch.tensor([0.0, 0.0, 0.5]), abs=1e-6)


def test_sampled_tokens_are_the_next_ids_of_sampled_positions():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "token_mask": torch.tensor([[0, 1, 1, 0]])}
    assert sampled_tokens(batch).tolist() == [[-1, 7, 8, -1]]
    assert sampled_tokens({"input_ids": batch["input_ids"]}) is None


def test_answer_signals_count_stops_and_lengths():
    out = answer_signals([[3, 4, 1], [3, 3, 3, 3], [1]], eos_id=1)
    assert out["eos_rate"].tolist() == [1.0, 0.0, 1.0]
    assert out["response_length"].tolist() == [2.0, 4.0, 0.0]


def test_stop_rules_name_their_key():
    logged = {"val/health/eos_rate"}
    with pytest.raises(ConfigError, match=r"health.stop_on\[0\].metric: this run never logs"):
        check_rules([{"metric": "val/health/eos", "below": 0.5}], logged)
    with pytest.raises(ConfigError, match=r"health.stop_on\[0\]: expected"):
        check_rules([{"metric": "val/health/eos_rate", "below": 0.5, "above": 2}], logged)
    (rule,) = check_rules([{"metric": "val/health/eos_rate", "below": 0.5}], logged)
    assert rule["times"] == 1 and rule["key"] == "health.stop_on[0]"


def test_a_student_that_never_emits_eos_is_stopped(train_cfg, arith_tok, arith_teacher_ckpt):
    """arith_kd with a student whose EOS logit is forced to -inf: greedy answers never
    end, val/health/eos_rate stays 0 (the teacher's is logged beside it), and
    health.stop_on stops the run at the second validation with a message."""
    from distillery.engine.builder import build_run

    cfg = train_cfg("experiment=arith_kd", *SMALL_ARITH, f"data.tokenizer={arith_tok}", f"teacher.ckpt_path={arith_teacher_ckpt}",
                    "trainer.max_steps=8", "trainer.val_check_interval=2", "scheduler.warmup_steps=1",
                    "trainer.log_every_n_steps=1", "+trainer.num_sanity_val_steps=0", "callbacks=none", "logger=csv",
                    "health.stop_on=[{metric: val/health/eos_rate, below: 0.5, times: 2}]")  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    eos = module.task.eos_id

    def never_eos(_, __, output):
        output.logits[..., eos] = -1e9  # in place: training, validation and generation

    module.student.model.register_forward_hook(never_eos)
    with pytest.raises(UnhealthyRun, match=r"health.stop_on\[0\]: val/health/eos_rate = 0 is below 0.5 for 2 validation\(s\) in a row \(step 4\)"):  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert float(logged["val/health/eos_rate"]) == 0.0
    assert float(logged["val/health/response_length"]) == module.task.max_new_tokens
    assert "val/health/teacher_eos_rate" in logged and "val/health/teacher_entropy" in logged
    for name in ("student_entropy", "teacher_entropy", "outlier_share"):
        assert f"train/health/{name}" in logged
    assert trainer.global_step == 4  # stopped, not trained on to max_steps
