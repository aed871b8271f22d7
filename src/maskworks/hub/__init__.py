"""Published weights: which exist for each registered model, and fetching them into one cache.

Use::

    create_model("resnet34", pretrained=True)            # the model's default tag
    create_model("vit_base_patch16_224", pretrained="augreg_in21k_ft_in1k")
    create_model("deeplabv3", pretrained="coco_voc")      # torchvision's COCO-VOC DeepLabv3 (21 classes, ResNet-50)
    create_model("unet", encoder="resnet34", encoder_weights="imagenet")   # or a tag of the encoder, or a path
    create_model("resnet34", pretrained="/data/resnet34.pth")               # a local file, as load_weights reads it

``pretrained=True`` is the model's default tag; ``encoder_weights="imagenet"`` (or ``True``) is the encoder's
default tag, which is an ImageNet one for every backbone. A string that names an existing file, or that looks like a
path (it has a folder separator or ends in ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``), is a path and loads as
:func:`maskworks.load_weights` always did; any other string is a tag, and an unknown tag is a ``ValueError`` listing
the model's tags. A tag's row may carry the constructor arguments of the architecture it was trained with (the
DeepLabv3 ``coco_voc`` weights: ``num_classes=21, aux=True``); they become the defaults of that ``create_model``
call, the caller's own arguments win, except those in the row's ``requires`` (they change tensor shapes). The
weights land in the model (``model.encoder`` for a backbone checkpoint): classifier heads the model has no room for
are dropped, the first convolution is adapted to ``in_channels``, ViT position tables are resampled to the model's
grid, and :func:`maskworks.load_weights`' coverage check refuses a file that fills less than half of its target.
Checkpoints never store these arguments (``save_model`` drops ``pretrained`` / ``encoder_weights``: the
checkpoint's own weights are the trained ones).

:data:`PRETRAINED` is the table (:class:`PretrainedWeights` rows: model, tag, kind of source, URL or hub repo and
file names, SHA-256, licence, the training data, the ``load_weights`` converter); :data:`NO_PUBLISHED_WEIGHTS` says
why a registered model has none. :func:`list_pretrained` and :func:`format_pretrained_table` list them (the latter is
what ``maskworks models --pretrained`` prints).

Where files come from:

* torchvision rows: the URL of the torchvision weights enum (read from torchvision at run time), downloaded with
  ``torch.hub.download_url_to_file`` (temporary file, progress bar, hash check, then an atomic rename) to
  ``$MASKWORKS_HOME/weights/<file name>``; the file name's hash part (``resnet34-b627a593.pth``) is a prefix of the
  file's SHA-256, checked as torch.hub does (a full SHA-256 is checked where the table records one).
* hub rows (timm's ``timm/<model>.<tag>`` repositories, transformers models such as ``google/vit-base-patch16-224``):
  ``huggingface_hub.hf_hub_download`` (``model.safetensors`` first, else ``pytorch_model.bin``), into the
  huggingface_hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$MASKWORKS_HOME/hub`` (so that without
  Hugging Face settings everything is under ``$MASKWORKS_HOME``). huggingface_hub checks the size; maskworks also
  checks the SHA-256 against the LFS object id the cached blob is named by.

Cache layout (``MASKWORKS_HOME`` defaults to ``~/.cache/maskworks``)::

    $MASKWORKS_HOME/weights/resnet34-b627a593.pth               URL downloads, and URL files placed by hand
    $MASKWORKS_HOME/weights/timm--resnet34.a1_in1k/model.safetensors   hub files placed by hand (<owner>--<repo>)
    $MASKWORKS_HOME/weights/.verified/                          stamps of files whose checksum was verified
    $MASKWORKS_HOME/hub/models--timm--resnet34.a1_in1k/...      the huggingface_hub cache (unless HF_HUB_CACHE /
                                                                HF_HOME is set)

Environment:

* ``MASKWORKS_HOME``: the cache root.
* ``MASKWORKS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: never touch the network; use the cache (and files placed by hand).
* ``HF_HUB_CACHE`` / ``HF_HOME``: the hub cache, as for every huggingface_hub user; ``HF_ENDPOINT`` a hub mirror.

Errors: a file that cannot be obtained (offline with nothing cached, no network, an HTTP error, a missing
repository) raises :class:`WeightsUnavailable`, an ``OSError`` whose one-line message names the URL or repository and
the exact path where a file downloaded by hand is picked up; a file that fails its checksum raises
:class:`ChecksumError` (a :class:`WeightsUnavailable`). A download that fails its checksum leaves nothing in the
cache; a cached file that fails it is downloaded again (offline: :class:`ChecksumError`, naming the file). Checked
files get a stamp (size, mtime, inode, digest), so a later load re-hashes only a file that changed.

Concurrency: a URL download goes to a uniquely named temporary file beside its target and is renamed into place
only when complete and verified, and huggingface_hub downloads the same way (with a lock per blob), so two processes
fetching the same weights both end with the complete file and neither ever sees a partial one.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from maskworks.hub.download import (
    ChecksumError,
    WeightsUnavailable,
    fetch_weights,
    hub_cache_dir,
    is_offline,
    manual_path,
    maskworks_home,
    sha256_file,
    weights_dir,
)
from maskworks.hub.table import KINDS, NO_PUBLISHED_WEIGHTS, PRETRAINED, PretrainedWeights, torchvision_weights_url

__all__ = [
    "ChecksumError",
    "KINDS",
    "NO_PUBLISHED_WEIGHTS",
    "PRETRAINED",
    "PretrainedWeights",
    "ResolvedWeights",
    "WeightsUnavailable",
    "fetch_weights",
    "find_pretrained",
    "format_pretrained_table",
    "hub_cache_dir",
    "is_offline",
    "list_pretrained",
    "manual_path",
    "maskworks_home",
    "resolve_weights",
    "sha256_file",
    "torchvision_weights_url",
    "weights_dir",
]

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".npz")


def list_pretrained(pattern: str = "*") -> list[PretrainedWeights]:
    """The rows of :data:`PRETRAINED` whose model name or ``model.tag`` matches the glob ``pattern``, sorted by
    model, then the default first, then tag (``"resnet*"``, ``"*.mae"``, ``"vit_base_patch16_224.*"``)."""
    rows = [r for r in PRETRAINED if fnmatch.fnmatch(r.model, pattern) or fnmatch.fnmatch(r.name, pattern)]
    return sorted(rows, key=lambda r: (r.model, not r.default, r.tag, tuple(sorted(map(str, r.model_kwargs.items())))))


def _describe_requires(row: PretrainedWeights) -> str:
    return ", ".join(f"{k}={row.model_kwargs[k]!r}" for k in row.requires)


def _checksum_column(row: PretrainedWeights) -> str:
    if row.sha256:
        return row.sha256[:16] + "..."
    if row.is_hub:
        return "LFS id"
    expected = row.expected_sha256()
    return f"{expected} (prefix)" if expected else "-"


def format_pretrained_table(pattern: str = "*") -> str:
    """The rows of :func:`list_pretrained` as a text table (``*`` marks each model's default tag), followed by the
    matching registered models that have no published weights and why. Reads torchvision's URLs (no network)."""
    rows = list_pretrained(pattern)
    header = ("model", "tag", "data", "licence", "source", "converter", "sha256", "location")
    lines = []
    for r in rows:
        tag = ("* " if r.default else "  ") + r.tag + (f" ({_describe_requires(r)})" if r.requires else "")
        lines.append((r.model, tag, r.dataset, r.license, r.kind, r.converter, _checksum_column(r), r.location))
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [fmt(header), fmt("-" * w for w in widths), *(fmt(line) for line in lines)]
    if not rows:
        out = [f"no published weights match {pattern!r}"]
    else:
        out.append(f"{len(rows)} weights for {len({r.model for r in rows})} models; * = the default tag")
    notes = [r for r in rows if r.note]
    if notes:
        out += ["", "notes:", *(f"  {r.name}: {r.note}" for r in notes)]
    missing = sorted(n for n in NO_PUBLISHED_WEIGHTS if fnmatch.fnmatch(n, pattern))
    if missing:
        out += ["", "registered models without published weights:"]
        out += [f"  {n}: {NO_PUBLISHED_WEIGHTS[n]}" for n in missing]
    out.append("")
    out.append(
        f"cache: {weights_dir()} (URL files, files placed by hand) and {hub_cache_dir()} (hub files)"
        + ("; offline" if is_offline() else "")
    )
    return "\n".join(out)


def _no_weights_message(model: str) -> str:
    reason = NO_PUBLISHED_WEIGHTS.get(model, "no row in maskworks.hub.PRETRAINED")
    return f"model {model!r} has no published weights ({reason}); pass a local file instead"


def find_pretrained(
    model: str, tag: str | bool = True, model_kwargs: Mapping[str, Any] | None = None
) -> PretrainedWeights:
    """The row of ``model``'s weights named ``tag`` that fits a model built with ``model_kwargs``.

    Args:
        model: a registered model name.
        tag: a tag; ``True`` for the default; ``"imagenet"`` for the default among the ImageNet-trained rows.
        model_kwargs: the caller's constructor arguments (they pick between rows of one tag that differ in
            ``requires``, e.g. DeepLabv3's encoder).

    Raises:
        ValueError: the model has no published weights, no such tag (the message lists the tags), or the weights
            need other values of the row's ``requires`` arguments.
    """
    model_kwargs = model_kwargs or {}
    rows = [r for r in PRETRAINED if r.model == model]
    if not rows:
        raise ValueError(_no_weights_message(model))
    tags = sorted({r.tag for r in rows})
    if tag is True:
        candidates = rows
    elif tag == "imagenet" and "imagenet" not in tags:
        candidates = [r for r in rows if "imagenet" in r.dataset]
        if not candidates:
            raise ValueError(f"model {model!r} has no ImageNet weights; its tags are: {', '.join(tags)}")
    elif isinstance(tag, str):
        candidates = [r for r in rows if r.tag == tag]
        if not candidates:
            default = next((r.tag for r in rows if r.default), rows[0].tag)
            raise ValueError(
                f"unknown weights tag {tag!r} for model {model!r} (and no file of that name exists); its tags are: "
                f"{', '.join(tags)} (default {default!r}; `maskworks models --pretrained` lists them)"
            )
    else:
        raise TypeError(f"weights must be True, a tag or a path, got {tag!r} ({type(tag).__name__})")
    fitting = [r for r in candidates if r.accepts(model_kwargs)]
    if not fitting:
        options = "; ".join(f"{r.tag!r} for {_describe_requires(r)}" for r in candidates)
        names = sorted({k for r in candidates for k in r.requires if k in model_kwargs})
        asked = ", ".join(f"{k}={model_kwargs[k]!r}" for k in names)
        raise ValueError(
            f"no published {model!r} weights fit {asked}: there are {options}; build the model with those "
            "arguments (and replace its head to fine-tune on other classes), or drop pretrained= and start only "
            "the encoder from published weights (encoder_weights='imagenet')"
        )
    defaults = [r for r in fitting if r.default]
    return (defaults or fitting)[0]


def _is_tag(value: str) -> bool:
    """A string that is not an existing file and does not look like a path."""
    if os.path.isfile(os.path.expanduser(value)):
        return False
    if "/" in value or "\\" in value or value.startswith("~"):
        return False
    return not value.lower().endswith(_WEIGHT_SUFFIXES)


class ResolvedWeights(NamedTuple):
    """A weights argument resolved to a local file: its path, the ``load_weights`` source, the table row (``None``
    for a path) and the constructor arguments the model must be built with (the row's defaults + the caller's)."""

    path: Path
    source: str
    entry: PretrainedWeights | None
    model_kwargs: dict[str, Any]


def resolve_weights(
    model: str,
    weights: bool | str | os.PathLike,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ResolvedWeights:
    """Turn a ``pretrained`` / ``encoder_weights`` value into a local file, downloading published weights into the
    cache when needed.

    Args:
        model: the registered model (or backbone) name the weights are for.
        weights: ``True`` (the default tag), a tag (``"imagenet"`` = the default ImageNet tag), or a path.
        model_kwargs: the caller's constructor arguments.
        progress: show a progress bar while downloading.

    Returns:
        :class:`ResolvedWeights`.

    Raises:
        ValueError: an unknown tag, a model without published weights, or arguments the weights do not fit.
        WeightsUnavailable: the file could not be obtained (see :mod:`maskworks.hub`).
    """
    model_kwargs = dict(model_kwargs or {})
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and not _is_tag(weights)):
        return ResolvedWeights(Path(os.path.expanduser(os.fspath(weights))), "auto", None, model_kwargs)
    if weights is not True and not isinstance(weights, str):
        raise TypeError(f"weights must be True, a tag or a path, got {weights!r} ({type(weights).__name__})")
    entry = find_pretrained(model, weights, model_kwargs)
    path = fetch_weights(entry, progress=progress)
    return ResolvedWeights(path, entry.converter, entry, {**entry.model_kwargs, **model_kwargs})
