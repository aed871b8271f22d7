"""Knowledge-distillation losses for semantic segmentation (dense prediction).

Every loss is an ``nn.Module`` called as ``loss(student, teacher, ...)`` on logits or feature maps ``(B, C, H, W)``
and returns a scalar. The teacher's tensors are detached inside, so gradients only ever reach the student (and,
for :class:`FeatureKD`, its adapters); run the teacher under ``torch.no_grad()`` in ``eval()`` mode anyway to save
memory and keep its BatchNorm statistics fixed.

* :class:`PixelKD`: pixel-wise KD (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, applied to
  every pixel as in Liu et al., CVPR 2019): temperature-scaled KL divergence per pixel, **mean over pixels**.
* :class:`ChannelWiseKD`: channel-wise KD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
  ICCV 2021): each channel is a distribution over the ``H * W`` positions.
* :class:`PairwiseKD`: pair-wise KD (Liu et al., "Structured Knowledge Distillation for Semantic Segmentation",
  CVPR 2019): cosine-similarity affinities between spatial nodes.
* :class:`FeatureKD`: feature imitation through learned 1x1 adapters (Romero et al., "FitNets: Hints for Thin Deep
  Nets", ICLR 2015).
* :class:`AttentionTransfer`: spatial attention maps (Zagoruyko & Komodakis, "Paying More Attention to Attention",
  ICLR 2017).
* :func:`distillation_loss`: build one of them by name.

The KL divergence of :class:`PixelKD` and :class:`ChannelWiseKD` is DeiT's
:func:`~maskworks.methods.distillation.deit.soft_distillation_loss` applied to rows (pixels, resp. channels), so
the library has one KD implementation: that function returns ``tau^2 * sum KL / (rows * row_length)`` and
multiplying by the row length gives the mean KL per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.methods.distillation.deit import soft_distillation_loss

__all__ = [
    "PixelKD",
    "ChannelWiseKD",
    "PairwiseKD",
    "FeatureKD",
    "AttentionTransfer",
    "distillation_loss",
]


# ------------------------------------------------------------------------------------------------ helpers
def _check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor, same_channels: bool) -> None:
    """Both ``(B, C, H, W)`` with the same ``B`` (and the same ``C`` when ``same_channels``)."""
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(
            f"{name}: student and teacher must be (B, C, H, W), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: batch sizes differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    if same_channels and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{name}: channel counts differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "logits need the same classes, features need an adapter (e.g. a 1x1 conv, see FeatureKD) first"
        )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``(B, C, H, W)`` to ``size``; a no-op when it already fits."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _mean_row_kl(student_rows: torch.Tensor, teacher_rows: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` of each row of ``(R, L)`` logits, averaged over rows.

    DeiT's :func:`soft_distillation_loss` divides the summed KL by ``R * L``; times ``L`` it is the mean per row.
    """
    return soft_distillation_loss(student_rows, teacher_rows, tau) * student_rows.shape[1]


def _as_list(name: str, x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"{name} must be a tensor or a list / tuple of tensors, got {type(x).__name__}")


def _check_positive(name: str, value: float) -> float:
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ logits
class PixelKD(nn.Module):
    """Pixel-wise knowledge distillation (Hinton et al., 2015; the pixel-wise term of Liu et al., "Structured
    Knowledge Distillation for Semantic Segmentation", CVPR 2019).

    With ``p = softmax(logits / T)`` over the classes at each pixel,

    ``loss = loss_weight * T^2 / |P| * sum_{pixels i in P} sum_c p_t[i, c] * (log p_t[i, c] - log p_s[i, c])``

    where ``P`` is the set of valid pixels (all pixels, or those whose ``target`` is not ``ignore_index``). The
    temperature divides **both** student and teacher logits, and the ``T^2`` factor keeps the gradient scale
    independent of ``T``: ``d loss / d s[i] = loss_weight * T * (p_s[i] - p_t[i]) / |P|``.

    The loss is a mean over pixels, so it does not grow with the resolution. (``F.kl_div(..., reduction=
    "batchmean")`` on 4-D tensors divides by ``B`` only and is ``H * W`` times larger.)

    Args:
        temperature: ``T > 0``.
        ignore_index: label of the pixels to leave out when a ``target`` is given; ``None`` never masks.
        loss_weight: multiplies the loss.

    Raises:
        ValueError: for a non-positive temperature.
    """

    def __init__(self, temperature: float = 4.0, ignore_index: int | None = 255, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_positive("temperature", temperature)
        self.ignore_index = ignore_index
        self.loss_weight = float(loss_weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, loss_weight={self.loss_weight}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss.

        Args:
            student: student logits ``(B, C, H, W)``.
            teacher: teacher logits ``(B, C, H', W')`` (detached here); resized bilinearly (``align_corners=False``)
                to ``(H, W)`` when the sizes differ.
            target: optional labels ``(B, H'', W'')``; pixels equal to ``ignore_index`` do not contribute. A target
                of another size is resized to ``(H, W)`` by nearest-neighbour sampling of its valid mask.

        Returns:
            The scalar loss; ``0`` (still attached to the student's graph) when no pixel is valid.

        Raises:
            ValueError: for shapes that do not fit (not 4-D, different batch or class counts, bad target).
        """
        _check_pair("PixelKD", student, teacher, same_channels=True)
        b, c, h, w = student.shape
        teacher = _resize(teacher.detach(), (h, w))
        s = student.permute(0, 2, 3, 1).reshape(-1, c)
        t = teacher.permute(0, 2, 3, 1).reshape(-1, c)
        if target is not None and self.ignore_index is not None:
            valid = self._valid_mask(target, b, h, w).reshape(-1)
            if not bool(valid.any()):
                return student.sum() * 0.0
            s, t = s[valid], t[valid]
        return self.loss_weight * _mean_row_kl(s, t, self.temperature)

    def _valid_mask(self, target: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        if target.ndim != 3 or target.shape[0] != b:
            raise ValueError(f"PixelKD: target must be (B, H, W) with B={b}, got {tuple(target.shape)}")
        valid = target != self.ignore_index
        if tuple(valid.shape[-2:]) != (h, w):
            valid = F.interpolate(valid[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
        return valid


class ChannelWiseKD(nn.Module):
    """Channel-wise knowledge distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
    ICCV 2021; CWD).

    Each channel ``c`` of each image ``n`` is turned into a distribution over the ``H * W`` positions,
    ``phi(y)[n, c, i] = softmax_i(y[n, c, i] / tau)``, and

    ``loss = loss_weight * tau^2 / (N * C) * sum_{n, c, i} phi_t[n, c, i] * (log phi_t[n, c, i] - log phi_s[n, c, i])``

    which is mmrazor's ``ChannelWiseDivergence``: ``tau^2 * sum(softmax_T * (log softmax_T - log softmax_S)) /
    (N * C)`` times ``loss_weight``. The paper uses ``tau = 4`` on logits.

    Student and teacher need the same number of channels: on logits, the same classes; on intermediate features,
    map the student's features to the teacher's channels first (a learned 1x1 conv, as in :class:`FeatureKD`).

    Args:
        temperature: ``tau > 0``.
        loss_weight: multiplies the loss.

    Raises:
        ValueError: for a non-positive temperature.
    """

    def __init__(self, temperature: float = 4.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_positive("temperature", temperature)
        self.loss_weight = float(loss_weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, loss_weight={self.loss_weight}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss.

        Args:
            student: student logits or features ``(N, C, H, W)``.
            teacher: teacher tensor ``(N, C, H', W')`` (detached here); resized bilinearly (``align_corners=False``)
                to ``(H, W)`` when the sizes differ.

        Returns:
            The scalar loss.

        Raises:
            ValueError: when the shapes differ in anything but ``H, W`` (the message names both shapes).
        """
        _check_pair("ChannelWiseKD", student, teacher, same_channels=True)
        n, c, h, w = student.shape
        teacher = _resize(teacher.detach(), (h, w))
        return self.loss_weight * _mean_row_kl(
            student.reshape(n * c, h * w), teacher.reshape(n * c, h * w), self.temperature
        )


# ------------------------------------------------------------------------------------------------ features
class PairwiseKD(nn.Module):
    """Pair-wise distillation (Liu et al., "Structured Knowledge Distillation for Semantic Segmentation",
    CVPR 2019): the student imitates the teacher's affinities between spatial nodes.

    1. Both feature maps are pooled to a ``pool_size`` grid with adaptive average pooling, giving
       ``N = pool_h * pool_w`` nodes. The paper's node size ``beta`` (each node aggregates ``beta x beta``
       positions) is therefore ``H / pool_h x W / pool_w`` of the input feature map; a fixed grid is used so
       that the cost (``N x N`` affinities) does not depend on the input resolution, and average pooling lets
       every position receive gradient. (The authors' code max-pools with a kernel of ``scale * H`` and
       ``scale = 0.5``, i.e. a 2 x 2 grid, ``pool_size=2``; other reproductions use ``beta = 2`` positions,
       i.e. ``pool_size = H / 2``.) ``pool_size=None`` keeps every position as a node (``beta = 1``; memory
       ``B * (H W)^2``).
    2. Each node's feature ``f_i`` is L2-normalised along the channels (``F.normalize``, eps ``1e-12``).
    3. ``a_ij = f_i . f_j`` (cosine similarity), one ``(B, N, N)`` matrix for the student and one for the
       teacher. The channel counts may differ: the affinities are ``N x N`` either way.
    4. ``loss = loss_weight / (B * N^2) * sum_{b, i, j} (a^s_bij - a^t_bij)^2``, the mean squared difference
       over the batch and all ``N^2`` ordered pairs (the authors' normalisation ``1 / ((W' H')^2 * B)``).

    The gradient flows through the normalisation's norm as well (the authors' code detaches it).

    Args:
        pool_size: the node grid, ``int`` or ``(pool_h, pool_w)``, or ``None`` for no pooling (then the teacher
            is resized bilinearly to the student's size when they differ).
        loss_weight: multiplies the loss.

    Raises:
        ValueError: for a non-positive pool size.
    """

    def __init__(self, pool_size: int | tuple[int, int] | None = 8, loss_weight: float = 1.0) -> None:
        super().__init__()
        if pool_size is not None:
            pool_size = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
            if len(pool_size) != 2 or not all(isinstance(p, int) and p > 0 for p in pool_size):
                raise ValueError(f"pool_size must be a positive int, a pair of them or None, got {pool_size!r}")
        self.pool_size = pool_size
        self.loss_weight = float(loss_weight)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, loss_weight={self.loss_weight}"

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, N)`` cosine similarities between the (pooled) nodes of ``(B, C, H, W)`` features."""
        if self.pool_size is not None:
            features = F.adaptive_avg_pool2d(features, self.pool_size)
        nodes = F.normalize(features.flatten(2), p=2, dim=1)  # (B, C, N)
        return torch.bmm(nodes.transpose(1, 2), nodes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss.

        Args:
            student: student features ``(B, C_s, H, W)``.
            teacher: teacher features ``(B, C_t, H', W')`` (detached here).

        Returns:
            The scalar loss.

        Raises:
            ValueError: for tensors that are not 4-D or have different batch sizes.
        """
        _check_pair("PairwiseKD", student, teacher, same_channels=False)
        teacher = teacher.detach()
        if self.pool_size is None:
            teacher = _resize(teacher, student.shape[-2:])
        diff = self.affinity(student) - self.affinity(teacher)
        return self.loss_weight * diff.pow(2).mean()


class FeatureKD(nn.Module):
    """Feature distillation through learned 1x1 conv adapters (FitNets-style hints; Romero et al., ICLR 2015).

    For each feature pair ``k``: ``a_k = adapter_k(s_k)`` (a ``1x1`` conv from the student's to the teacher's
    channels), resized bilinearly (``align_corners=False``) to the teacher's spatial size when they differ, and

    ``loss = loss_weight / K * sum_k mean((a_k - t_k)^2)`` (``F.mse_loss``, mean over all elements of a pair).

    The adapters are registered submodules (``self.adapters``, an ``nn.ModuleList``), so
    ``[*student.parameters(), *criterion.parameters()]`` optimises them with the student; they are only used for
    training. When a pair's channel counts match and ``identity_init`` is set, its adapter starts as the identity
    (so the loss initially compares the raw features, and is exactly 0 for identical features); otherwise it has
    PyTorch's default initialisation.

    Args:
        student_channels: channels of each student feature map (an ``int`` for one pair).
        teacher_channels: channels of each teacher feature map, as many as ``student_channels``.
        loss_weight: multiplies the loss.
        identity_init: initialise the adapters of equal-width pairs to the identity.

    Raises:
        ValueError: when the two lists differ in length, are empty, or hold non-positive counts.
    """

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        loss_weight: float = 1.0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        s_channels = [student_channels] if isinstance(student_channels, int) else list(student_channels)
        t_channels = [teacher_channels] if isinstance(teacher_channels, int) else list(teacher_channels)
        if len(s_channels) != len(t_channels) or not s_channels:
            raise ValueError(
                f"student_channels and teacher_channels must be non-empty and of the same length, got {s_channels} "
                f"and {t_channels}"
            )
        if not all(isinstance(c, int) and c > 0 for c in [*s_channels, *t_channels]):
            raise ValueError(f"channel counts must be positive ints, got {s_channels} and {t_channels}")
        self.student_channels = s_channels
        self.teacher_channels = t_channels
        self.loss_weight = float(loss_weight)
        self.adapters = nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(s_channels, t_channels))
        if identity_init:
            for adapter, cs, ct in zip(self.adapters, s_channels, t_channels):
                if cs == ct:
                    with torch.no_grad():
                        adapter.weight.copy_(torch.eye(cs).reshape(cs, cs, 1, 1))
                        adapter.bias.zero_()

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"

    def forward(
        self, student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The loss.

        Args:
            student: student feature maps ``(B, C_s_k, H_k, W_k)``, a list (or one tensor for one pair).
            teacher: teacher feature maps ``(B, C_t_k, H'_k, W'_k)``, as many (detached here).

        Returns:
            The scalar loss, averaged over the pairs.

        Raises:
            TypeError: for inputs that are not tensors or lists of tensors.
            ValueError: for a wrong number of maps or channel counts that do not match the adapters.
        """
        s_feats, t_feats = _as_list("student", student), _as_list("teacher", teacher)
        if len(s_feats) != len(self.adapters) or len(t_feats) != len(self.adapters):
            raise ValueError(
                f"FeatureKD has {len(self.adapters)} adapter(s), got {len(s_feats)} student and {len(t_feats)} "
                "teacher feature maps"
            )
        total = None
        for k, (adapter, s, t) in enumerate(zip(self.adapters, s_feats, t_feats)):
            _check_pair(f"FeatureKD pair {k}", s, t, same_channels=False)
            if s.shape[1] != adapter.in_channels or t.shape[1] != adapter.out_channels:
                raise ValueError(
                    f"FeatureKD pair {k}: the adapter maps {adapter.in_channels} -> {adapter.out_channels} channels, "
                    f"got student {tuple(s.shape)} and teacher {tuple(t.shape)}"
                )
            t = t.detach()
            term = F.mse_loss(_resize(adapter(s), t.shape[-2:]), t)
            total = term if total is None else total + term
        return self.loss_weight * total / len(self.adapters)


class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017), activation-based, with ``F^p`` mapping.

    For each feature pair: the attention map ``A = mean_c |F_c|^p`` ``(B, H, W)``; the student's map is resized
    bilinearly (``align_corners=False``) to the teacher's size (before normalising); each map is flattened and
    L2-normalised, ``Q = A / ||A||_2``; and

    ``loss = beta / 2 * sum_pairs mean_{b, i} (Q_s[b, i] - Q_t[b, i])^2``

    as in the authors' code (``at_loss = (at(x) - at(y)).pow(2).mean()``, summed over the pairs, times
    ``beta / 2``, ``beta = 1000``). Channel counts may differ.

    Args:
        p: exponent of the attention map, ``> 0`` (2 in the paper).
        beta: weight of the loss.

    Raises:
        ValueError: for a non-positive ``p``.
    """

    def __init__(self, p: float = 2.0, beta: float = 1000.0) -> None:
        super().__init__()
        self.p = _check_positive("p", p)
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"p={self.p}, beta={self.beta}"

    def attention(self, features: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, H * W)`` L2-normalised attention of ``(B, C, H, W)`` features, resized to ``size`` first."""
        att = features.abs().pow(self.p).mean(dim=1, keepdim=True)
        if size is not None:
            att = _resize(att, size)
        return F.normalize(att.flatten(1), p=2, dim=1)

    def forward(
        self, student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The loss.

        Args:
            student: student feature maps ``(B, C_s_k, H_k, W_k)``, a list (or one tensor).
            teacher: teacher feature maps ``(B, C_t_k, H'_k, W'_k)``, as many (detached here).

        Returns:
            The scalar loss.

        Raises:
            TypeError: for inputs that are not tensors or lists of tensors.
            ValueError: for different numbers of maps or mismatching batch sizes.
        """
        s_feats, t_feats = _as_list("student", student), _as_list("teacher", teacher)
        if len(s_feats) != len(t_feats) or not s_feats:
            raise ValueError(f"AttentionTransfer: got {len(s_feats)} student and {len(t_feats)} teacher feature maps")
        total = None
        for k, (s, t) in enumerate(zip(s_feats, t_feats)):
            _check_pair(f"AttentionTransfer pair {k}", s, t, same_channels=False)
            t = t.detach()
            term = (self.attention(s, t.shape[-2:]) - self.attention(t)).pow(2).mean()
            total = term if total is None else total + term
        return self.beta / 2 * total


# ------------------------------------------------------------------------------------------------ factory
_KINDS: dict[str, type[nn.Module]] = {
    "pixel": PixelKD,
    "cwd": ChannelWiseKD,
    "pairwise": PairwiseKD,
    "feature": FeatureKD,
    "attention": AttentionTransfer,
}


def distillation_loss(kind: str, **kwargs) -> nn.Module:
    """Build a segmentation distillation loss by name.

    Args:
        kind: ``"pixel"`` (:class:`PixelKD`), ``"cwd"`` (:class:`ChannelWiseKD`), ``"pairwise"``
            (:class:`PairwiseKD`), ``"feature"`` (:class:`FeatureKD`) or ``"attention"`` (:class:`AttentionTransfer`).
        **kwargs: passed to the class.

    Returns:
        The loss module.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown distillation kind {kind!r}; expected one of: {', '.join(_KINDS)}")
    return cls(**kwargs)
