"""Task adapters, by name and by the datamodule's ``output_kind``."""

from __future__ import annotations

from distillery.tasks.base import Task
from distillery.tasks.causal_lm import CausalLMTask
from distillery.tasks.classification import ClassificationTask
from distillery.tasks.embedding import EmbeddingTask
from distillery.tasks.generative import GenerativeLMTask

TASKS: dict[str, type[Task]] = {
    t.output_kind: t for t in (ClassificationTask, EmbeddingTask, CausalLMTask, GenerativeLMTask)
}


def task_for(output_kind: str, key: str = "data") -> Task:
    """The default adapter for a datamodule's ``output_kind``."""
    if output_kind not in TASKS:
        raise ValueError(
            f"{key}: no task adapter for output_kind {output_kind!r} (known: {sorted(TASKS)}); "
            f"set `task` to your adapter"
        )
    return TASKS[output_kind]()


__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "EmbeddingTask",
    "GenerativeLMTask",
    "Task",
    "task_for",
]
