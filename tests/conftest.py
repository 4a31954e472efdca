import os
import sys

# Nothing may be downloaded in tests (the Makefile exports these too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from distillery.config.resolvers import CONFIG_DIR, PROJECT_ROOT  # noqa: E402

SMALL_MNIST1D = ["data.num_samples=1000", "data.val_size=200"]

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pool

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core, so
    os.environ["OMP_NUM_THREADS"] = "1"  # N workers (and their subprocesses) do not
    torch.set_num_threads(1)  # oversubscribe N cores


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """The session fails if a process a test started is still alive at its end."""
    import processes

    processes.become_subreaper()
    # Tests never run under MPI. Lightning's MPIEnvironment.detect() initializes MPI when
    # mpi4py is installed (a GPU image has it), and Open MPI then spawns an `orted` daemon
    # that outlives the session; the tests' Trainers do not ask MPI.
    import lightning.fabric.plugins.environments.mpi as lightning_mpi

    lightning_mpi._MPI4PY_AVAILABLE = False
    yield
    if "wandb" in sys.modules:  # W&B runs in-process start its service; end it as W&B does
        sys.modules["wandb"].teardown()
    left = processes.survivors()
    if left:
        pytest.fail("processes outlived the test session (killed now):\n" + "\n".join(
            f"  {pid}: {cmd}" for pid, cmd in left.items()), pytrace=False)  # fmt: skip


@pytest.fixture(autouse=True)
def ended_processes():
    """Whatever a test's outcome, the process groups it started end with it."""
    import processes

    yield
    processes.stop_all()


def compose_cfg(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One generated-data cache for the whole session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def train_cfg(tmp_path, data_dir):
    """compose conf/train.yaml with outputs under tmp_path and quiet extras."""

    def make(*overrides: str, out: Path | None = None):
        out = out or tmp_path / "run"
        return compose_cfg(
            "train",
            [
                *overrides,
                f"paths.output_dir={out}",
                f"paths.data_dir={data_dir}",
                f"paths.artifacts_dir={tmp_path / 'artifacts'}",
                "extras.print_config=false",
            ],
        )

    return make


def train_teacher(tmp_path_factory, data_dir: Path, name: str, *overrides: str) -> Path:
    """Run experiment ``name`` briefly and export its best checkpoint (a real run)."""
    from distillery.train import train

    out = tmp_path_factory.mktemp(name)
    ckpt = out / "teacher.ckpt"
    cfg = compose_cfg("train", [
        f"experiment={name}", *overrides, "trainer.max_epochs=2", f"paths.output_dir={out}",
        f"paths.data_dir={data_dir}", f"export_ckpt={ckpt}", "extras.print_config=false",
    ])  # fmt: skip
    train(cfg)
    return ckpt


@pytest.fixture(scope="session")
def mnist1d_teacher_ckpt(tmp_path_factory, data_dir) -> Path:
    """A small trained MNIST-1D CNN teacher checkpoint."""
    return train_teacher(tmp_path_factory, data_dir, "mnist1d_teacher", *SMALL_MNIST1D)


@pytest.fixture(scope="session")
def digits_teacher_ckpt(tmp_path_factory, data_dir) -> Path:
    return train_teacher(tmp_path_factory, data_dir, "digits_teacher")


@pytest.fixture(scope="session")
def bert_teacher_ckpt(tmp_path_factory, data_dir) -> Path:
    """A briefly trained 4-layer BERT teacher on digits-as-tokens."""
    return train_teacher(tmp_path_factory, data_dir, "digits_bert_teacher")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 512-token BPE trained on the pydoc corpus (shared by the text tests)."""
    path = tmp_path_factory.mktemp("tok") / "pydoc_bpe_512"
    from distillery.data.text import TextDataModule

    TextDataModule(tokenizer=str(path), train_tokenizer_vocab=512).load_tokenizer()
    return path


def text_overrides(tokenizer_dir, data_dir):
    return [f"data.tokenizer={tokenizer_dir}", "data.train_tokenizer_vocab=null", "data.seq_len=32",
            f"data.cache_dir={data_dir}/text_cache", "student.config.vocab_size=512", "student.config.n_positions=32"]  # fmt: skip


@pytest.fixture(scope="session")
def text_teacher_ckpt(tmp_path_factory, data_dir, tokenizer_dir):
    """A tiny GPT-2 teacher trained for 5 batches on the pydoc corpus."""
    from distillery.train import train

    out = tmp_path_factory.mktemp("text_teacher")
    cfg = compose_cfg("train", [
        "experiment=text_lm_teacher", *text_overrides(tokenizer_dir, data_dir), "trainer.max_epochs=1",
        "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
        f"paths.output_dir={out}", f"export_ckpt={out / 'teacher.ckpt'}", "extras.print_config=false",
    ])  # fmt: skip
    train(cfg)
    return out / "teacher.ckpt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


__all__ = ["PROJECT_ROOT", "SMALL_MNIST1D", "compose_cfg", "text_overrides"]


# --- the embedded arith task (tests/test_generative.py, tests/test_inherited.py) ---
SMALL_ARITH = ["data.num_train=400", "data.num_val=16", "data.num_test=16", "data.eval_batch_size=8",
         "data.batch_size=8", "data.labeled=100"]  # fmt: skip


@pytest.fixture(scope="session")
def arith_tok(tmp_path_factory):
    return tmp_path_factory.mktemp("arith") / "arith_char"


@pytest.fixture(scope="session")
def arith_teacher_ckpt(tmp_path_factory, data_dir, arith_tok):
    """A 4-layer arith teacher trained for a few steps (a real run, not a good teacher)."""
    from distillery.train import train

    out = tmp_path_factory.mktemp("arith_teacher")
    cfg = compose_cfg("train", [
        "experiment=arith_teacher", *SMALL_ARITH, f"data.tokenizer={arith_tok}", "trainer.max_steps=6", "scheduler.warmup_steps=2",
        "trainer.val_check_interval=3", f"paths.output_dir={out}", f"paths.data_dir={data_dir}",
        f"export_ckpt={out / 'teacher.ckpt'}", "extras.print_config=false",
    ])  # fmt: skip
    train(cfg)
    return out / "teacher.ckpt"
