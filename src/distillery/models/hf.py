"""HuggingFace transformers models with the Distillery call convention (logits out).

Both wrappers build their model from a pretrained name or local directory
(``pretrained``, with ``attn_implementation``, ``dtype``, ``trust_remote_code``) or,
offline, from a config dict with ``model_type`` (the tests and CPU experiments use tiny
BERTs and GPT-2s built this way).

* ``HFSequenceClassifier``: ``AutoModelForSequenceClassification``; token ids ``[B, N]``
  in, ``[B, num_classes]`` out; ``pad_token_id`` positions are masked out of attention.
* ``HFCausalLM``: ``AutoModelForCausalLM``; token ids in, logits ``[B, L, V]`` out.
* ``HFSentenceEncoder``: ``AutoModel`` + pooling (+ a linear map to ``output_dim``) +
  L2 normalisation; token ids ``[B, N]`` in, sentence embeddings ``[B, D]`` out. With
  ``pretrained`` pointing at a sentence-transformers directory (all-MiniLM-L6-v2:
  mean pooling, normalised) it reproduces ``SentenceTransformer.encode``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def build_hf(
    auto_cls,
    config: dict[str, Any] | None,
    pretrained: str | None,
    attn_implementation: str,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    **overrides: Any,
) -> nn.Module:
    """``auto_cls.from_pretrained(pretrained)`` or ``auto_cls.from_config(config)``."""
    from transformers import AutoConfig

    if (config is None) == (pretrained is None):
        raise ValueError(
            "student/teacher: give exactly one of `config` (a dict with model_type) or `pretrained`"
        )
    torch_dtype = getattr(torch, dtype) if dtype else None
    if pretrained is not None:
        return auto_cls.from_pretrained(
            pretrained,
            attn_implementation=attn_implementation,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            **overrides,
        )
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.model_type is required (e.g. bert, gpt2)")
    built = AutoConfig.for_model(model_type, **{**cfg, **overrides})
    built._attn_implementation = attn_implementation
    model = auto_cls.from_config(built)
    return model.to(torch_dtype) if torch_dtype is not None else model


def hf_config(net):
    """The HF config of an HF-backed network (its ``model.config``); None for others."""
    return getattr(getattr(net, "model", None), "config", None)


def context_length(net) -> int | None:
    """The positions an HF-backed network (its ``model.config``) can attend over:
    ``n_positions`` or ``max_position_embeddings``; None when it states neither."""
    conf = hf_config(net)
    return getattr(conf, "n_positions", None) or getattr(conf, "max_position_embeddings", None)


class HFSequenceClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        attn_implementation: str = "sdpa",
        pad_token_id: int = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        overrides = {"num_labels": num_classes} | (
            {} if pretrained else {"pad_token_id": pad_token_id}
        )
        self.model = build_hf(
            AutoModelForSequenceClassification,
            config,
            pretrained,
            attn_implementation,
            trust_remote_code=trust_remote_code,
            **overrides,
        )
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: Tensor) -> Tensor:
        input_ids = input_ids.long()
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


class HFCausalLM(nn.Module):
    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        vocab_size: int | None = None,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM

        overrides = (
            {"vocab_size": vocab_size} if vocab_size is not None and pretrained is None else {}
        )
        self.model = build_hf(
            AutoModelForCausalLM,
            config,
            pretrained,
            attn_implementation,
            dtype,
            trust_remote_code,
            **overrides,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids.long(), attention_mask=attention_mask).logits

    def hidden_and_head(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        """The last hidden states and the output layer (``task.fused``): ``forward``'s
        logits are ``head(hidden)``, never built here."""
        from distillery.losses.fused import HeadOutputs

        if getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError(
                "task.fused: this model soft-caps its logits after the output layer; "
                "the fused loss would skip that: set task.fused=false"
            )
        out = self.model.base_model(input_ids=input_ids.long(), attention_mask=attention_mask)
        return HeadOutputs(out.last_hidden_state, self.model.get_output_embeddings())


class HFSentenceEncoder(nn.Module):
    """Sentence embeddings: e = normalize(W pool(h)), with h the encoder's last hidden
    states, pool the mean over non-padding tokens (``pooling: mean``) or the first token
    (``cls``), W a linear map to ``output_dim`` (identity when ``output_dim`` is null)
    and normalize the L2 normalisation (``normalize: true``). Padding is the
    ``pad_token_id`` positions, masked out of attention and of the mean."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        pooling: str = "mean",
        output_dim: int | None = None,
        normalize: bool = True,
        pad_token_id: int = 0,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        """Initialise the input embeddings from a teacher's with the ``student_init``
        step :func:`pca_init` (``conf/student_init/pca_embeddings.yaml``)."""
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        pretrained = None if pretrained is None else str(pretrained)
        self.model = build_hf(
            AutoModel, config, pretrained, attn_implementation, dtype, trust_remote_code
        )
        width = self.model.config.hidden_size
        self.proj = nn.Identity() if output_dim in (None, width) else nn.Linear(width, output_dim)
        self.pooling, self.normalize, self.pad_token_id = pooling, normalize, pad_token_id
        self.embedding_dim = output_dim or width

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def forward(self, input_ids: Tensor) -> Tensor:
        input_ids = input_ids.long()
        mask = (input_ids != self.pad_token_id).long()
        h = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        e = self.proj(pooled)
        return torch.nn.functional.normalize(e, dim=-1) if self.normalize else e


def pca_init(student: nn.Module, source: str) -> None:
    """``student_init`` step: :func:`pca_embeddings` on an HF student's inner model
    (``HFSentenceEncoder``, ``HFCausalLM``, ``HFSequenceClassifier``: ``student.model``)."""
    pca_embeddings(getattr(student, "model", student), str(source))


@torch.no_grad()
def pca_embeddings(model: nn.Module, source: str) -> None:
    """Initialise ``model``'s word, position and token-type embeddings from a pretrained
    model's (same tokenizer, any width): with W the source word embeddings [V, D_src],
    mu their mean and U the top-d principal directions of W - mu (d = this model's
    width), every source embedding table E becomes (E - mu) U. Position and type tables
    share the word basis, so their sums stay in one space. Tokens the training text
    never shows keep a meaningful embedding: the point of initialising from a teacher."""
    from transformers import AutoModel

    src = AutoModel.from_pretrained(source).embeddings
    dst = model.embeddings
    w = src.word_embeddings.weight.float()
    d = dst.word_embeddings.weight.shape[1]
    if w.shape[0] != dst.word_embeddings.weight.shape[0] or d > w.shape[1]:
        raise ValueError(
            f"{source} has {tuple(w.shape)} word embeddings; this model needs "
            f"the same vocabulary and a width <= {w.shape[1]}, has "
            f"{tuple(dst.word_embeddings.weight.shape)}"
        )
    mu = w.mean(0)
    centred = (w - mu).double()
    _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    basis = vecs[:, -d:].flip(1).float()  # [D_src, d], top-d principal directions
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table, target = getattr(src, name, None), getattr(dst, name, None)
        if table is None or target is None:
            continue
        n = min(table.weight.shape[0], target.weight.shape[0])
        centred = table.weight[:n].float() - (mu if name == "word_embeddings" else 0)
        target.weight[:n] = (centred @ basis).to(target.weight.dtype)


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an HF model (BERT-like ``encoder.layer``, GPT-2
    ``transformer.h`` / ``h``, Llama-like ``layers``)."""
    for path in ("encoder.layer", "transformer.h", "h", "model.layers", "layers"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__}: no stack of transformer layers found")


@torch.no_grad()
def layers_init(student: nn.Module, source: str, layers: list[int]) -> None:
    """``student_init`` step (``conf/student_init/teacher_layers.yaml``): the student's
    embeddings and its k-th transformer layer become the source's embeddings and its
    ``layers[k]``-th layer, weights copied as they are (the DistilBERT initialisation,
    Sanh et al. 2019: a student of the teacher's width and a subset of its layers).
    Student and source need the same width, heads and vocabulary; any mismatch is an
    error naming the parameter."""
    from transformers import AutoModel

    dst = getattr(student, "model", student)
    src = AutoModel.from_pretrained(str(source))
    dst_layers, src_layers = _layer_stack(dst), _layer_stack(src)
    if len(layers) != len(dst_layers) or not all(0 <= i < len(src_layers) for i in layers):
        raise ValueError(
            f"layers={list(layers)} must name {len(dst_layers)} layers (the student's) of "
            f"the source's {len(src_layers)} (0-based)"
        )
    pairs = [(dst.get_input_embeddings(), src.get_input_embeddings())]
    if hasattr(dst, "embeddings") and hasattr(src, "embeddings"):
        pairs = [(dst.embeddings, src.embeddings)]
    pairs += [(dst_layers[k], src_layers[i]) for k, i in enumerate(layers)]
    for target, origin in pairs:
        theirs, ours = origin.state_dict(), target.state_dict()
        for name, value in ours.items():
            if name not in theirs or theirs[name].shape != value.shape:
                shape = tuple(theirs[name].shape) if name in theirs else "nothing"
                raise ValueError(
                    f"the student's {name} {tuple(value.shape)} has {shape} to "
                    f"copy in {source} (student width, heads and vocabulary must be the source's)"
                )
        target.load_state_dict({n: theirs[n] for n in ours})
