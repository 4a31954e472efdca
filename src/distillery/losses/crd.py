"""Contrastive representation distillation (Tian et al., ICLR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.config import require
from distillery.contract import Outputs
from distillery.losses.feature import FeatureTerm


class CRD(FeatureTerm):
    """CRD with memory banks, in its softmax (InfoNCE) form, both directions.

    Student and teacher features (flattened) are embedded by trainable heads
    ``g_S, g_T`` (Linear, then L2 normalisation) into ``feat_dim``. Memory banks ``M_S``,
    ``M_T`` hold one embedding per training sample (``bank_size`` rows, addressed by the
    batch's ``sample_id``). For sample i with K negatives n_1..n_K drawn uniformly from
    the banks:

        loss_i = CE([<s_i, M_T[i]>, <s_i, M_T[n_1]>, ..., <s_i, M_T[n_K]>] / tau, 0)
               + CE([<t_i, M_S[i]>, <t_i, M_S[n_1]>, ..., <t_i, M_S[n_K]>] / tau, 0)

    with s_i = g_S(f_S,i), t_i = g_T(f_T,i). After the step the banks move towards the
    new embeddings: M[i] <- normalize(m * M[i] + (1 - m) * embedding_i). Each rank keeps
    its own banks under DDP. Sample ids are given bank slots on first sight; more
    distinct ids than ``bank_size`` is an error (size the bank to the training set).

    Valid: ``bank_size >= 2``; ``feat_dim >= 1``; ``num_negatives >= 1`` (at most
    ``bank_size - 1`` are drawn); ``temperature > 0``; ``0 <= momentum < 1`` (at 1 the
    banks never move from their random start).
    """

    uses_projector = False

    def __init__(
        self,
        student: str,
        teacher: str,
        bank_size: int,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__(student, teacher, projector=None)
        require(bank_size >= 2, "bank_size", ">= 2 (the training-set size)", bank_size)
        require(feat_dim >= 1, "feat_dim", ">= 1", feat_dim)
        require(num_negatives >= 1, "num_negatives", ">= 1", num_negatives)
        require(temperature > 0, "temperature", "> 0", temperature)
        require(0 <= momentum < 1, "momentum", "in [0, 1)", momentum)
        self.bank_size, self.feat_dim = bank_size, feat_dim
        self.num_negatives = min(num_negatives, bank_size - 1)
        self.temperature, self.momentum = temperature, momentum
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()
        self.register_buffer("bank_s", F.normalize(torch.randn(bank_size, feat_dim), dim=1))
        self.register_buffer("bank_t", F.normalize(torch.randn(bank_size, feat_dim), dim=1))
        self.register_buffer("slot_ids", torch.full((bank_size,), -1, dtype=torch.long))
        self._slots: dict[int, int] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._slots = None  # rebuilt from the loaded slot_ids

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        s_dim = int(torch.tensor(student_shape[1:]).prod())
        t_dim = int(torch.tensor(teacher_shape[1:]).prod())
        self.embed_s, self.embed_t = (
            nn.Linear(s_dim, self.feat_dim),
            nn.Linear(t_dim, self.feat_dim),
        )
        self.key = key

    def slots(self, sample_ids: Tensor) -> Tensor:
        if self._slots is None:  # rebuilt from the buffer (e.g. after loading a checkpoint)
            self._slots = {int(i): s for s, i in enumerate(self.slot_ids.tolist()) if i >= 0}
        out, new_ids, new_slots = [], [], []
        for i in sample_ids.tolist():
            slot = self._slots.get(i)
            if slot is None:
                slot = len(self._slots)
                if slot >= self.bank_size:
                    raise RuntimeError(
                        f"{getattr(self, 'key', 'CRD')}: more than bank_size={self.bank_size} "
                        f"distinct sample ids; set bank_size to the training-set size"
                    )
                self._slots[i] = slot
                new_ids.append(i)
                new_slots.append(slot)
            out.append(slot)
        if new_slots:  # one write per step, not one per new id
            device = self.slot_ids.device
            self.slot_ids[torch.tensor(new_slots, device=device)] = torch.tensor(
                new_ids, device=device
            )
        return torch.tensor(out, device=self.bank_s.device)

    def forward(self, out: Outputs) -> Tensor:
        if "sample_id" not in out.extras:
            raise RuntimeError("CRD needs the batch's sample_id (DistillationModule passes it)")
        f_s = out.extras["student_features"][self.student_tap].float().flatten(1)
        f_t = out.extras["teacher_features"][self.teacher_tap].detach().float().flatten(1)
        s, t = F.normalize(self.embed_s(f_s), dim=1), F.normalize(self.embed_t(f_t), dim=1)
        idx = self.slots(out.extras["sample_id"])
        b = idx.shape[0]
        neg = torch.randint(0, self.bank_size, (b, self.num_negatives), device=idx.device)
        neg = torch.where(
            neg == idx[:, None], (neg + 1) % self.bank_size, neg
        )  # never the positive
        cand = torch.cat([idx[:, None], neg], 1)  # [B, 1 + K]
        logits_s = torch.einsum("bd,bkd->bk", s, self.bank_t[cand]) / self.temperature
        logits_t = torch.einsum("bd,bkd->bk", t, self.bank_s[cand]) / self.temperature
        target = torch.zeros(b, dtype=torch.long, device=idx.device)
        loss = F.cross_entropy(logits_s, target, reduction="none") + F.cross_entropy(
            logits_t, target, reduction="none"
        )
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.bank_s[idx] = F.normalize(m * self.bank_s[idx] + (1 - m) * s.detach(), dim=1)
                self.bank_t[idx] = F.normalize(m * self.bank_t[idx] + (1 - m) * t.detach(), dim=1)
        return loss
