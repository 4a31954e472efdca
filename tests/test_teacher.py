"""The teacher contract: frozen, always eval, provenance, and each source."""

import pytest
import torch
from torch import nn

from distillery.engine.teacher import Teacher, from_state_dict, from_timm, weights_sha256
from distillery.models import CNN1D, resnet8x4


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = Teacher(CNN1D())
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Linear(2, 2)})
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent["student"].training
    y = teacher(torch.randn(4, 40))
    assert not y.requires_grad and y.grad_fn is None


def test_eval_mode_teacher_never_changes_bn_buffers():
    teacher = Teacher(CNN1D())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    teacher(torch.randn(16, 40) * 3 + 1)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_stats_mode_uses_batch_statistics_without_updating_running_stats():
    model = CNN1D()
    teacher = Teacher(model, bn_mode="batch_stats")
    teacher.train(False)
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bns and all(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    x = torch.randn(16, 40) * 3 + 1
    y_batch = teacher(x)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before, strict=True))
    y_eval = Teacher(CNN1D(), bn_mode="eval")
    y_eval.model.load_state_dict(model.state_dict())
    assert not torch.allclose(y_batch, y_eval(x))


def test_provenance_hash_tracks_the_weights():
    a, b = CNN1D(), CNN1D()
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)
    assert Teacher(a).provenance["sha256"] == weights_sha256(a)


def test_from_state_dict_with_key_and_prefix(tmp_path):
    src = resnet8x4(num_classes=10)
    path = tmp_path / "t.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    teacher = from_state_dict(
        resnet8x4(num_classes=10), str(path), key="model", strip_prefix="module."
    )
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), src.eval()(x))
    assert teacher.provenance["source"] == "state_dict"


def test_from_state_dict_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher.path"):
        from_state_dict(resnet8x4(), str(tmp_path / "missing.pth"))
    path = tmp_path / "t.pth"
    torch.save({"model": CNN1D().state_dict()}, path)
    with pytest.raises(KeyError, match="teacher.key"):
        from_state_dict(resnet8x4(), str(path), key="weights")
    with pytest.raises(ValueError, match="does not fit teacher.model"):
        from_state_dict(resnet8x4(), str(path), key="model")


def test_from_timm_with_checkpoint_file(tmp_path):
    import timm

    src = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    teacher = from_timm(
        "test_resnet",
        checkpoint_path=str(path),
        num_classes=5,
        input_norm={"mean": [0.5] * 3, "std": [0.25] * 3},
    )
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(teacher(x), src.eval()((x - 0.5) / 0.25))
    with pytest.raises(ValueError, match="teacher.model_name"):
        from_timm("no_such_model_xyz")
