"""The offline teacher-output cache: python -m distillery.cache, then teacher.cache=<dir>."""

import json

import pytest
import torch

from conftest import SMALL_MNIST1D, compose_cfg, text_overrides
from distillery.config import ConfigError


def topk_reference(logits: torch.Tensor, k: int, half: bool = False) -> torch.Tensor:
    """The top-k cache's documented reading, written out here independently of
    ``teacher_cache/codec.py``: per position the teacher's k largest log-probabilities
    (rounded to float16 with ``half``), the rest of the mass spread evenly over the other
    V - k tokens."""
    logp = logits.float().log_softmax(-1)
    top, ids = logp.topk(k, dim=-1)
    rest = 1.0 - top.exp().sum(-1, keepdim=True)
    top = top.half().float() if half else top
    fill = torch.log(rest / (logp.shape[-1] - k)).expand_as(logp)
    return fill.scatter(-1, ids, top)


def write(tmp_path, data_dir, *overrides):
    from distillery.cache import write_cache

    return write_cache(compose_cfg("cache", [*overrides, f"paths.output_dir={tmp_path / 'cache_run'}",
                                             f"paths.data_dir={data_dir}", "extras.print_config=false"]))  # fmt: skip


def student_after(train_cfg, tmp_path, name, *overrides):
    from distillery.train import train

    train(train_cfg(*overrides, "test=false", out=tmp_path / name))
    ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt


def test_cached_teacher_trains_the_online_student_and_refuses_other_runs(
    train_cfg, tmp_path, data_dir, mnist1d_teacher_ckpt
):
    """mnist1d_kd for 8 steps with the teacher's logits read from the cache: the very
    same student as with the live teacher (full fp32 logits are exact). The cache is
    sharded, resumable, and refused for another teacher, other data, random views, a
    truncated shard or an unfinished write."""
    run = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=1200",
           f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    cache = tmp_path / "cache"
    meta = write(tmp_path, data_dir, *run, f"cache.dir={cache}", "cache.shard_rows=700")
    shards = sorted(cache.glob("shard_*.safetensors"))
    assert meta["complete"] and meta["rows"] == 1 + 800 + 1200 + 200 + 200 and len(shards) == 3

    steps = ["+trainer.max_steps=8", "trainer.max_epochs=1"]
    online = student_after(train_cfg, tmp_path, "online", *run, *steps)
    cached = student_after(train_cfg, tmp_path, "cached", *run, *steps, f"teacher.cache={cache}")
    for k, v in online["state_dict"].items():
        assert torch.equal(cached["state_dict"][k], v), k
    assert cached["distillery"]["teacher"]["sha256"] == online["distillery"]["teacher"]["sha256"]

    from distillery.engine.builder import build_run
    from distillery.teacher_cache.keys import row_keys
    from distillery.teacher_cache.store import CachedOutputs

    with pytest.raises(
        ValueError, match=r"teacher.cache: 3 of 3 teacher inputs are not in the cache"
    ):
        CachedOutputs(cache)(torch.randn(3, 40))  # inputs it was not written for
    x = torch.randn(4, 40)
    y = x.clone()
    y[2, 17] = torch.nextafter(y[2, 17], torch.tensor(1.0))  # one bit of one value
    assert (row_keys(x) != row_keys(y)).tolist() == [False, False, True, False]
    assert row_keys(x.double()).tolist() != row_keys(x).tolist()  # dtype is part of the key

    def refused(*overrides, match):
        with pytest.raises(ConfigError, match=match):
            build_run(train_cfg(*run, f"teacher.cache={cache}", *overrides))

    refused(
        "teacher.ckpt_path=/elsewhere/teacher.ckpt",
        match=r"teacher.cache: .* teacher.ckpt_path differ",
    )
    refused("data.transfer_size=600", match=r"data.transfer_size differ")
    refused("views=mixup_signal", match=r"another run: .*views")
    build_run(train_cfg(*run, f"teacher.cache={cache}", "data.batch_size=32"))  # loader-only change

    # resumable: a lost last shard and an unfinished record are written again, the rest kept
    shards[-1].unlink()
    record = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**record, "complete": False}))
    refused(match="incomplete")
    kept = shards[0].stat().st_mtime_ns
    assert (
        write(tmp_path, data_dir, *run, f"cache.dir={cache}", "cache.shard_rows=700")["rows"]
        == meta["rows"]
    )
    assert shards[0].stat().st_mtime_ns == kept
    with pytest.raises(ValueError, match=r"cache.dir: .* another run \(.*data.transfer_size"):
        write(tmp_path, data_dir, *run, "data.transfer_size=600", f"cache.dir={cache}")
    with pytest.raises(ConfigError, match=r"cache.k: 10 is not below the teacher's 10 outputs"):
        write(tmp_path, data_dir, *run, f"cache.dir={tmp_path / 'k10'}", "cache.k=10")
    with pytest.raises(ConfigError, match=r"cache.indices: 'zip' is not one of"):
        write(
            tmp_path,
            data_dir,
            *run,
            f"cache.dir={tmp_path / 'z'}",
            "cache.k=4",
            "cache.indices=zip",
        )
    assert not (tmp_path / "z").exists()  # refused before anything is written
    with pytest.raises(
        ConfigError, match=r"cache.indices: delta codes top-k token ids; set cache.k"
    ):
        write(tmp_path, data_dir, *run, f"cache.dir={tmp_path / 'd'}", "cache.indices=delta")
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # truncated
    refused(match=r"teacher.cache: cannot read cache shard .*shard_00001")


def test_topk_token_cache(train_cfg, tmp_path, data_dir, tokenizer_dir, text_teacher_ckpt):
    """text_lm_kd from a top-k cache (k = 16 of 512 tokens, fp16 log-probabilities, int16
    ids): bytes per token as designed, read back as a distribution whose KL from the
    teacher's falls with k, the run trains; a full cache (k: null) gives the online
    student."""
    from distillery.engine.teacher import from_run_checkpoint
    from distillery.teacher_cache.store import CachedOutputs, bytes_per_row

    run = ["experiment=text_lm_kd", *text_overrides(tokenizer_dir, data_dir), f"teacher.ckpt_path={text_teacher_ckpt}",
           "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]  # fmt: skip
    topk = tmp_path / "top16"
    meta = write(tmp_path, data_dir, *run, f"cache.dir={topk}", "cache.k=16", "cache.dtype=fp16")
    assert meta["vocab"] == 512 and meta["rows"] > 100
    # per token: 16 fp16 values + 16 int16 ids + a float32 remaining mass; per row a key
    per_token = (bytes_per_row(topk) - 8) / 32
    assert 16 * 2 + 16 * 2 + 4 <= per_token < 16 * 2 + 16 * 2 + 4 + 4  # + safetensors headers

    teacher = from_run_checkpoint(str(text_teacher_ckpt))
    ids = torch.stack(_some_rows(data_dir, run))
    with torch.no_grad():
        logits = teacher(ids).float()
    q = CachedOutputs(topk)(ids)  # what a run reads: the stored rows, expanded
    torch.testing.assert_close(q, topk_reference(logits, 16, half=True))
    assert torch.allclose(q.exp().sum(-1), torch.ones(()), atol=1e-3)  # a distribution
    p = torch.log_softmax(logits, -1)

    def kl(k):  # KL(teacher || its top-k cache), per position
        return float((p.exp() * (p - topk_reference(logits, k))).sum(-1).mean())

    errors = [kl(k) for k in (16, 64, 256)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02, errors

    # delta-coded ids: lossless (the same distribution read back), fewer bytes; with q8
    # values the smallest variant
    delta = tmp_path / "top16_delta"
    write(tmp_path, data_dir, *run, f"cache.dir={delta}", "cache.k=16", "cache.dtype=fp16",
          "cache.indices=delta", "cache.shard_rows=37")  # fmt: skip
    torch.testing.assert_close(CachedOutputs(delta)(ids), q, rtol=0, atol=0)
    assert bytes_per_row(delta) < bytes_per_row(topk) - 16 * 0.5 * 32  # < 1.5 bytes an id
    with pytest.raises(ValueError, match=r"cache.dir: .* another run \(.*indices"):
        write(tmp_path, data_dir, *run, f"cache.dir={delta}", "cache.k=16", "cache.dtype=fp16")

    steps = ["+trainer.max_steps=3", "trainer.max_epochs=1"]
    from_topk = student_after(train_cfg, tmp_path, "topk", *run, *steps, f"teacher.cache={topk}")
    assert from_topk["global_step"] == 3
    full = tmp_path / "full"
    write(tmp_path, data_dir, *run, f"cache.dir={full}")
    online = student_after(train_cfg, tmp_path, "online", *run, *steps)
    cached_full = student_after(
        train_cfg, tmp_path, "full_run", *run, *steps, f"teacher.cache={full}"
    )
    for k, v in online["state_dict"].items():
        torch.testing.assert_close(cached_full["state_dict"][k], v, rtol=0, atol=0)


def _some_rows(data_dir, run):
    """A few training sequences of the run (what the cache was written from)."""
    from distillery.config import build

    cfg = compose_cfg("train", [*run, f"paths.data_dir={data_dir}"])
    dm = build(cfg.data, "data")
    dm.prepare_data()
    dm.setup("fit")
    return [dm.train_set[i]["input_ids"] for i in range(4)]


def test_runs_a_cache_cannot_serve_are_refused_by_key():
    from omegaconf import OmegaConf

    from distillery.engine.builder import build_frozen_model
    from distillery.tasks import (
        CausalLMTask,
        ClassificationTask,
        EmbeddingTask,
        GenerativeLMTask,
    )
    from distillery.teacher_cache.store import unsupported

    def problems(task=None, **cfg):
        return " | ".join(unsupported(OmegaConf.create(cfg), task or ClassificationTask()))

    assert problems() == ""
    assert problems(data={"augment": True}).startswith("data.augment:")
    augment = {"_target_": "distillery.recipes.augment.SignalAugment"}
    assert problems(views={"augment": augment}).startswith("views.augment: random augmentation")
    assert problems(views={"augment": augment, "pool": 4}) == ""  # a pool of views: cached
    assert problems(views={"augment": augment, "pool": 4, "mix": {"alpha": 1}}).startswith(
        "views.mix: a mixed input depends on its batch partner"
    )
    assert problems(CausalLMTask(), data={"format": "prompt_response"}) == ""  # causal: by tokens
    assert problems(GenerativeLMTask()).startswith("task: generative_lm has the teacher generate")
    assert problems(EmbeddingTask()).startswith("task: batches pad rows")
    assert problems(teacher={"bn_mode": "batch_stats"}).startswith("teacher.bn_mode:")
    assert problems(taps={"teacher": {"f": "layer1"}}) == ""  # features cached per row
    padded = {"format": "prompt_response"}
    assert problems(CausalLMTask(), data=padded, taps={"teacher": {"f": "h"}}).startswith(
        "taps.teacher: the cache stores tapped features per row"
    )
    assert problems(CausalLMTask(fused=True)).startswith("task.fused:")
    node = {
        "_target_": "distillery.engine.teacher.from_run_checkpoint",
        "ckpt_path": "x",
        "cache": "/c",
    }
    with pytest.raises(ConfigError, match="frozen.reference.cache: only the teacher"):
        build_frozen_model(node, "frozen.reference")


def test_delta_coded_ids_are_leb128_gaps_and_read_back_by_row():
    """The byte format by hand (gaps 0, 4, 194: 194 = 0b1_1000010 takes two bytes, low
    seven bits first with the high bit set), a round trip over a 128k vocabulary with
    rows of different byte lengths, read back row by row in any order; a stream that does
    not hold the expected ids is refused; a corrupt shard is refused naming the key."""
    from distillery.teacher_cache.codec import delta_decode, delta_encode, ragged_rows

    codes, lengths = delta_encode(torch.tensor([[0, 5, 200]]))
    assert codes.tolist() == [0x00, 0x04, 0xC2, 0x01] and lengths.tolist() == [4]
    assert delta_decode(codes, (1, 3)).tolist() == [[0, 5, 200]]

    g = torch.Generator().manual_seed(0)
    ids = torch.rand(6, 5, 131072, generator=g).topk(32, dim=-1).indices.sort(-1).values
    ids[0, 0] = torch.arange(32)  # gaps of 0: one byte each
    ids[1, 0, -1] = 131071  # a gap of > 2^14: three bytes
    codes, lengths = delta_encode(ids)
    assert len(set(lengths.tolist())) > 1 and int(lengths.sum()) == len(codes)
    assert torch.equal(delta_decode(codes, tuple(ids.shape)), ids)
    starts = torch.cumsum(lengths.long(), 0) - lengths.long()
    rows = torch.tensor([4, 1, 1, 0])
    picked = ragged_rows(codes, starts[rows], lengths[rows])
    assert torch.equal(delta_decode(picked, (4, 5, 32)), ids[rows])
    with pytest.raises(ValueError, match="holds 960 ids, expected 961"):
        delta_decode(codes, (961,))
    with pytest.raises(ValueError, match="sorted and distinct"):
        delta_encode(torch.tensor([[3, 1]]))


def test_delta_cache_shard_that_lost_bytes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from distillery.teacher_cache.codec import compress
    from distillery.teacher_cache.keys import row_keys
    from distillery.teacher_cache.store import CachedOutputs, CacheWriter

    x = torch.randn(5, 3, 40)
    writer = CacheWriter(tmp_path, {"k": 4, "dtype": "q8", "indices": "delta", "vocab": 40})
    writer.add(row_keys(x).tolist(), compress(x, 4, torch.uint8, "delta"))
    writer.close()
    read = CachedOutputs(tmp_path)(x)
    p = torch.log_softmax(x, -1)
    top = p.topk(4, -1)
    torch.testing.assert_close(read.gather(-1, top.indices), top.values, atol=0.02, rtol=0)
    shard = next(tmp_path.glob("shard_*"))
    tensors = load_file(str(shard))
    save_file({**tensors, "index_codes": tensors["index_codes"][:-3]}, str(shard))
    with pytest.raises(ValueError, match=r"teacher.cache: cache shard .*shard_00000.* corrupt"):
        CachedOutputs(tmp_path)


def _pairs(path, n=60, last=""):
    import json as _json

    rows = [{"prompt": f"def f{i}(x):", "response": " return x + " + "1" * (i % 7 + 1) + last}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    return path


def _padded(rows, pad_id, width=None):
    width = width or max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    return batch, torch.tensor([len(r) for r in rows])


def test_padded_prompt_response_rows_are_cached_by_their_tokens(
    train_cfg, tmp_path, data_dir, tokenizer_dir, text_teacher_ckpt
):
    """text_prompt_kd (rows right-padded to their batch's longest): a row is keyed by its
    tokens alone, so a cache written in batches of 512 serves training batches of 8; the
    full-logit cache trains the online student, and a delta-coded top-k cache reads back
    what the teacher gives at every real position of any padding. A row whose text ends
    in the pad token is refused at write time, naming data."""
    from distillery.engine.teacher import from_run_checkpoint
    from distillery.teacher_cache.keys import ragged_row_keys
    from distillery.teacher_cache.store import CachedOutputs

    pairs = _pairs(tmp_path / "pairs.jsonl")
    run = ["experiment=text_prompt_kd", *text_overrides(tokenizer_dir, data_dir), f"data.source={pairs}",
           f"teacher.ckpt_path={text_teacher_ckpt}", "data.batch_size=8",
           "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]  # fmt: skip
    full = tmp_path / "full"
    meta = write(tmp_path, data_dir, *run, f"cache.dir={full}")
    assert (
        meta["pad_id"] is not None and meta["rows"] == 1 + 60
    )  # + the dry-run example (2 equal rows)
    steps = ["+trainer.max_steps=3", "trainer.max_epochs=1"]
    online = student_after(train_cfg, tmp_path, "online", *run, *steps)
    cached = student_after(train_cfg, tmp_path, "cached", *run, *steps, f"teacher.cache={full}")
    assert cached["distillery"]["teacher"]["cache"] == str(full)  # read from the cache
    for k, v in online["state_dict"].items():  # padding widths differ: float tolerance
        torch.testing.assert_close(cached["state_dict"][k], v)

    from distillery.config import build

    dm = build(compose_cfg("train", [*run, f"paths.data_dir={data_dir}"]).data, "data")
    dm.setup("fit")
    rows = [dm.train_set[i]["input_ids"] for i in (0, 20, 40, 7, 33)]  # across shards of 16
    assert len({len(r) for r in rows}) > 1
    teacher = from_run_checkpoint(str(text_teacher_ckpt))
    top = tmp_path / "top8"
    write(tmp_path, data_dir, *run, f"cache.dir={top}", "cache.k=8", "cache.indices=delta",
          "cache.dtype=q8", "cache.shard_rows=16", "cache.batch_size=8")  # fmt: skip
    read = CachedOutputs(top)
    assert len(read.shards) >= 3 and len({int(read.shard_of[read.order[torch.searchsorted(
        read.sorted_keys, k)]]) for k in ragged_row_keys(*_padded(rows, dm.pad_id))}) > 1  # fmt: skip
    for width in (max(len(r) for r in rows), 32):  # two paddings of the same rows
        batch, _ = _padded(rows, dm.pad_id, width)
        with torch.no_grad():
            got, logits = read(batch), teacher(batch).float()
        assert got.shape == logits.shape
        for i, r in enumerate(rows):
            n = len(r)
            want = topk_reference(logits[i, :n], 8)
            top = want.topk(8).values  # q8: within half a level (+ fp16 min and max) of it
            low, high = top.amin(-1, keepdim=True), top.amax(-1, keepdim=True)
            bound = (high - low) / 510 + (low.abs() + high.abs()) * 2.0**-11 + 1e-5
            assert ((got[i, :n] - want).abs() <= bound).all()
            assert torch.allclose(got[i, n:].exp().sum(-1), torch.ones(())) if n < width else True

    bad = _pairs(tmp_path / "bad.jsonl", last="<|pad|>")
    with pytest.raises(ConfigError, match=r"data: a row's attention mask covers more"):
        write(tmp_path, data_dir, *run, f"data.source={bad}", f"cache.dir={tmp_path / 'bad'}")


def test_a_pool_of_views_is_cached_and_trains_the_online_student(
    train_cfg, tmp_path, data_dir, mnist1d_teacher_ckpt
):
    """views.pool: every view of every training sample is cached (view v of sample i
    from the seed i * pool + v), so a run with augmented views reads its teacher from
    the cache and trains the very student the live teacher gives; mixing, an unpooled
    augmentation and a cache of another pool are refused by key."""
    from distillery.engine.builder import build_run

    pool = ["views=augment_signal_pool", "views.pool=3"]
    run = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=400", *pool,
           f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    cache = tmp_path / "views"
    meta = write(tmp_path, data_dir, *run, f"cache.dir={cache}")
    assert meta["rows"] == 1 + 3 * (800 + 400) + 200 + 200 and meta["views"]["pool"] == 3

    steps = ["+trainer.max_steps=8", "trainer.max_epochs=1"]
    online = student_after(train_cfg, tmp_path, "online", *run, *steps)
    cached = student_after(train_cfg, tmp_path, "cached", *run, *steps, f"teacher.cache={cache}")
    assert cached["distillery"]["teacher"]["cache"] == str(cache)
    for k, v in online["state_dict"].items():
        assert torch.equal(cached["state_dict"][k], v), k

    def refused(*overrides, match):
        with pytest.raises(ConfigError, match=match):
            build_run(train_cfg(*run, f"teacher.cache={cache}", *overrides))

    refused("views.pool=4", match=r"teacher.cache: .* views.pool differ")
    refused("views=mixup_signal", match=r"views.mix differ")
    refused("views.pool=null", match=r"views.pool differ")


def test_tapped_teacher_features_are_cached_and_train_the_online_student(
    train_cfg, tmp_path, data_dir, mnist1d_teacher_ckpt
):
    """taps.teacher: the writer stores each tap's capture per row beside the logits, so
    mnist1d_fitnet (a hint on the input of the teacher's head) reads its teacher from
    the cache and trains the very student the live teacher gives; a tap matching
    several modules comes back as their list; a run without teacher taps reads the
    logits alone; a cache without the run's tap, or holding it for another module, is
    refused by key."""
    from distillery.config import build
    from distillery.engine.builder import build_run
    from distillery.engine.taps import CachedTaps, DuplicateCaptureError, Taps
    from distillery.engine.teacher import from_run_checkpoint
    from distillery.teacher_cache.codec import compress_features
    from distillery.teacher_cache.keys import row_keys
    from distillery.teacher_cache.store import CachedOutputs

    run = ["experiment=mnist1d_fitnet", *SMALL_MNIST1D, "data.transfer_size=400",
           f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    cache = tmp_path / "fitnet"
    glob = "+taps.teacher.convs={path: 'features.[036]', kind: output}"  # three modules
    meta = write(tmp_path, data_dir, *run, glob, f"cache.dir={cache}", "cache.shard_rows=500")
    assert meta["taps"]["hint"] == {"path": "head", "kind": "input", "index": 0, "targets": 1}
    assert meta["taps"]["convs"]["targets"] == 3

    steps = ["+trainer.max_steps=8", "trainer.max_epochs=1"]
    online = student_after(train_cfg, tmp_path, "online", *run, *steps)
    cached = student_after(train_cfg, tmp_path, "cached", *run, *steps, f"teacher.cache={cache}")
    assert set(online["state_dict"]) == set(cached["state_dict"])  # the hint's projector too
    for k, v in online["state_dict"].items():
        assert torch.equal(cached["state_dict"][k], v), k

    # every tap reads back what the live teacher's taps capture, across shards
    read = CachedOutputs(cache)
    data = build(train_cfg(*run).data, "data")
    data.prepare_data()
    data.setup("fit")
    x = torch.stack([data.train_set[i]["inputs"] for i in (700, 3, 5)])  # two shards, reordered
    assert len(read.shards) > 1 and len(set(read.shard_of[read.order[
        torch.searchsorted(read.sorted_keys, row_keys(x))]].tolist())) == 2  # fmt: skip
    teacher = from_run_checkpoint(str(mnist1d_teacher_ckpt))
    specs = {"hint": {"path": "head", "kind": "input"}, "convs": "features.[036]"}
    with Taps(teacher.network, specs, "teacher", detach=True) as live, torch.no_grad():
        logits = teacher(x)
        expected = dict(live.captured)
    with CachedTaps(read, specs) as stored:
        assert torch.equal(read(x), logits)
        assert torch.equal(stored.captured["hint"], expected["hint"])
        assert all(map(torch.equal, stored.captured["convs"], expected["convs"]))
        with pytest.raises(DuplicateCaptureError, match="read twice in one forward"):
            read(x)  # not cleared in between: as live taps, refused
        stored.active = False  # silent taps: the features are not read
        stored.clear()
        read(x)
        assert stored.captured == {}
    assert read.sink is None  # removed

    with pytest.raises(ValueError, match=r"taps.teacher.big: .* overflow torch.float16"):
        compress_features({"big": torch.full((2, 3), 1e6)}, 2, torch.uint8)  # q8: fp16 features
    with pytest.raises(ValueError, match=r"taps.teacher.pooled: .* not one row per input"):
        compress_features({"pooled": torch.ones(3)}, 2, torch.float32)

    kd = ["experiment=mnist1d_kd", *SMALL_MNIST1D, "data.transfer_size=400",
          f"teacher.ckpt_path={mnist1d_teacher_ckpt}"]  # fmt: skip
    build_run(train_cfg(*kd, f"teacher.cache={cache}"))  # no teacher taps: the logits alone
    plain = tmp_path / "plain"
    write(tmp_path, data_dir, *kd, f"cache.dir={plain}")
    with pytest.raises(
        ConfigError, match=r"taps.teacher.hint: the teacher cache at .* holds no such tap"
    ):
        build_run(train_cfg(*run, f"teacher.cache={plain}"))
    with pytest.raises(
        ConfigError, match=r"taps.teacher.hint: .* holds it for \{'path': 'head', 'kind': 'input'"
    ):
        build_run(train_cfg(*run, "taps.teacher.hint={path: features.8}", f"teacher.cache={cache}"))


def test_view_pool_views_are_fixed_per_sample_and_seed():
    """A sample's v-th view is the same in any batch, order or process; different seeds
    give different views; bad pools are refused naming views.pool / views.augment."""
    from distillery.recipes.augment import SignalAugment
    from distillery.recipes.views import Views

    views = Views(SignalAugment(max_shift=3), pool=4)
    x, ids = torch.randn(6, 40), torch.arange(100, 106)
    a = views.pooled(x, ids, 2)
    b = views.pooled(x.flip(0), ids.flip(0), 2).flip(0)  # another batch order
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(views.pooled(x[2:3], ids[2:3], 2), a[2:3], rtol=0, atol=0)
    assert not torch.equal(views.pooled(x, ids, 3), a)
    torch.manual_seed(0)
    out = views(x, torch.zeros(6, dtype=torch.long), 10, ids)
    assert out.student is out.teacher  # consistent
    per_view = torch.stack([views.pooled(x, ids, v) for v in range(4)])  # [4, 6, 40]
    assert all(any(torch.equal(out.student[i], per_view[v, i]) for v in range(4)) for i in range(6))

    with pytest.raises(ValueError, match="views.pool: 0 is not a positive integer"):
        Views(SignalAugment(), pool=0)
    with pytest.raises(ValueError, match="views.pool: pooled views are shared"):
        Views(SignalAugment(), pool=2, consistent=False)
    with pytest.raises(ValueError, match="views.augment: Identity.forward takes no seeds"):
        Views(torch.nn.Identity(), pool=2)
