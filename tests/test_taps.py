"""Taps: hook lifecycle, duplicate fires, attention maps equal to eager attention,
projectors, feature-loss goldens, and feature KD end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SMALL_MNIST1D, compose_cfg
from distillery.contract import Outputs
from distillery.engine.taps import DuplicateCaptureError, Taps, describe
from distillery.losses import (
    PKT,
    RKD,
    AttentionMapKL,
    AttentionTransfer,
    CosineFeature,
    FitNet,
    HiddenStates,
    SimilarityPreserving,
)
from distillery.losses.projectors import MapProjector, TokenProjector, build_projector
from distillery.train import build_run

FITNET = ["experiment=mnist1d_fitnet", *SMALL_MNIST1D, "data.transfer_size=300"]


def feature_outputs(s, t, name="f", batch=None):
    b = batch or (len(s) if isinstance(s, torch.Tensor) else len(s[0]))
    return Outputs(torch.zeros(b, 2), torch.zeros(b).long(), torch.zeros(b, 2),
                   extras={"student_features": {name: s}, "teacher_features": {name: t}})  # fmt: skip


class HandleCounter(__import__("lightning").Callback):
    def __init__(self, fail_at: int | None = None):
        self.counts, self.fail_at = [], fail_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counts.append(module.student_taps.handle_count + module.teacher_taps.handle_count)
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")


def test_hook_handles_constant_over_steps_and_zero_after_teardown(train_cfg, mnist1d_teacher_ckpt):
    cfg = train_cfg(
        *FITNET,
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=5",
        "+trainer.limit_val_batches=1",
        "test=false",
    )
    datamodule, module, trainer, _ = build_run(cfg)
    counter = HandleCounter()
    trainer.callbacks.append(counter)
    trainer.fit(module, datamodule=datamodule)
    assert counter.counts == [2] * 10  # one student + one teacher hook, registered once
    assert module.student_taps.handle_count == module.teacher_taps.handle_count == 0
    assert not module.student._forward_hooks and not module.teacher.network.head._forward_pre_hooks


def test_hook_handles_removed_after_an_exception(train_cfg, mnist1d_teacher_ckpt):
    cfg = train_cfg(
        *FITNET, f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "trainer.max_epochs=1", "test=false"
    )
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.callbacks.append(HandleCounter(fail_at=2))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=datamodule)
    assert module.student_taps.handle_count == module.teacher_taps.handle_count == 0


def test_teacher_captures_are_detached_and_student_captures_keep_their_graph():
    student, teacher = (
        nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
        nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
    )
    with (
        Taps(student, {"h": "0"}, "student", detach=False) as s,
        Taps(teacher, {"h": "0"}, "teacher", detach=True) as t,
    ):
        x = torch.randn(2, 4)
        student(x)
        teacher(x)
        assert s.captured["h"].requires_grad and s.captured["h"].grad_fn is not None
        assert not t.captured["h"].requires_grad


def test_duplicate_fire_is_reported():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # the same module runs twice
    with (
        Taps(model, {"x": "0"}, "student", detach=False),
        pytest.raises(DuplicateCaptureError, match="fired twice"),
    ):
        model(torch.randn(2, 4))
    # Activation checkpointing re-runs the forward during backward.
    from torch.utils.checkpoint import checkpoint

    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with Taps(block, {"x": "0"}, "student", detach=False) as taps:
        y = checkpoint(block, torch.randn(2, 4, requires_grad=True), use_reentrant=False)
        with pytest.raises(DuplicateCaptureError):
            y.sum().backward()
        taps.clear()


def test_glob_taps_and_unknown_paths():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    with Taps(model, {"acts": "*.1"}, "student", detach=False) as taps:
        model(torch.randn(2, 4))
        assert isinstance(taps.captured["acts"], list) and len(taps.captured["acts"]) == 3
    with pytest.raises(ValueError, match=r"taps.student.bad.path: no module matches '9.0'"):
        Taps(model, {"bad": "9.0"}, "student", detach=False)


def test_timm_vit_attention_maps_equal_eager_attention():
    import timm

    torch.manual_seed(0)
    fused = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3
    ).eval()
    eager = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3
    ).eval()
    eager.load_state_dict(fused.state_dict())
    reference = {}
    for i, block in enumerate(eager.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: reference.__setitem__(i, o))
    assert fused.blocks[1].attn.fused_attn  # the tapped model keeps its fused kernel
    x = torch.rand(2, 3, 32, 32)
    spec = {"attn": {"path": "blocks.*.attn", "kind": "attention"}}
    with Taps(fused, spec, "teacher", detach=True) as taps:
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)
        maps = taps.captured["attn"]
    assert len(maps) == 3
    for i, a in enumerate(maps):
        assert a.shape == (2, 3, 17, 17)  # 3 heads, 16 patches + cls
        torch.testing.assert_close(a, reference[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 17), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hf_attention_maps_equal_eager_and_only_tapped_layers_switch(arch):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    if arch == "bert":
        config = dict(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
        )
        make, path = (
            (lambda impl: BertModel(BertConfig(**config, attn_implementation=impl))),
            "encoder.layer.1.attention.self",
        )
        other = "encoder.layer.0.attention.self"
    else:
        config = dict(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=16)
        make, path = (
            (lambda impl: GPT2Model(GPT2Config(**config, attn_implementation=impl))),
            "h.1.attn",
        )
        other = "h.0.attn"
    sdpa, eager = make("sdpa").eval(), make("eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding in the second sequence
    want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1]
    modules = dict(sdpa.named_modules())
    with Taps(sdpa, {"a": {"path": path, "kind": "attention"}}, "teacher", detach=True) as taps:
        assert modules[path].config._attn_implementation == "eager"
        assert modules[other].config._attn_implementation == "sdpa"
        sdpa(input_ids=ids, attention_mask=mask)
        got = taps.captured["a"]
    assert modules[path].config._attn_implementation == "sdpa"  # restored on remove
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)


def test_projector_shapes_are_inferred():
    conv = build_projector((2, 16, 8, 8), (2, 32, 4, 4), "k")
    assert isinstance(conv, MapProjector) and conv(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    sig = build_projector((2, 8, 20), (2, 16, 10), "k", layout="maps")
    assert sig(torch.randn(2, 8, 20)).shape == (2, 16, 10)
    tok = build_projector((2, 17, 192), (2, 17, 384), "k")
    assert isinstance(tok, TokenProjector) and tok(torch.randn(2, 17, 192)).shape == (2, 17, 384)
    assert build_projector((2, 100), (2, 64), "k")(torch.randn(2, 100)).shape == (2, 64)
    assert isinstance(build_projector((2, 5), (2, 5), "k"), nn.Identity)
    with pytest.raises(ValueError, match="different ranks"):
        build_projector((2, 100), (2, 64, 10), "k")


def test_fitnet_cosine_and_at_goldens():
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    fit = FitNet("f", "f", projector=None)
    fit.setup(s.shape, t.shape, "k")
    want = torch.tensor([sum((s[i] - t[i]).flatten().pow(2).tolist()) / 100 for i in range(3)])
    torch.testing.assert_close(fit(feature_outputs(s, t)), want)
    cos = CosineFeature("f", "f", projector=None)
    cos.setup(s.shape, t.shape, "k")
    want = torch.tensor(
        [1 - float(F.cosine_similarity(s[i].flatten(), t[i].flatten(), dim=0)) for i in range(3)]
    )
    torch.testing.assert_close(cos(feature_outputs(s, t)), want)
    at = AttentionTransfer("f", "f")
    a = lambda f: f.pow(2).mean(0).flatten() / f.pow(2).mean(0).flatten().norm()  # noqa: E731
    want = torch.tensor([float((a(s[i]) - a(t[i])).pow(2).mean()) for i in range(3)])
    torch.testing.assert_close(at(feature_outputs(s, t)), want)


def test_attention_map_kl_golden_and_mask():
    a_s = torch.rand(2, 2, 3, 4).softmax(-1)
    a_t = torch.rand(2, 2, 3, 4).softmax(-1)
    a_t[1, :, 2] = 0  # a masked query row
    got = AttentionMapKL("f", "f")(feature_outputs(a_s, a_t))
    for i in range(2):
        kls = [float((a_t[i, h, q] * (a_t[i, h, q] / a_s[i, h, q]).log()).sum())
               for h in range(2) for q in range(3) if a_t[i, h, q].sum() > 0.5]  # fmt: skip
        assert float(got[i]) == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert float(
        AttentionMapKL("f", "f")(feature_outputs(a_t.clamp_min(1e-12), a_t))[0]
    ) == pytest.approx(0, abs=1e-5)


def test_hidden_states_uniform_layer_map():
    assert HiddenStates.uniform_map(2, 6) == [2, 5] and HiddenStates.uniform_map(3, 3) == [0, 1, 2]
    hs = [torch.randn(2, 5, 8) for _ in range(2)]
    ht = [torch.randn(2, 5, 16) for _ in range(4)]
    term = HiddenStates("f", "f", kind="mse")
    term.setup([h.shape for h in hs], [h.shape for h in ht], "k")
    assert term.layer_map == [1, 3]
    got = term(feature_outputs(hs, ht, batch=2))
    want = torch.stack(
        [
            (term.projectors[j](hs[j]) - ht[m]).pow(2).flatten(1).mean(1)
            for j, m in enumerate([1, 3])
        ]
    ).mean(0)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="layer_map"):
        HiddenStates("f", "f", layer_map=[0, 9]).setup(
            [h.shape for h in hs], [h.shape for h in ht], "k"
        )


def naive_sp(fs, ft):
    def g(f):
        m = f @ f.T
        return m / m.norm(dim=1, keepdim=True)

    return float((g(fs) - g(ft)).pow(2).sum()) / len(fs) ** 2


def test_relation_goldens():
    torch.manual_seed(0)
    fs, ft = torch.randn(5, 6), torch.randn(5, 9)
    out = feature_outputs(fs, ft)
    assert float(SimilarityPreserving("f", "f")(out).mean()) == pytest.approx(
        naive_sp(fs, ft), rel=1e-5
    )

    def kernel(f):
        f = f / f.norm(dim=1, keepdim=True)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdim=True)

    p_s, p_t = kernel(fs), kernel(ft)
    want = (p_t * (p_t / p_s).log()).sum(1) / 5  # the batch mean is the mean over B^2 (PKT code)
    torch.testing.assert_close(PKT("f", "f")(out), want, atol=1e-5, rtol=1e-4)
    # RKD distance part against a loop over pairs.
    d = lambda f: torch.cdist(f, f)  # noqa: E731
    ds, dt = d(fs) / d(fs)[d(fs) > 0].mean(), d(ft) / d(ft)[d(ft) > 0].mean()
    want_d = [
        sum(float(F.smooth_l1_loss(ds[i, j], dt[i, j])) for j in range(5) if j != i)
        / 5  # mean over all B entries of a row (RKD code)
        for i in range(5)
    ]
    got_d = RKD("f", "f", distance_weight=1.0, angle_weight=0.0)(out)
    torch.testing.assert_close(got_d, torch.tensor(want_d), atol=1e-4, rtol=1e-4)

    # Angle part: e_ij = normalised (f_i - f_j), psi(i, j, k) = <e_ij, e_kj>, averaged per anchor j.
    def angles(f):
        e = F.normalize(f.unsqueeze(0) - f.unsqueeze(1), dim=2)
        return torch.einsum("jid,jkd->jik", e, e)

    want_a = F.smooth_l1_loss(angles(fs), angles(ft), reduction="none").mean((1, 2))
    torch.testing.assert_close(RKD("f", "f", distance_weight=0.0, angle_weight=1.0)(out), want_a)
    assert math.isfinite(float(RKD("f", "f")(feature_outputs(fs, fs)).sum()))


def test_describe_lists_paths_and_shapes():
    from distillery.models import CNN1D

    rows = dict((p, s) for p, _, s in describe(CNN1D(), torch.zeros(2, 40)))
    assert rows["features.8"] == "(2, 64, 10)" and rows["head"] == "(2, 10)"


def test_feature_kd_end_to_end_projector_trained_and_not_exported(
    train_cfg, mnist1d_teacher_ckpt, tmp_path
):
    from distillery.engine.checkpoint import load_student, read_checkpoint

    cfg = train_cfg(*FITNET, f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "trainer.max_epochs=2")
    datamodule, module, trainer, _ = build_run(cfg)
    proj = module.objective.terms["hint"].projector
    assert isinstance(proj, TokenProjector) and proj.linear.weight.shape == (64, 100)
    before = proj.linear.weight.detach().clone()
    trainer.fit(module, datamodule=datamodule)
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(proj.linear.weight) in opt_ids and not torch.equal(before, proj.linear.weight)
    assert float(trainer.callback_metrics["train/loss/hint"]) > 0
    ckpt_path = trainer.checkpoint_callback.last_model_path
    state = read_checkpoint(ckpt_path)["state_dict"]
    assert "objective.terms.hint.projector.linear.weight" in state
    exported = load_student(ckpt_path)
    assert not any("projector" in k for k in exported.state_dict())
    # Resume restores the projector with the rest.
    _, module2, _, _ = build_run(cfg)
    module2.load_state_dict(state)
    torch.testing.assert_close(
        module2.objective.terms["hint"].projector.linear.weight, proj.linear.weight
    )


def test_feature_term_naming_a_missing_tap_is_a_config_error(train_cfg, mnist1d_teacher_ckpt):
    from distillery.config import ConfigError

    cfg = train_cfg(
        *FITNET, f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "distill.terms.hint.teacher=nope"
    )
    with pytest.raises(
        ConfigError, match=r"distill.terms.hint: no tap named 'nope' under taps.teacher"
    ):
        build_run(cfg)


def test_taps_cli_lists_a_configured_model():
    from distillery.taps import list_taps

    rows = list_taps(compose_cfg("taps", ["experiment=mnist1d_fitnet", "side=student"]))
    assert ("net.4", "ReLU", "(2, 100)", "") in rows


def test_glob_star_matches_one_path_component():
    from distillery.engine.taps import path_matches

    assert path_matches("encoder.layer.3", "encoder.layer.*")
    assert not path_matches("encoder.layer.3.attention", "encoder.layer.*")
    assert path_matches("encoder.layer.3.attention.self", "encoder.**.self")
    assert path_matches("layer2", "layer*") and not path_matches("layer2.0", "layer*")


def test_attention_transfer_sums_over_layer_pairs():
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    t = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    at = AttentionTransfer("f", "f")
    at.setup([x.shape for x in s], [x.shape for x in t], "k")
    want = at(feature_outputs(s[0], t[0], batch=2)) + at(feature_outputs(s[1], t[1], batch=2))
    torch.testing.assert_close(at(feature_outputs(s, t, batch=2)), want)


def test_value_relation_kl_golden():
    from distillery.losses import ValueRelationKL

    v_s, v_t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    term = ValueRelationKL("f", "f", relation_heads=2)
    term.setup(v_s.shape, v_t.shape, "k")
    got = term(feature_outputs(v_s, v_t, batch=2))

    def rel(v, h):
        d = v.shape[-1] // h
        return torch.stack([(v[:, :, i * d:(i + 1) * d] @ v[:, :, i * d:(i + 1) * d].transpose(1, 2) / d**0.5).softmax(-1)
                            for i in range(h)], 1)  # fmt: skip

    r_s, r_t = rel(v_s, 2), rel(v_t, 2)
    want = (r_t * (r_t.log() - r_s.log())).sum(-1).mean((1, 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert float(term(feature_outputs(v_t, v_t, batch=2)).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="divisible"):
        ValueRelationKL("f", "f", relation_heads=3).setup(v_s.shape, v_t.shape, "k")


def test_crd_golden_and_memory_bank():
    from distillery.losses import CRD

    torch.manual_seed(0)
    term = CRD("f", "f", bank_size=6, feat_dim=4, num_negatives=3, temperature=0.5, momentum=0.5)
    term.setup((3, 5), (3, 7), "distill.terms.crd")
    f_s, f_t = torch.randn(3, 5), torch.randn(3, 7)
    ids = torch.tensor([100, 200, 300])
    out = feature_outputs(f_s, f_t)
    out.extras["sample_id"] = ids
    bank_s, bank_t = term.bank_s.clone(), term.bank_t.clone()
    torch.manual_seed(1)
    got = term(out)
    torch.manual_seed(1)
    neg = torch.randint(0, 6, (3, 3))
    idx = torch.tensor([0, 1, 2])  # first-seen ids get slots 0, 1, 2
    neg = torch.where(neg == idx[:, None], (neg + 1) % 6, neg)
    s = F.normalize(term.embed_s(f_s), dim=1)
    t = F.normalize(term.embed_t(f_t), dim=1)
    want = []
    for i in range(3):
        cand = [int(idx[i]), *neg[i].tolist()]
        ls = torch.stack([s[i] @ bank_t[c] for c in cand]) / 0.5
        lt = torch.stack([t[i] @ bank_s[c] for c in cand]) / 0.5
        want.append(-ls.log_softmax(0)[0] - lt.log_softmax(0)[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    # Banks moved towards the new embeddings (training mode) and stay unit norm.
    torch.testing.assert_close(
        term.bank_s[0], F.normalize(0.5 * bank_s[0] + 0.5 * s[0].detach(), dim=0)
    )
    torch.testing.assert_close(term.bank_s.norm(dim=1), torch.ones(6))
    assert term.slot_ids[:3].tolist() == [100, 200, 300]
    out.extras["sample_id"] = torch.tensor([400, 500, 600, 700])[:3]
    term(out)
    out.extras["sample_id"] = torch.tensor([701, 702, 703])
    with pytest.raises(RuntimeError, match="bank_size"):
        term(out)


def test_projector_given_explicitly_in_config():
    proj = nn.Sequential(nn.Linear(100, 32), nn.ReLU(), nn.Linear(32, 64))
    term = FitNet("f", "f", projector=proj)
    term.setup((2, 100), (2, 64), "k")
    assert term.projector is proj
    s, t = torch.randn(2, 100), torch.randn(2, 64)
    torch.testing.assert_close(term(feature_outputs(s, t)), (proj(s) - t).pow(2).mean(1))


def test_token_feature_terms_ignore_padding():
    """With a token mask, new content at padded positions (as token, query or key)
    leaves every token-feature term unchanged, and a padded sample's loss equals the
    loss of its real tokens alone."""
    from distillery.losses import (
        AttentionMapKL,
        CosineFeature,
        FitNet,
        HiddenStates,
        ValueRelationKL,
    )  # fmt: skip

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    h_s, h_t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    a_s, a_t = (torch.rand(2, 2, 5, 5) * mask[:, None, None, :] for _ in range(2))
    a_s, a_t = a_s / a_s.sum(-1, keepdim=True), a_t / a_t.sum(-1, keepdim=True)

    def junk(x):  # new content at the padded positions of sample 1
        x = x.clone()
        x[1, 3:] = torch.randn_like(x[1, 3:]) * 10
        return x

    def run(term, s, t, m, listed):
        out = feature_outputs([s] if listed else s, [t] if listed else t, batch=len(s))
        if m is not None:
            out.extras["token_mask"] = m
        return term(out)

    hidden = HiddenStates("f", "f", kind="cosine", projector=None)
    hidden.setup([h_s.shape], [h_t.shape], "k")
    token_terms = [FitNet("f", "f", projector=None), CosineFeature("f", "f", projector=None)]
    for term in [*token_terms, ValueRelationKL("f", "f", relation_heads=2), hidden]:
        listed = term is hidden
        base = run(term, h_s, h_t, mask, listed)
        torch.testing.assert_close(run(term, junk(h_s), junk(h_t), mask, listed), base)
        alone = run(term, h_s[1:, :3], h_t[1:, :3], None, listed)
        torch.testing.assert_close(base[1:], alone, atol=1e-6, rtol=1e-5)
    attn = AttentionMapKL("f", "f")
    a_s2 = a_s.clone()
    a_s2[1, :, 3:] = torch.rand(2, 2, 5)  # padded queries: anything
    torch.testing.assert_close(run(attn, a_s2, a_t, mask, False), run(attn, a_s, a_t, mask, False))
    out = feature_outputs(h_s[:, :4], h_t[:, :4], batch=2)
    out.extras["token_mask"] = mask
    with pytest.raises(ValueError, match="token_mask"):
        FitNet("f", "f", projector=None)(out)


def test_compiled_models_run_their_taps(train_cfg, mnist1d_teacher_ckpt, tmp_path):
    """module.compile (torch.compile's default backend, inductor: C++ code generated and
    built here; ``fullgraph``: a graph break is an error, not a silent return to eager
    Python for part of the forward): the student's and teacher's forwards compile whole
    and run inductor's kernels, not an eager fallback; the taps' hooks still fire inside the compiled forwards, and
    3 steps of mnist1d_fitnet end with the student of the uncompiled run."""
    from torch._dynamo.utils import counters

    from distillery.engine.builder import build_run

    students, hints = {}, {}
    for compiled in (False, True):
        overrides = ["experiment=mnist1d_fitnet", *SMALL_MNIST1D, "data.transfer_size=600", "+trainer.max_steps=3",
                     f"teacher.ckpt_path={mnist1d_teacher_ckpt}", "test=false"]  # fmt: skip
        if compiled:
            overrides.append("+module.compile={fullgraph: true}")
            torch._dynamo.reset()
            counters.clear()
        datamodule, module, trainer, _ = build_run(
            train_cfg(*overrides, out=tmp_path / str(compiled))
        )
        trainer.fit(module, datamodule=datamodule)
        hints[compiled] = float(trainer.callback_metrics["train/loss/hint"])  # the tap fed it
        students[compiled] = module.student.state_dict()
        if compiled:  # both compiled in place, whole, by inductor
            assert module.student._compiled_call_impl and module.teacher.model._compiled_call_impl
            breaks = {**counters["graph_break"], **counters["resumes"]}
            assert not breaks, breaks
            assert counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's
            assert counters["inductor"], "no inductor kernels: compiled by another backend"
            torch._dynamo.reset()
    assert hints[True] > 0 and hints[True] == pytest.approx(hints[False], rel=1e-5)
    for k, v in students[False].items():
        torch.testing.assert_close(students[True][k], v, atol=1e-6, rtol=1e-5)
