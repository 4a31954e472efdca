"""Feature distillation terms: the student matches teacher features captured by taps.

Each term names a student tap and a teacher tap (``conf: taps.student.<name>``) and
reads the captures from ``Outputs.extras``. Terms with a projector build it in
:meth:`FeatureTerm.setup` from dry-run shapes (``projector: auto``), or take none
(``projector: null``: shapes must already match). Losses are per sample, float32.

Token features ``[B, N, C]`` (transformers) are averaged over real tokens only when the
batch carries a token mask (``Outputs.extras["token_mask"]``, ``[B, N]``, 1 = token,
0 = padding; from the batch's ``attention_mask``): padding never enters a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.config import require
from distillery.contract import LossTerm, Outputs
from distillery.losses.projectors import build_projector


class FeatureTerm(LossTerm):
    """Base of the feature terms. Valid: ``student`` and ``teacher`` non-empty tap names;
    ``projector`` ``auto``, ``tokens``, ``maps``, null or a module."""

    needs_teacher = True
    uses_projector = True

    def __init__(self, student: str, teacher: str, projector: str | nn.Module | None = "auto"):
        super().__init__()
        require(bool(student), "student", "a tap name (taps.student.<name>)", student)
        require(bool(teacher), "teacher", "a tap name (taps.teacher.<name>)", teacher)
        self.student_tap, self.teacher_tap = student, teacher
        self.projector: nn.Module = nn.Identity()
        if isinstance(projector, nn.Module):  # given explicitly in config (_target_)
            self.projector, projector = projector, "given"
        else:
            modes = ("auto", "tokens", "maps", None)
            require(
                projector in modes, "projector", "auto, tokens, maps, null or a module", projector
            )
        self.projector_mode = projector

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        """Build the projector from one dry run's capture shapes."""
        if self.projector_mode == "given":
            return
        if self.uses_projector and self.projector_mode is not None:
            layout = "auto" if self.projector_mode == "auto" else self.projector_mode
            self.projector = build_projector(student_shape, teacher_shape, key, layout)
        elif self.uses_projector and tuple(student_shape) != tuple(teacher_shape):
            raise ValueError(
                f"{key}: shapes differ ({tuple(student_shape)} vs {tuple(teacher_shape)}) "
                f"and projector is null"
            )

    def __call__(self, out: Outputs) -> Tensor:
        if "student_features" not in out.extras:
            raise RuntimeError(
                f"a feature term reads taps ({self.student_tap!r}, {self.teacher_tap!r}), but "
                f"nothing was captured in this forward"
            )
        return super().__call__(out)

    def features(self, out: Outputs) -> tuple[Tensor, Tensor]:
        s = out.extras["student_features"][self.student_tap]
        t = out.extras["teacher_features"][self.teacher_tap]
        return self.projector(s).float(), t.detach().float()


def token_mean(per_token: Tensor, out: Outputs) -> Tensor:
    """``[B, N]`` per-position losses -> ``[B]``: the mean over each sample's real tokens
    (``extras["token_mask"]``), or over all positions when there is no mask."""
    mask = out.extras.get("token_mask")
    if mask is None:
        return per_token.mean(1)
    if mask.shape != per_token.shape:
        raise ValueError(
            f"token_mask of shape {tuple(mask.shape)} does not fit token features with "
            f"positions {tuple(per_token.shape)} (tap a layer whose output has one position "
            f"per input token)"
        )
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(1) / m.sum(1).clamp_min(1.0)


def squared_error(s: Tensor, t: Tensor, out: Outputs) -> Tensor:
    """Per-sample mean squared error; token features ``[B, N, C]`` via :func:`token_mean`."""
    if s.ndim == 3:
        return token_mean((s - t).pow(2).mean(-1), out)
    return (s - t).pow(2).flatten(1).mean(1)


class FitNet(FeatureTerm):
    """FitNets hint (Romero et al. 2015): loss_i = mean_j (P(f_S)_ij - f_T_ij)^2, the mean
    squared error over all feature elements j of sample i, P the projector."""

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.features(out)
        return squared_error(s, t, out)


class CosineFeature(FeatureTerm):
    """loss_i = 1 - cos(P(f_S)_i, f_T_i) over the flattened features of sample i; for
    token features ``[B, N, C]`` the mean over tokens of 1 - cos over channels."""

    def forward(self, out: Outputs) -> Tensor:
        s, t = self.features(out)
        if s.ndim == 3:
            return token_mean(1 - F.cosine_similarity(s, t, dim=-1), out)
        return 1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)


def attention_map(f: Tensor, p: float) -> Tensor:
    """Zagoruyko & Komodakis: a(f) = normalize(mean_c |f_c|^p), flattened over space."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(FeatureTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017) on feature maps ``[B, C, *space]``:
    loss_i = sum_l mean_s (a(f_S^l)_is - a(f_T^l)_is)^2 with a() above (p = 2 by
    default), over the tapped layer pairs l (one pair, or lists from glob taps such as
    ``layer*``); student maps are resized to the teacher's spatial size. No projector.
    Valid: ``p > 0`` (at 0 every map is uniform and the loss 0)."""

    uses_projector = False

    def __init__(self, student: str, teacher: str, p: float = 2.0):
        super().__init__(student, teacher, projector=None)
        require(p > 0, "p", "> 0", p)
        self.p = p

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        if isinstance(student_shape, list) != isinstance(teacher_shape, list) or (
            isinstance(student_shape, list) and len(student_shape) != len(teacher_shape)
        ):
            raise ValueError(
                f"{key}: student and teacher taps must capture the same number of layers"
            )

    def forward(self, out: Outputs) -> Tensor:
        ss = out.extras["student_features"][self.student_tap]
        ts = out.extras["teacher_features"][self.teacher_tap]
        pairs = zip(ss, ts, strict=True) if isinstance(ss, list) else [(ss, ts)]
        total = 0.0
        for s, t in pairs:
            s, t = s.float(), t.detach().float()
            if s.shape[2:] != t.shape[2:]:
                mode = "linear" if t.ndim == 3 else "bilinear"
                s = F.interpolate(s, size=t.shape[2:], mode=mode, align_corners=False)
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean(1)
        return total


class AttentionMapKL(FeatureTerm):
    """MiniLM-style attention-map distillation (Wang et al. 2020), per head:
    loss_i = mean_{h, q} KL(A_T[i,h,q,:] || A_S[i,h,q,:]), A = attention probabilities
    ``[B, H, Q, K]`` captured with ``kind: attention``. Head counts must match (or
    ``average_heads: true`` compares head-averaged maps). Queries with an all-zero
    teacher row (masked) and padding queries (``token_mask``) are left out; padding keys
    have probability 0 in both maps (the taps apply the attention mask).
    Valid: ``eps > 0`` (log(0) of a masked key otherwise)."""

    uses_projector = False

    def __init__(self, student: str, teacher: str, average_heads: bool = False, eps: float = 1e-8):
        super().__init__(student, teacher, projector=None)
        require(eps > 0, "eps", "> 0", eps)
        self.average_heads, self.eps = average_heads, eps

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        if self.average_heads:
            student_shape, teacher_shape = (
                student_shape[:1] + student_shape[2:],
                teacher_shape[:1] + teacher_shape[2:],
            )
        if tuple(student_shape) != tuple(teacher_shape):
            raise ValueError(
                f"{key}: attention maps differ in shape ({tuple(student_shape)} vs "
                f"{tuple(teacher_shape)}); set average_heads: true if only head counts differ"
            )

    def forward(self, out: Outputs) -> Tensor:
        a_s = out.extras["student_features"][self.student_tap].float()
        a_t = out.extras["teacher_features"][self.teacher_tap].detach().float()
        if self.average_heads:
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        kl = (a_t * ((a_t + self.eps).log() - (a_s + self.eps).log())).sum(-1)  # [B, H, Q]
        valid = (a_t.sum(-1) > 0.5).float()
        mask = out.extras.get("token_mask")
        if mask is not None:
            valid = valid * mask[:, None, :].to(valid.dtype)
        return (kl * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)


class HiddenStates(FeatureTerm):
    """Hidden-state distillation over a layer stack (TinyBERT/DistilBERT style). The taps
    capture lists (globs such as ``encoder.layer.*``); student layer l is matched with
    teacher layer ``layer_map[l]``, by default uniformly: ``m(l) = round((l + 1) * L_T / L_S) - 1``
    (every k-th teacher layer). loss_i = mean_l d(P_l(h_S^l)_i, h_T^{m(l)}_i), with d the
    per-sample MSE (``kind: mse``) or 1 - cosine over channels averaged over tokens
    (``kind: cosine``); one projector per student layer. Valid: ``kind`` mse or cosine;
    ``layer_map`` null or a non-empty list of teacher layer indices >= 0 (their upper
    bound, the teacher's layer count, is checked once the taps have run)."""

    def __init__(
        self,
        student: str,
        teacher: str,
        kind: str = "mse",
        layer_map: list[int] | None = None,
        projector: str | None = "auto",
    ):
        super().__init__(student, teacher, projector)
        require(kind in ("mse", "cosine"), "kind", "mse or cosine", kind)
        indices = layer_map is None or (
            len(layer_map) > 0
            and all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in layer_map)
        )
        require(indices, "layer_map", "null or a list of teacher layer indices >= 0", layer_map)
        self.kind, self.layer_map = kind, list(layer_map) if layer_map is not None else None
        self.projectors = nn.ModuleList()

    @staticmethod
    def uniform_map(n_student: int, n_teacher: int) -> list[int]:
        return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        s_shapes, t_shapes = list(student_shape), list(teacher_shape)  # lists of shapes
        if self.layer_map is None:
            self.layer_map = self.uniform_map(len(s_shapes), len(t_shapes))
        if len(self.layer_map) != len(s_shapes) or not all(
            0 <= m < len(t_shapes) for m in self.layer_map
        ):
            raise ValueError(
                f"{key}.layer_map: needs {len(s_shapes)} teacher indices in [0, {len(t_shapes)}), "
                f"got {self.layer_map}"
            )
        self.projectors = nn.ModuleList(
            build_projector(s, t_shapes[m], f"{key}[{i}]") if self.projector_mode else nn.Identity()
            for i, (s, m) in enumerate(zip(s_shapes, self.layer_map, strict=True))
        )

    def forward(self, out: Outputs) -> Tensor:
        hs = out.extras["student_features"][self.student_tap]
        ht = out.extras["teacher_features"][self.teacher_tap]
        losses = []
        for proj, s, m in zip(self.projectors, hs, self.layer_map, strict=True):
            s, t = proj(s).float(), ht[m].detach().float()
            if self.kind == "mse":
                losses.append(squared_error(s, t, out))
            elif s.ndim == 3:
                losses.append(token_mean(1 - F.cosine_similarity(s, t, dim=-1), out))
            else:
                losses.append((1 - F.cosine_similarity(s, t, dim=-1)).flatten(1).mean(1))
        return torch.stack(losses).mean(0)


def relation(x: Tensor, heads: int, key_mask: Tensor | None = None) -> Tensor:
    """softmax(X_h X_h^T / sqrt(d_h)) per relation head: ``[B, N, C] -> [B, heads, N, N]``;
    keys where ``key_mask`` ``[B, N]`` is 0 (padding) get probability 0."""
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"feature width {c} is not divisible by relation_heads={heads}")
    xh = x.reshape(b, n, heads, c // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-2, -1) / (c // heads) ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


class ValueRelationKL(FeatureTerm):
    """MiniLM value-relation transfer (Wang et al. 2020; MiniLMv2's relation heads).
    Tap the value projections (``[B, N, C]``, e.g. ``...attention.self.value``) of one
    teacher and one student layer. Both are split into ``relation_heads`` heads, so the
    widths need not match; with VR = softmax(V_h V_h^T / sqrt(d_h)):
    loss_i = mean_{h, q} KL(VR_T[i,h,q,:] || VR_S[i,h,q,:]); padding is left out as a key
    (probability 0; ``extras["attention_mask"]``, else ``token_mask``) and as a query
    (only ``token_mask`` positions are averaged). Valid: ``relation_heads >= 1`` (the
    widths must divide by it: checked once the taps have run)."""

    uses_projector = False

    def __init__(self, student: str, teacher: str, relation_heads: int = 4):
        super().__init__(student, teacher, projector=None)
        require(
            not isinstance(relation_heads, bool) and relation_heads >= 1,
            "relation_heads",
            ">= 1",
            relation_heads,
        )
        self.relation_heads = relation_heads

    def setup(self, student_shape, teacher_shape, key: str) -> None:
        if len(student_shape) != 3 or tuple(student_shape[:2]) != tuple(teacher_shape[:2]):
            raise ValueError(
                f"{key}: needs token features [B, N, C] with equal N, got {tuple(student_shape)} "
                f"and {tuple(teacher_shape)}"
            )
        for side, shape in (("student", student_shape), ("teacher", teacher_shape)):
            if shape[-1] % self.relation_heads:
                raise ValueError(
                    f"{key}: {side} width {shape[-1]} is not divisible by relation_heads"
                )

    def forward(self, out: Outputs) -> Tensor:
        v_s = out.extras["student_features"][self.student_tap].float()
        v_t = out.extras["teacher_features"][self.teacher_tap].detach().float()
        keys = out.extras.get("attention_mask", out.extras.get("token_mask"))
        r_s = relation(v_s, self.relation_heads, keys)
        r_t = relation(v_t, self.relation_heads, keys)
        kl = (r_t * (r_t.clamp_min(1e-12).log() - r_s.clamp_min(1e-12).log())).sum(-1)
        return token_mean(kl.mean(1), out)  # heads, then real-token queries
