"""Function matching pieces: consistent views, mixing, the transfer pool and
step-based schedules (including resume)."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.contract import UNLABELED, Outputs
from distillery.data.batch import TensorDictDataset
from distillery.data.mnist1d import MNIST1DDataModule
from distillery.data.pool import ID_STRIDE, TransferPool
from distillery.engine.checkpoint import read_checkpoint
from distillery.losses import CrossEntropy
from distillery.recipes.augment import ImageAugment, SignalAugment
from distillery.recipes.mixing import CutMix, Mixup
from distillery.recipes.schedules import WarmupCosine
from distillery.recipes.views import Views, mix_labels
from distillery.train import build_run, train

POOL = [
    "data.base.num_samples=1000",
    "data.base.val_size=200",
    "data.sources.generated.size=600",
    "data.samples_per_epoch=512",
    "data.batch_size=64",
]


def capture_training_inputs(module):
    """Record the raw tensors entering teacher and student during training steps."""
    seen = {"teacher": [], "student": []}

    def hook(name):
        def record(m, args):
            if module.student.training:  # skip validation/test forwards
                seen[name].append(args[0].detach().clone())

        return record

    module.teacher.register_forward_pre_hook(hook("teacher"))
    module.student_norm.register_forward_pre_hook(hook("student"))
    return seen


@pytest.mark.parametrize("consistent", [True, False])
def test_teacher_and_student_see_identical_tensors_under_consistent_views(
    consistent, train_cfg, mnist1d_teacher_ckpt
):
    cfg = train_cfg(
        "experiment=mnist1d_fm",
        *POOL,
        f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
        f"views.consistent={consistent}",
        "trainer.max_steps=3",
        "scheduler.warmup_steps=1",
        "trainer.val_check_interval=3",
        "test=false",
    )
    datamodule, module, trainer, _ = build_run(cfg)
    seen = capture_training_inputs(module)
    trainer.fit(module, datamodule=datamodule)
    assert len(seen["teacher"]) == len(seen["student"]) == 3
    for t, s in zip(seen["teacher"], seen["student"], strict=True):
        assert t.shape == s.shape == (64 + 64, 40)  # labeled + pool samples
        assert torch.equal(t, s) is consistent


def test_mixup_formula_and_mixed_labels():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    mixed, perm, lam = Mixup(alpha=0.4)(x)
    torch.testing.assert_close(mixed, lam[:, None] * x + (1 - lam[:, None]) * x[perm])
    labels = torch.tensor([0, 1, 2, UNLABELED, 4, 5])
    hard, targets = mix_labels(labels, perm, lam, num_classes=6)
    for i in range(6):
        a, b = int(labels[i]), int(labels[perm[i]])
        if UNLABELED in (a, b):
            assert hard[i] == UNLABELED
            continue
        want = lam[i] * F.one_hot(torch.tensor(a), 6) + (1 - lam[i]) * F.one_hot(torch.tensor(b), 6)
        torch.testing.assert_close(targets[i], want.float())
        assert hard[i] == (a if lam[i] >= 0.5 else b)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))


def test_soft_target_cross_entropy_is_the_mixture_of_the_two_hard_losses():
    logits, lam = torch.randn(4, 3), torch.tensor([0.2, 0.5, 0.9, 1.0])
    a, b = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    targets = lam[:, None] * F.one_hot(a, 3) + (1 - lam[:, None]) * F.one_hot(b, 3)
    got = CrossEntropy()(Outputs(logits, a, targets=targets.float()))
    want = lam * F.cross_entropy(logits, a, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, b, reduction="none"
    )
    torch.testing.assert_close(got, want)


def test_cutmix_lambda_is_the_kept_area():
    torch.manual_seed(3)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    for _ in range(10):
        mixed, perm, lam = CutMix(alpha=1.0)(x)
        for i in range(4):
            kept = (mixed[i] == x[i]).float().mean()
            if perm[i] != i:
                assert float(kept) == pytest.approx(float(lam[i]))
    with pytest.raises(ValueError, match="Mixup"):
        CutMix()(torch.randn(4, 40))


def test_views_without_mixing_keep_hard_labels():
    x, y = torch.randn(4, 40), torch.tensor([1, 2, UNLABELED, 3])
    out = Views(augment=None, mix=None)(x, y, 10)
    assert out.student is out.teacher and torch.equal(out.labels, y) and out.targets is None


def test_augmentations():
    x = torch.randn(8, 40)
    torch.testing.assert_close(SignalAugment(max_shift=0, scale=0.0, noise_std=0.0)(x), x)
    shifted = SignalAugment(max_shift=3, scale=0.0, noise_std=0.0)(x)
    for i in range(8):  # each row is the original moved by at most 3 positions (edges repeated)
        assert any(torch.equal(shifted[i, 3:-3], x[i, 3 - s : 37 - s]) for s in range(-3, 4))
    img = torch.rand(8, 3, 8, 8)
    flipped = ImageAugment(padding=0, flip=True)(img)
    assert all(
        torch.equal(flipped[i], img[i]) or torch.equal(flipped[i], img[i].flip(-1))
        for i in range(8)
    )
    moved = ImageAugment(padding=2, flip=False)(img)
    assert moved.shape == img.shape


def test_transfer_pool_honours_its_weights(data_dir):
    torch.manual_seed(0)
    base = MNIST1DDataModule(data_dir=str(data_dir), num_samples=1000, val_size=200, batch_size=32)
    extra = TensorDictDataset(torch.zeros(5000, 40), None)
    unused = TensorDictDataset(torch.ones(100, 40), None)
    pool = TransferPool(
        base,
        weights={"train": 0.25, "extra": 0.75, "unused": 0.0},
        sources={"extra": extra, "unused": unused},
        samples_per_epoch=8000,
        batch_size=100,
    )
    pool.setup("fit")
    loaders = pool.train_dataloader()
    ids = torch.cat([b["sample_id"] for b in loaders["transfer"]])
    labels = torch.cat([b["labels"] for b in loaders["transfer"]])
    source = ids // ID_STRIDE  # 1 = train, 2 = extra, 3 = unused
    assert len(ids) == 8000 and (labels == UNLABELED).all()
    assert abs(float((source == 1).float().mean()) - 0.25) < 0.03
    assert abs(float((source == 2).float().mean()) - 0.75) < 0.03
    assert not (source == 3).any()
    with pytest.raises(ValueError, match="data.weights"):
        TransferPool(base, weights={"nope": 1.0})


def test_warmup_cosine_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosine(opt, total_steps=12, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    for s in range(4, 14):
        p = min(1.0, (s - 4) / 8)
        assert lrs[s] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(opt, total_steps=0)


def test_step_schedule_resumes_from_last_ckpt(train_cfg, mnist1d_teacher_ckpt, tmp_path):
    def cfg(out, steps, *extra):
        return train_cfg(
            "experiment=mnist1d_fm",
            *POOL,
            f"teacher.ckpt_path={mnist1d_teacher_ckpt}",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=5",
            "scheduler.total_steps=20",
            "scheduler.warmup_steps=4",
            "test=false",
            *extra,
            out=tmp_path / out,
        )

    train(cfg("straight", 20))
    train(cfg("first", 10))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["lr_schedulers"][0]["last_epoch"] == 10
    train(cfg("resumed", 20, f"ckpt_path={last}"))
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 20
    s, r = straight["lr_schedulers"][0], resumed["lr_schedulers"][0]
    assert r["last_epoch"] == s["last_epoch"] == 20
    assert r["_last_lr"] == pytest.approx(s["_last_lr"])
    lr = lambda c: c["optimizer_states"][0]["param_groups"][0]["lr"]  # noqa: E731
    assert lr(resumed) == pytest.approx(lr(straight))


def test_fm_recipe_runs_with_an_image_pool_source(train_cfg, tmp_path, mnist1d_teacher_ckpt):
    """The unlabeled image-folder source and image views compose into a run."""
    from test_data import make_image_folder

    make_image_folder(tmp_path / "labeled", classes=3, per_class=4, size=16)
    make_image_folder(tmp_path / "unlabeled", classes=2, per_class=3, size=20)
    cfg = train_cfg(
        "data=mnist1d_pool",
        "~data.sources.generated",
        "+data.sources.web._target_=distillery.data.pool.UnlabeledImageFolder",
        f"+data.sources.web.root={tmp_path / 'unlabeled'}",
        "+data.sources.web.image_size=16",
        "~data.weights.generated",
        "+data.weights.web=0.5",
        "data.weights.train=0.5",
        "data.base._target_=distillery.data.images.ImageDataModule",
        "~data.base.data_dir",
        "~data.base.seed",
        "~data.base.num_samples",
        "~data.base.val_size",
        "~data.base.transfer_size",
        "+data.base.dataset=imagefolder",
        f"+data.base.root={tmp_path / 'labeled'}",
        "data.base.num_classes=3",
        "+data.base.image_size=16",
        "data.base.batch_size=4",
        "data.samples_per_epoch=16",
        "data.batch_size=4",
        "student=timm",
        "student.model_name=test_resnet",
        "student.num_classes=3",
        "views=mixup_cutmix_image",
        "distill=function_matching",
        "teacher=timm",
        "teacher.model_name=test_resnet",
        "teacher.num_classes=3",
        "teacher.input_norm=null",
        "debug=fdr",
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])


def test_mixing_keeps_labeled_and_unlabeled_apart():
    """Partners are drawn within each group: the labeled count of a batch (the data's
    fixed mix) survives mixing, so label-term means stay exact under accumulation."""
    from distillery.recipes.views import grouped_permutation

    labels = torch.tensor([3, UNLABELED, 1, UNLABELED, UNLABELED, 0, UNLABELED, UNLABELED])
    views = Views(mix=Mixup(alpha=1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        perm = grouped_permutation(labels)
        assert sorted(perm.tolist()) == list(range(8))
        assert ((labels[perm] == UNLABELED) == (labels == UNLABELED)).all()
        out = views(torch.randn(8, 40), labels, num_classes=4)
        assert ((out.labels == UNLABELED) == (labels == UNLABELED)).all()
        labeled = out.targets[labels != UNLABELED]
        assert labeled[:, 2].eq(0).all()  # no class-2 sample in the batch: mass only on 0, 1, 3
        torch.testing.assert_close(labeled.sum(1), torch.ones(3))
