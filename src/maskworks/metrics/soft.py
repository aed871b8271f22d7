"""Metrics for soft masks / alpha mattes (values in ``[0, 1]``), as used by matting benchmarks (technique notes Q11).

Per image, over the evaluated region ``R`` (all pixels, or the trimap's unknown band when a ``region`` mask is
given), with prediction ``p`` and ground truth ``g``:

* **SAD** ``= sum_R |p - g| / 1000`` (the matting convention of Rhemann et al. 2009 and Xu et al. 2017, "Deep
  Image Matting", reports SAD in thousands).
* **MSE** ``= mean_R (p - g)^2``.
* **Gradient error** ``= sum_R (|grad p| - |grad g|)^2 / 1000`` with gradients from first-derivative-of-Gaussian
  filters of ``sigma = 1.4`` (the ``gaussgradient`` filter of the Deep Image Matting evaluation code:
  half-size ``ceil(sigma * sqrt(-2 log(sqrt(2 pi) sigma 0.01)))``, kernel normalised to unit L2 norm,
  replicate padding). Gradients are taken on the whole image, then summed over ``R``.
* **Soft IoU** ``= sum_R min(p, g) / sum_R max(p, g)`` (equals the hard IoU for binary inputs; ``NaN`` when
  both are zero everywhere in ``R``).

``compute`` averages each metric over images (the matting convention); images with an empty region are
skipped and counted in ``num_skipped``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maskworks.metrics.confusion import _as_tensor, check_finite

__all__ = ["SoftMaskMetrics", "gaussian_gradient"]


def _gauss_derivative_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 1e-2)))
    u = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(u**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    dg = -u * g / sigma**2
    hx = g[:, None] * dg[None, :]  # rows: Gaussian, columns: derivative -> d/dx
    hx = hx / hx.abs().pow(2).sum().sqrt()
    return hx.to(device=device, dtype=dtype)


def gaussian_gradient(x: torch.Tensor, sigma: float = 1.4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d/dx, d/dy)`` of ``(B, H, W)`` maps with first-derivative-of-Gaussian filters (replicate padding)."""
    hx = _gauss_derivative_kernel(sigma, x.dtype, x.device)
    half = hx.shape[0] // 2
    xp = F.pad(x[:, None], (half, half, half, half), mode="replicate")
    # conv2d is a correlation; flipping the kernel makes it MATLAB's imfilter(..., 'conv').
    gx = F.conv2d(xp, hx.flip(0, 1)[None, None])[:, 0]
    gy = F.conv2d(xp, hx.t().flip(0, 1)[None, None])[:, 0]
    return gx, gy


class SoftMaskMetrics:
    """Streaming SAD, MSE, gradient error and soft IoU over images (see the module docstring).

    Args:
        grad_sigma: sigma of the Gaussian-derivative filters of the gradient error.
        scale: SAD and gradient error are divided by this (1000 by convention; 1 for raw sums).
    """

    def __init__(self, grad_sigma: float = 1.4, scale: float = 1000.0) -> None:
        if grad_sigma <= 0 or scale <= 0:
            raise ValueError(f"grad_sigma and scale must be > 0, got {grad_sigma} and {scale}")
        self.grad_sigma, self.scale = float(grad_sigma), float(scale)
        self.reset()

    def reset(self) -> None:
        self.rows: list[tuple[float, float, float, float]] = []
        self.num_skipped = 0

    def __repr__(self) -> str:
        return f"SoftMaskMetrics(grad_sigma={self.grad_sigma}, scale={self.scale}, images={len(self.rows)})"

    @staticmethod
    def _maps(x: Any, name: str) -> torch.Tensor:
        t = _as_tensor(x, name)
        if t.dim() == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:  # 8-bit alpha mattes
            return t.double() / 255.0
        check_finite(t, name, "values")  # NaN slips through min / max comparisons
        t = t.double()
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(
                f"{name} must hold values in [0, 1] (or uint8 0-255 mattes), got range "
                f"[{float(t.min()):.3g}, {float(t.max()):.3g}]; apply a sigmoid/softmax to logits first"
            )
        return t

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        target: torch.Tensor | np.ndarray,
        region: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add a batch of soft masks.

        Args:
            pred: predicted alpha/probability maps in ``[0, 1]`` (or uint8 0-255).
            target: ground-truth maps, same shape.
            region: optional boolean maps of the pixels to evaluate (e.g. ``trimap == 128``), same shape.
        """
        p, g = self._maps(pred, "pred"), self._maps(target, "target")
        if p.shape != g.shape:
            raise ValueError(f"pred {tuple(p.shape)} and target {tuple(g.shape)} must have the same shape")
        g = g.to(p.device)
        if region is None:
            r = torch.ones_like(p, dtype=torch.bool)
        else:
            r = _as_tensor(region, "region")
            r = r[:, 0] if r.dim() == 4 else (r[None] if r.dim() == 2 else r)
            if r.shape != p.shape:
                raise ValueError(f"region {tuple(r.shape)} must have the shape of pred {tuple(p.shape)}")
            r = r.to(p.device).bool()
        gpx, gpy = gaussian_gradient(p, self.grad_sigma)
        ggx, ggy = gaussian_gradient(g, self.grad_sigma)
        grad_err = (torch.sqrt(gpx**2 + gpy**2) - torch.sqrt(ggx**2 + ggy**2)) ** 2
        for b in range(p.shape[0]):
            m = r[b]
            n = int(m.sum())
            if n == 0:
                self.num_skipped += 1
                continue
            pb, gb = p[b][m], g[b][m]
            union = float(torch.maximum(pb, gb).sum())
            self.rows.append(
                (
                    float((pb - gb).abs().sum()) / self.scale,
                    float(((pb - gb) ** 2).mean()),
                    float(grad_err[b][m].sum()) / self.scale,
                    float(torch.minimum(pb, gb).sum()) / union if union > 0 else math.nan,
                )
            )

    def compute(self) -> dict[str, Any]:
        """Means over images of ``sad``, ``mse``, ``grad`` and ``soft_iou``; ``num_images``, ``num_skipped``."""
        if not self.rows:
            vals = [math.nan] * 4
        else:
            arr = np.asarray(self.rows, dtype=np.float64)
            vals = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in arr.T]
        return {
            "sad": vals[0],
            "mse": vals[1],
            "grad": vals[2],
            "soft_iou": vals[3],
            "num_images": len(self.rows),
            "num_skipped": self.num_skipped,
        }
