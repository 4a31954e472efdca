"""Every experiment's fully resolved `train` config, to check that a config refactor moves
no number.

    python scripts/resolved_configs.py dump before.json      # at the base commit
    python scripts/resolved_configs.py dump after.json       # after the change
    python scripts/resolved_configs.py compare before.json after.json
    python scripts/resolved_configs.py compare before.json after.json --moved-targets

Each experiment in conf/experiment/ is composed as `train experiment=<name>` (outputs and
the project root pinned to fixed strings, so two checkouts compare equal) and resolved
leaf by leaf: a leaf that cannot resolve here (a `???`, a model package that is not
installed) is kept as its unresolved text. ``--moved-targets`` reads the ``_target_``s of
before.json at today's paths first (``distillery.config.MOVED_TARGETS``, what an old
checkpoint's config goes through), so a move of code alone compares identical.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ["paths.output_dir=/OUTPUT", "paths.root_dir=/ROOT"]


def resolved(node):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        return {str(k): _leaf(node, k) for k in node.keys()}
    if isinstance(node, ListConfig):
        return [_leaf(node, i) for i in range(len(node))]
    return OmegaConf.to_container(node)


def _leaf(parent, key):
    from omegaconf import DictConfig, ListConfig

    try:
        value = parent[key]
    except Exception as e:  # unresolvable here (missing value, absent package)
        return f"<unresolved {parent._get_node(key)._value()!r}: {type(e).__name__}>"
    if isinstance(value, (DictConfig, ListConfig)):
        return resolved(value)
    return value


def dump(path: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distillery.config.resolvers import CONFIG_DIR

    names = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    out = {}
    for name in names:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", [f"experiment={name}", *PINNED])
        out[name] = resolved(cfg)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(out)} experiments -> {path}")


def differences(a, b, where=""):
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b) and set(a) == set(b):  # the order of terms, callbacks, ...
            yield f"{where}: keys in the order {list(a)} -> {list(b)}"
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{where}.{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
            else:
                yield from differences(a[key], b[key], f"{where}.{key}")
    elif a != b:
        yield f"{where}: {a!r} -> {b!r}"


def compare(before: str, after: str, *flags: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (before, after))
    if "--moved-targets" in flags:
        sys.path.insert(0, str(ROOT / "src"))
        from distillery.config import upgrade_targets

        a = upgrade_targets(a)
    found = list(differences(a, b))
    for line in found:
        print(line.lstrip("."))
    print(f"{len(a)} experiments before, {len(b)} after: "
          + ("identical" if not found else f"{len(found)} differences"))  # fmt: skip
    return 1 if found else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    command, *args = sys.argv[1:]
    sys.exit(dump(*args) if command == "dump" else compare(*args))
