"""The discriminative embedding loss for bottom-up instance segmentation (De Brabandere, Neven and Van Gool,
"Semantic Instance Segmentation with a Discriminative Loss Function", 2017).

Every pixel gets a ``D``-dimensional embedding. With ``mu_c`` the mean embedding of instance ``c`` in one image:

* variance (pull): ``L_var = mean_c mean_{i in c} max(0, ||mu_c - x_i|| - delta_v)^2``: pixels within
  ``delta_v`` of their centre cost nothing;
* distance (push): ``L_dist = mean_{c_a != c_b} max(0, 2 delta_d - ||mu_a - mu_b||)^2`` over ordered pairs:
  centres at least ``2 delta_d`` apart cost nothing;
* regulariser: ``L_reg = mean_c ||mu_c||``;

``L = alpha L_var + beta L_dist + gamma L_reg`` per image (paper: ``delta_v = 0.5``, ``delta_d = 1.5``,
``alpha = beta = 1``, ``gamma = 0.001``), averaged over the images of the batch. With these margins every pixel lies
within ``delta_v`` of its centre and centres are over ``2 delta_d`` apart, so a threshold of ``delta_d`` around a
centre separates the instances (:func:`maskworks.ops.cluster_embeddings`).

Background pixels (id 0) and ignored pixels (``ignore_index``: void regions, padding) belong to no instance and
never contribute; an image without instances contributes 0 (the loss stays a tensor with a gradient). Terms are
means, not sums, so the scale does not grow with the number of instances.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DiscriminativeLoss", "discriminative_loss"]


def _check(embeddings: torch.Tensor, instances: torch.Tensor) -> None:
    if embeddings.ndim != 4:
        raise ValueError(f"embeddings must be (B, D, H, W), got shape {tuple(embeddings.shape)}")
    if instances.shape != (embeddings.shape[0], *embeddings.shape[2:]):
        raise ValueError(
            f"instances must be (B, H, W) = {(embeddings.shape[0], *embeddings.shape[2:])} instance ids, "
            f"got shape {tuple(instances.shape)}"
        )
    if instances.is_floating_point():
        raise ValueError(f"instances must hold integer instance ids (0 = background), got {instances.dtype}")


def discriminative_loss(
    embeddings: torch.Tensor,
    instances: torch.Tensor,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    ignore_index: int | None = 255,
) -> dict[str, torch.Tensor]:
    """The discriminative loss and its three terms, each averaged over the batch.

    Args:
        embeddings: ``(B, D, H, W)`` pixel embeddings.
        instances: ``(B, H, W)`` integer instance ids; 0 = background, ``ignore_index`` = ignored, any other value
            one instance (ids need not be consecutive).
        delta_v, delta_d: the pull and push margins.
        alpha, beta, gamma: weights of the variance, distance and regularisation terms.
        ignore_index: id of pixels that are left out (``None``: none).

    Returns:
        ``{"loss", "loss_var", "loss_dist", "loss_reg"}`` scalar tensors (``loss`` is the weighted sum).
    """
    _check(embeddings, instances)
    if not (delta_v > 0 and delta_d > 0):
        raise ValueError(f"delta_v and delta_d must be > 0, got {delta_v}, {delta_d}")
    b, d = embeddings.shape[:2]
    zero = embeddings.sum() * 0.0  # keeps the graph (and the dtype / device) when there are no instances
    var, dist, reg = [zero] * b, [zero] * b, [zero] * b
    for i in range(b):
        ids = instances[i].reshape(-1)
        keep = ids != 0
        if ignore_index is not None:
            keep &= ids != ignore_index
        if not bool(keep.any()):
            continue
        x = embeddings[i].reshape(d, -1)[:, keep].t()  # (P, D)
        labels, inverse, counts = torch.unique(ids[keep], return_inverse=True, return_counts=True)
        c = labels.numel()
        mu = x.new_zeros(c, d).index_add_(0, inverse, x) / counts[:, None].to(x.dtype)  # (C, D)
        pull = (torch.linalg.vector_norm(x - mu[inverse], dim=1) - delta_v).clamp(min=0) ** 2  # (P,)
        per_cluster = x.new_zeros(c).index_add_(0, inverse, pull) / counts.to(x.dtype)
        var[i] = per_cluster.mean()
        if c > 1:
            gaps = torch.linalg.vector_norm(mu[:, None] - mu[None], dim=2)  # (C, C)
            off = ~torch.eye(c, dtype=torch.bool, device=mu.device)
            dist[i] = ((2 * delta_d - gaps[off]).clamp(min=0) ** 2).mean()
        reg[i] = torch.linalg.vector_norm(mu, dim=1).mean()
    loss_var, loss_dist, loss_reg = (torch.stack(t).mean() for t in (var, dist, reg))
    total = alpha * loss_var + beta * loss_dist + gamma * loss_reg
    return {"loss": total, "loss_var": loss_var, "loss_dist": loss_dist, "loss_reg": loss_reg}


class DiscriminativeLoss(nn.Module):
    """Module form of :func:`discriminative_loss` (options validated here); ``forward`` returns the total loss and
    keeps the last terms in ``last_terms``.

    Args:
        delta_v, delta_d: pull and push margins (paper: 0.5, 1.5).
        alpha, beta, gamma: term weights (paper: 1, 1, 0.001).
        ignore_index: instance id of ignored pixels (``None``: none).
    """

    def __init__(
        self,
        delta_v: float = 0.5,
        delta_d: float = 1.5,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.001,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        if not (delta_v > 0 and delta_d > 0):
            raise ValueError(f"delta_v and delta_d must be > 0, got delta_v={delta_v}, delta_d={delta_d}")
        if 2 * delta_d <= 2 * delta_v:
            raise ValueError(
                f"delta_d must exceed delta_v (centres 2*delta_d apart, pixels within delta_v), got "
                f"delta_v={delta_v}, delta_d={delta_d}"
            )
        if min(alpha, beta, gamma) < 0:
            raise ValueError(f"alpha, beta and gamma must be >= 0, got {alpha}, {beta}, {gamma}")
        self.delta_v, self.delta_d = float(delta_v), float(delta_d)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.ignore_index = ignore_index
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        terms = discriminative_loss(
            embeddings,
            instances,
            self.delta_v,
            self.delta_d,
            self.alpha,
            self.beta,
            self.gamma,
            self.ignore_index,
        )
        self.last_terms = {k: v.detach() for k, v in terms.items() if k != "loss"}
        return terms["loss"]

    def extra_repr(self) -> str:
        return (
            f"delta_v={self.delta_v}, delta_d={self.delta_d}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}"
        )
