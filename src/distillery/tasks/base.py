"""The task adapter contract: what differs between modalities, and nothing else.

A task adapter turns a batch into :class:`~distillery.contract.Outputs` (student
and teacher outputs, labels, masks, captured features) for the one LightningModule
(``distillery.engine.module.DistillationModule``), names the objective reduction it needs,
and builds the held-out metrics that validation, test and the report card share.

Adding a modality is one adapter file (a subclass of :class:`Task`) plus configs
(``conf/task/<name>.yaml``, data, student, distill); see ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distillery.contract import Outputs
from distillery.tasks.checks import check_compatible


class Task:
    """Base class of the task adapters.

    Class attributes:
        name: the adapter's name (``conf/task/<name>.yaml``).
        output_kind: what its datamodule declares (``datamodule.output_kind``).
        reduction: the objective reduction it needs (``distill.reduction``).
        step_normalised: the module normalises every term by a count over the whole
            optimizer step (:meth:`count`, summed over micro-batches and ranks), which
            needs manual optimisation; otherwise Lightning optimises automatically.
        report_keys: the report card's quality columns, in order.
        speed_columns: names of the report's (throughput, cost per million) columns.
        quality_key: the column the quality-vs-latency plot uses.
        keeps_predictions: the report card keeps every model's outputs for plots and
            evaluators (classifiers; token logits are too large).
        generates: the models write text (:meth:`text_model`; prompt/answer tasks).
    """

    name = "task"
    output_kind = "logits"
    reduction = "sample"
    step_normalised = False
    report_keys: tuple[str, ...] = ()
    speed_columns = ("throughput", "cost_per_million")
    quality_key = ""
    keeps_predictions = False
    generates = False
    throughput_defaults: dict[str, Any] = {}

    def check(self, module) -> None:
        """Raise ``ValueError`` naming the config key for combinations the task can't run."""
        if module.objective.reduction.name != self.reduction:
            raise ValueError(
                f"distill.reduction: the {self.name} task needs reduction "
                f"{self.reduction!r}, the objective has {module.objective.reduction.name!r}"
            )

    def check_models(self, cfg, student, teacher, datamodule, example: Tensor) -> None:
        """Dry-run checks before training (``distillery.tasks.checks``), ``ConfigError``s
        naming the key. ``student`` takes raw inputs (its input normalisation included).
        Default: student and teacher run on ``example`` and agree in output shape (and
        give ``num_classes`` outputs when the data has classes)."""
        check_compatible(teacher, student, example, getattr(datamodule, "num_classes", None))

    def bind(self, datamodule) -> None:
        """Take what the adapter needs from the data before anything runs (e.g. the
        special token ids of generation). Default: nothing."""

    def prepare_batch(self, module, batch: dict) -> dict:
        """A training batch before it is counted and trained (e.g. responses replaced by
        the student's own samples). Default: unchanged."""
        return batch

    def training_outputs(self, module, batch: dict, epoch: float) -> Outputs:
        """Student and teacher forwards of one training batch (taps capturing)."""
        raise NotImplementedError

    def eval_outputs(self, module, batch: dict) -> Outputs:
        """Student and teacher forwards of one validation/test batch (taps silent)."""
        raise NotImplementedError

    def model_input(self, batch: dict) -> Tensor:
        """The tensor a standalone model (exported student, teacher) takes."""
        raise NotImplementedError

    def teacher_model_input(self, batch: dict) -> Tensor:
        """What the reference model of the report card takes. Default: :meth:`model_input`
        (the cross-tokenizer generative task: the teacher's own tokens)."""
        return self.model_input(batch)

    def predict(self, model: nn.Module, batch: dict, device, teacher: bool = False) -> Any:
        """A standalone model's output on a held-out batch, on the CPU, in what
        :meth:`metrics` reads (report card; ``teacher``: the model is the reference).
        Default: ``model(model_input(batch))``."""
        return model(self.model_input(batch).to(device)).float().cpu()

    def teacher_scores(self, teacher: nn.Module, out: Any, batch: dict, device) -> None:
        """Add to a model's :meth:`predict` output what needs the teacher run on that
        model's own outputs (report card). Default: nothing."""

    def sample_records(self, out: Any, batch: dict, teacher: bool = False) -> dict | None:
        """Per test sample, from a model's :meth:`predict` output: ``{sample_id, answer,
        correct, ...}`` lists (``distillery.evaluation.inherited``: groups, repeated
        errors). None: the task has no per-sample answer (e.g. sentence encoders)."""
        return None

    def text_model(self, model: nn.Module, teacher: bool = False, device="cpu"):
        """The model as a ``generation.TextModel`` (text in, text out) for probes that
        prompt it (memorisation, safety); None: the task does not generate."""
        return None

    def labels(self, batch: dict) -> Tensor:
        """What the held-out metrics compare with (class ids, next tokens, targets)."""
        return batch["labels"]

    def count(self, batch: dict) -> Tensor:
        """Units one micro-batch adds to the optimizer step's normaliser."""
        raise NotImplementedError

    def metrics(self, num_classes: int | None, with_teacher: bool) -> nn.Module:
        """Validation/test metrics: ``update(student, labels, teacher, sample_id)``,
        ``items() -> [(name, torchmetrics.Metric)]`` (``distillery.evaluation.metrics``)."""
        raise NotImplementedError

    def quality(self, values: dict[str, float], teacher: dict[str, float] | None) -> dict:
        """The report card's quality columns from one model's metric values (and the
        teacher's, the reference)."""
        raise NotImplementedError

    def control_term(self) -> tuple[str, dict] | None:
        """The supervised term (name, config node) a no-teacher control trains with when
        every term of the objective needs a teacher; None: the task has none."""
        return None

    def units_per_sample(self, example: Tensor) -> int:
        """Throughput units per input row (tokens per sequence for language models)."""
        return 1
