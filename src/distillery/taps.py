"""List the tappable module paths of a run's student or teacher:
``python -m distillery.taps experiment=... [side=teacher]`` (module path, type, output
shape for a batch of 2, timm feature stage). Taps themselves live in
``distillery.engine.taps``.
"""

from __future__ import annotations

import hydra

from distillery.config import build
from distillery.config.resolvers import CONFIG_DIR
from distillery.engine.builder import build_teacher
from distillery.engine.taps import describe


def list_taps(cfg) -> list[tuple[str, str, str, str]]:
    """Tappable module paths of the configured student (or teacher, ``side=teacher``)."""
    data = build(cfg.data, "data")
    example = data.example_input(2)
    if cfg.side == "teacher":
        teacher = build_teacher(cfg)
        if teacher is None:
            raise ValueError("side=teacher but `teacher` is null in the config")
        model, example = teacher.network, teacher.input_norm(example)
    elif cfg.side == "student":
        model = build(cfg.student, "student")
    else:
        raise ValueError(f"side must be student or teacher, got {cfg.side!r}")
    rows = describe(model, example)
    info = getattr(model, "feature_info", None)
    if info is not None:
        entries = info.info if hasattr(info, "info") else info
        stages = {e["module"]: i for i, e in enumerate(entries)}
        return [(p, t, s, f"feature_info:{stages[p]}" if p in stages else "") for p, t, s in rows]
    return [(p, t, s, "") for p, t, s in rows]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="taps")
def main(cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tappable modules of the {cfg.side} (output shapes for a batch of 2)")
    for col in ("path", "type", "output shape", "timm stage"):
        table.add_column(col)
    for row in list_taps(cfg):
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
