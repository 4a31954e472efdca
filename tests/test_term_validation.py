"""Every loss term and task option checks its arguments when built, before any data or
model: a value out of range is one ``ConfigError`` naming its full key
(``distill.terms.<name>.<arg>``, ``task.<arg>``), exit code 2.

The terms are discovered (every ``LossTerm`` subclass with a ``forward`` in the modules of
``distillery.losses``, and every ``_target_: distillery.losses.*`` under ``conf/``); the
table below must give bad values for every argument of every one of them, so a new term
or a new argument without a range check fails here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

import distillery.losses
from conftest import PROJECT_ROOT, compose_cfg
from distillery.config import ConfigError
from distillery.contract import LossTerm
from distillery.engine import builder
from distillery.tasks import TASKS

CONF = PROJECT_ROOT / "conf"

# class name -> [(the argument the error must name, the arguments given)]. Entries of a base
# class (FeatureTerm) apply to its subclasses whose signature has those arguments.
BAD: dict[str, list[tuple[str, dict]]] = {
    "FeatureTerm": [("student", {"student": ""}), ("teacher", {"teacher": ""}),
                    ("projector", {"projector": "linear"})],
    "CrossEntropy": [("label_smoothing", {"label_smoothing": -0.1}),
                     ("label_smoothing", {"label_smoothing": 1.0})],
    "HintonKD": [("temperature", {"temperature": 0.0}), ("temperature", {"temperature": -1.0})],
    "DKD": [("alpha", {"alpha": -1.0}), ("beta", {"beta": -0.5}), ("beta", {"alpha": 0.0, "beta": 0.0}),
            ("temperature", {"temperature": 0.0}), ("warmup_epochs", {"warmup_epochs": -1.0})],
    "DPO": [("beta", {"beta": 0.0}), ("label_smoothing", {"label_smoothing": 0.5}),
            ("label_smoothing", {"label_smoothing": -0.1}), ("reference", {"reference": ""})],
    "EmbeddingCosine": [],
    "EmbeddingMSE": [],
    "SimilarityMatch": [],
    "TokenCrossEntropy": [],
    "TokenKD": [("kind", {"kind": "kl"}), ("temperature", {"temperature": 0.0}),
                ("beta", {"beta": 2.0}), ("beta", {"beta": -0.1}), ("alpha", {"alpha": 0.0}),
                ("alpha", {"alpha": 1.0}), ("chunk_size", {"chunk_size": 0}),
                ("vocab_align", {"vocab_align": "pad"})],
    "FusedTokenLoss": [("kind", {"kind": "kl"}), ("temperature", {"temperature": -1.0}),
                       ("beta", {"beta": 1.5}), ("alpha", {"alpha": 1.0}),
                       ("ce_weight", {"ce_weight": -1.0}), ("kd_weight", {"kd_weight": -1.0}),
                       ("kd_weight", {"kd_weight": 0.0, "ce_weight": 0.0}),
                       ("chunk_size", {"chunk_size": 0}), ("chunk_size", {"chunk_size": None})],
    "ULD": [("temperature", {"temperature": 0.0})],
    "FitNet": [],
    "CosineFeature": [],
    "AttentionTransfer": [("p", {"p": 0.0})],
    "AttentionMapKL": [("eps", {"eps": 0.0})],
    "HiddenStates": [("kind", {"kind": "l1"}), ("layer_map", {"layer_map": [0, -1]}),
                     ("layer_map", {"layer_map": []})],
    "ValueRelationKL": [("relation_heads", {"relation_heads": 0})],
    "SimilarityPreserving": [],
    "PKT": [("eps", {"eps": 0.0})],
    "RKD": [("distance_weight", {"distance_weight": -1.0}), ("angle_weight", {"angle_weight": -1.0}),
            ("angle_weight", {"distance_weight": 0.0, "angle_weight": 0.0})],
    "CRD": [("bank_size", {"bank_size": 1}), ("feat_dim", {"feat_dim": 0}),
            ("num_negatives", {"num_negatives": 0}), ("temperature", {"temperature": 0.0}),
            ("momentum", {"momentum": 1.0}), ("momentum", {"momentum": -0.1})],
}  # fmt: skip
# Arguments every value of their type is valid for (so no bad value), with the reason.
ANY_VALUE = {("AttentionMapKL", "average_heads"): "either bool"}
# Values for the required arguments (valid ones).
REQUIRED = {"student": "s", "teacher": "t", "bank_size": 16}


def discovered_terms() -> dict[str, type]:
    """Every LossTerm subclass defined in a module of distillery.losses that computes a
    loss (a ``forward`` of its own or inherited, not LossTerm's)."""
    found = {}
    for info in pkgutil.iter_modules(distillery.losses.__path__):
        module = importlib.import_module(f"distillery.losses.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, LossTerm)
                and cls.__module__ == module.__name__
                and cls.forward is not LossTerm.forward
            ):
                found[cls.__name__] = cls
    return found


OBJECTIVE = "distillery.losses.objective.Objective"  # the terms' sum, not a term


def shipped_term_nodes() -> list[tuple[str, dict]]:
    """(file, node) for every ``_target_: distillery.losses.*`` term node under conf/."""
    nodes = []

    def walk(value, path):
        if isinstance(value, dict):
            target = str(value.get("_target_", ""))
            if target.startswith("distillery.losses.") and target != OBJECTIVE:  # a term
                nodes.append((path, value))
            for v in value.values():
                walk(v, path)
        elif isinstance(value, list):
            for v in value:
                walk(v, path)

    for path in sorted(CONF.rglob("*.yaml")):
        if "distillery.losses." in path.read_text():
            walk(OmegaConf.to_container(OmegaConf.load(path)), str(path.relative_to(CONF)))
    return nodes


def params(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # fmt: skip


def bad_values(cls) -> list[tuple[str, dict]]:
    """The table's entries for ``cls`` and its bases, those whose arguments it takes."""
    own = params(cls)
    entries = []
    for base in cls.__mro__:
        for arg, given in BAD.get(base.__name__, []):
            if set(given) <= set(own):
                entries.append((arg, given))
    return entries


def node_for(cls, given: dict) -> dict:
    required = {n: REQUIRED[n] for n, p in params(cls).items() if p.default is p.empty}
    return {"_target_": f"{cls.__module__}.{cls.__name__}", **required, **given}


CASES = [(name, arg, given) for name, cls in sorted(discovered_terms().items())
         for arg, given in bad_values(cls)]  # fmt: skip


def test_every_term_is_discovered_and_has_bad_values_for_each_argument():
    terms = discovered_terms()
    assert len(terms) >= 20, sorted(terms)  # the discovery works
    assert set(terms) <= set(distillery.losses.__all__), "a term not exported by distillery.losses"
    shipped = {node["_target_"].rsplit(".", 1)[1] for _, node in shipped_term_nodes()}
    assert shipped and shipped <= set(terms), shipped - set(terms)
    missing = sorted(set(terms) - set(BAD))
    assert not missing, f"terms without an entry in BAD (add their bad values): {missing}"
    for name, cls in terms.items():
        covered = {arg for arg, _ in bad_values(cls)}
        unchecked = [a for a in params(cls) if a not in covered and (name, a) not in ANY_VALUE]
        assert not unchecked, f"{name}: arguments with no bad value in BAD: {unchecked}"
        needed = [n for n, p in params(cls).items() if p.default is p.empty]
        assert set(needed) <= set(REQUIRED), f"{name}: no valid value in REQUIRED for {needed}"
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(discovered_terms()))
def test_each_term_builds_with_its_defaults_and_the_shipped_configs(name):
    """The table's failures come from the bad value: the term builds without it, and
    every node under conf/ that names it builds too."""
    cls = discovered_terms()[name]
    cfg = OmegaConf.create({"distill": {"_target_": "distillery.losses.objective.Objective",
                                        "terms": {"probe": node_for(cls, {})}}})  # fmt: skip
    assert isinstance(builder.build_objective(cfg).terms["probe"], cls)
    for path, node in shipped_term_nodes():
        if node["_target_"].rsplit(".", 1)[1] == name and "${" not in str(node):
            cfg = OmegaConf.create({"distill": {"_target_": "distillery.losses.objective.Objective",
                                                "terms": {"probe": node}}})  # fmt: skip
            assert isinstance(builder.build_objective(cfg).terms["probe"], cls), path


@pytest.fixture(scope="module")
def base_cfgs(tmp_path_factory):
    """Composed once: a classifier run and a prompt/answer run whose teacher file does not
    exist (loading it would fail with another message)."""
    tmp = tmp_path_factory.mktemp("term_validation")
    common = [f"paths.output_dir={tmp}/run", f"paths.data_dir={tmp}/data",
              f"paths.artifacts_dir={tmp}/artifacts", "extras.print_config=false",
              f"teacher.ckpt_path={tmp}/no_teacher.ckpt"]  # fmt: skip
    return {
        "classifier": compose_cfg("train", ["experiment=mnist1d_kd", *common]),
        "generative": compose_cfg("train", ["experiment=arith_gkd", *common]),
    }


@pytest.fixture
def no_models(monkeypatch):
    """Building a model (student, teacher, frozen) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(builder, "build_student", refuse)
    monkeypatch.setattr(builder, "build_frozen_model", refuse)


def one_problem(cfg) -> str:
    from distillery.train import train

    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert len(err.value.problems) == 1, err.value.problems
    assert str(err.value).count("invalid config") == 1
    return err.value.problems[0]


@pytest.mark.parametrize(("name", "arg", "given"), CASES,
                         ids=[f"{n}.{a}={list(g.values())}" for n, a, g in CASES])  # fmt: skip
def test_a_bad_term_argument_is_one_config_error_naming_its_key(
    name, arg, given, base_cfgs, no_models
):
    cfg = base_cfgs["classifier"].copy()
    with open_dict(cfg):
        cfg.distill.terms = {"probe": node_for(discovered_terms()[name], given)}
        cfg.distill.weights = {"probe": 1.0}
    problem = one_problem(cfg)
    assert re.match(rf"distill\.terms\.probe\.{arg}\b(?!\.)", problem), problem


# task option -> [(the argument the error must name, the options given)], per task class.
TASK_BAD: dict[str, list[tuple[str, dict]]] = {
    "ClassificationTask": [],
    "EmbeddingTask": [],
    "CausalLMTask": [],
    "GenerativeLMTask": [("on_policy", {"on_policy": 1.5}), ("on_policy", {"on_policy": -0.1}),
                         ("temperature", {"temperature": -1.0}), ("max_new_tokens", {"max_new_tokens": 0}),
                         ("preference_samples", {"preference_samples": 1}),
                         ("preference_samples", {"preference_samples": -2}),
                         ("on_policy", {"preference_samples": 2, "on_policy": 0.5}),
                         ("preference_ranker", {"preference_ranker": 5})],
}  # fmt: skip
TASK_ANY_VALUE = {"fused": "either bool (checked against the objective once built)"}
TASK_CASES = [(n, a, g) for n, entries in sorted(TASK_BAD.items()) for a, g in entries]


def test_every_task_option_has_bad_values():
    tasks = {cls.__name__: cls for cls in TASKS.values()}
    assert set(tasks) == set(TASK_BAD), "a task adapter without an entry in TASK_BAD"
    for name, cls in tasks.items():
        covered = {a for a, _ in TASK_BAD[name]}
        unchecked = [a for a in params(cls) if a not in covered and a not in TASK_ANY_VALUE]
        assert not unchecked, f"{name}: options with no bad value in TASK_BAD: {unchecked}"


@pytest.mark.parametrize(("name", "arg", "given"), TASK_CASES,
                         ids=[f"{n}.{a}={list(g.values())}" for n, a, g in TASK_CASES])  # fmt: skip
def test_a_bad_task_option_is_one_config_error_naming_its_key(
    name, arg, given, base_cfgs, no_models
):
    cfg = base_cfgs["generative"].copy()
    with open_dict(cfg):
        cfg.task._target_ = f"distillery.tasks.{name}"
        for key, value in given.items():
            cfg.task[key] = value
    problem = one_problem(cfg)
    assert re.match(rf"task\.{arg}\b", problem), problem


def test_the_issue_beta_2_exits_2_naming_the_key_before_any_model(tmp_path, no_models, caplog):
    """``python -m distillery.train experiment=text_lm_kd distill.terms.kd.beta=2
    debug=fdr`` built the models and failed at the first step (exit 1); now it is one
    message naming the key and exit code 2, with no teacher checkpoint on disk at all."""
    from distillery.config import exit_on_config_error
    from distillery.train import train

    cfg = compose_cfg("train", [
        "experiment=text_lm_kd", "distill.terms.kd.beta=2", "debug=fdr",
        f"teacher.ckpt_path={tmp_path}/none.ckpt", f"paths.output_dir={tmp_path}/run",
        f"paths.artifacts_dir={tmp_path}/artifacts", "extras.print_config=false",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        exit_on_config_error(lambda: train(cfg))
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["invalid config:\n  - distill.terms.kd.beta must be in [0, 1], got 2"]
    assert not list(Path(tmp_path).rglob("*.ckpt"))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_term_weight_is_refused_before_any_model(
    weight, base_cfgs, no_models
):
    cfg = base_cfgs["classifier"].copy()
    with open_dict(cfg):
        cfg.distill.weights.kd = weight
    assert one_problem(cfg).startswith("distill.weights.kd must be >= 0 and finite")
