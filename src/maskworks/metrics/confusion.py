"""Streaming confusion matrix for semantic segmentation and the metrics derived from it.

The matrix is accumulated exactly in int64 with a single ``torch.bincount`` per update on the device of the
inputs, so it is cheap enough to update every validation batch and exact for any number of pixels. Labels are
cast to int64 *before* forming the flat index ``target * K + pred``; doing that product in the input dtype
(uint8 / int16 masks) silently wraps around, which is the classic bug this module guards against.

Derived metrics follow the usual definitions (Long et al., "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015, section 5, for pixel accuracy, mean accuracy, mean IoU and frequency-weighted IoU;
Dice = F1 = 2 TP / (2 TP + FP + FN)).

Absent classes (how ``compute`` treats a class ``c``, with ``T_c`` its target pixels and ``P_c`` its predicted
pixels, both counted over non-ignored pixels only):

* ``T_c = 0`` and ``P_c = 0`` (absent from both): IoU and Dice are undefined, reported as ``NaN`` and left out of
  ``miou`` / ``mdice`` (nan-mean). This is the same as torchmetrics' ``average="macro"``, which gives such
  classes weight 0; torchmetrics' per-class ``average=None`` instead reports ``zero_division`` (0.0) for them.
* ``T_c = 0`` but ``P_c > 0`` (a false-positive-only class): IoU = Dice = 0, and they *do* count in ``miou`` /
  ``mdice``, pulling the mean down. Recall is ``NaN`` (no target pixels) and the class is left out of
  ``mean_acc``; its frequency weight in ``fwiou`` is 0.
* ``T_c > 0`` but ``P_c = 0`` (never predicted): IoU = Dice = recall = 0, precision is ``NaN``.

An ``ignore_index`` inside ``0..K-1`` (e.g. 0, to leave a background class out of the statistics) excludes that
class entirely, as torchmetrics' ``MulticlassJaccardIndex(ignore_index=c)`` does: its target pixels are not
counted, its per-class ``iou`` / ``dice`` / ``precision`` / ``recall`` are ``NaN`` and it is left out of
``miou`` / ``mdice`` / ``mean_acc`` (torchmetrics reports 0.0 for it with ``average=None``; the means agree). A
counted pixel (true class ``t != c``) that is *predicted* as ``c`` is kept: it is a miss (false negative) of
class ``t``, lowers ``t``'s IoU, Dice and recall, and counts as wrong in ``pixel_acc`` - exactly torchmetrics'
treatment (its confusion-matrix row ``c`` is zero, column ``c`` keeps those predictions). ``fwiou`` weighs the
remaining classes by their target pixels, so it equals torchmetrics' ``average="weighted"`` Jaccard index.

Intentional differences from torchmetrics (1.9), each asserted in the parity tests: (1) per-class values of
undefined classes are ``NaN``, not ``zero_division``; (2) with an in-range ``ignore_index`` torchmetrics'
``MulticlassF1Score`` / ``MulticlassRecall`` (``average="macro"``) drop only that class's target pixels, so once
it is predicted on a counted pixel it is a false-positive-only class averaged in as 0, while every mean here
leaves it out, consistently with torchmetrics' own Jaccard index; (3) ``mean_acc`` averages recall over
classes present in the target (Long et al.), while ``MulticlassRecall(average="macro")`` also averages in a
false-positive-only class as 0; (4) everything is pooled over the dataset (one matrix, like
``MulticlassJaccardIndex``), while the segmentation ``MeanIoU`` averages per-image IoUs (skipping classes absent
from an image), which weighs every image equally whatever its size.

With no counted pixels at all (empty or fully ignored inputs) ``compute`` does not raise: every ratio is ``NaN``
and ``num_pixels`` is 0. ``NaN`` values are plain Python floats; ``json.dumps`` writes them as ``NaN`` (valid for
Python's ``json`` module, not strict JSON) - pass ``allow_nan=False`` if a strict consumer must reject them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "check_common_args", "check_finite", "labels_from_scores"]

log = logging.getLogger(__name__)

_MAX_LISTED = 10  # offending values listed in error messages


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    """Convert a numpy array / tensor to a tensor without changing its values (unsigned numpy ints widened)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "u" and x.dtype != np.uint8:  # torch lacks full uint16/32/64 support
            x = x.astype(np.int64)
        elif x.dtype.kind == "f" and x.dtype not in (np.float16, np.float32, np.float64):
            x = x.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _list_values(values: torch.Tensor) -> str:
    uniq = torch.unique(values).cpu().tolist()
    more = f" ... ({len(uniq)} distinct)" if len(uniq) > _MAX_LISTED else ""
    return f"{uniq[:_MAX_LISTED]}{more}"


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``NaN`` where ``den == 0`` (float64)."""
    out = torch.full_like(num, math.nan, dtype=torch.float64)
    ok = den > 0
    out[ok] = num[ok].double() / den[ok].double()
    return out


def _nanmean(x: torch.Tensor) -> float:
    """Mean of the finite entries; ``NaN`` when there are none (no RuntimeWarning)."""
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if bool(keep.any()) else math.nan


def check_common_args(num_classes: Any, ignore_index: Any, class_names: Sequence[str] | None) -> list[str] | None:
    """Validate the arguments every streaming metric shares; returns ``class_names`` as a list of str (or None)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a sequence of {num_classes} names, got the string {class_names!r}")
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries, expected num_classes={num_classes}")
    return names


def check_finite(x: torch.Tensor, name: str, what: str = "scores") -> None:
    """Raise a one-line ValueError when a floating-point tensor holds NaN or inf (one ``isfinite().all()`` pass).

    ``argmax`` returns class 0 for an all-NaN score vector, so non-finite model outputs would otherwise be counted
    as confident predictions of class 0. Integer and bool tensors are not checked.
    """
    if not x.is_floating_point() or x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    raise ValueError(
        f"{name} holds non-finite {what} ({n_nan} NaN and {n_inf} inf of {x.numel()} values, shape "
        f"{tuple(x.shape)}); they are rejected rather than counted as class 0 - check the model output"
    )


def labels_from_scores(
    scores: torch.Tensor, target: torch.Tensor, num_classes: int, batched_only: bool = False
) -> torch.Tensor:
    """Labels from float scores by ``argmax`` over the class dimension.

    The class dimension is 1 for ``(B, K, *spatial)`` scores against a ``(B, *spatial)`` target, and 0 for one
    ``(K, H, W)`` score map against an ``(H, W)`` target (unless ``batched_only``).

    Raises:
        ValueError: on a shape that does not match ``target``, a class dimension that is not ``num_classes``, or
            non-finite scores (NaN / inf anywhere, also at ignored pixels; see :func:`check_finite`).
    """
    if scores.ndim != target.ndim + 1 or scores.ndim < 2:
        single = "" if batched_only else " or (K, H, W) matching (H, W)"
        raise ValueError(
            f"float pred must be scores (B, K, *spatial) matching target (B, *spatial){single}; got pred "
            f"{tuple(scores.shape)} vs target {tuple(target.shape)}"
        )
    dim = 0 if (not batched_only and scores.ndim == 3 and target.ndim == 2) else 1
    if scores.shape[dim] != num_classes:
        hint = (
            " (threshold single-channel binary logits yourself, e.g. (logits > 0).long())"
            if scores.shape[dim] == 1
            else ""
        )
        raise ValueError(
            f"float pred has {scores.shape[dim]} channels in dim {dim}, expected num_classes={num_classes}{hint}; "
            f"pred shape {tuple(scores.shape)}"
        )
    check_finite(scores, "pred")
    return scores.argmax(dim)


class ConfusionMatrix:
    """Streaming ``K x K`` confusion matrix (rows = target class, columns = predicted class).

    Args:
        num_classes: number of classes ``K`` (>= 1).
        ignore_index: target value whose pixels are not counted (``None`` counts every pixel). It may lie outside
            ``0..K-1`` (the default 255) or inside it (e.g. 0 to drop a background class from the statistics):
            then that class is excluded from the per-class results (``NaN``) and from every mean, while valid
            pixels predicted as it count as misses of their true class (see the module docstring).
        class_names: optional ``K`` names, returned by :meth:`compute` as ``class_names``.
        device: where the matrix lives. ``None`` (default) follows the inputs: the matrix moves to the device of the
            first update, so accumulation never forces a host copy of the masks.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
        >>> round(cm.compute()["miou"], 4)
        0.5
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        class_names = check_common_args(num_classes, ignore_index, class_names)
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.class_names = class_names
        self._fixed_device = device is not None
        self.matrix = torch.zeros(
            self.num_classes,
            self.num_classes,
            dtype=torch.int64,
            device=torch.device(device) if device is not None else "cpu",
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_pixels={int(self.matrix.sum())}, device={self.matrix.device})"
        )

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch to the matrix.

        Args:
            pred: predicted labels of any integer (or bool) dtype with the same shape as ``target``, e.g. ``(B, H, W)``
                or ``(H, W)``; or float logits / probabilities ``(B, K, H, W)`` (``(K, H, W)`` for a single ``(H, W)``
                target), reduced with ``argmax`` over the class dimension.
            target: integer labels ``0..K-1`` or ``ignore_index``, any integer dtype.

        Raises:
            ValueError: on mismatched shapes, a float ``pred`` whose class dimension is not ``K`` or that holds NaN /
                inf (anywhere, also at ignored pixels), target values outside ``0..K-1`` that are not
                ``ignore_index``, or predicted labels outside ``0..K-1``.
            TypeError: on a floating-point ``target`` or an unsupported input type.
        """
        pred = _as_tensor(pred, "pred")
        target = _as_tensor(target, "target")
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
        if pred.is_complex():
            raise TypeError(f"pred must be integer labels or float scores, got dtype {pred.dtype}")
        if pred.is_floating_point():
            pred = self._argmax(pred, target)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        device = self._device_for(target)
        target = target.to(device=device, dtype=torch.int64).reshape(-1)  # int64 BEFORE target * K + pred
        pred = pred.to(device=device, dtype=torch.int64).reshape(-1)
        k = self.num_classes
        keep = target != self.ignore_index if self.ignore_index is not None else None
        bad_t = (target < 0) | (target >= k)
        bad_p = (pred < 0) | (pred >= k)
        if keep is not None:
            bad_t &= keep
            bad_p &= keep
        if bool((bad_t | bad_p).any()):  # one host sync for both checks
            if bool(bad_t.any()):
                raise ValueError(
                    f"target holds values outside 0..{k - 1} that are not ignore_index="
                    f"{self.ignore_index}: {_list_values(target[bad_t])}"
                )
            raise ValueError(f"pred holds labels outside 0..{k - 1}: {_list_values(pred[bad_p])}")
        index = target * k + pred
        if keep is not None:  # ignored pixels go to an extra bin that is dropped (no boolean-mask copies)
            index = torch.where(keep, index, k * k)
        counts = torch.bincount(index, minlength=k * k + 1)[: k * k].reshape(k, k)  # (K target, K pred)
        self.matrix += counts.to(self.matrix.device)

    def _argmax(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return labels_from_scores(scores, target, self.num_classes)

    def _device_for(self, target: torch.Tensor) -> torch.device:
        """Device to count on: the inputs' device; a matrix created with ``device=None`` moves there with its counts."""
        if not self._fixed_device and self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        return target.device

    def reset(self) -> None:
        """Zero the matrix (keeps its device)."""
        self.matrix.zero_()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker) and return ``self``.

        Raises:
            ValueError: if ``other`` has a different number of classes or ignore index.
        """
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge another ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, ignore_index="
                f"{other.ignore_index}) into num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ``torch.distributed`` ranks in place (no-op when not initialised); returns ``self``.

        Every rank must call it (it is a collective). With the NCCL backend a CPU matrix is reduced on the
        current CUDA device and copied back.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        buf = self.matrix
        if dist.get_backend() == "nccl" and buf.device.type != "cuda":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            buf = buf.clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.matrix = buf.to(self.matrix.device)
        return self

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Counts and settings (the matrix as a CPU int64 tensor), loadable with ``torch.load(weights_only=True)``."""
        return {
            "matrix": self.matrix.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`.

        Raises:
            ValueError: if the saved matrix is not ``(K, K)`` for this instance's ``K``.
        """
        matrix = torch.as_tensor(state["matrix"])
        k = self.num_classes
        if matrix.shape != (k, k):
            raise ValueError(f"state matrix has shape {tuple(matrix.shape)}, expected ({k}, {k})")
        if "ignore_index" in state and state["ignore_index"] != self.ignore_index:
            log.warning(
                "loading confusion counts made with ignore_index=%s into one with ignore_index=%s",
                state["ignore_index"],
                self.ignore_index,
            )
        self.matrix = matrix.to(device=self.matrix.device, dtype=torch.int64).clone()

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, Any]:
        """Metrics from the accumulated counts (see the module docstring for absent classes).

        Returns:
            Dict of plain Python numbers / lists (JSON-serialisable; ``NaN`` marks undefined values):
            ``iou``, ``dice``, ``precision``, ``recall`` (per-class lists of length ``K``; ``NaN`` for an
            ``ignore_index`` inside ``0..K-1``); ``miou``, ``mdice`` (nan-means of IoU / Dice); ``pixel_acc``
            (correct / counted pixels); ``mean_acc`` (mean recall over classes present in the target); ``fwiou``
            (IoU weighted by target pixel frequency); ``num_pixels`` (counted, i.e. non-ignored, pixels, an int);
            and ``class_names`` when given.
        """
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = torch.diagonal(m)
        gt = m.sum(1)  # target pixels per class
        pr = m.sum(0)  # predicted pixels per class
        total = m.sum()
        iou = _safe_ratio(tp, gt + pr - tp)
        dice = _safe_ratio(2 * tp, gt + pr)
        precision = _safe_ratio(tp, pr)
        recall = _safe_ratio(tp, gt)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            for per_class in (iou, dice, precision, recall):  # the ignored class is excluded, not scored 0
                per_class[self.ignore_index] = math.nan
        if total > 0:
            pixel_acc = float(tp.sum() / total)
            fwiou = float((gt * torch.nan_to_num(iou, nan=0.0)).sum() / total)
        else:
            pixel_acc = fwiou = math.nan
        out: dict[str, Any] = {
            "iou": iou.tolist(),
            "miou": _nanmean(iou),
            "dice": dice.tolist(),
            "mdice": _nanmean(dice),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(recall),
            "fwiou": fwiou,
            "num_pixels": int(self.matrix.sum()),
        }
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out
