"""Normalisation layers.

:class:`PooledBatchNorm2d` is ``nn.BatchNorm2d`` for maps that global pooling has reduced to ``1 x 1`` (the
image-pooling branch of ASPP, BiSeNet's global context and attention branches). Plain BatchNorm raises
"Expected more than 1 value per channel when training" for such a map at batch size 1, because the batch
variance of a single value is undefined. This layer keeps the parameters and buffers of ``nn.BatchNorm2d`` (so
checkpoints of torchvision, smp and mmseg load unchanged) and, only when training on a batch with a single
value per channel, normalises with the running statistics and leaves them untouched; every other batch is
normalised exactly as ``nn.BatchNorm2d`` does.

:class:`LayerNorm2d` (LayerNorm over the channels of an NCHW map) and :class:`GlobalResponseNorm` (ConvNeXt V2's
GRN) follow timm's definitions and parameter names, so timm checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GlobalResponseNorm", "LayerNorm2d", "PooledBatchNorm2d"]


class PooledBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains at one value per channel (batch 1 after global pooling).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.shape[0] * x[0, 0].numel() == 1
        if self.training and single and self.track_running_stats and self.running_mean is not None:
            # batch statistics are undefined: use the running ones, as in eval mode, without updating them
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map, each pixel normalised on its own (timm's
    ``LayerNorm2d``, ConvNeXt's "channels_first" LayerNorm).

    Parameters and state-dict keys are those of ``nn.LayerNorm(num_channels)`` (``weight``, ``bias``).

    Args:
        num_channels: channels ``C`` of the input.
        eps: added to the variance (timm's default ``1e-6``).
        affine: learn a per-channel scale and shift.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """Global Response Normalization of ConvNeXt V2 (Woo et al., "ConvNeXt V2", CVPR 2023):

    ``G_c = ||X_c||_2`` over the spatial positions, ``N_c = G_c / (mean_c G_c + eps)``,
    ``y = X + weight * (X * N) + bias``. With ``weight = bias = 0`` (the initialisation) it is the identity.

    Args:
        dim: channels ``C``.
        eps: added to the mean of the channel norms.
        channels_last: input ``(N, H, W, C)`` when True (timm's default), ``(N, C, H, W)`` otherwise.
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            spatial, channel, shape = (1, 2), -1, (1, 1, 1, -1)
        else:
            spatial, channel, shape = (2, 3), 1, (1, -1, 1, 1)
        g = torch.linalg.vector_norm(x, ord=2, dim=spatial, keepdim=True)  # (N, 1, 1, C) or (N, C, 1, 1)
        n = g / (g.mean(dim=channel, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * n)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, channels_last={self.channels_last}"
