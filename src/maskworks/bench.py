"""Side-by-side timing: warm-up, interleaved repetitions, median and spread, peak memory, machine facts.

Performance claims in maskworks are ratios measured in the same run on the same machine. :func:`compare` runs
several callables round-robin (A, B, A, B, ...) so that slow drift of the machine (another process, thermal
throttling) affects every side alike, and reports for each the median, the spread (min, max, interquartile range)
and the peak memory of one call: the CUDA allocator's ``max_memory_allocated`` on GPU, and on CPU the resident
memory the call added (Linux ``VmHWM`` after resetting the high-water mark through ``/proc/self/clear_refs``;
unavailable elsewhere).

    from maskworks.bench import compare
    result = compare({"ours": lambda: ours(x), "smp": lambda: ref(x)}, repeats=7)
    result.ratio("ours", "smp")        # median time ours / median time smp
    table = result.markdown()          # a markdown table of medians, spreads and peak memory

:func:`matmul_gflops` and :func:`conv_gflops` measure the machine limit that model throughputs are compared to.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "PAIRS",
    "Pair",
    "Timing",
    "Comparison",
    "bench_pair",
    "compare",
    "rows_markdown",
    "count_macs",
    "conv_gflops",
    "machine_info",
    "matmul_gflops",
    "add_throughput_args",
    "setup_throughput_run",
    "write_rows",
]


log = logging.getLogger(__name__)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Timing:
    """Timings of one callable, in seconds, and its peak memory in MiB (None when not measurable)."""

    name: str
    times: list[float]
    peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        """Interquartile range of the times (0 for fewer than 4 repetitions' worth of spread)."""
        if len(self.times) < 2:
            return 0.0
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[2] - q[0]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median,
            "best_s": self.best,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "iqr_s": self.iqr,
            "repeats": len(self.times),
            "peak_mib": self.peak_mib,
        }


@dataclass
class Comparison:
    """Result of :func:`compare`: one :class:`Timing` per callable plus the machine description."""

    timings: dict[str, Timing]
    machine: dict[str, Any] = field(default_factory=dict)

    def ratio(self, a: str, b: str, stat: str = "median") -> float:
        """``stat`` time of ``a`` divided by that of ``b`` (``"median"`` or ``"best"``)."""
        ta, tb = self.timings[a], self.timings[b]
        return getattr(ta, stat) / getattr(tb, stat)

    def memory_ratio(self, a: str, b: str) -> float | None:
        pa, pb = self.timings[a].peak_mib, self.timings[b].peak_mib
        return None if pa is None or pb is None or pb <= 0 else pa / pb

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "timings": [t.summary() for t in self.timings.values()]}

    def markdown(self, baseline: str | None = None) -> str:
        """A markdown table: median ms, spread, peak MiB, and the time ratio to ``baseline`` when given."""
        head = "| name | median ms | min-max ms | IQR ms | peak MiB |" + (f" time / {baseline} |" if baseline else "")
        sep = "|---|---|---|---|---|" + ("---|" if baseline else "")
        rows = [head, sep]
        for name, t in self.timings.items():
            peak = "-" if t.peak_mib is None else f"{t.peak_mib:.1f}"
            row = (
                f"| {name} | {1e3 * t.median:.2f} | {1e3 * min(t.times):.2f}-{1e3 * max(t.times):.2f} | "
                f"{1e3 * t.iqr:.2f} | {peak} |"
            )
            if baseline:
                row += f" {self.ratio(name, baseline):.3f} |"
            rows.append(row)
        return "\n".join(rows)


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Facts that make a timing interpretable: CPU, threads, device, torch version, date."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _peak_of_one_call(fn: Callable[[], Any], device: torch.device | None) -> float | None:
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    before = _status_kib("VmRSS")
    if before is None or not _reset_rss_peak():
        fn()
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return None if peak is None else max(peak - before, 0) / 1024


def compare(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    inner: int = 1,
    device: torch.device | str | None = None,
    memory: bool = True,
) -> Comparison:
    """Time callables interleaved: after ``warmup`` rounds, ``repeats`` rounds of each in turn (the order reversed
    every other round).

    Args:
        fns: name -> zero-argument callable (e.g. ``lambda: model(x)``).
        warmup: untimed rounds first (kernel selection, allocator warm-up).
        repeats: timed rounds; each gives one time per callable.
        inner: calls per timed sample (the sample is their mean), for very short callables.
        device: synchronised around each sample when CUDA; also selects how peak memory is measured.
        memory: measure the peak memory of one extra call of each callable after the timed rounds.

    Returns:
        A :class:`Comparison`.
    """
    if not fns:
        raise ValueError("fns is empty; pass at least one callable")
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, inner >= 1; got {repeats}, {warmup}, {inner}")
    device = torch.device(device) if device is not None else None
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    peaks = {n: _peak_of_one_call(fns[n], device) if memory else None for n in names}
    timings = {n: Timing(n, times[n], peaks[n]) for n in names}
    return Comparison(timings, machine_info(device))


def count_macs(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter`` (convolutions, matrix
    products, attention; elementwise ops are not counted), as FLOPs / 2.

    Attention modules with a ``fused_attn`` flag run their explicit path while counting, because the counter does
    not see the fused scaled-dot-product kernel on CPU; the flags are restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    model.eval()
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
        for m, flag in fused:
            m.fused_attn = flag
    return counter.get_total_flops() // 2


def matmul_gflops(n: int = 2048, repeats: int = 5, device: torch.device | str = "cpu", dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an ``n x n`` by ``n x n`` matrix product (best of ``repeats``): the machine's fp32 limit."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    result = compare({"mm": lambda: a @ b}, warmup=1, repeats=repeats, device=device, memory=False)
    return 2 * n**3 / result.timings["mm"].best / 1e9


def add_throughput_args(parser, repeats: int = 5) -> None:
    """The options every ours-vs-peer throughput script shares: ``--repeats``, ``--device``, ``--amp``,
    ``--threads`` (default 2: the standard machine; a fixed count keeps runs comparable) and ``--json``."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed interleaved rounds (default {repeats})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--json", help="write the machine facts and rows to this file")


def setup_throughput_run(args) -> tuple[torch.device, float]:
    """Apply ``--threads``, resolve ``--device`` and measure the machine limit (the best GFLOP/s of a square matrix
    product: 2048 on CPU, 8192 on GPU; bf16 with ``--amp``); logs it and returns ``(device, limit)``."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.amp else torch.float32
    limit = matmul_gflops(8192 if device.type == "cuda" else 2048, device=device, dtype=dtype)
    log.info("machine limit: %s matmul %.1f GFLOP/s on %s", dtype, limit, device)
    return device, limit


def write_rows(args, device: torch.device, limit: float, rows: list) -> None:
    """Write ``{"machine", "matmul_gflops", "threads", "rows"}`` to ``args.json`` when it is set."""
    if args.json:
        import json
        from pathlib import Path

        info = {"machine": machine_info(device), "matmul_gflops": limit, "threads": args.threads, "rows": rows}
        Path(args.json).write_text(json.dumps(info, indent=2))


def conv_gflops(
    channels: int = 256, size: int = 64, batch: int = 8, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Achieved GFLOP/s of a 3x3 convolution ``channels -> channels`` on ``batch x channels x size x size`` (best
    of ``repeats``, channels-last, no gradient)."""
    device = torch.device(device)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device).eval()
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            return conv(x)

    result = compare({"conv": run}, warmup=1, repeats=repeats, device=device, memory=False)
    flops = 2 * batch * channels * channels * 9 * size * size
    return flops / result.timings["conv"].best / 1e9


# ----------------------------------------------------------------------------------------------- model pairs


def _smp(cls_name: str, encoder: str, **extra) -> Callable[[int], torch.nn.Module]:
    def build(num_classes: int) -> torch.nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, cls_name)(encoder, encoder_weights=None, classes=num_classes, **extra)

    return build


class _OutOnly(torch.nn.Module):
    """torchvision segmentation models return ``{"out": ...}``; this returns the tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _tv_deeplabv3(num_classes: int) -> torch.nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    return _OutOnly(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False))


def _timm(name: str) -> Callable[[int], torch.nn.Module]:
    def build(num_classes: int) -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


@dataclass(frozen=True)
class Pair:
    """A maskworks model and its peer implementation of the same architecture.

    Attributes:
        name: the pair's name in tables.
        model: registered maskworks name.
        kwargs: constructor arguments of ours (besides ``num_classes``).
        peer: description of the peer (library and class).
        build_peer: ``num_classes -> module`` building the peer with random weights.
    """

    name: str
    model: str
    kwargs: dict
    peer: str
    build_peer: Callable[[int], torch.nn.Module]


PAIRS: dict[str, Pair] = {
    p.name: p
    for p in (
        Pair("unet_resnet34", "unet", {"encoder": "resnet34"}, "smp Unet", _smp("Unet", "resnet34")),
        Pair("unet_resnet18", "unet", {"encoder": "resnet18"}, "smp Unet", _smp("Unet", "resnet18")),
        Pair(
            "unetplusplus_resnet34",
            "unetplusplus",
            {"encoder": "resnet34"},
            "smp UnetPlusPlus",
            _smp("UnetPlusPlus", "resnet34"),
        ),
        Pair(
            "deeplabv3plus_resnet50",
            "deeplabv3plus",
            {"encoder": "resnet50", "output_stride": 16, "atrous_rates": (12, 24, 36)},
            "smp DeepLabV3Plus",
            _smp("DeepLabV3Plus", "resnet50", encoder_output_stride=16),
        ),
        Pair("fpn_resnet34", "fpn", {"encoder": "resnet34"}, "smp FPN", _smp("FPN", "resnet34")),
        Pair("pspnet_resnet34", "pspnet", {"encoder": "resnet34"}, "smp PSPNet", _smp("PSPNet", "resnet34")),
        Pair(
            "deeplabv3_resnet50",
            "deeplabv3",
            {"encoder": "resnet50", "output_stride": 8},
            "torchvision deeplabv3_resnet50",
            _tv_deeplabv3,
        ),
        Pair(
            "vit_base_patch16_224",
            "vit_base_patch16_224",
            {},
            "timm vit_base_patch16_224",
            _timm("vit_base_patch16_224"),
        ),
        Pair(
            "vit_small_patch16_224",
            "vit_small_patch16_224",
            {},
            "timm vit_small_patch16_224",
            _timm("vit_small_patch16_224"),
        ),
    )
}


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool, amp: bool, opt=None) -> Callable[[], Any]:
    device_type = x.device.type

    def infer():
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            return model(x)

    def train_step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            out = out["out"] if isinstance(out, dict) else out
            loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step if train else infer


def bench_pair(
    pair: Pair,
    size: tuple[int, int] = (256, 256),
    batch: int = 2,
    num_classes: int = 11,
    train: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    copy_weights: bool = True,
) -> dict[str, Any]:
    """Time ours and the peer of ``pair`` interleaved on the same input, eval forward or one training step.

    Args:
        pair: the pair (see :data:`PAIRS`).
        size: input ``(H, W)``; ViT pairs need their native size (224).
        batch: images per call.
        num_classes: output channels of both.
        train: time a training step (forward, a scalar loss, backward, SGD step) instead of an eval forward.
        device: where both run.
        amp: bf16 autocast (GPU).
        channels_last: both models and the input in the channels-last layout.
        compile: ``torch.compile`` both.
        warmup, repeats: see :func:`compare`.
        copy_weights: load the peer's state dict into ours first (the pairs share keys), so both compute the same
            function.

    Returns:
        A row: times, ratio ours / peer (median), peak memory of each, MACs of ours, achieved GFLOP/s.
    """
    from maskworks import create_model

    device = torch.device(device)
    torch.manual_seed(0)
    ours = create_model(pair.model, num_classes=num_classes, **pair.kwargs)
    peer = pair.build_peer(num_classes)
    if copy_weights:
        peer_sd = peer.state_dict()
        if isinstance(peer, _OutOnly):
            from maskworks.convert import convert_torchvision

            peer_sd, _ = convert_torchvision(peer.model.state_dict(), aux=False)
        ours.load_state_dict(peer_sd, strict=False)
    x = torch.randn(batch, 3, *size, device=device)
    macs = count_macs(ours, x[:1].cpu()) * batch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    fns = {}
    for name, model in (("ours", ours), ("peer", peer)):
        model = model.to(device=device, memory_format=fmt).train(train)
        if compile:
            model = torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6) if train else None
        fns[name] = _step(model, x, train, amp, opt)
    result = compare(fns, warmup=warmup, repeats=repeats, device=device)
    t_ours, t_peer = result.timings["ours"], result.timings["peer"]
    flops = 2 * macs * (3 if train else 1)  # backward ~ 2x forward
    return {
        "pair": pair.name,
        "peer": pair.peer,
        "mode": "train" if train else "eval",
        "size": list(size),
        "batch": batch,
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        "ours_ms": 1e3 * t_ours.median,
        "peer_ms": 1e3 * t_peer.median,
        "ours_iqr_ms": 1e3 * t_ours.iqr,
        "peer_iqr_ms": 1e3 * t_peer.iqr,
        "ratio": result.ratio("ours", "peer"),
        "ours_peak_mib": t_ours.peak_mib,
        "peer_peak_mib": t_peer.peak_mib,
        "gmacs": macs / 1e9,
        "ours_gflops": flops / t_ours.median / 1e9,
        "machine": result.machine,
    }


def rows_markdown(rows: list[dict[str, Any]], limit_gflops: float | None = None) -> str:
    """Markdown table of :func:`bench_pair` rows (with the achieved fraction of ``limit_gflops`` when given)."""
    head = "| pair | peer | mode | input | ours ms | peer ms | ours / peer | ours GFLOP/s |"
    sep = "|---|---|---|---|---|---|---|---|"
    if limit_gflops:
        head += " fraction of matmul |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        shape = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        line = (
            f"| {r['pair']} | {r['peer']} | {r['mode']} | {shape} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} | "
            f"{r['ratio']:.3f} | {r['ours_gflops']:.1f} |"
        )
        if limit_gflops:
            line += f" {r['ours_gflops'] / limit_gflops:.2f} |"
        lines.append(line)
    return "\n".join(lines)
