"""Config helpers of the commands: ``extras`` (warnings, config printing) and building
every ``_target_`` entry of a group such as ``callbacks`` or ``logger``."""

from __future__ import annotations

import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillery.config import build


def build_list(node: DictConfig | None, key: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as ``callbacks`` or ``logger``."""
    if not node:
        return []
    return [
        build(v, f"{key}.{k}")
        for k, v in node.items()
        if isinstance(v, DictConfig) and "_target_" in v
    ]


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)


def print_config(cfg: DictConfig) -> None:
    """Print the config as a rich tree (unresolved, so ??? values show)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG")
    for key in cfg:
        node = cfg._get_node(key)
        body = OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else str(node._value())
        tree.add(str(key)).add(rich.syntax.Syntax(body, "yaml"))
    rich.print(tree)
