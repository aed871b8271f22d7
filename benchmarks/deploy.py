"""Deployment and compression on 2 CPU cores: latency of PyTorch eager / the maskworks default path / onnxruntime fp32
/ onnxruntime INT8, and CamVid accuracy of INT8, structured pruning (+ fine-tuning) and distillation.

Stages (each appends to ``benchmarks/results/deploy.json``):

- ``latency``: ``fast_scnn``, ``bisenetv2``, ``unet`` (ResNet-18) and ``segformer_b0`` at 512x1024, batch 1, random
  weights: median of ``--runs`` after warm-up for (a) PyTorch eager, NCHW, (b) the maskworks default path
  (channels-last + BatchNorm folded, what ``maskworks predict`` runs), (c) onnxruntime fp32 (``maskworks export``),
  (d) onnxruntime INT8 (QDQ, calibrated on 8 CamVid training images at that size).
- ``camvid``: a student (``fast_scnn``) trained from scratch for ``--budget-min`` on CamVid (half resolution, median
  frequency weighted CE, poly schedule over elapsed time); its val mIoU in PyTorch, onnxruntime fp32 and INT8;
  then structured L1 channel pruning at 30 % and 50 % with ``--finetune-min`` of fine-tuning each (mIoU before /
  after, parameters, latency at 512x1024).
- ``distill``: a teacher (``--teacher unet``: ResNet-18 U-Net; ``--teacher fast_scnn``: the student's own
  architecture, born-again distillation) trained for ``--teacher-min`` (default ``--budget-min``), then the student
  trained for ``--budget-min`` with pixel-wise KD from it (alpha 0.5, T 4) and, in the same run, without it: mIoU of
  both. With ``--teacher fast_scnn`` and equal budgets the teacher run is the student-without-KD run.
- ``accuracy``: ``bisenetv2`` and ``segformer_b0`` (``--models``) trained for ``--budget-min`` like the student; val
  mIoU in PyTorch, onnxruntime fp32 and INT8 (first + last conv float); PT2E INT8 (torchao's x86 quantizer) mIoU and
  its latency at 512x1024 under ``torch.compile`` next to the compiled fp32 model.

    python benchmarks/deploy.py --stage latency
    python benchmarks/deploy.py --stage camvid --budget-min 8 --finetune-min 2
    python benchmarks/deploy.py --stage distill --budget-min 20 --teacher fast_scnn
    python benchmarks/deploy.py --stage accuracy --budget-min 6
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from maskworks.data import CamVid, build_transforms, collate_samples  # noqa: E402
from maskworks.engine.optim import build_optimizer  # noqa: E402
from maskworks.export import to_onnx  # noqa: E402
from maskworks.export.onnx import _session, dynamic_blockers  # noqa: E402
from maskworks.export.quantize import quantize_onnx  # noqa: E402
from maskworks.inference import prepare_for_inference  # noqa: E402
from maskworks.losses import build_loss, split_outputs  # noqa: E402
from maskworks.metrics import ConfusionMatrix  # noqa: E402
from maskworks.registry import create_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "deploy.json"
MODELS_DIR = Path(tempfile.gettempdir()) / "maskworks_deploy_models"  # trained weights between stages (not kept)
MODELS = {"fast_scnn": {}, "bisenetv2": {}, "unet": {"encoder": "resnet18"}, "segformer_b0": {}}
# SegNet's median-frequency class weights of CamVid's 11 classes (as benchmarks/camvid_unet.py)
CAMVID_MEDIAN_FREQ = [0.58872014, 0.51052379, 2.6966694, 0.45021711, 1.17997105, 0.77210379, 2.47826798,
                      2.5187609, 1.01048051, 3.23752394, 4.13065949]  # fmt: skip


def _save(key: str, value) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))


def _median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _calibration(data: str, size: tuple[int, int], n: int = 8) -> list[torch.Tensor]:
    ds = CamVid(data, split="train", transform=build_transforms(train=False))
    return [F.interpolate(ds[i]["image"][None], size=size, mode="bilinear", align_corners=False) for i in range(n)]


def _onnx_pair(model, workdir: Path, name: str, example: torch.Tensor, calibration) -> tuple[Path, Path]:
    fp32 = workdir / f"{name}.onnx"
    to_onnx(model, fp32, example, dynamic=not dynamic_blockers(model))
    int8 = quantize_onnx(fp32, workdir / f"{name}_int8.onnx", calibration)
    return fp32, int8


def _ort_ms(path: Path, x: torch.Tensor, runs: int, threads: int) -> float:
    session = _session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return _median_ms(lambda: session.run(None, feed), runs)


def _torch_ms(model, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        return _median_ms(lambda: model(x), runs)


def stage_latency(args) -> None:
    size = (512, 1024)
    x = torch.randn(1, 3, *size)
    calibration = _calibration(args.data, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in MODELS.items():
            torch.manual_seed(0)
            model = create_model(name, num_classes=11, **kwargs).eval()
            eager = _torch_ms(model, x, args.runs)
            fast = prepare_for_inference(copy.deepcopy(model), fuse=True, channels_last=True)
            xc = x.contiguous(memory_format=torch.channels_last)
            default = _torch_ms(fast, xc, args.runs)
            fp32, int8 = _onnx_pair(model, Path(tmp), name, x, calibration)
            ort32 = _ort_ms(fp32, x, args.runs, args.threads)
            ort8 = _ort_ms(int8, x, args.runs, args.threads)
            row = {
                "model": name,
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                "eager_nchw_ms": round(eager, 1),
                "maskworks_default_ms": round(default, 1),
                "ort_fp32_ms": round(ort32, 1),
                "ort_int8_ms": round(ort8, 1),
                "onnx_mib": round(fp32.stat().st_size / 2**20, 1),
                "onnx_int8_mib": round(int8.stat().st_size / 2**20, 1),
            }
            print(row, flush=True)
            rows.append(row)
    _save("latency_512x1024", {"threads": args.threads, "runs": args.runs, "rows": rows})


# ---------------------------------------------------------------------------------------------------- CamVid
def _loaders(data: str, batch: int):
    tf = build_transforms(train=True, crop_size=(160, 224), scale_range=(0.375, 0.75), hflip=0.5, color_jitter=0.2)
    train = CamVid(data, split="train", transform=tf)
    val = CamVid(data, split="val", transform=build_transforms(train=False))
    loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate_samples)
    return loader, val


def _train(model, loader, minutes: float, lr: float, teacher=None, alpha: float = 0.5) -> dict:
    from maskworks.methods.distillation import PixelKD

    loss_fn = build_loss("ce", options={"ce": {"weight": torch.tensor(CAMVID_MEDIAN_FREQ)}})
    kd = PixelKD(temperature=4.0)
    opt = build_optimizer(model, "adamw", lr=lr, weight_decay=1e-4)
    budget, t0, steps = minutes * 60.0, time.perf_counter(), 0
    while True:
        model.train()
        for batch in loader:
            frac = (time.perf_counter() - t0) / budget
            if frac >= 1.0:
                return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
            for g in opt.param_groups:
                g["lr"] = lr * (1.0 - frac) ** 0.9
            out = model(batch["image"])
            loss = loss_fn(out, batch["mask"])
            if teacher is not None:
                with torch.no_grad():
                    t_logits, _ = split_outputs(teacher(batch["image"]))
                loss = (1 - alpha) * loss + alpha * kd(split_outputs(out)[0], t_logits, batch["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1


def _miou(forward, val, scale: float = 0.5) -> float:
    cm = ConfusionMatrix(val.num_classes)
    for batch in DataLoader(val, batch_size=1, collate_fn=collate_samples):
        x = F.interpolate(batch["image"], scale_factor=scale, mode="bilinear", align_corners=False)
        logits = forward(x)
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), batch["mask"])
    return round(float(cm.compute()["miou"]), 4)


def _torch_forward(model):
    model.eval()

    def run(x):
        with torch.inference_mode():
            return split_outputs(model(x))[0]

    return run


def _ort_forward(path: Path, threads: int):
    session = _session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def stage_camvid(args) -> None:
    from maskworks.compress import prune_channels

    loader, val = _loaders(args.data, 8)
    torch.manual_seed(0)
    student = create_model("fast_scnn", num_classes=11)
    info = _train(student, loader, args.budget_min, 2e-3)
    result = {"model": "fast_scnn", "budget_min": args.budget_min, **info}
    result["miou_torch"] = _miou(_torch_forward(student), val)
    example = torch.randn(1, 3, 180, 240)  # CamVid val at --eval-scale 0.5
    calibration = [F.interpolate(b["image"], scale_factor=0.5, mode="bilinear", align_corners=False)
                   for b, _ in zip(DataLoader(loader.dataset, batch_size=1, collate_fn=collate_samples), range(16))]  # fmt: skip
    calibration = [F.interpolate(c, size=(180, 240), mode="bilinear", align_corners=False) for c in calibration]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = _onnx_pair(student.eval(), Path(tmp), "student", example, calibration)
        result["miou_ort_fp32"] = _miou(_ort_forward(fp32, args.threads), val)
        result["miou_ort_int8"] = _miou(_ort_forward(int8, args.threads), val)
    print(result, flush=True)
    x = torch.randn(1, 3, 512, 1024)
    result["latency_ms_512x1024"] = round(_torch_ms(student.eval(), x, args.runs), 1)
    result["params"] = sum(p.numel() for p in student.parameters())
    pruned_rows = []
    for ratio in (0.3, 0.5):
        model = copy.deepcopy(student)
        report = prune_channels(model, ratio, criterion="l1", example_input=torch.randn(1, 3, 160, 224))
        row = {"ratio": ratio, "params": report.params_after, "macs_ratio": round(report.macs_ratio, 3)}
        row["miou_pruned"] = _miou(_torch_forward(model), val)
        row.update({f"finetune_{k}": v for k, v in _train(model, loader, args.finetune_min, 1e-3).items()})
        row["miou_finetuned"] = _miou(_torch_forward(model), val)
        row["latency_ms_512x1024"] = round(_torch_ms(model.eval(), x, args.runs), 1)
        print(row, flush=True)
        pruned_rows.append(row)
    result["pruning"] = pruned_rows
    _save("camvid_fast_scnn", result)


def _build(name: str):
    return create_model(name, num_classes=11, **MODELS[name])


def stage_distill(args) -> None:
    loader, val = _loaders(args.data, 8)
    teacher_min = args.teacher_min or args.budget_min
    torch.manual_seed(0)
    teacher = _build(args.teacher)
    teacher_info = _train(teacher, loader, teacher_min, 2e-3)
    teacher.eval().requires_grad_(False)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), MODELS_DIR / f"teacher_{args.teacher}.pt")
    result = {"teacher": args.teacher, "teacher_min": teacher_min, "teacher_steps": teacher_info["steps"]}
    result["teacher_miou"] = _miou(_torch_forward(teacher), val)
    print(result, flush=True)
    if args.teacher == "fast_scnn" and teacher_min == args.budget_min:
        # same seed, same budget, no teacher: the teacher run is the student-without-KD run
        result.update(
            {"student_without_kd_miou": result["teacher_miou"], "student_without_kd_steps": teacher_info["steps"]}
        )
    else:
        torch.manual_seed(0)
        plain = _build("fast_scnn")
        info = _train(plain, loader, args.budget_min, 2e-3)
        result.update(
            {"student_without_kd_miou": _miou(_torch_forward(plain), val), "student_without_kd_steps": info["steps"]}
        )
    torch.manual_seed(0)
    student = _build("fast_scnn")
    info = _train(student, loader, args.budget_min, 2e-3, teacher=teacher, alpha=0.5)
    torch.save(student.state_dict(), MODELS_DIR / "student_fast_scnn_kd.pt")
    result.update({"student": "fast_scnn", "budget_min": args.budget_min, "student_steps": info["steps"],
                   "student_kd_miou": _miou(_torch_forward(student), val)})  # fmt: skip
    print(result, flush=True)
    _save(f"distill_fast_scnn_{args.teacher}_{args.budget_min:g}min", result)


def _calibration_images(data: str, count: int, size: tuple[int, int]) -> list[torch.Tensor]:
    train = CamVid(data, split="train", transform=build_transforms(train=False))
    return [
        F.interpolate(train[i]["image"][None], size=size, mode="bilinear", align_corners=False)
        for i in range(0, len(train), max(1, len(train) // count))
    ][:count]


def _compiled_ms(model, x: torch.Tensor, runs: int) -> tuple[float, float]:
    """(compile + first call seconds, median ms) of ``torch.compile(model)``."""
    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    first = time.perf_counter() - t0
    with torch.no_grad():
        return round(first, 1), round(_median_ms(lambda: compiled(x), runs), 1)


def stage_accuracy(args) -> None:
    from maskworks.export.onnx import _Logits
    from maskworks.export.quantize import quantize_pt2e

    loader, val = _loaders(args.data, 8)
    calibration = _calibration_images(args.data, args.calib_count, (180, 240))
    for name in args.models:
        torch.manual_seed(0)
        model = _build(name)
        row = {"model": name, "budget_min": args.budget_min, **_train(model, loader, args.budget_min, 2e-3)}
        model.eval()
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), MODELS_DIR / f"{name}_{args.budget_min:g}min.pt")
        row["miou_torch"] = _miou(_torch_forward(model), val)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "m.onnx"
            to_onnx(model, fp32, torch.randn(1, 3, 180, 240), dynamic=not dynamic_blockers(model))
            row["miou_ort_fp32"] = _miou(_ort_forward(fp32, args.threads), val)
            int8 = quantize_onnx(fp32, Path(tmp) / "int8.onnx", calibration)
            row["miou_ort_int8"] = _miou(_ort_forward(int8, args.threads), val)
        print(row, flush=True)
        try:  # PT2E: accuracy at the val size, speed at 512x1024 (static shapes: one export per size)
            q = quantize_pt2e(model, calibration, torch.randn(1, 3, 180, 240))
            row["miou_pt2e_int8"] = _miou(q, val)
            x = torch.randn(1, 3, 512, 1024)
            big = [F.interpolate(c, size=(512, 1024), mode="bilinear", align_corners=False) for c in calibration[:8]]
            q_big = quantize_pt2e(model, big, x)
            row["compile_s_fp32"], row["latency_ms_compiled_fp32"] = _compiled_ms(_Logits(model).eval(), x, args.runs)
            row["compile_s_pt2e"], row["latency_ms_compiled_pt2e_int8"] = _compiled_ms(q_big, x, args.runs)
            row["latency_ms_eager_fp32"] = round(_torch_ms(model, x, args.runs), 1)
        except Exception as e:  # recorded, not hidden: the table says which model PT2E refuses and why
            row["pt2e_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(row, flush=True)
        _save(f"accuracy_{name}_{args.budget_min:g}min", row)


def stage_int8(args) -> None:
    """INT8 calibration choices on the models the ``distill`` stage trained (its weights in MODELS_DIR)."""
    _, val = _loaders(args.data, 8)
    train = CamVid(args.data, split="train", transform=build_transforms(train=False))
    calibration = [
        F.interpolate(train[i]["image"][None], size=(180, 240), mode="bilinear", align_corners=False)
        for i in range(0, len(train), max(1, len(train) // args.calib_count))
    ][: args.calib_count]
    rows = []
    for name, builder, file in (
        ("unet (resnet18)", lambda: create_model("unet", encoder="resnet18", num_classes=11), "teacher_unet.pt"),
        ("fast_scnn (KD)", lambda: create_model("fast_scnn", num_classes=11), "student_fast_scnn_kd.pt"),
    ):
        model = builder()
        model.load_state_dict(torch.load(MODELS_DIR / file, map_location="cpu"))
        model.eval()
        row = {"model": name, "calibration_images": len(calibration), "miou_torch": _miou(_torch_forward(model), val)}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "m.onnx"
            to_onnx(model, fp32, torch.randn(1, 3, 180, 240), dynamic=not dynamic_blockers(model))
            row["miou_ort_fp32"] = _miou(_ort_forward(fp32, args.threads), val)
            for method, keep_ends in (("minmax", False), ("minmax", True), ("percentile", True), ("entropy", True)):
                key = f"int8_{method}{'_ends_fp32' if keep_ends else ''}"
                int8 = quantize_onnx(fp32, Path(tmp) / f"{key}.onnx", calibration, method=method, keep_ends=keep_ends)
                row[f"miou_{key}"] = _miou(_ort_forward(int8, args.threads), val)
                print(name, key, row[f"miou_{key}"], flush=True)
        rows.append(row)
        print(row, flush=True)
    _save("int8_calibration", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("latency", "camvid", "distill", "int8", "accuracy"), required=True)
    p.add_argument("--teacher", choices=("unet", "fast_scnn"), default="unet", help="distill: the teacher model")
    p.add_argument("--teacher-min", type=float, default=None, help="distill: teacher budget (default --budget-min)")
    p.add_argument("--models", nargs="+", default=["bisenetv2", "segformer_b0"], help="accuracy: models to train")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--budget-min", type=float, default=8.0)
    p.add_argument("--finetune-min", type=float, default=2.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    stages = {"latency": stage_latency, "camvid": stage_camvid, "distill": stage_distill, "int8": stage_int8,
              "accuracy": stage_accuracy}  # fmt: skip
    stages[args.stage](args)


if __name__ == "__main__":
    main()
