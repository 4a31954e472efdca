"""Sentence encoders: token ids -> L2-normalised embeddings ``[B, D]`` in the teacher's
space, unlabeled text.

The batch path is the classifier's (inputs are token ids; padding is found by pad id, and
``attention_mask`` reaches the feature terms as ``token_mask``); what differs is what is
measured on held-out text: the cosine to the teacher's embedding and top-1
nearest-neighbour agreement over the whole split (``EmbeddingMetrics``).
"""

from __future__ import annotations

from distillery.evaluation.metrics import EmbeddingMetrics
from distillery.tasks.checks import check_pad_id, check_vocab
from distillery.tasks.classification import ClassificationTask


class EmbeddingTask(ClassificationTask):
    name = "embedding"
    output_kind = "embedding"
    report_keys = ("cosine_to_teacher", "nn_agreement")
    speed_columns = ("sentences_per_second", "cost_per_million_sentences")
    quality_key = "nn_agreement"
    keeps_predictions = False
    throughput_defaults = {"batch_size": 64, "repeats": 3}

    def check(self, module) -> None:
        super().check(module)
        if module.teacher is None:
            raise ValueError("teacher: the embedding task compares with a teacher; none is set")

    def check_models(self, cfg, student, teacher, datamodule, example) -> None:
        super().check_models(cfg, student, teacher, datamodule, example)
        check_vocab(cfg, student[-1], teacher, datamodule, same_rows=False)
        check_pad_id(student[-1], teacher, datamodule)

    def control_term(self):
        return None  # unlabeled sentences: nothing to train on without a teacher

    def metrics(self, num_classes, with_teacher):
        return EmbeddingMetrics(num_classes, with_teacher)

    def quality(self, values, teacher):
        return {"cosine_to_teacher": values["cosine"], "nn_agreement": values["nn_agreement"]}
