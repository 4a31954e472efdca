"""Every bad input answered: one ``ConfigError`` whose message names the config key (or
file), raised before training, leaving no checkpoint or half-written file behind. The
commands turn it into one logged message and exit code 2 (``tests/test_cli.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SMALL_MNIST1D, text_overrides
from distillery.config import ConfigError
from distillery.train import train

MNIST_KD = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=300"]
FM = ["experiment=mnist1d_fm", "data.base.num_samples=1000", "data.base.val_size=200",
      "data.sources.generated.size=300"]  # fmt: skip
FITNET = ["experiment=mnist1d_fitnet", *SMALL_MNIST1D, "data.transfer_size=300"]
BASE = ["experiment=mnist1d_baseline", *SMALL_MNIST1D]

# (case id, overrides, text the message must contain). "{teacher}" is the MNIST-1D teacher
# checkpoint, "{junk}" a file that is not a checkpoint, "{tmp}" the test's folder,
# "{blank}" a distillery.generate jsonl with blank responses (an undertrained teacher's).
CASES = [
    ("missing teacher path", [*MNIST_KD, "teacher.ckpt_path=???"], "teacher.ckpt_path: missing value"),
    ("missing lr", [*MNIST_KD, "optimizer.lr=???"], "optimizer.lr: missing value"),
    ("epochs not a number", [*BASE, "trainer.max_epochs=ten"], "trainer.max_epochs"),
    ("batch size not a number", [*BASE, "data.batch_size=abc"], "data.batch_size"),
    ("unknown student argument", [*BASE, "+student.hiddn=[3]"], "student"),
    ("seed not a number", [*BASE, "seed=abc"], "seed"),
    ("negative lr", [*BASE, "optimizer.lr=-0.1"], "optimizer: Invalid learning rate"),
    ("unknown optimizer", [*BASE, "optimizer._target_=torch.optim.Nope"], "optimizer"),
    ("unknown student class", [*BASE, "student._target_=distillery.models.Nope"], "student"),
    ("teacher file missing", [*MNIST_KD, "teacher.ckpt_path={tmp}/none.ckpt"], "teacher.ckpt_path: file not found"),
    ("teacher file not a checkpoint", [*MNIST_KD, "teacher.ckpt_path={junk}"], "not a readable checkpoint"),
    ("teacher source removed", [*MNIST_KD, "~teacher"], "teacher: no teacher source"),
    ("KD without a teacher", [*BASE, "distill=kd"], "need a teacher"),
    ("negative temperature", [*MNIST_KD, "distill.terms.kd.temperature=-1"], "temperature must be > 0"),
    ("weight for an unknown term", [*MNIST_KD, "+distill.weights.nope=1"], "distill.weights"),
    ("weight not a number", [*MNIST_KD, "distill.weights.kd=heavy"], "distill.weights.kd"),
    ("not a loss term", [*MNIST_KD, "+distill.terms.x._target_=torch.nn.Identity"], "distill.terms.x"),
    ("unknown reduction", [*MNIST_KD, "+distill.reduction=tokens"], "distill.reduction"),
    ("too many CPU processes", [*BASE, "trainer.devices=64"], "trainer.devices: 64 CPU processes"),
    ("negative mixup alpha", [*FM, "teacher.ckpt_path={teacher}", "views.mix.alpha=-1"], "mixup alpha must be > 0"),
    ("warmup longer than the schedule", [*FM, "teacher.ckpt_path={teacher}", "scheduler.warmup_steps=99999"], "scheduler"),
    ("task that does not fit the data", [*BASE, "task=causal_lm"], "task: the causal_lm task"),
    ("step options on a classifier", [*BASE, "+module.accumulate=2"], "module.accumulate"),
    ("no tap at the path", [*FITNET, "teacher.ckpt_path={teacher}", "taps.student.hint=nope.path"], "taps.student.hint.path: no module matches"),
    ("term reads a missing tap", [*FITNET, "teacher.ckpt_path={teacher}", "distill.terms.hint.student=nope"], "no tap named 'nope'"),
    ("frozen model not a teacher", [*MNIST_KD, "+frozen.ref._target_=torch.nn.Identity"], "frozen.ref"),
    ("student_init fails", [*BASE, "+student_init._target_=torch.load", "+student_init._partial_=true", "+student_init.f={tmp}/none.pt"], "student_init"),
    ("resume from a missing file", [*BASE, "ckpt_path={tmp}/none.ckpt"], "ckpt_path: checkpoint not found"),
    ("resume from a non-checkpoint", [*BASE, "ckpt_path={junk}"], "ckpt_path"),
    ("export from a smoke test", [*BASE, "debug=fdr", "export_ckpt={tmp}/a.ckpt"], "export_ckpt: a fast_dev_run"),
    ("unknown timm teacher", [*SMALL_MNIST1D, "distill=kd", "teacher=timm", "teacher.model_name=no_such_net"], "teacher.model_name: unknown timm model"),
    ("experiment keys left in another source", [*MNIST_KD, "teacher=timm", "teacher.model_name=resnet18"], "teacher.ckpt_path: unexpected argument"),
    ("student for other inputs", [*BASE, "student=digits_mlp"], "student: forward on an input"),
    ("student with other classes", [*MNIST_KD, "teacher.ckpt_path={teacher}", "student.num_classes=5"], "student: outputs shape"),
    ("wrong class count", ["experiment=digits_teacher", "data.num_classes=7"], "data.num_classes"),
    ("image folder missing", ["experiment=mnist1d_baseline", "data=imagefolder", "data.root={tmp}/none", "data.num_classes=3", "student=timm", "student.model_name=resnet18"], "data.root"),
    ("precision unknown", [*BASE, "trainer.precision=banana"], "trainer"),
    ("state-dict teacher not a checkpoint", [*SMALL_MNIST1D, "distill=kd", "teacher=state_dict", "+teacher.model._target_=distillery.models.CNN1D", "teacher.path={junk}"], "teacher.path: "),
    ("embedding control", ["experiment=minilm_embed_kd", "control=true"], "control: every term of distill.terms"),
    ("embedding width", ["experiment=minilm_embed_kd", "student.output_dim=100"], "student: outputs shape"),
    ("embedding pad id", ["experiment=minilm_embed_kd", "student.pad_token_id=5"], "pad_token_id"),
    ("negative chunk size", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "distill.terms.kd.chunk_size=-3"], "chunk_size must be a positive"),
    ("unknown divergence", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "distill.terms.kd.kind=xx"], "kind must be one of"),
    ("vocabularies differ", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "student.config.vocab_size=600"], "vocabularies differ"),
    ("student vocab too small", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "student.config.vocab_size=300"], "smaller than the tokenizer"),
    ("fused with logit terms", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "task=causal_lm", "task.fused=true"], "task.fused: distill.terms.ce (TokenCrossEntropy) reads logits"),
    ("fused without fused task", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "distill=token_kd_fused"], "set task=causal_lm task.fused=true"),
    ("zero accumulation", ["experiment=text_lm_kd", "{text}", "{text_teacher}", "module.accumulate=0"], "module.accumulate must be >= 1"),
    ("tokenizer missing", ["experiment=text_lm_baseline", "{text}", "data.tokenizer={tmp}/no_tokenizer"], "data.tokenizer"),
    ("sweep metric never logged", [*MNIST_KD, "optimized_metric=val/accuracy"], "optimized_metric: this run never logs 'val/accuracy'"),
    ("sweep metric misspelt", [*MNIST_KD, "hparams_search=kd_optuna", "optimized_metric=val/acc_"], "optimized_metric"),
    ("text file missing", ["experiment=text_lm_baseline", "{text}", "data.source={tmp}/none.jsonl"], "data.source"),
    ("term argument out of range (no model loads: the teacher file does not exist)", ["experiment=text_lm_kd", "debug=fdr", "teacher.ckpt_path={tmp}/none.ckpt", "distill.terms.kd.beta=2"], "distill.terms.kd.beta must be in [0, 1], got 2"),
    ("blank teacher responses", ["experiment=arith_seqkd", "data.responses={blank}"], "data.responses: line 1 of {blank} has a blank 'response' ('response' is '    '); 2 of its 3 rows have a blank response"),
]  # fmt: skip


@pytest.fixture
def junk(tmp_path) -> Path:
    path = tmp_path / "junk.ckpt"
    path.write_text("this is not a checkpoint\n")
    return path


@pytest.fixture
def blank(tmp_path) -> Path:
    """What distillery.generate writes for an undertrained teacher: blank responses."""
    import json

    path = tmp_path / "blank.jsonl"
    rows = [("1+2=", "    "), ("3+4=", "7"), ("5+5=", "")]
    path.write_text("".join(json.dumps({"prompt": q, "prompt_id": i, "response": r}) + "\n"
                            for i, (q, r) in enumerate(rows)))  # fmt: skip
    return path


@pytest.mark.parametrize(("overrides", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_naming_the_key_and_writes_nothing(
    overrides, needle, train_cfg, tmp_path, junk, blank, request
):
    assert len(CASES) >= 40
    uses_teacher = any("{teacher}" in o or o == MNIST_KD[0] for o in overrides)
    teacher = request.getfixturevalue("mnist1d_teacher_ckpt") if uses_teacher else None
    resolved = []
    for o in overrides:
        if o == "{text}":
            tok = request.getfixturevalue("tokenizer_dir")
            resolved += text_overrides(tok, request.getfixturevalue("data_dir"))
            continue
        if o == "{text_teacher}":
            resolved.append(f"teacher.ckpt_path={request.getfixturevalue('text_teacher_ckpt')}")
            continue
        resolved.append(o.format(teacher=teacher, junk=junk, tmp=tmp_path, blank=blank))
    if teacher is not None and not any(o.startswith(("teacher", "~teacher")) for o in resolved):
        resolved.append(f"teacher.ckpt_path={teacher}")
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as err:
        train(train_cfg(*resolved))
    message = str(err.value)
    assert needle.format(blank=blank) in message, message
    assert message.count("invalid config") == 1, message  # one message, not nested
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert not [p for p in written if p.suffix in (".ckpt", ".pt", ".tmp")], written


def test_the_oversubscription_guard_can_be_lifted(train_cfg):
    from distillery.engine.builder import check_processes

    cores = len(__import__("os").sched_getaffinity(0))
    with pytest.raises(ConfigError, match="trainer.devices"):
        check_processes(train_cfg(*BASE, f"trainer.devices={cores + 1}"))
    check_processes(train_cfg(*BASE, f"trainer.devices={cores + 1}", "allow_oversubscription=true"))
    check_processes(train_cfg(*BASE, f"trainer.devices={cores}"))


def test_a_training_loader_without_a_batch_is_refused():
    """Fewer samples per process than one batch (with drop_last) would train nothing; under
    DDP each process gets a share of the samples, so it happens with valid-looking sizes."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from distillery.engine.module import DistillationModule
    from distillery.losses import CrossEntropy
    from distillery.losses.objective import Objective

    module = DistillationModule(torch.nn.Linear(2, 2), Objective({"task": CrossEntropy()}),
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.1), num_classes=2)  # fmt: skip
    empty = DataLoader(torch.zeros(200, 2), batch_size=256, drop_last=True)
    module._trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[empty]))
    )
    with pytest.raises(ValueError, match="data: a training loader has no batch in this process"):
        module.on_train_start()


def test_blank_responses_exit_2_naming_file_line_and_count(train_cfg, blank, caplog, monkeypatch):
    """An undertrained teacher writes blank responses through distillery.generate: the
    student's run stops with exit code 2 and one message saying so (the key, the file, the
    first blank line, how many), before any model; never "lacks" a key the rows have."""
    from distillery.config import exit_on_config_error
    from distillery.engine import builder

    def refuse(cfg):
        raise AssertionError("the student was built before data.responses was read")

    monkeypatch.setattr(builder, "build_student", refuse)

    with pytest.raises(SystemExit) as exit_:
        exit_on_config_error(
            lambda: train(train_cfg("experiment=arith_seqkd", f"data.responses={blank}"))
        )
    assert exit_.value.code == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message.count("\n  - ") == 1, message
    assert f"data.responses: line 1 of {blank} has a blank 'response'" in message, message
    assert "2 of its 3 rows have a blank response" in message and " lacks [" not in message


def test_a_missing_field_lacks_it_and_a_blank_one_is_blank(tmp_path):
    from distillery.data.base import read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')
    with pytest.raises(ConfigError, match=r"line 2 of .* lacks \['response'\]"):
        read_jsonl(str(path), "data.responses", ("prompt", "response"), ("response",))
    path.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": null}\n')
    with pytest.raises(
        ConfigError, match=r"line 2 of .* has a blank 'response' \('response' is None\); 1 of its 2"
    ) as err:
        read_jsonl(str(path), "data.responses", ("prompt", "response"), ("response",))
    assert " lacks [" not in str(err.value)
