"""ConfusionMatrix: hand-computed values, torchmetrics parity, overflow safety, streaming and DDP summation."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from maskworks.metrics import ConfusionMatrix

IGNORE = 255


def _random_batch(gen: torch.Generator, k: int, shape=(4, 16, 16), ignore_frac: float = 0.1):
    target = torch.randint(0, k, shape, generator=gen)
    pred = torch.randint(0, k, shape, generator=gen)
    agree = torch.rand(shape, generator=gen) < 0.5  # make the prediction better than chance
    pred = torch.where(agree, target, pred)
    target[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE
    return pred, target


def _int64_reference(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    t = target.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    keep = t != IGNORE
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


# ---------------------------------------------------------------------------------------------- hand-computed
def test_hand_computed_example_with_ignore_and_absent_class():
    # 3 classes. The pixel at (1, 1) is ignored, so its prediction 2 is not counted: class 2 is then absent from
    # both target and prediction.
    target = torch.tensor([[0, 0, 1], [1, IGNORE, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1], [0, 2, 0]], dtype=torch.uint8)
    cm = ConfusionMatrix(3, class_names=["bg", "cat", "dog"])
    cm.update(pred, target)
    # counted pixels (target, pred): (0,0) (0,1) (1,1) (1,0) (0,0)
    assert cm.matrix.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert cm.matrix.dtype == torch.int64
    r = cm.compute()
    # tp = [2, 1, 0]; target counts = [3, 2, 0]; predicted counts = [3, 2, 0]
    assert r["iou"][0] == pytest.approx(2 / 4)  # 2 / (3 + 3 - 2)
    assert r["iou"][1] == pytest.approx(1 / 3)  # 1 / (2 + 2 - 1)
    assert math.isnan(r["iou"][2])  # absent from both: undefined and excluded
    assert r["miou"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # = 5/12
    assert r["dice"][0] == pytest.approx(4 / 6) and r["dice"][1] == pytest.approx(2 / 4)
    assert math.isnan(r["dice"][2])
    assert r["mdice"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # = 7/12
    assert r["precision"][:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(r["precision"][2])
    assert r["recall"][:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(r["recall"][2])
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["mean_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["fwiou"] == pytest.approx((3 * 1 / 2 + 2 * 1 / 3) / 5)  # = 13/30
    assert r["num_pixels"] == 5
    assert r["class_names"] == ["bg", "cat", "dog"]
    json.dumps(r)  # plain Python types (NaN allowed by the json module)


def test_class_only_in_prediction_counts_as_zero_iou():
    # target [0, 1], pred [0, 2]: class 2 is a false positive only -> IoU 0 and it counts in the mean;
    # class 1 is never predicted -> IoU 0, precision undefined.
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))
    r = cm.compute()
    assert r["iou"] == [1.0, 0.0, 0.0]
    assert r["miou"] == pytest.approx(1 / 3)
    assert math.isnan(r["precision"][1]) and r["precision"][2] == 0.0
    assert math.isnan(r["recall"][2])
    assert r["mean_acc"] == pytest.approx(0.5)  # mean recall over classes present in the target (0 and 1)
    assert r["fwiou"] == pytest.approx(0.5)  # class 2 has target frequency 0


# ---------------------------------------------------------------------------------------------- torchmetrics parity
# How torchmetrics (1.x, functional/classification/jaccard.py and utilities/compute.py) treats absent classes:
# * average=None returns, per class, tp / (tp + fp + fn) with ``zero_division`` (default 0.0) where the
#   denominator is 0, i.e. a class absent from both target and prediction is reported as 0 where we report NaN.
# * average="macro" gives such classes weight 0 (``weights[confmat.sum(1) + confmat.sum(0) == 0] = 0``), so the
#   macro mean equals our nan-mean; a class seen only in the prediction has IoU 0 and weight 1 in both.
# * average="weighted" uses the target count per class as the weight: that is our frequency-weighted IoU.
# * Pixels whose target equals ``ignore_index`` are removed before counting, as here.
# F1 / accuracy use the same zero_division = 0 per class.
def test_matches_torchmetrics_when_all_classes_present():
    tm = pytest.importorskip("torchmetrics.classification")
    k = 5
    gen = torch.Generator().manual_seed(0)
    pred, target = _random_batch(gen, k)
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    r = cm.compute()
    assert all(not math.isnan(v) for v in r["iou"])
    iou_tm = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average=None)(pred, target)
    torch.testing.assert_close(torch.tensor(r["iou"], dtype=torch.float32), iou_tm, atol=1e-6, rtol=0)
    miou_tm = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="macro")(pred, target)
    assert r["miou"] == pytest.approx(float(miou_tm), abs=1e-6)
    fw_tm = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="weighted")(pred, target)
    assert r["fwiou"] == pytest.approx(float(fw_tm), abs=1e-6)
    f1_tm = tm.MulticlassF1Score(num_classes=k, ignore_index=IGNORE, average=None)(pred, target)
    torch.testing.assert_close(torch.tensor(r["dice"], dtype=torch.float32), f1_tm, atol=1e-6, rtol=0)
    acc_tm = tm.MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="micro")(pred, target)
    assert r["pixel_acc"] == pytest.approx(float(acc_tm), abs=1e-6)
    macc_tm = tm.MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="macro")(pred, target)
    assert r["mean_acc"] == pytest.approx(float(macc_tm), abs=1e-6)
    prec_tm = tm.MulticlassPrecision(num_classes=k, ignore_index=IGNORE, average=None)(pred, target)
    torch.testing.assert_close(torch.tensor(r["precision"], dtype=torch.float32), prec_tm, atol=1e-6, rtol=0)


def test_matches_torchmetrics_macro_with_absent_classes():
    tm = pytest.importorskip("torchmetrics.classification")
    k = 6
    gen = torch.Generator().manual_seed(1)
    pred, target = _random_batch(gen, 4)  # classes 4 and 5 never occur
    pred[0, 0, 0], target[0, 0, 0] = 4, 0  # class 4: prediction only
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    r = cm.compute()
    iou_tm = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average=None)(pred, target)
    assert r["iou"][4] == 0.0 and float(iou_tm[4]) == 0.0
    assert math.isnan(r["iou"][5]) and float(iou_tm[5]) == 0.0  # torchmetrics: zero_division; ours: NaN
    torch.testing.assert_close(torch.tensor(r["iou"][:5], dtype=torch.float32), iou_tm[:5], atol=1e-6, rtol=0)
    miou_tm = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="macro")(pred, target)
    assert r["miou"] == pytest.approx(float(miou_tm), abs=1e-6)


# ---------------------------------------------------------------------------------------------- exactness
def test_streaming_equals_single_update():
    k = 4
    gen = torch.Generator().manual_seed(2)
    batches = [_random_batch(gen, k, shape=(2, 9, 7)) for _ in range(5)]
    streamed = ConfusionMatrix(k)
    for p, t in batches:
        streamed.update(p, t)
    whole = ConfusionMatrix(k)
    whole.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(streamed.matrix, whole.matrix)
    a, b = streamed.compute(), whole.compute()
    assert a.keys() == b.keys()
    for key in a:  # same integer matrix -> same numbers (pytest.approx refuses nested dicts in pytest >= 9.2)
        assert a[key] == pytest.approx(b[key], nan_ok=True), key


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_dtypes_do_not_overflow(dtype):
    k = 200
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, k, (3, 32, 32), generator=gen)
    pred = torch.randint(0, k, (3, 32, 32), generator=gen)
    target[:, :4] = IGNORE
    target, pred = target.to(dtype), pred.to(dtype)
    if dtype in (torch.uint8, torch.int16):  # the naive formula really does wrap for these dtypes
        assert not torch.equal((target * k + pred).long(), target.long() * k + pred.long())
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    ref = _int64_reference(pred.numpy(), target.numpy(), k)
    np.testing.assert_array_equal(cm.matrix.numpy(), ref)
    assert cm.compute()["num_pixels"] == int((target != IGNORE).sum())


def test_numpy_inputs_of_any_int_dtype():
    k = 3
    target = np.array([[0, 1, 2], [2, 255, 1]], dtype=np.uint16)
    pred = np.array([[0, 1, 1], [2, 0, 1]], dtype=np.int8)
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix.numpy(), _int64_reference(pred, target, k))


def test_logits_equal_argmax_labels():
    k = 4
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, k, 8, 8, generator=gen)
    target = torch.randint(0, k, (2, 8, 8), generator=gen)
    a, b, c = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(logits, target)
    b.update(logits.argmax(1).to(torch.uint8), target)
    c.update(logits.softmax(1)[0], target[0])  # unbatched (K, H, W) scores against (H, W)
    c.update(logits.softmax(1)[1].numpy(), target[1].numpy())
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.matrix, c.matrix)


def test_all_ignore_and_empty_give_nan_without_error():
    cm = ConfusionMatrix(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r0 = cm.compute()
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), IGNORE))
        r = cm.compute()
    for res in (r0, r):
        assert res["num_pixels"] == 0
        for key in ("miou", "mdice", "pixel_acc", "mean_acc", "fwiou"):
            assert math.isnan(res[key])
        assert all(math.isnan(v) for v in res["iou"])


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target .*outside 0\.\.2.*\[3, 7\]"):
        cm.update(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 3, 7, 255]]))
    with pytest.raises(ValueError, match=r"target .*\[-1\]"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"pred .*outside 0\.\.2.*\[5\]"):
        cm.update(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="expected num_classes=3"):
        cm.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold"):
        cm.update(torch.randn(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="float"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))
    assert int(cm.matrix.sum()) == 0  # failed updates leave no partial counts
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="class_names"):
        ConfusionMatrix(3, class_names=["a", "b"])


# ---------------------------------------------------------------------------------------------- state, merge, DDP
def test_merge_state_dict_reset(tmp_path):
    k = 3
    gen = torch.Generator().manual_seed(5)
    (p1, t1), (p2, t2) = _random_batch(gen, k), _random_batch(gen, k)
    a, b, both = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(p1, t1)
    both.update(p2, t2)
    assert torch.equal(a.merge(b).matrix, both.matrix)
    with pytest.raises(ValueError, match="num_classes"):
        a.merge(ConfusionMatrix(4))
    torch.save(both.state_dict(), tmp_path / "cm.pt")
    restored = ConfusionMatrix(k)
    restored.load_state_dict(torch.load(tmp_path / "cm.pt", weights_only=True))
    assert torch.equal(restored.matrix, both.matrix)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        ConfusionMatrix(4).load_state_dict(both.state_dict())
    assert a.all_reduce() is a  # no process group: a no-op
    both.reset()
    assert int(both.matrix.sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulates_on_input_device():
    k = 4
    gen = torch.Generator().manual_seed(6)
    pred, target = _random_batch(gen, k)
    cpu, gpu = ConfusionMatrix(k), ConfusionMatrix(k)
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.matrix.device.type == "cuda"
    assert torch.equal(gpu.matrix.cpu(), cpu.matrix)
    a, b = gpu.compute(), cpu.compute()
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True), key


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        pred, target = _random_batch(gen, 3, shape=(2, 8, 8))
        cm = ConfusionMatrix(3)
        cm.update(pred, target)
        cm.all_reduce()
        if rank == 0:
            torch.save(cm.matrix, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    out = tmp_path / "matrix.pt"
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    expected = ConfusionMatrix(3)
    for rank in range(world):
        gen = torch.Generator().manual_seed(100 + rank)
        expected.update(*_random_batch(gen, 3, shape=(2, 8, 8)))
    assert torch.equal(torch.load(out, weights_only=True), expected.matrix)
