"""Causal language models: token ids -> next-token logits ``[B, T, V]``.

Batches are ``{input_ids, labels (next tokens, -100 = not trained), attention_mask,
sample_id}``. Terms give per-token losses and are summed over trained tokens and divided
by the valid-token count of the whole optimizer step (``reduction: token``): the module
pulls ``module.accumulate`` micro-batches, counts their tokens (summed over DDP ranks)
and steps the optimizer itself, so padding and accumulation leave the loss unchanged.
Held-out metrics per token: nll, ppl and, with a teacher, top-1 agreement and KL.

``fused: true``: training steps hand the terms the models' last hidden states and output
layers (``losses.fused.HeadOutputs``) instead of logits, for ``FusedTokenLoss``, which
never builds the ``tokens x vocab`` logits; taps and the step normalisation are the same.
Evaluation still computes logits (its metrics read them; no gradient is kept).
"""

from __future__ import annotations

import math

from torch import Tensor

from distillery.contract import IGNORE, Outputs
from distillery.evaluation.metrics import LMMetrics
from distillery.tasks.base import Task
from distillery.tasks.checks import check_vocab


class CausalLMTask(Task):
    name = "causal_lm"
    output_kind = "token_logits"
    reduction = "token"
    step_normalised = True
    report_keys = ("ppl", "nll", "agreement", "kl_to_teacher", "quality_retained")
    speed_columns = ("tokens_per_second", "cost_per_million_tokens")
    quality_key = "ppl"
    throughput_defaults = {"batch_size": 16, "repeats": 3}

    def __init__(self, fused: bool = False):
        self.fused = fused

    def check(self, module) -> None:
        super().check(module)
        if module.views is not None:
            raise ValueError("views: augmentation/mixing views are for classifier inputs")
        check_fused(module, self.fused)

    def check_models(self, cfg, student, teacher, datamodule, example) -> None:
        check_vocab(cfg, student[-1], teacher, datamodule)

    def _outputs(self, module, batch: dict, capture: bool, epoch: float = 0.0) -> Outputs:
        ids = batch["input_ids"]
        student, teacher, extras = module.forward_both(
            (ids, batch.get("attention_mask")), self.teacher_input(batch), capture=capture,
            head=self.fused and capture,
        )  # fmt: skip
        if extras:
            if "attention_mask" in batch:  # padding keys of relation terms
                extras["attention_mask"] = batch["attention_mask"]
            extras["token_mask"] = batch["labels"] != IGNORE  # the trained positions
        return Outputs(student, batch["labels"], teacher, epoch=epoch, extras=extras)

    def teacher_input(self, batch: dict) -> Tensor:
        """The token ids the teacher reads (the student's, unless the tokenizers differ)."""
        return batch["input_ids"]

    def training_outputs(self, module, batch: dict, epoch: float) -> Outputs:
        return self._outputs(module, batch, capture=True, epoch=epoch)

    def eval_outputs(self, module, batch: dict) -> Outputs:
        return self._outputs(module, batch, capture=False)

    def model_input(self, batch: dict) -> Tensor:
        return batch["input_ids"]

    def count(self, batch: dict) -> Tensor:
        return (batch["labels"] != IGNORE).sum()

    def control_term(self):
        if self.fused:
            return "ce", {"_target_": "distillery.losses.FusedTokenLoss", "kd_weight": 0.0, "ce_weight": 1.0}  # fmt: skip
        return "ce", {"_target_": "distillery.losses.TokenCrossEntropy"}

    def metrics(self, num_classes, with_teacher):
        return LMMetrics(num_classes, with_teacher)

    def quality(self, values, teacher):
        ppl = math.exp(values["nll"])
        return {
            "ppl": ppl, "nll": values["nll"],
            "agreement": values.get("agreement"), "kl_to_teacher": values.get("kl_to_teacher"),
            "quality_retained": 100.0 * (math.exp(teacher["nll"]) / ppl) if teacher else None,
        }  # fmt: skip

    def units_per_sample(self, example: Tensor) -> int:
        return int(example.shape[1])  # tokens per sequence


def check_fused(module, fused: bool) -> None:
    """``task.fused``: both models expose ``hidden_and_head`` and no term reads logits;
    without it, no term reads hidden states and output layers."""
    from distillery.losses.fused import FusedTokenLoss
    from distillery.losses.token import TokenCrossEntropy, TokenKD

    if not fused:
        for name, term in module.objective.terms.items():
            if isinstance(term, FusedTokenLoss):
                raise ValueError(
                    f"distill.terms.{name} (FusedTokenLoss) reads hidden states and output "
                    f"layers: set task=causal_lm task.fused=true"
                )
        return
    models = [("student", module.student)]
    if module.teacher is not None:
        models.append(("teacher", module.teacher.network))
    for role, model in models:
        if not callable(getattr(model, "hidden_and_head", None)):
            raise ValueError(
                f"task.fused: the {role} ({type(model).__name__}) has no hidden_and_head() "
                f"giving its last hidden states and output layer; set task.fused=false"
            )
    for name, term in module.objective.terms.items():
        if isinstance(term, (TokenKD, TokenCrossEntropy)):
            raise ValueError(
                f"task.fused: distill.terms.{name} ({type(term).__name__}) reads logits; "
                f"use distillery.losses.FusedTokenLoss (distill=token_kd_fused)"
            )
