"""Text data on `datasets` and causal-LM distillation runs (tiny GPT-2s from config)."""

import json

import pytest
import torch

from conftest import PROJECT_ROOT, compose_cfg, text_overrides
from distillery.config import ConfigError
from distillery.data.text import TextDataModule
from distillery.train import build_run, train


def test_pydoc_corpus_blocks_and_deterministic_split(tokenizer_dir):
    a = TextDataModule(tokenizer=str(tokenizer_dir), seq_len=32)
    b = TextDataModule(tokenizer=str(tokenizer_dir), seq_len=32)
    a.setup()
    b.setup()
    assert torch.equal(a.test_set.blocks, b.test_set.blocks) and len(a.train_set) > 10 * len(
        a.test_set
    )
    item = a.train_set[0]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])  # labels are the next tokens
    ids = torch.cat([a.train_set.ids, a.val_set.ids, a.test_set.ids])
    assert len(ids.unique()) == len(ids)
    assert a.vocab_size == 512 and "<|eos|>" in a.tokenizer.get_vocab()


def test_local_jsonl_source_and_missing_file(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    from pydoc_data.topics import topics

    path.write_text("".join(json.dumps({"body": v}) + "\n" for v in list(topics.values())[:30]))
    dm = TextDataModule(
        tokenizer=str(tokenizer_dir), source=str(path), text_field="body", seq_len=32
    )
    dm.setup()
    assert len(dm.train_set) > 0
    with pytest.raises(FileNotFoundError, match="data.source"):
        TextDataModule(tokenizer=str(tokenizer_dir), source=str(tmp_path / "nope.jsonl")).setup()
    with pytest.raises(ValueError, match="data.text_field"):
        TextDataModule(tokenizer=str(tokenizer_dir), source=str(path), text_field="text").setup()


TEXT_EXPERIMENTS = sorted(
    p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("text_*.yaml")
)


@pytest.mark.parametrize("name", TEXT_EXPERIMENTS)
def test_text_experiments_under_fdr(
    name, train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt, generated_pairs, monkeypatch
):
    extra = {
        "text_lm_kd": [f"teacher.ckpt_path={text_teacher_ckpt}"],
        "text_lm_kd_hidden": [f"teacher.ckpt_path={text_teacher_ckpt}"],
        "text_seqkd": [
            f"data.source={generated_pairs}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
        ],
        "text_prompt_kd": [
            f"data.source={generated_pairs}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            f"teacher.ckpt_path={text_teacher_ckpt}",
        ],
    }.get(name, [])
    import distillery.train as train_module

    built = []  # the run train() builds, to check its test metrics against
    monkeypatch.setattr(
        train_module, "build_run", lambda c: built.append(build_run(c)) or built[-1]
    )
    metrics = train(
        train_cfg(
            f"experiment={name}", "debug=fdr", *text_overrides(tokenizer_dir, data_dir), *extra
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/loss"] > 0
    datamodule, module = built[0][:2]  # the one test batch, scored here
    batch = next(iter(datamodule.test_dataloader()))
    module.eval()
    with torch.no_grad():
        student = module.student(batch["input_ids"]).float()
        teacher = module.teacher(batch["input_ids"]).float() if module.teacher else None
    valid = batch["labels"] != -100  # trained positions only (padding and prompts out)
    nll = torch.nn.functional.cross_entropy(student[valid], batch["labels"][valid])
    assert metrics["test/ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    if name.startswith("text_lm_kd") or name == "text_prompt_kd":
        agree = (student[valid].argmax(-1) == teacher[valid].argmax(-1)).float().mean()
        assert metrics["train/loss/kd"] > 0
        assert metrics["test/agreement"] == pytest.approx(float(agree), abs=1e-6)
    if name == "text_lm_kd_hidden":
        assert metrics["train/loss/hidden"] > 0 and metrics["train/loss/attn"] > 0
    if name in ("text_lm_kd", "text_lm_kd_hidden"):  # its no-teacher control
        from test_train import check_control

        overrides = text_overrides(tokenizer_dir, data_dir)
        check_control(
            train_cfg(f"experiment={name}", "debug=fdr", "control=true", *overrides, *extra)
        )
    if name in ("text_prompt_kd", "text_seqkd"):  # its data came from the teacher
        control = train_cfg(f"experiment={name}", "control=true", *extra)
        with pytest.raises(ConfigError, match="control: data.source .* holds teacher generations"):
            build_run(control)


def test_vocab_mismatch_is_an_error_unless_truncated(
    train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt
):
    base = [
        "experiment=text_lm_kd",
        *text_overrides(tokenizer_dir, data_dir),
        f"teacher.ckpt_path={text_teacher_ckpt}",
    ]
    with pytest.raises(ConfigError, match="vocabularies differ"):
        build_run(train_cfg(*base, "student.config.vocab_size=600"))
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        build_run(train_cfg(*base, "student.config.vocab_size=400"))
    build_run(
        train_cfg(*base, "student.config.vocab_size=600", "distill.terms.kd.vocab_align=truncate")
    )


@pytest.mark.parametrize("experiment", ["text_lm_kd", "text_lm_kd_hidden"])
def test_accumulation_is_normalised_by_the_step_token_count(
    experiment, train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt
):
    """One optimizer step over 2 micro-batches equals one step over their concatenation,
    for token terms and for feature terms read from the taps (hidden states, attention)."""
    base = [
        f"experiment={experiment}",
        *text_overrides(tokenizer_dir, data_dir),
        f"teacher.ckpt_path={text_teacher_ckpt}",
        "optimizer._target_=torch.optim.SGD",
        "~optimizer.weight_decay",
        "optimizer.lr=0.5",
        "scheduler=null",
    ]
    _, m2, _, _ = build_run(
        train_cfg(*base, "module.accumulate=2", "module.gradient_clip_val=null")
    )
    _, m1, _, _ = build_run(
        train_cfg(*base, "module.accumulate=1", "module.gradient_clip_val=null")
    )
    m1.student.load_state_dict(m2.student.state_dict())
    m1.objective.load_state_dict(m2.objective.state_dict())  # the projectors
    m1.setup("fit"), m2.setup("fit")  # attach the taps
    m1.student.eval(), m2.student.eval()  # no dropout: compare the arithmetic
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 33))
    labels = ids[:, 1:].clone()
    labels[0, 5:] = -100  # micro-batch 1 has fewer valid tokens than micro-batch 2
    batches = [{"input_ids": ids[i : i + 2, :-1], "labels": labels[i : i + 2]} for i in (0, 2)]
    whole = {"input_ids": ids[:, :-1], "labels": labels}
    grads = []
    for module, micro in ((m2, batches), (m1, [whole])):
        module.student.zero_grad()
        n = sum((b["labels"] != -100).sum() for b in micro).float()
        for b in micro:
            out = module.task.training_outputs(module, b, epoch=0.0)
            total, values = module.objective(out, n)
            total.backward()
        if experiment == "text_lm_kd_hidden":
            assert values["hidden"] > 0 and values["attn"] > 0
        params = [*module.student.parameters(), *module.objective.parameters()]
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        module.teardown("fit")
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_accumulated_steps_in_a_real_run(train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt):
    cfg = train_cfg("experiment=text_lm_kd", *text_overrides(tokenizer_dir, data_dir), f"teacher.ckpt_path={text_teacher_ckpt}",
                    "module.accumulate=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
                    "+trainer.limit_val_batches=1", "test=false")  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2  # 4 micro-batches, 2 optimizer steps
    assert (
        float(trainer.callback_metrics["train/tokens"]) == 2 * 16 * 32
    )  # valid tokens of one step


def test_qwen_config_composes_and_validates():
    """The real-hardware LLM config is checked without downloading anything."""
    from distillery.config import validate

    cfg = compose_cfg("train", ["experiment=qwen_kd", "paths.output_dir=/tmp/unused"])
    validate(cfg)
    assert (
        cfg.teacher.model.pretrained == "Qwen/Qwen2.5-7B-Instruct"
        and cfg.distill.terms.kd.vocab_align == "truncate"
    )


@pytest.fixture(scope="session")
def generated_pairs(tmp_path_factory, tokenizer_dir, text_teacher_ckpt):
    from distillery.generate import generate

    out = tmp_path_factory.mktemp("seqkd") / "pairs.jsonl"
    generate(generate_cfg(tokenizer_dir, text_teacher_ckpt, out))
    return out


def generate_cfg(tokenizer_dir, teacher_ckpt, output, num_prompts=10):
    return compose_cfg("generate", [
        f"teacher_ckpt={teacher_ckpt}", f"tokenizer={tokenizer_dir}", f"output={output}", "batch_size=4",
        f"prompts.num_prompts={num_prompts}", "prompts.prompt_tokens=8", "generation.max_new_tokens=12",
        "paths.output_dir=/tmp/unused",
    ])  # fmt: skip


def test_generation_resumes_without_duplicates(
    tmp_path, tokenizer_dir, text_teacher_ckpt, generated_pairs
):
    from distillery.generate import generate

    straight = [json.loads(x) for x in generated_pairs.read_text().splitlines()]
    assert [r["prompt_id"] for r in straight] == list(range(10)) and all(
        r["response"] for r in straight
    )
    meta = json.loads(generated_pairs.with_name("pairs.jsonl.meta.json").read_text())
    assert meta["generation"]["temperature"] > 0 and meta["teacher_sha256"]
    # Interrupted after 5 rows and half of the 6th, then resumed.
    out = tmp_path / "pairs.jsonl"
    lines = generated_pairs.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:10])
    out.with_name("pairs.jsonl.meta.json").write_text(
        generated_pairs.with_name("pairs.jsonl.meta.json")
        .read_text()
        .replace(str(generated_pairs), str(out))
    )
    generate(generate_cfg(tokenizer_dir, text_teacher_ckpt, out))
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in resumed) == list(range(10))
    assert sorted(resumed, key=lambda r: r["prompt_id"]) == straight
    with pytest.raises(ValueError, match="other provenance"):
        generate(
            compose_cfg(
                "generate",
                [
                    f"teacher_ckpt={text_teacher_ckpt}",
                    f"tokenizer={tokenizer_dir}",
                    f"output={out}",
                    "generation.temperature=0.5",
                    "paths.output_dir=/tmp/u",
                ],
            )
        )


def test_prompt_response_masks_prompt_and_padding(tmp_path, tokenizer_dir):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"def f{i}(x):", "response": " return x + " + "1" * (i % 4 + 1)}
        for i in range(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = TextDataModule(
        tokenizer=str(tokenizer_dir),
        source=str(path),
        format="prompt_response",
        seq_len=32,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for i in range(len(batch["input_ids"])):
        sid = int(batch["sample_id"][i])
        n_prompt = len(tok(rows[sid]["prompt"])["input_ids"])
        n_all = n_prompt + len(tok(rows[sid]["response"])["input_ids"]) + 1
        labels = batch["labels"][i]
        assert (labels[: n_prompt - 1] == -100).all() and (
            labels[n_prompt - 1 : n_all - 1] != -100
        ).all()
        assert (labels[n_all - 1 :] == -100).all() and batch["attention_mask"][i].sum() == n_all - 1
        assert int(labels[n_all - 2]) == tok.eos_token_id  # the response ends with EOS


def test_lm_report_card(train_cfg, tokenizer_dir, data_dir, text_teacher_ckpt, tmp_path):
    from distillery.evaluate import evaluate
    from distillery.evaluation.report import report_keys
    from distillery.tasks import CausalLMTask

    cfg = train_cfg("experiment=text_lm_kd", *text_overrides(tokenizer_dir, data_dir), f"teacher.ckpt_path={text_teacher_ckpt}",
                    "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
                    "+trainer.limit_test_batches=1")  # fmt: skip
    ckpt = train(cfg)["best_ckpt"]
    report = evaluate(
        compose_cfg(
            "evaluate", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", "price_per_hour=3.6"]
        )
    )
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert (
        set(s) == set(report_keys(CausalLMTask()))
        and t["quality_retained"] == 100.0
        and t["agreement"] == 1.0
    )
    assert s["ppl"] == pytest.approx(torch.exp(torch.tensor(s["nll"])).item(), rel=1e-5)
    assert s["quality_retained"] == pytest.approx(100 * t["ppl"] / s["ppl"])
    assert s["cost_per_million_tokens"] == pytest.approx(1e6 * 0.001 / s["tokens_per_second"])
    assert (tmp_path / "quality_vs_latency.png").is_file() and "tokens_per_second" in (
        tmp_path / "report.md"
    ).read_text()


@pytest.mark.slow
def test_lm_under_ddp_normalises_by_the_tokens_of_both_ranks(
    tmp_path, data_dir, tokenizer_dir, text_teacher_ckpt
):
    """Two CPU processes: the step token count logged (and divided by) is the sum over
    both ranks (2 x 4 sequences x 32 tokens), not one rank's."""
    import csv

    from test_cli import common, run_cli

    out = tmp_path / "ddp_lm"
    proc = run_cli("distillery.train", "experiment=text_lm_kd", "trainer=ddp_sim",
                   *text_overrides(tokenizer_dir, data_dir), f"teacher.ckpt_path={text_teacher_ckpt}",
                   "data.batch_size=4", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                   "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
                   "trainer.log_every_n_steps=1", f"hydra.run.dir={out}", *common(tmp_path, data_dir))  # fmt: skip
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    rows = list(
        csv.DictReader((out / "csv" / "version_0" / "metrics.csv").read_text().splitlines())
    )
    tokens = {float(r["train/tokens"]) for r in rows if r.get("train/tokens")}
    assert tokens == {2 * 4 * 32}


def test_lm_student_exports_as_a_hugging_face_directory(tmp_path, text_teacher_ckpt):
    """format=hf: save_pretrained weights (safetensors), the run's tokenizer and a
    generation config; AutoModelForCausalLM loads it, gives the student's logits, and
    generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from distillery.engine.checkpoint import load_student
    from distillery.export import export_student, load_exported

    ids = torch.randint(3, 500, (2, 12))
    path = export_student(str(text_teacher_ckpt), "hf", tmp_path / "export", ids)
    assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        want = load_student(str(text_teacher_ckpt))(ids)
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_exported(path)(ids), want, atol=1e-5, rtol=1e-5)
        prompt = tokenizer("def read(path):", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert GenerationConfig.from_pretrained(str(path)).pad_token_id is not None


def test_docstring_corpus_is_large_deterministic_and_offline():
    """data.source=docstrings: the standard library's docstrings read with ast (nothing
    imported), deduplicated, test suites left out; packages by name; unknown ones refused."""
    from distillery.data.sentences import split_sentences
    from distillery.data.text import docstrings, load_documents

    docs = load_documents("docstrings")
    assert len(docs) > 5000 and len(set(docs)) == len(docs)
    assert len(split_sentences(docs)) > 5 * len(split_sentences(load_documents("pydoc")))
    assert any(
        d.startswith("Serialize ``obj`` as a JSON formatted stream") for d in docs
    )  # json.dump
    ours = docstrings(["omegaconf"], stdlib=False)
    assert ours and ours == docstrings(["omegaconf"], stdlib=False)
    with pytest.raises(ValueError, match="docstrings:no_such_pkg: no installed package"):
        load_documents("docstrings:no_such_pkg")
