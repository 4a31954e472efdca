"""The engine: what runs a distillation. The LightningModule (``module.py``), the builder
that makes a run from its config (``builder.py``), frozen models (``teacher.py``,
``remote_teacher.py``), feature taps (``taps.py``), checkpoints, sharding across devices,
guards against non-finite losses, loggers and the preflight checks. It sits above the task
adapters (``distillery.tasks``) and below the commands (``distillery/<command>.py``).
"""
