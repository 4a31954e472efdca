"""Resume is exact: a run stopped and resumed from its last.ckpt ends with the same student
weights as the run that went straight through (CPU, deterministic), mid-epoch included.

What makes it so: the training order is a function of (seed, epoch, pass) with its
position saved in the checkpoint (``distillery.data.sampling``), the random states that
training consumes (dropout, views: augmentation and mixing) are saved and restored, and
the micro-batches of an optimizer step being collected travel with the checkpoint."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL_MNIST1D, text_overrides
from distillery.engine.checkpoint import load_student
from distillery.train import train

# No validation (the function-matching test keeps it, between the steps): last.ckpt only.
NO_VALIDATION = ["++trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null"]


def final_student(train_cfg, tmp_path, name: str, overrides: list[str], resume=None):
    out = tmp_path / name
    extra = [f"ckpt_path={resume}"] if resume else []
    train(train_cfg(*overrides, *extra, "test=false", "trainer.deterministic=true", out=out))
    last = out / "checkpoints" / "last.ckpt"
    return last, load_student(last).state_dict()


def assert_exact_resume(train_cfg, tmp_path, common, straight, first, rest):
    """``straight`` vs ``first`` then ``rest`` resumed from the first part's last.ckpt."""
    _, want = final_student(train_cfg, tmp_path, "straight", [*common, *straight])
    part, _ = final_student(train_cfg, tmp_path, "first", [*common, *first])
    _, got = final_student(train_cfg, tmp_path, "resumed", [*common, *rest], resume=part)
    assert want.keys() == got.keys()
    diff = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)
    assert diff <= 1e-7, diff


def test_resume_is_exact_at_an_epoch_boundary(train_cfg, tmp_path):
    common = ["experiment=mnist1d_baseline", *SMALL_MNIST1D, "scheduler.T_max=4",
              "+trainer.limit_val_batches=1"]  # fmt: skip
    assert_exact_resume(train_cfg, tmp_path, common, ["trainer.max_epochs=4"],
                        ["trainer.max_epochs=2"], ["trainer.max_epochs=4"])  # fmt: skip


def test_resume_is_exact_mid_epoch_with_views_and_a_transfer_pool(
    train_cfg, tmp_path, mnist1d_teacher_ckpt
):
    """Function matching: step-based, stopped inside an epoch; mixing and augmentation,
    a cycling labeled loader and weighted pool draws."""
    common = ["experiment=mnist1d_fm", "data.base.num_samples=1000", "data.base.val_size=200",
              "data.sources.generated.size=300", "scheduler.total_steps=40", "scheduler.warmup_steps=5",
              "trainer.val_check_interval=10", "+trainer.limit_val_batches=1",
              f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    assert_exact_resume(train_cfg, tmp_path, common, ["trainer.max_steps=40"],
                        ["trainer.max_steps=25"], ["trainer.max_steps=40"])  # fmt: skip


def test_resume_is_exact_for_token_kd_with_accumulation(
    train_cfg, tmp_path, tokenizer_dir, data_dir, text_teacher_ckpt
):
    common = ["experiment=text_lm_kd", *text_overrides(tokenizer_dir, data_dir),
              f"teacher.ckpt_path={text_teacher_ckpt}", "module.accumulate=2", "trainer.max_epochs=-1",
              "scheduler.T_max=10", "+trainer.limit_train_batches=10", *NO_VALIDATION]  # fmt: skip
    assert_exact_resume(train_cfg, tmp_path, common, ["++trainer.max_steps=12"],
                        ["++trainer.max_steps=7"], ["++trainer.max_steps=12"])  # fmt: skip


def test_resume_is_exact_for_sentence_embeddings(train_cfg, tmp_path):
    common = ["experiment=minilm_embed_kd", "data.batch_size=8", "trainer.max_epochs=-1",
              "+trainer.limit_train_batches=4", *NO_VALIDATION]  # fmt: skip
    assert_exact_resume(train_cfg, tmp_path, common, ["++trainer.max_steps=6"],
                        ["++trainer.max_steps=3"], ["++trainer.max_steps=6"])  # fmt: skip


def test_the_saved_position_skips_what_was_trained():
    from distillery.data.sampling import EpochSampler, ResumableLoader

    torch.manual_seed(0)
    data = torch.arange(20)
    loader = ResumableLoader(data, batch_size=4, sampler=EpochSampler(20, seed=3), drop_last=True)
    loader.sampler.set_epoch(1)
    it = iter(loader)
    seen = [next(it), next(it)]  # two batches trained on
    state = loader.state_dict()
    assert state == {"seed": 3, "epoch": 1, "pass": 0, "consumed": 8, "replicas": 1}
    fresh = ResumableLoader(data, batch_size=4, sampler=EpochSampler(20, seed=3), drop_last=True)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)
    rest = list(fresh)
    assert len(rest) == 3 and not any(torch.equal(r, b) for r in rest for b in seen)
    assert torch.equal(torch.cat([*seen[:2], *rest]).sort().values, data)
    other = EpochSampler(20, seed=3)
    other.set_epoch(2)
    assert list(other) != list(loader.sampler.order(1, 0).tolist())  # a new order per epoch
    workers = ResumableLoader(data, batch_size=4, sampler=EpochSampler(20, seed=3), drop_last=True,
                              num_workers=2)  # fmt: skip
    it = iter(workers)
    next(it)  # the workers have fetched indices ahead; the position is what was handed out
    assert workers.state_dict()["consumed"] == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_the_order_depends_on_the_seed_not_the_global_rng(seed):
    from distillery.data.sampling import EpochSampler

    torch.manual_seed(123)
    a = list(EpochSampler(10, seed=seed))
    torch.manual_seed(456)
    b = list(EpochSampler(10, seed=seed))
    assert a == b and sorted(a) == list(range(10))


def test_epoch_sampler_shards_by_rank_and_refuses_a_mid_epoch_resume_on_other_ranks():
    from distillery.data.sampling import EpochSampler

    def shard(size, rank, replicas):
        sampler = EpochSampler(size, seed=4)
        sampler.num_replicas, sampler.rank = replicas, rank
        return sampler

    order = list(EpochSampler(10, seed=4))
    shards = [list(shard(10, r, 4)) for r in range(4)]
    assert [len(s) for s in shards] == [len(shard(10, 0, 4))] * 4 == [3] * 4  # padded to 12
    assert [shards[r][i] for i in range(2) for r in range(4)] == order[
        :8
    ]  # steps = one-process order
    assert [len(list(shard(1, r, 4))) for r in range(4)] == [1] * 4  # fewer samples than ranks
    two = shard(10, 0, 2)
    state = two.state(consumed=2)  # 2 per rank = the first 4 of the pass
    assert state["consumed"] == 4 and state["replicas"] == 2
    with pytest.raises(ValueError, match="ckpt_path: the checkpoint stopped mid-epoch with 2"):
        shard(10, 0, 4).resume(state)
    shard(10, 0, 4).resume({**state, "consumed": 0})  # an epoch boundary: any number of ranks
