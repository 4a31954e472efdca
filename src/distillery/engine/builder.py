"""Build a run from its config: data, student (and its initialisation), teacher and
other frozen models, objective, task adapter, taps and projectors, module, trainer.

Every failure is a :class:`~distillery.config.ConfigError` naming the config key, raised
before anything trains. The objective (each loss term) and the task adapter are built
first, before any data or model, so an argument out of range is reported at once under
its full key (``distill.terms.kd.beta``). Used by the commands (``train``, ``evaluate``,
``taps``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from distillery.config import ArgumentError, ConfigError, build, to_record, validate


def build_frozen_model(node, key: str, cfg: DictConfig | None = None):
    """A frozen model from a teacher-source node: ``_target_`` (the source) plus an
    optional ``dtype`` (``bf16``: weights and forward in bfloat16, see
    ``Teacher.cast``), with its config recorded in its provenance; or, with ``cache``
    (a directory written by ``python -m distillery.cache``), its cached outputs, once
    the cache is shown to come from this teacher config and ``cfg``'s data."""
    from omegaconf import OmegaConf, open_dict

    from distillery.engine.teacher import Teacher

    if node is None:
        return None
    node = OmegaConf.create(node) if isinstance(node, dict) else node
    if "_target_" not in node:
        raise ConfigError(
            [f"{key}: no teacher source (_target_), only {sorted(node)}; choose one with "
             f"{key}=<source>, or run the no-teacher control with control=true"]
        )  # fmt: skip
    source = node.copy()
    with open_dict(source):
        dtype = source.pop("dtype", None)
        cache = source.pop("cache", None)
    teacher_node = node.copy()  # what the provenance records: the teacher, not the cache
    with open_dict(teacher_node):
        teacher_node.pop("cache", None)
    if cache is not None:
        from distillery.engine.teacher import cached_teacher

        if key != "teacher":
            raise ConfigError([f"{key}.cache: only the teacher reads a teacher-output cache"])

        views = to_record(cfg.views) if cfg and cfg.get("views") is not None else None
        run = {"paths": to_record(cfg.paths), "data": to_record(cfg.data), "views": views} if cfg else {}  # fmt: skip
        return cached_teacher(str(cache), to_record(teacher_node), run, key)
    import torch

    with torch.random.fork_rng(devices=[]):  # building it (random init, then its weights)
        model = build(source, key)  # leaves the run's random stream as it was: dropout
        # masks do not depend on which teacher (or teacher cache) the run has
    if not isinstance(model, Teacher):
        raise ConfigError(
            [f"{key}: the teacher source must return a distillery.engine.teacher.Teacher, got {type(model).__name__}"]
        )  # fmt: skip
    model.provenance["config"] = to_record(teacher_node)
    if dtype is not None:
        try:
            model.cast(str(dtype))
        except ValueError as e:
            raise ConfigError([f"{key}.dtype: {e}"]) from e
    return model


def build_teacher(cfg: DictConfig):
    """The teacher from ``cfg.teacher``."""
    return build_frozen_model(cfg.get("teacher"), "teacher", cfg)


def build_taps(cfg: DictConfig, student, teacher, objective, x) -> tuple:
    """Taps from ``cfg.taps`` and, from one dry-run forward, the projectors of every
    feature term (so they exist before the optimizer and checkpoint loading)."""
    import torch

    from distillery.engine.taps import CachedTaps, Taps
    from distillery.losses.feature import FeatureTerm
    from distillery.teacher_cache.store import CachedOutputs

    feature_terms = {n: t for n, t in objective.terms.items() if isinstance(t, FeatureTerm)}
    spec = cfg.get("taps") or {}
    if not feature_terms and not spec:
        return None, None
    if teacher is None:
        raise ConfigError(["taps: feature taps need a teacher, but `teacher` is null"])
    try:
        s_taps = Taps(student, spec.get("student"), "student", detach=False)
        if isinstance(teacher.network, CachedOutputs):  # features stored with its outputs
            t_taps = CachedTaps(teacher.network, spec.get("teacher"))
        else:
            t_taps = Taps(teacher.network, spec.get("teacher"), "teacher", detach=True)
    except ConfigError:
        raise  # already names its key
    except (ValueError, TypeError) as e:
        raise ConfigError([str(e)]) from e
    problems = []
    for name, term in feature_terms.items():
        for side, taps, tap in (
            ("student", s_taps, term.student_tap),
            ("teacher", t_taps, term.teacher_tap),
        ):
            if tap not in taps.specs:
                problems.append(
                    f"distill.terms.{name}: no tap named {tap!r} under taps.{side} ({sorted(taps.specs)})"
                )
    if problems:
        raise ConfigError(problems)
    with s_taps, t_taps, torch.no_grad():
        was_training = student.training
        student.eval()
        teacher(x)
        student(x)
        student.train(was_training)

        def shapes(v):
            return [tuple(t.shape) for t in v] if isinstance(v, list) else tuple(v.shape)

        for name, term in feature_terms.items():
            try:
                term.setup(
                    shapes(s_taps.captured[term.student_tap]),
                    shapes(t_taps.captured[term.teacher_tap]),
                    f"distill.terms.{name}",
                )
            except ConfigError:
                raise  # already names its key
            except (ValueError, KeyError) as e:
                problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    return s_taps, t_taps


def build_frozen(cfg: DictConfig) -> dict:
    """Further frozen models (``frozen: {name: <teacher source>}``, e.g. a DPO reference),
    each under the Teacher contract, with its config in its provenance."""
    return {
        str(name): build_frozen_model(node, f"frozen.{name}")
        for name, node in (cfg.get("frozen") or {}).items()
    }


def build_student(cfg: DictConfig):
    """The student from ``cfg.student``, then ``cfg.student_init(student)`` if set (an
    initialisation step, e.g. embeddings from the teacher's principal components)."""
    student = build(cfg.student, "student")
    init = build(cfg.get("student_init"), "student_init")
    if init is not None:
        try:
            init(student)
        except ConfigError:
            raise  # already names its key
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError([f"student_init: {e}"]) from e
    return student


def build_objective(cfg: DictConfig):
    """The objective from ``cfg.distill``: each term (``distill.terms.<name>``) and each
    weight schedule (``distill.weights.<name>``) built on its own, so an argument its
    constructor refuses (an :class:`~distillery.config.ArgumentError`) is reported under
    its full key (``distill.terms.kd.beta``), then the objective (``_target_``) with
    them. Built in a forked random stream: a term that draws (CRD's memory banks) leaves
    the run's stream, and so the student's initialisation, as it was."""
    import torch
    from omegaconf import OmegaConf, open_dict

    node = cfg.distill
    terms_node = node.get("terms") if isinstance(node, DictConfig) else None
    if not isinstance(terms_node, DictConfig):  # not the usual shape: the objective says
        return build(node, "distill")

    def built(group: str) -> dict:
        values = {}
        for name in node[group]:
            child = node[group][name]
            if isinstance(child, DictConfig) and "_target_" in child:
                values[str(name)] = build(child, f"distill.{group}.{name}")
            elif isinstance(child, DictConfig | ListConfig):
                values[str(name)] = OmegaConf.to_object(child)  # refused by the objective
            else:
                values[str(name)] = child
        return values

    with torch.random.fork_rng(devices=[]):
        terms = built("terms")
        weights = built("weights") if isinstance(node.get("weights"), DictConfig) else None
    rest = node.copy()  # keeps its parent: interpolations resolve as before
    with open_dict(rest):
        rest.pop("terms")
        if weights is not None:
            rest.pop("weights")
        rest["_partial_"] = True
    factory = build(rest, "distill")
    kwargs = {"terms": terms} if weights is None else {"terms": terms, "weights": weights}
    try:
        return factory(**kwargs)
    except ConfigError:
        raise  # already names its key
    except ArgumentError as e:
        raise ConfigError([e.under("distill")]) from e
    except (ValueError, TypeError) as e:  # the objective's messages name distill.<key>
        raise ConfigError([str(e) if str(e).startswith("distill") else f"distill: {e}"]) from e


def build_task(cfg: DictConfig, datamodule, task=None):
    """The task adapter: ``task`` (already built from ``cfg.task``), else ``cfg.task`` if
    set, else the default for the datamodule's ``output_kind``; the two must agree."""
    from distillery.tasks import Task, task_for

    kind = getattr(datamodule, "output_kind", "logits")
    if task is None:
        task = build(cfg.get("task"), "task")
    if task is None:
        try:
            task = task_for(kind)
        except ValueError as e:
            raise ConfigError([str(e)]) from e
    if not isinstance(task, Task):
        raise ConfigError([f"task: expected a distillery.tasks.Task, got {type(task).__name__}"])
    if task.output_kind != kind:
        raise ConfigError(
            [f"task: the {task.name} task reads {task.output_kind!r} data, but data gives {kind!r}"]
        )
    task.bind(datamodule)
    return task


def control_config(cfg: DictConfig) -> DictConfig:
    """``control=true``: the run's no-teacher control, the same student, data, views,
    schedule and seed without the teacher, other frozen models and taps (the objective
    drops its teacher-only terms in :func:`control_objective`). Data the teacher wrote
    (``data.source`` or ``data.responses`` with a ``distillery.generate`` provenance file) is refused: a
    control trained on it still learns from the teacher."""
    from omegaconf import open_dict

    for key in ("source", "responses"):
        source = (cfg.get("data") or {}).get(key)
        meta = Path(str(source) + ".meta.json") if isinstance(source, str) else None
        if meta is not None and meta.is_file() and "teacher_sha256" in meta.read_text():
            raise ConfigError(
                [f"control: data.{key} {source} holds teacher generations ({meta.name}, "
                 f"written by distillery.generate); a no-teacher control must not train on "
                 f"them: point data.{key} at the original data (e.g. experiment=text_lm_baseline "
                 f"or arith_sft)"]
            )  # fmt: skip
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.teacher, cfg.frozen, cfg.taps = None, None, None
    return cfg


def control_objective(cfg: DictConfig, objective, task):
    """The objective without its teacher-only terms; when no label term is left (e.g.
    function matching), the task's supervised term (``task.control_term``). The recorded
    config (``cfg.distill``) is rewritten to match."""
    from omegaconf import OmegaConf, open_dict

    from distillery.losses.objective import Objective

    keep = {n: t for n, t in objective.terms.items() if not t.needs_teacher}
    dropped = [n for n in objective.terms if n not in keep]
    weights = {n: objective.weights[n] for n in keep}
    with open_dict(cfg):
        for name in dropped:
            cfg.distill.terms.pop(name, None)
            if cfg.distill.get("weights"):
                cfg.distill.weights.pop(name, None)
        if not keep:
            fallback = task.control_term()
            if fallback is None:
                raise ConfigError(
                    [f"control: every term of distill.terms ({dropped}) needs a teacher, and the "
                     f"{task.name} task has no supervised term to train its control with"]
                )  # fmt: skip
            name, node = fallback
            cfg.distill.terms[name] = OmegaConf.create(node)
            keep, weights = {name: build(cfg.distill.terms[name], f"distill.terms.{name}")}, {}
    return Objective(keep, weights, reduction=objective.reduction.name)


def check_cached_teacher(cfg: DictConfig, teacher, task) -> None:
    """A cached teacher (``teacher.cache``) holds outputs for fixed inputs and has no
    modules: refuse what needs a live teacher, naming the key."""
    if teacher is None or "cache" not in teacher.provenance:
        return
    from distillery.teacher_cache.store import unsupported

    problems = unsupported(cfg, task)
    if problems:
        raise ConfigError(problems)


def connect_remote_teacher(teacher, task, datamodule) -> None:
    """``teacher=remote`` (``engine/remote_teacher.py``): token tasks only; connect to the
    endpoint with the tokenizer the teacher reads in this run (the student's, or
    ``data.teacher_tokenizer``'s for a cross-tokenizer objective), recording what it
    serves in the teacher's provenance; and have the training loader hand each batch to
    the teacher as it is drawn (``teacher.prefetch`` batches ahead), unless the run
    trains on the student's own samples (those are drawn in the step). A no-op for other
    teachers, and once connected."""
    from distillery.data.sampling import ResumableLoader
    from distillery.engine.remote_teacher import remote_of
    from distillery.generation import special_ids

    remote = remote_of(teacher)
    if remote is None or remote.store is not None:
        return
    if task.name not in ("causal_lm", "generative_lm"):
        raise ConfigError([f"teacher: a remote teacher serves next-token log-probabilities (tasks causal_lm, generative_lm); this run's task is {task.name}"])  # fmt: skip
    load_teacher = getattr(datamodule, "load_teacher_tokenizer", None)
    teacher_tok = load_teacher() if load_teacher is not None else None
    if teacher_tok is not None:
        tok, key, pad_id = teacher_tok, "data.teacher_tokenizer", special_ids(teacher_tok)[1]
    else:
        tok, key, pad_id = datamodule.load_tokenizer(), "data.tokenizer", getattr(datamodule, "pad_id", None)  # fmt: skip
    try:
        teacher.provenance.update(remote.connect(tok, pad_id, key))
    except (ValueError, ConnectionError) as e:
        raise ConfigError([str(e)]) from e
    if remote.prefetch_depth and not (getattr(task, "on_policy", 0) or getattr(task, "preference_samples", 0)):  # fmt: skip
        make_loader = datamodule.train_dataloader

        def ask_ahead(batch: dict) -> None:
            x = task.teacher_input(batch)
            if x is not None:
                remote.prefetch(x)

        def prefetching_train_dataloader():
            loader = make_loader()
            if isinstance(loader, ResumableLoader):  # token tasks: one training loader
                loader.lookahead = (remote.prefetch_depth, ask_ahead)  # data/sampling.py
            return loader

        datamodule.train_dataloader = prefetching_train_dataloader


def check_processes(cfg: DictConfig) -> None:
    """Refuse more CPU processes than this machine has cores (``trainer.devices`` x
    ``trainer.num_nodes`` on ``accelerator: cpu``) unless ``allow_oversubscription``, and
    several processes without a seed."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, list | ListConfig) else devices
    nodes = int(trainer.get("num_nodes") or 1)  # devices "auto" / -1: not known here
    many = nodes > 1 or (isinstance(count, int) and count > 1)
    if many and cfg.get("seed") is None:
        raise ConfigError(
            ["seed: null with several processes: each would draw its own data order, and the "
             "ranks' shards would overlap; set a seed"]
        )  # fmt: skip
    if trainer.get("accelerator") != "cpu" or not isinstance(devices, int):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if devices > (cores or 1) and not cfg.get("allow_oversubscription"):
        raise ConfigError(
            [f"trainer.devices: {devices} CPU processes on a machine with {cores} cores; use at "
             f"most {cores} (or set allow_oversubscription=true)"]
        )  # fmt: skip


def check_optimization(optimizer, scheduler) -> None:
    """Build the optimizer and schedule once on a probe parameter: hyperparameters torch
    or a schedule refuses (a negative lr, a warmup longer than the schedule) are reported
    before any data or model is built."""
    import torch

    try:
        probe = optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        raise ConfigError([f"optimizer: {e}"]) from e
    try:
        if scheduler is not None:
            scheduler(optimizer=probe)
    except (ValueError, TypeError) as e:
        raise ConfigError([f"scheduler: {e}"]) from e


def check_optimized_metric(cfg: DictConfig, module) -> None:
    """A sweep's ``optimized_metric`` must be one the run logs (known before training from
    the objective's terms and the task's metrics), not found missing after the last epoch."""
    name = cfg.get("optimized_metric")
    if name is None:
        return
    terms = list(module.objective.terms)
    logged = {"train/loss", *(f"train/loss/{t}" for t in terms)}
    logged |= {f"train/weight/{t}" for t in module.objective.scheduled}
    logged |= {f"{stage}/{m}" for stage in ("val", "test") for m, _ in module.val_metrics.items()}
    if not module.automatic_optimization:
        logged.add("train/tokens")
    if name not in logged:
        raise ConfigError(
            [f"optimized_metric: this run never logs {name!r} (it logs {sorted(logged)})"]
        )


def health_rules(cfg: DictConfig, module) -> list[dict]:
    """``health.stop_on``, checked against the metrics the run logs (keys named)."""
    from omegaconf import OmegaConf

    from distillery.evaluation.health import check_rules

    node = (cfg.get("health") or {}).get("stop_on")
    if not node:
        return []
    logged = {f"{stage}/{m}" for stage in ("val",) for m, _ in module.val_metrics.items()}
    return check_rules(OmegaConf.to_container(node, resolve=True), logged)


def build_run(cfg: DictConfig, findings: list | None = None):
    """Validate the config, then build (datamodule, module, trainer, loggers). The
    preflight's errors (``engine/preflight.py``) are raised, its warnings logged, unless
    ``findings`` (a list) is given: then they are appended there (the preflight command)."""
    control = bool(cfg.get("control"))
    if control:
        cfg = control_config(cfg)
    validate(cfg)
    import lightning as L
    from lightning.pytorch.callbacks.progress import ProgressBar as ProgressBarBase
    from torch import nn

    from distillery.config.extras import build_list
    from distillery.engine import preflight
    from distillery.engine.callbacks import ProgressBar
    from distillery.engine.checkpoint import AtomicCheckpointIO
    from distillery.engine.loggers import log_hyperparameters, single_lightning_log
    from distillery.engine.module import DistillationModule, count_params
    from distillery.engine.sharding import check_plan
    from distillery.models.input_norm import InputNorm

    single_lightning_log()

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    check_processes(cfg)
    if cfg.get("ckpt_path") not in (None, "last", "best", "hpc"):  # resume: checked up front
        from distillery.engine.checkpoint import read_checkpoint

        try:
            read_checkpoint(cfg.ckpt_path, "ckpt_path")
        except ConfigError:
            raise  # already names its key
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError([str(e)]) from e
    optimizer = build(cfg.optimizer, "optimizer")
    scheduler = build(cfg.get("scheduler"), "scheduler")
    check_optimization(optimizer, scheduler)
    objective = build_objective(cfg)  # every term's arguments checked before data and models
    task = build(cfg.get("task"), "task")  # and the task's options
    datamodule = build(cfg.data, "data")
    task = build_task(cfg, datamodule, task)
    if control:
        objective = control_objective(cfg, objective, task)
    student = build_student(cfg)
    teacher = build_teacher(cfg)
    connect_remote_teacher(teacher, task, datamodule)
    frozen = build_frozen(cfg)
    if teacher is not None or frozen:  # frozen models are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    student_norm = InputNorm.from_config(getattr(datamodule, "input_norm", None))
    example = datamodule.example_input(2)
    num_classes = getattr(datamodule, "num_classes", None)
    task.check_models(cfg, nn.Sequential(student_norm, student), teacher, datamodule, example)
    checked = preflight.run_checks(cfg, student, teacher, datamodule, task)
    if findings is None:
        preflight.raise_errors(checked)
    else:
        findings.extend(checked)
    check_cached_teacher(cfg, teacher, task)
    student_taps, teacher_taps = build_taps(cfg, student, teacher, objective, example)
    module_factory = build(cfg.get("module"), "module") or DistillationModule
    try:
        module = module_factory(
            student=student,
            objective=objective,
            optimizer=optimizer,
            task=task,
            scheduler=scheduler,
            num_classes=num_classes,
            teacher=teacher,
            frozen=frozen,
            student_norm=student_norm,
            views=build(cfg.get("views"), "views"),
            student_taps=student_taps,
            teacher_taps=teacher_taps,
            run_config=to_record(cfg),
            **({"log_health": True} if (cfg.get("health") or {}).get("log") else {}),
        )
    except ConfigError:
        raise  # already names its key
    except (ValueError, TypeError) as e:
        raise ConfigError([str(e)]) from e

    check_optimized_metric(cfg, module)
    callbacks = build_list(cfg.get("callbacks"), "callbacks")
    rules = health_rules(cfg, module)
    if rules:
        from distillery.evaluation.health import HealthGuard

        callbacks.append(HealthGuard(rules))
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, ProgressBarBase) for c in callbacks
    ):  # Lightning's rich bar, step-based runs shown without "/-2"
        callbacks.append(ProgressBar())
    loggers = build_list(cfg.get("logger"), "logger")
    strategy = cfg.trainer.get("strategy", "auto")
    plugins = [AtomicCheckpointIO()] if strategy in ("auto", "ddp", "ddp_spawn", None) else []
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers, plugins=plugins)
    check_plan(module, trainer.strategy)  # trainer=fsdp2: units exist, a replicated teacher fits
    log_hyperparameters(
        trainer,
        cfg,
        {
            "params/student": count_params(student),
            "params/teacher": count_params(teacher) if teacher is not None else None,
            "params/compression": count_params(teacher) / count_params(student)
            if teacher is not None and count_params(teacher)
            else None,
        },
    )
    return datamodule, module, trainer, loggers
