"""Segment Anything latency: maskworks against Hugging Face transformers and the official ``segment_anything`` on
the same weights, interleaved in one run.

    python benchmarks/sam.py                                  # ViT-B at 1024, CPU, 2 threads
    python benchmarks/sam.py --parts encoder prompt --repeats 3
    python benchmarks/sam.py --device cuda --amp              # GPU, bf16 autocast

Three measurements, each with a ratio ours / peer in latency (<= 1.0: at least as fast):

* ``encoder``: one 1024 x 1024 image through the image encoder (ours ``embed_image``, HF ``get_image_embeddings``,
  official ``image_encoder``), with the GFLOP/s it reaches and its fraction of the machine's matmul limit.
* ``prompt``: one click answered from the cached embedding (three masks), through each predictor's public path:
  ours ``SamPredictor.predict`` and the official ``SamPredictor.predict`` (decode + upsampling to the original image
  size), and the decoder alone against HF's ``SamModel`` given ``image_embeddings``.
* ``amg``: the automatic mask generator on one ``--amg-size`` image (``--points-per-side`` grid, 64 prompts a batch),
  ours against the official generator. The weights are random, so the quality thresholds are set to 0 and every
  mask goes through the filtering, box NMS and RLE encoding: an upper bound of the post-processing work.

All weights are HF's random initialisation (relative tables and norms given realistic values: as initialised, the
neck's LayerNorms put the embedding near 1e-20, and the decoder's products fall into slow denormal arithmetic), loaded into ours and the official model
with ``load_weights`` / the converter's inverse, so every implementation computes the same function.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch

from maskworks import load_weights
from maskworks.bench import add_throughput_args, compare, count_macs, setup_throughput_run, write_rows
from maskworks.models.promptable import SamAutomaticMaskGenerator, SamPredictor, sam_vit_base


def build_models(device: torch.device):
    import transformers
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    hf = transformers.SamModel(transformers.SamConfig())
    with torch.no_grad():  # HF's init leaves the neck's output near 1e-20 (denormal products): give the relative
        for name, p in hf.named_parameters():  # tables and every norm realistic values
            if "rel_pos" in name:
                p.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = sam_vit_base()
    load_weights(ours, hf.state_dict(), source="hf", strict=True)
    official = sam_model_registry["vit_b"](checkpoint=None)
    state = {re.sub(r"\.mlp\.fc([12])\.", r".mlp.lin\1.", k): v for k, v in ours.state_dict().items()}
    official.load_state_dict(state)
    return [m.to(device).eval() for m in (ours, hf, official)]


class _Encoder(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf.get_image_embeddings(x)


def _cast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def bench_encoder(models, args, device, limit) -> dict:
    ours, hf, official = models
    x = torch.randn(1, 3, 1024, 1024, device=device)
    macs = count_macs(_Encoder(hf).cpu(), x.cpu())
    hf.to(device)

    def run(fn):
        def call():
            with torch.no_grad(), _cast(device, args.amp):
                return fn(x)

        return call

    fns = {"ours": run(ours.embed_image), "hf": run(hf.get_image_embeddings), "official": run(official.image_encoder)}
    result = compare(fns, warmup=1, repeats=args.repeats, device=device)
    t = {k: v.median for k, v in result.timings.items()}
    return {
        "part": "encoder",
        "input": [1024, 1024],
        "ours_s": t["ours"],
        "hf_s": t["hf"],
        "official_s": t["official"],
        "ours_vs_hf": t["ours"] / t["hf"],
        "ours_vs_official": t["ours"] / t["official"],
        "ours_peak_mib": result.timings["ours"].peak_mib,
        "hf_peak_mib": result.timings["hf"].peak_mib,
        "official_peak_mib": result.timings["official"].peak_mib,
        "gmacs": macs / 1e9,
        "ours_gflops": 2 * macs / t["ours"] / 1e9,
        "fraction_of_matmul": 2 * macs / t["ours"] / 1e9 / limit,
    }


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    for _ in range(8):  # a few flat shapes
        y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
        image[y : y + h // 5, x : x + w // 5] = rng.integers(0, 255, 3)
    return image


def bench_prompt(models, args, device) -> dict:
    from segment_anything import SamPredictor as OfficialPredictor

    ours, hf, official = models
    image = _image(768, 1024)
    mine, theirs = SamPredictor(ours), OfficialPredictor(official)
    mine.set_image(image)
    theirs.set_image(image)
    point, label = np.array([[400.0, 300.0]]), np.array([1])
    embedding = mine.features
    coords = torch.tensor([[[400.0, 300.0]]], device=device)
    labels = torch.tensor([[1]], device=device)

    def ours_decoder():
        with torch.no_grad():
            return ours.decode(embedding, coords, labels, multimask_output=True)

    def hf_decoder():
        with torch.no_grad():
            return hf(image_embeddings=embedding, input_points=coords[:, None], input_labels=labels[:, None])

    fns = {
        "ours": lambda: mine.predict(point, label, multimask_output=True),
        "official": lambda: theirs.predict(point, label, multimask_output=True),
        "ours_decoder": ours_decoder,
        "hf_decoder": hf_decoder,
    }
    result = compare(fns, warmup=2, repeats=max(args.repeats, 10), inner=5, device=device)
    t = {k: v.median for k, v in result.timings.items()}
    return {
        "part": "prompt",
        "input": [768, 1024],
        "ours_ms": 1e3 * t["ours"],
        "official_ms": 1e3 * t["official"],
        "ours_vs_official": t["ours"] / t["official"],
        "ours_decoder_ms": 1e3 * t["ours_decoder"],
        "hf_decoder_ms": 1e3 * t["hf_decoder"],
        "decoder_ours_vs_hf": t["ours_decoder"] / t["hf_decoder"],
    }


def bench_amg(models, args, device) -> dict:
    from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator

    ours, _, official = models
    h, w = args.amg_size
    image = _image(h, w)
    options = {"points_per_side": args.points_per_side, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    mine, theirs = SamAutomaticMaskGenerator(ours, **options), OfficialGenerator(official, **options)
    counts = {}

    def run(name, gen):
        def call():
            with torch.no_grad():
                counts[name] = len(gen.generate(image))

        return call

    result = compare({"ours": run("ours", mine), "official": run("official", theirs)}, warmup=0,
                     repeats=args.repeats, device=device)  # fmt: skip
    t = {k: v.median for k, v in result.timings.items()}
    return {
        "part": "amg",
        "input": [h, w],
        "points_per_side": args.points_per_side,
        "ours_s": t["ours"],
        "official_s": t["official"],
        "ours_vs_official": t["ours"] / t["official"],
        "ours_peak_mib": result.timings["ours"].peak_mib,
        "official_peak_mib": result.timings["official"].peak_mib,
        "masks_ours": counts["ours"],
        "masks_official": counts["official"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["encoder", "prompt", "amg"], choices=["encoder", "prompt", "amg"])
    p.add_argument("--amg-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--points-per-side", type=int, default=16)
    add_throughput_args(p, repeats=3)
    args = p.parse_args()
    device, limit = setup_throughput_run(args)
    print(f"machine limit: matmul {limit:.1f} GFLOP/s on {device} ({'bf16' if args.amp else 'fp32'})", flush=True)
    models = build_models(device)
    rows = []
    for part in args.parts:
        if part == "encoder":
            rows.append(bench_encoder(models, args, device, limit))
        elif part == "prompt":
            rows.append(bench_prompt(models, args, device))
        else:
            rows.append(bench_amg(models, args, device))
        print(json.dumps(rows[-1]), flush=True)
    write_rows(args, device, limit, rows)


if __name__ == "__main__":
    main()
