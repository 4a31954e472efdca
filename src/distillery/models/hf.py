"""HuggingFace transformers models as Distillery classifiers (logits out).

``HFSequenceClassifier`` builds an ``AutoModelForSequenceClassification`` from a
pretrained name or local directory (``pretrained``) or, offline, from a config dict
(``config`` with ``model_type``, e.g. a tiny BERT). Inputs are token ids ``[B, N]``;
``pad_token_id`` positions are masked out of attention.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


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
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if (config is None) == (pretrained is None):
            raise ValueError(
                "student/teacher: give exactly one of `config` (a dict with model_type) or `pretrained`"
            )
        if pretrained is not None:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                pretrained,
                num_labels=num_classes,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        else:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError("config.model_type is required (e.g. bert)")
            hf_config = AutoConfig.for_model(
                model_type, num_labels=num_classes, pad_token_id=pad_token_id, **cfg
            )
            hf_config._attn_implementation = attn_implementation
            self.model = AutoModelForSequenceClassification.from_config(hf_config)
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: Tensor) -> Tensor:
        input_ids = input_ids.long()
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


class HFCausalLM(nn.Module):
    """A causal LM (``AutoModelForCausalLM``) from a pretrained name / local directory or,
    offline, from a config dict with ``model_type`` (e.g. a tiny GPT-2). Returns logits
    ``[B, L, V]`` for ``input_ids``."""

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
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if (config is None) == (pretrained is None):
            raise ValueError(
                "give exactly one of `config` (a dict with model_type) or `pretrained`"
            )
        torch_dtype = getattr(torch, dtype) if dtype else None
        if pretrained is not None:
            self.model = AutoModelForCausalLM.from_pretrained(
                pretrained,
                attn_implementation=attn_implementation,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )
        else:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError("config.model_type is required (e.g. gpt2)")
            if vocab_size is not None:
                cfg["vocab_size"] = vocab_size
            hf_config = AutoConfig.for_model(model_type, **cfg)
            hf_config._attn_implementation = attn_implementation
            self.model = AutoModelForCausalLM.from_config(hf_config)
            if torch_dtype is not None:
                self.model.to(torch_dtype)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids.long(), attention_mask=attention_mask).logits
