"""Text for language-model distillation, on HuggingFace ``datasets``.

Sources (``source``): ``pydoc`` (the English documentation text that ships with
CPython in ``pydoc_data.topics``: works offline anywhere), ``docstrings`` (the
docstrings of the standard library, ~7k documents and 1.6M characters, six times the
sentences of ``pydoc``; ``docstrings:numpy,torch`` adds installed packages'), a local
``.txt`` / ``.jsonl`` / ``.parquet`` file (``text_field`` names the column), or a hub
dataset name (online).
Documents are tokenized once with a cached ``map``, concatenated with EOS and packed
into blocks of ``seq_len + 1`` tokens; blocks are split deterministically (``seed``)
into train/val/test. Batches: ``input_ids`` and ``labels`` ``[B, seq_len]`` (labels are
the next tokens; ``-100`` is ignored), ``attention_mask`` and ``sample_id``.

With ``format: prompt_response`` the source is a ``.jsonl`` of ``prompt_field`` /
``response_field`` pairs (e.g. written by ``python -m distillery.generate``): each
example is ``prompt + response + EOS``, truncated to ``seq_len + 1`` tokens, padded per
batch; the prompt and the padding are masked out of ``labels`` (``-100``).

``tokenizer`` is a pretrained name or local directory; with ``train_tokenizer_vocab``
set and no tokenizer there yet, a byte-level BPE of that size is trained on the
training text and saved to that directory (an HF fast tokenizer), so a fresh machine
needs no download.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from distillery.data.base import make_loader, read_jsonl, split_indices

IGNORE = -100


SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}


def docstrings(packages: list[str] = (), stdlib: bool = True) -> list[str]:
    """The docstrings (module, class, function) of the standard library's modules and of
    the installed ``packages``, read with ``ast`` (nothing is imported), deduplicated, in
    the sorted order of their files: the same list wherever the same versions are
    installed. Test suites and demos are left out."""
    import ast
    import importlib.util
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"])] if stdlib else []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"data.source: docstrings:{name}: no installed package {name!r}")
        roots += [Path(p) for p in spec.submodule_search_locations]
    seen: dict[str, None] = {}
    for root in roots:
        files = sorted(
            p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts)
        )
        for path in files:
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and doc.strip():
                        seen.setdefault(doc.strip(), None)
    return list(seen)


def load_documents(source: str, text_field: str = "text") -> list[str]:
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source == "docstrings" or source.startswith("docstrings:"):
        packages = [p for p in source.partition(":")[2].split(",") if p]
        return docstrings(packages)
    path = Path(source).expanduser()
    import datasets

    if path.suffix in (".txt", ".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"data.source: file not found: {path}")
        kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}[
            path.suffix
        ]
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(source, split="train")  # hub name (needs network)
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field: {text_field!r} not in {ds.column_names}")
    return [t for t in ds[text_field] if t]


def load_tokenizer(name_or_path: str):
    """An HF tokenizer from a local directory or a hub name (``data.tokenizer``)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except OSError as e:
        raise FileNotFoundError(f"data.tokenizer: cannot load {name_or_path!r} ({e})") from e


def train_bpe(texts: list[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on ``texts``, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


class BlockDataset(Dataset):
    def __init__(self, blocks: torch.Tensor, ids: torch.Tensor):
        self.blocks, self.ids = blocks, ids

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        b = self.blocks[i]
        return {
            "input_ids": b[:-1],
            "labels": b[1:],
            "attention_mask": torch.ones_like(b[:-1]),
            "sample_id": self.ids[i],
        }


class PairDataset(Dataset):
    """Prompt/response examples: variable-length ``input_ids`` and ``labels``."""

    def __init__(self, examples: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor):
        self.examples, self.ids = examples, ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        x, y = self.examples[i]
        return {"input_ids": x, "labels": y, "sample_id": self.ids[i]}


def pad_collate(pad_id: int):
    def collate(items: list[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = it["input_ids"], it["labels"], 1
        sample_ids = torch.stack([torch.as_tensor(it["sample_id"]) for it in items])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "sample_id": sample_ids}

    return collate


def load_pairs(path: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    fields = (prompt_field, response_field)
    rows = read_jsonl(path, "data.source (data.prompt_field/response_field)", fields)
    pairs = [(row[prompt_field], row[response_field]) for row in rows]
    return pairs


class TextDataModule(L.LightningDataModule):
    output_kind = "token_logits"

    def __init__(
        self,
        tokenizer: str,
        source: str = "pydoc",
        text_field: str = "text",
        seq_len: int = 128,
        format: str = "packed",
        prompt_field: str = "prompt",
        response_field: str = "response",
        train_tokenizer_vocab: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
        if format not in ("packed", "prompt_response"):
            raise ValueError(f"data.format must be packed or prompt_response, got {format!r}")
        self.tokenizer_path, self.source, self.text_field = tokenizer, source, text_field
        self.format, self.prompt_field, self.response_field = format, prompt_field, response_field
        self.collate = None
        self.pad_id = None  # prompt_response: rows right-padded with this id (teacher cache)
        self.seq_len, self.train_tokenizer_vocab = seq_len, train_tokenizer_vocab
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.batch_size, self.eval_batch_size, self.num_workers = (
            batch_size,
            eval_batch_size,
            num_workers,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.input_norm = None
        self.tokenizer = None
        self.train_set = self.val_set = self.test_set = None

    @property
    def vocab_size(self) -> int:
        return len(self.load_tokenizer())

    def load_tokenizer(self):
        if self.tokenizer is None:
            path = Path(self.tokenizer_path).expanduser()
            if self.train_tokenizer_vocab and not (path / "tokenizer.json").is_file():
                self.tokenizer = train_bpe(
                    load_documents(self.source, self.text_field), self.train_tokenizer_vocab, path
                )
            else:
                self.tokenizer = load_tokenizer(self.tokenizer_path)
        return self.tokenizer

    def example_input(self, n: int = 2) -> torch.Tensor:
        return torch.ones(n, self.seq_len, dtype=torch.long)

    def prepare_data(self) -> None:
        self.load_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import datasets

        tok = self.load_tokenizer()
        if self.format == "prompt_response":
            self._setup_pairs(tok)
            return
        docs = load_documents(self.source, self.text_field)
        key = hashlib.sha256(
            f"{self.source}|{self.tokenizer_path}|{len(docs)}".encode()
        ).hexdigest()[:16]
        ds = datasets.Dataset.from_dict({"text": docs})
        cache = None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cache = str(self.cache_dir / f"tokenized_{key}.arrow")
        ds = ds.map(
            lambda b: {"ids": tok(b["text"])["input_ids"]},
            batched=True,
            remove_columns=["text"],
            cache_file_name=cache,
            load_from_cache_file=cache is not None,
        )
        eos = tok.eos_token_id
        stream = torch.tensor([t for ids in ds["ids"] for t in (*ids, eos)], dtype=torch.long)
        n_blocks = (len(stream) - 1) // self.seq_len
        if n_blocks < 3:
            raise ValueError(
                f"data.source: {len(stream)} tokens is too little text for seq_len={self.seq_len}"
            )
        blocks = stream[: n_blocks * self.seq_len + 1].unfold(0, self.seq_len + 1, self.seq_len)
        parts = split_indices(n_blocks, self.val_fraction, self.test_fraction, self.seed)
        self.val_set, self.test_set, self.train_set = (
            BlockDataset(blocks[parts[k]], parts[k]) for k in ("val", "test", "train")
        )

    def _setup_pairs(self, tok) -> None:
        pairs = load_pairs(self.source, self.prompt_field, self.response_field)
        examples = []
        for prompt, response in pairs:
            p = tok(prompt)["input_ids"]
            ids = p + tok(response)["input_ids"] + [tok.eos_token_id]
            tokens = torch.tensor(ids[: self.seq_len + 1])
            labels = tokens[1:].clone()
            labels[: max(len(p) - 1, 0)] = IGNORE  # positions whose next token is in the prompt
            examples.append((tokens[:-1], labels))
        n = len(examples)
        if n < 3:
            raise ValueError(f"data.source: {n} examples is too few to split")
        parts = split_indices(n, self.val_fraction, self.test_fraction, self.seed)
        self.val_set, self.test_set, self.train_set = (
            PairDataset([examples[i] for i in parts[k].tolist()], parts[k])
            for k in ("val", "test", "train")
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.collate, self.pad_id = pad_collate(pad), pad

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        return make_loader(ds, batch_size, shuffle, self.num_workers, collate_fn=self.collate)

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size, False)
