"""Classifiers: inputs -> logits over classes, labels per sample (-1 = unlabeled).

Training batches may combine a labeled set and a transfer set (``merge_sources``) and
go through the views (augment once, mix once: the same tensor for teacher and student,
``distillery.recipes.views``). Per-sample losses, ``reduction: sample``; Lightning's own
optimisation (``trainer.accumulate_grad_batches`` is exact: the labeled count per batch
is fixed). Held-out metrics: accuracy, nll, ECE and, with a teacher, agreement and KL.
"""

from __future__ import annotations

from torch import Tensor

from distillery.contract import Outputs
from distillery.data.batch import merge_sources
from distillery.evaluation.metrics import ClassificationMetrics
from distillery.tasks.base import Task


class ClassificationTask(Task):
    name = "classification"
    output_kind = "logits"
    reduction = "sample"
    report_keys = ("accuracy", "nll", "ece", "agreement", "kl_to_teacher", "quality_retained")
    quality_key = "accuracy"
    keeps_predictions = True
    throughput_defaults = {"batch_size": 256, "repeats": 5}

    def training_outputs(self, module, batch: dict, epoch: float) -> Outputs:
        batch = merge_sources(batch)
        x, labels, targets = batch["inputs"], batch["labels"], None
        x_teacher = x
        if module.views is not None:  # augmentation / mixing, once per batch
            x, x_teacher, labels, targets = module.views(
                x, labels, module.num_classes, batch.get("sample_id")
            )
        student, teacher, extras = module.forward_both((x,), x_teacher, capture=True)
        if extras:
            extras["sample_id"] = batch["sample_id"]
            if "attention_mask" in batch:  # token inputs: feature terms skip the padding
                extras["token_mask"] = batch["attention_mask"]
        return Outputs(student, labels, teacher, epoch=epoch, targets=targets, extras=extras)

    def eval_outputs(self, module, batch: dict) -> Outputs:
        x = batch["inputs"]
        student, teacher, _ = module.forward_both((x,), x, capture=False)
        return Outputs(
            student, batch["labels"], teacher, extras={"sample_id": batch.get("sample_id")}
        )

    def model_input(self, batch: dict) -> Tensor:
        return batch["inputs"]

    def control_term(self):
        return "task", {"_target_": "distillery.losses.CrossEntropy"}

    def sample_records(self, out, batch: dict, teacher: bool = False) -> dict:
        """Predicted class (``answer``), ``correct``, ``label`` and ``confidence`` per sample."""
        labels = self.labels(batch)
        pred, conf = out.argmax(-1), out.float().softmax(-1).max(-1).values
        return {"sample_id": batch["sample_id"].tolist(), "answer": pred.tolist(),
                "correct": (pred == labels).tolist(), "label": labels.tolist(),
                "confidence": conf.tolist()}  # fmt: skip

    def metrics(self, num_classes, with_teacher):
        return ClassificationMetrics(num_classes, with_teacher)

    def quality(self, values, teacher):
        return {
            "accuracy": values["acc"], "nll": values["nll"], "ece": values["ece"],
            "agreement": values.get("agreement"), "kl_to_teacher": values.get("kl_to_teacher"),
            "quality_retained": 100.0 * (values["acc"] / teacher["acc"]) if teacher and teacher["acc"] else None,
        }  # fmt: skip
