"""The one core: package layout, task adapters, frozen models, student initialisation."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import distillery
from conftest import SMALL_MNIST1D
from distillery.config import ConfigError
from distillery.contract import Outputs
from distillery.engine.module import DistillationModule
from distillery.engine.teacher import Teacher, from_model
from distillery.losses import CrossEntropy, HintonKD, TokenKD
from distillery.losses.objective import Objective
from distillery.train import build_run

COMMANDS = {
    "train",
    "evaluate",
    "pipeline",
    "generate",
    "export",
    "aggregate",
    "taps",
    "cache",
    "serve",
    "preflight",
}


def package_modules() -> dict[str, Path]:
    root = Path(distillery.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = ("distillery", *f.relative_to(root).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file, lazy imports too)."""

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                t = owner(n) if n.startswith("distillery") else None
                # a module importing its own package's __init__ (the parent) is no edge
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_every_module_imports_and_there_is_no_import_cycle():
    for info in pkgutil.walk_packages(distillery.__path__, "distillery."):
        importlib.import_module(info.name)
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, bottom to top: a module imports its own layer or the layers below, never a
# higher one (docs/architecture.md draws them). Names are top-level packages or modules.
LAYERS = (
    {"contract", "config"},  # the shared vocabulary; config errors, resolvers, run records
    {"losses", "models", "recipes", "generation", "data", "teacher_cache", "evaluation"},
    {"tasks"},  # task adapters
    {"engine"},  # module, builder, teacher, taps, sharding, checkpoint, remote teacher
    COMMANDS,
)


def folder_of(module: str, mods: dict[str, Path]) -> str:
    """The folder (package) a module lives in; a top-level module (a command, the
    contract) is a unit of its own."""
    folder = module if mods[module].name == "__init__.py" else module.rpartition(".")[0]
    return module if folder == "distillery" else folder


def folder_graph(graph: dict[str, set[str]], mods: dict[str, Path]) -> dict[str, set[str]]:
    """Folder -> the folders its modules import (no self edges)."""
    folders: dict[str, set[str]] = {folder_of(m, mods): set() for m in graph}
    for m, targets in graph.items():
        for t in targets:
            if folder_of(t, mods) != folder_of(m, mods):
                folders[folder_of(m, mods)].add(folder_of(t, mods))
    return folders


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_no_import_cycle_between_folders():
    mods = package_modules()
    cycle = find_cycle(folder_graph(import_graph(mods), mods))
    assert cycle is None, "folders import each other: " + " -> ".join(cycle)


def test_a_lower_layer_never_imports_a_higher_one():
    tops = {m.split(".")[1] for m in package_modules() if m != "distillery"}
    assert tops == set().union(*LAYERS), "every top-level package or module has a layer"
    upward = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in import_graph(package_modules()).items() if m != "distillery"
        for t in targets if layer_of(t) > layer_of(m)
    )  # fmt: skip
    assert not upward, "\n".join(upward)


def test_every_distillery_import_names_a_module_that_exists():
    """Lazy imports too (inside functions), which importing every module does not run."""
    mods = package_modules()
    stale = sorted(
        f"{m}: {node.module}"
        for m, f in mods.items() for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 0
        and (node.module or "").startswith("distillery") and node.module not in mods
    )  # fmt: skip
    assert not stale, stale


def test_the_contract_imports_nothing_of_distillery():
    assert import_graph(package_modules())["distillery.contract"] == set()


def test_the_folder_check_finds_a_cycle_between_folders_of_acyclic_files():
    mods = {m: Path(f"{m.replace('.', '/')}.py") for m in ("distillery.a.x", "distillery.a.y",
                                                         "distillery.b.z")}  # fmt: skip
    files = {"distillery.a.x": {"distillery.b.z"}, "distillery.b.z": {"distillery.a.y"},
             "distillery.a.y": set()}  # fmt: skip
    assert find_cycle(files) is None  # no cycle between files ...
    assert find_cycle(folder_graph(files, mods)) == ["distillery.a", "distillery.b", "distillery.a"]


def test_top_level_modules_are_the_commands_and_each_has_a_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    top = {m.split(".")[1] for m in package_modules() if m.count(".") == 1}
    assert top == set().union(*LAYERS)
    scripts = tomllib.loads((Path(distillery.__file__).parents[2] / "pyproject.toml").read_text())
    targets = scripts["project"]["scripts"]
    assert {t.split(":")[0] for t in targets.values()} == {f"distillery.{c}" for c in COMMANDS}
    for target in targets.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def frozen(out_features: int = 3) -> Teacher:
    return from_model(nn.Linear(4, out_features))


def module(objective: Objective, **kw) -> DistillationModule:
    return DistillationModule(
        student=nn.Linear(4, 3), objective=objective, num_classes=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), **kw,
    )  # fmt: skip


def test_every_frozen_model_is_eval_locked_and_outside_optimizer_and_checkpoint():
    m = module(Objective({"kd": HintonKD()}), teacher=frozen(), frozen={"reference": frozen()})
    m.train()
    assert not m.teacher.training and not m.reference.training
    in_optimizer = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    for name in ("teacher", "reference"):
        assert not any(id(p) in in_optimizer for p in getattr(m, name).parameters())
    state = m.state_dict()
    assert state and all(k.startswith(("student.", "student_norm.")) for k in state)
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["distillery"]["frozen"]) == {"reference"}
    assert ckpt["distillery"]["frozen"]["reference"]["sha256"]
    m.load_state_dict(state)  # refilled from the live frozen models
    with pytest.raises(ValueError, match="teacher weights"):
        m.load_state_dict({**state, "reference.model.weight": torch.zeros(3, 4)})


def test_frozen_models_must_be_teachers_with_free_names():
    with pytest.raises(TypeError, match="frozen.ref"):
        module(Objective({"task": CrossEntropy()}), frozen={"ref": nn.Linear(4, 3)})
    for name in ("student", "teacher", "log", "trainer"):  # the module's, or the teacher's
        with pytest.raises(ValueError, match=f"frozen.{name}: '{name}' is taken"):
            module(Objective({"task": CrossEntropy()}), frozen={name: frozen()})


def test_a_task_refuses_the_other_reduction():
    with pytest.raises(ValueError, match="distill.reduction"):
        module(Objective({"kd": TokenKD()}, reduction="token"), teacher=frozen())


def test_a_per_token_term_under_the_sample_reduction_names_the_key():
    objective = Objective({"kd": TokenKD()})
    logits = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match="distill.reduction: token"):
        objective(Outputs(logits, torch.zeros(2, 5, dtype=torch.long), logits))


def test_step_normalised_options_belong_to_step_normalised_tasks():
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches"):
        module(Objective({"task": CrossEntropy()}), accumulate=2)


def test_scheduled_weights_under_the_token_reduction():
    from distillery.recipes.schedules import LinearWarmupWeight

    objective = Objective(
        {"kd": TokenKD()}, {"kd": LinearWarmupWeight(1.0, warmup_epochs=2)}, reduction="token"
    )
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    half, _ = objective(Outputs(s, labels, t, epoch=1.0))
    full, values = objective(Outputs(s, labels, t, epoch=2.0))
    torch.testing.assert_close(half, 0.5 * values["kd"])
    torch.testing.assert_close(full, values["kd"])
    assert objective.scheduled == ["kd"]


def test_task_must_fit_the_data(train_cfg):
    cfg = train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, "task=causal_lm")
    with pytest.raises(ConfigError, match="task: the causal_lm task reads 'token_logits'"):
        build_run(cfg)


def test_the_data_picks_the_default_task(train_cfg):
    _, m, _, _ = build_run(train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D))
    assert m.task.name == "classification" and m.automatic_optimization


def test_student_init_runs_after_the_student_is_built(train_cfg, tmp_path):
    torch.save({"weight": torch.zeros(10, 100)}, tmp_path / "w.pt")
    cfg = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D,
        "+student_init._target_=test_core.load_last_layer", "+student_init._partial_=true",
        f"+student_init.path={tmp_path / 'w.pt'}",
    )  # fmt: skip
    _, m, _, _ = build_run(cfg)
    last = [p for n, p in m.student.named_parameters() if n.endswith("weight")][-1]
    assert bool((last == 0).all())
    bad = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D,
        "+student_init._target_=test_core.load_last_layer", "+student_init._partial_=true",
        f"+student_init.path={tmp_path / 'missing.pt'}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="student_init"):
        build_run(bad)


def load_last_layer(student: nn.Module, path: str) -> None:
    """A student_init step for the test: the last Linear's weight from a file."""
    weight = torch.load(path)["weight"]
    last = [m for m in student.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.copy_(weight)


def test_a_checkpoint_from_before_the_unified_core_still_loads(mnist1d_teacher_ckpt, tmp_path):
    """Format-1 metadata named the teacher sources at distillery.teacher.* and kept
    embeddings_from in the student config; reading it gives today's layout."""
    from distillery.engine.checkpoint import read_checkpoint
    from distillery.evaluate import rebuild_teacher

    ckpt = torch.load(mnist1d_teacher_ckpt, weights_only=True)
    meta = ckpt["distillery"]
    meta["format"] = 1
    meta["config"]["student"]["embeddings_from"] = "/nowhere"
    meta["teacher"] = {
        "source": "run_checkpoint",
        "sha256": Teacher(torch.nn.Identity()).provenance["sha256"],
        "config": {"_target_": "distillery.teacher.from_run_checkpoint", "ckpt_path": "x"},
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    new = read_checkpoint(tmp_path / "old.ckpt")["distillery"]
    assert new["format"] == 3 and "embeddings_from" not in new["config"]["student"]
    assert new["teacher"]["config"]["_target_"] == "distillery.engine.teacher.from_run_checkpoint"
    with pytest.raises(ConfigError, match="teacher.ckpt_path: file not found: x"):
        rebuild_teacher(read_checkpoint(tmp_path / "old.ckpt"))  # today's source runs


def test_a_checkpoint_from_before_the_layers_still_rebuilds(mnist1d_teacher_ckpt, tmp_path):
    """Format-2 checkpoints recorded their targets under distillery.core.*; reading one
    names today's paths, and every target it names can be imported."""
    from hydra.utils import get_object

    from distillery.config import MOVED_TARGETS
    from distillery.engine.checkpoint import read_checkpoint

    ckpt = torch.load(mnist1d_teacher_ckpt, weights_only=True)
    meta = ckpt["distillery"]
    meta["format"] = 2
    old = {"module": "distillery.core.module.DistillationModule",
           "objective": "distillery.core.objective.Objective",
           "task": "distillery.core.tasks.ClassificationTask",
           "teacher": "distillery.core.teacher.from_run_checkpoint",
           "init": "distillery.core.checkpoint.init_from_run",
           "remote": "distillery.core.remote_teacher.from_remote",
           "strategy": "distillery.core.sharding.FSDP2Strategy",
           "callback": "distillery.core.callbacks.ModelCheckpoint"}  # fmt: skip
    meta["config"]["recorded"] = {k: {"_target_": v} for k, v in old.items()}
    torch.save(ckpt, tmp_path / "old.ckpt")
    new = read_checkpoint(tmp_path / "old.ckpt")["distillery"]
    for key, node in new["config"]["recorded"].items():
        assert not node["_target_"].startswith("distillery.core."), key
        assert callable(get_object(node["_target_"])), node["_target_"]
    assert {old for old, _ in MOVED_TARGETS[1:]} == {
        v.rsplit(".", 1)[0] + "." for v in old.values()
    }  # every moved prefix is exercised here


class NaNOnCall(CrossEntropy):
    """Cross-entropy that is NaN on the given calls (1-based): a loss that blows up."""

    def __init__(self, bad_calls: list[int]):
        super().__init__()
        self.bad, self.calls = set(bad_calls), 0

    def forward(self, out):
        self.calls += 1
        loss = super().forward(out)
        return loss * float("nan") if self.calls in self.bad else loss


def nan_run(train_cfg, *overrides):
    cfg = train_cfg(
        "experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=-1",
        "++trainer.max_steps=6", "++trainer.limit_val_batches=0", "callbacks=none",
        "+distill.terms.nan._target_=test_core.NaNOnCall", "+distill.terms.nan.bad_calls=[3]",
        *overrides,
    )  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    return datamodule, module, trainer


def test_a_non_finite_loss_stops_the_run_naming_terms_step_and_samples(train_cfg):
    datamodule, module, trainer = nan_run(train_cfg)
    with pytest.raises(FloatingPointError, match=r"step 2: terms \['nan'\], sample ids \[\d+"):
        trainer.fit(module, datamodule=datamodule)


def test_skip_drops_the_step_and_leaves_the_optimizer_state_alone(train_cfg):
    datamodule, module, trainer = nan_run(
        train_cfg, "+module.nan_policy=skip", "+module.max_skipped_share=0.5"
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.nan_guard.skipped == 1
    state = trainer.optimizers[0].state
    steps = {int(s["step"]) for s in state.values()}
    assert steps == {trainer.global_step - 1}  # the skipped step never reached the optimizer
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    assert trainer.callback_metrics["train/skipped_steps"] == 1


def test_too_many_skips_stop_the_run(train_cfg):
    datamodule, module, trainer = nan_run(
        train_cfg, "+module.nan_policy=skip", "+module.max_skipped_share=0.0"
    )
    with pytest.raises(FloatingPointError, match="max_skipped_share"):
        trainer.fit(module, datamodule=datamodule)


def test_bf16_teacher_halves_its_memory_and_keeps_the_loss(train_cfg, mnist1d_teacher_ckpt):
    """teacher.dtype=bf16: weights and forward in bfloat16 (half the bytes), float32
    outputs; the first step's KD term (the only term the teacher's dtype can move) within
    bf16's precision of the float32 teacher's; the report card rebuilds it from the
    checkpoint's provenance (hash of the loaded weights)."""
    from distillery.config import ConfigError
    from distillery.evaluate import rebuild_teacher
    from distillery.train import build_run

    base = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=300", "debug=fdr",
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "seed=5"]  # fmt: skip
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["teacher.dtype=bf16"])):
        datamodule, module, trainer, _ = build_run(train_cfg(*base, *extra))
        runs[name] = module
        trainer.fit(module, datamodule=datamodule)
        runs[name + "_kd"] = float(trainer.callback_metrics["train/loss/kd"])
    size = {
        n: sum(p.numel() * p.element_size() for p in runs[n].teacher.parameters())
        for n in ("fp32", "bf16")
    }
    assert size["bf16"] * 2 == size["fp32"]
    assert {p.dtype for p in runs["bf16"].teacher.parameters()} == {torch.bfloat16}
    x = torch.randn(64, 40)
    logits = {n: runs[n].teacher(x) for n in ("fp32", "bf16")}
    assert logits["bf16"].dtype == torch.float32
    # bf16 keeps 8 significant bits: unit roundoff u = 2^-8 per rounding. The teacher's
    # logits, rounded through its few layers, stay within 4u of their scale (measured:
    # 1.2u), and the KD term (smooth in them; student and batch equal in both runs) within
    # 4u relative (measured: 0.7u); outputs off by 2 % (5u) fail both, and a teacher that
    # is not really in bf16 fails the inequalities.
    u = 2.0**-8
    err = (logits["bf16"] - logits["fp32"]).abs().max() / logits["fp32"].abs().max()
    assert 0 < err <= 4 * u, err
    assert runs["bf16_kd"] != runs["fp32_kd"]
    assert runs["bf16_kd"] == pytest.approx(runs["fp32_kd"], rel=4 * u)
    ckpt = {"distillery": {"teacher": runs["bf16"].teacher.provenance}}
    assert rebuild_teacher(ckpt).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="teacher.dtype: teacher.dtype must be one of"):
        build_run(train_cfg(*base, "teacher.dtype=int3"))


def test_terms_are_logged_when_the_logger_writes_and_on_the_last_batch(
    train_cfg, mnist1d_teacher_ckpt
):
    """``train/loss`` every batch; the terms on the batches the logger writes
    (``log_every_n_steps=4``: the 4th) and on the last (the 6th), so every row the CSV
    logger wrote holds them and ``callback_metrics`` end with the last batch's values;
    a callback that stops the run at the 3rd batch makes it the last one logged."""
    import csv

    import lightning as L

    class StopAt(L.Callback):
        def __init__(self, step: int):
            self.step = step

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.step:
                trainer.should_stop = True

    def run(out: str, *callbacks):
        cfg = train_cfg(
            "++trainer.min_epochs=0",  # a stop may come before the end of the first epoch
            "experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=300",
            "trainer.max_epochs=-1", f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
            "++trainer.max_steps=6", "logger=csv", "++trainer.limit_val_batches=0",
            "callbacks=none", "trainer.log_every_n_steps=4", out=Path(cfg_root) / out,
        )  # fmt: skip
        datamodule, module, trainer, _ = build_run(cfg)
        trainer.callbacks.extend(callbacks)
        logged: list[tuple[int, str, float]] = []
        log = module.log

        def spy(name, value, *args, **kwargs):
            if name.startswith("train/"):
                logged.append((trainer.global_step, name, float(torch.as_tensor(value).detach())))
            return log(name, value, *args, **kwargs)

        module.log = spy
        trainer.fit(module, datamodule=datamodule)
        steps = {n: [s for s, m, _ in logged if m == n] for n in ("train/loss", "train/loss/kd")}
        last_kd = [v for _, n, v in logged if n == "train/loss/kd"][-1]
        assert float(trainer.callback_metrics["train/loss/kd"]) == pytest.approx(last_kd)
        return steps, cfg

    cfg_root = train_cfg("experiment=mnist1d_kd").paths.output_dir
    steps, cfg = run("full")
    # train/loss is logged in training_step (before the step's update), terms after it
    assert steps == {"train/loss": [0, 1, 2, 3, 4, 5], "train/loss/kd": [4, 6]}
    rows = list(
        csv.DictReader(
            next(Path(cfg.paths.output_dir).rglob("metrics.csv")).read_text().splitlines()
        )
    )
    written = [r for r in rows if r.get("train/loss")]
    assert written and all(r["train/loss/kd"] and r["train/loss/task"] for r in written)
    steps, _ = run("stopped", StopAt(3))
    assert steps == {"train/loss": [0, 1, 2], "train/loss/kd": [3]}
