"""Normalisation layers.

:class:`PooledBatchNorm2d` is ``nn.BatchNorm2d`` for maps that global pooling has reduced to ``1 x 1`` (the
image-pooling branch of ASPP, BiSeNet's global context and attention branches). Plain BatchNorm raises
"Expected more than 1 value per channel when training" for such a map at batch size 1, because the batch
variance of a single value is undefined. This layer keeps the parameters and buffers of ``nn.BatchNorm2d`` (so
checkpoints of torchvision, smp and mmseg load unchanged) and, only when training on a batch with a single
value per channel, normalises with the running statistics and leaves them untouched; every other batch is
normalised exactly as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PooledBatchNorm2d"]


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
