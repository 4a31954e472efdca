"""Check a teacher-student pair before spending GPU time on it:
``python -m distillery.preflight experiment=... [devices=8] [measure=true]``.

Prints one table: the checks of ``engine/preflight.py`` (vocabularies compared by token
string, special tokens, chat templates, the data's longest sequence against both models'
positions, teacher frozen; the same checks ``distillery.train`` runs before its first
step) and the memory estimate per device and strategy of ``engine/memory.py`` (with
``measure=true``, beside the measured peak of one real step on this CPU). Exits with
code 2, naming the keys, when a check finds the objective would be wrong.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, open_dict

from distillery.config import ConfigError, exit_on_config_error
from distillery.config.resolvers import CONFIG_DIR


def preflight(cfg: DictConfig) -> dict:
    """``{findings, estimate, measured}`` of a run config (nothing trains unless
    ``cfg.measure``)."""
    from distillery.engine import memory
    from distillery.engine.builder import build_run
    from distillery.engine.preflight import Finding

    findings: list[Finding] = []
    try:
        datamodule, module, trainer, _ = build_run(cfg, findings)
    except FileNotFoundError as e:
        raise ConfigError([str(e)]) from e
    datamodule.setup("fit")
    loaders = datamodule.train_dataloader()  # a loader, or {source: loader} (labeled + transfer)
    if isinstance(loaders, dict):
        batch = {name: next(iter(loader)) for name, loader in loaders.items()}
    else:
        batch = next(iter(loaders))
    row = memory.one_row(batch)
    longest = getattr(datamodule, "longest_sequence", None)
    if longest is not None and "input_ids" in row:  # the configured length, not this batch's
        row = memory.pad_row(row, longest(), getattr(module.task, "pad_id", 0) or 0)
    rows = len(batch["input_ids"]) if "input_ids" in batch else cfg.data.get("batch_size", 1)
    if isinstance(loaders, dict):  # one row of each source: the estimate scales rows alike
        sizes = [len(next(t for t in b.values() if torch.is_tensor(t))) for b in batch.values()]
        rows = sum(sizes) / len(sizes)
    est = memory.estimate(module, row, rows, module.optimizer_factory, int(cfg.devices))
    measured = measure_step(cfg)[0] if cfg.get("measure") else None
    return {"findings": findings, "estimate": est, "measured": measured}


def measure_step(cfg: DictConfig, step: int = 1):
    """Run ``step + 1`` real training steps of ``cfg`` on this CPU; ``(result, module)``
    with the peak of the last (``engine.memory.StepPeak``)."""
    from distillery.engine import memory
    from distillery.engine.builder import build_run

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.min_epochs, cfg.trainer.min_steps = None, None  # StepPeak stops the run
        cfg.trainer.limit_val_batches, cfg.trainer.accelerator = 0, "cpu"
        cfg.trainer.devices, cfg.trainer.num_sanity_val_steps = 1, 0
        cfg.trainer.enable_checkpointing, cfg.trainer.enable_progress_bar = False, False
        cfg.trainer.pop("strategy", None)
        cfg.trainer.pop("val_check_interval", None)
        cfg.callbacks, cfg.logger = None, None
    datamodule, module, trainer, _ = build_run(cfg, [])
    probe = memory.StepPeak(step)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    if probe.result is None:
        raise RuntimeError(f"measure: the run stopped before training step {step}")
    return probe.result, module, probe.row


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="preflight")
def main(cfg: DictConfig) -> None:
    from rich.console import Console

    from distillery.config.extras import apply_extras
    from distillery.engine import memory
    from distillery.engine import preflight as checks

    apply_extras(cfg)

    def run() -> None:
        result = preflight(cfg)
        console = Console()
        console.print(checks.table(result["findings"]))
        console.print(memory.render(result["estimate"], result["measured"]))
        checks.raise_errors(result["findings"], warn=False)  # shown in the table

    exit_on_config_error(run)


if __name__ == "__main__":
    main()
