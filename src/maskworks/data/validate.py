"""Up-front validation of a dataset's files, cached so that unchanged datasets are checked once.

:func:`validate_dataset` decodes every image and mask of a file-based dataset (the pairs of a
:class:`~maskworks.data.folder.PairedFileDataset`: ``FolderDataset``, ``CamVid``, ``ISBI2012``), exactly as
``dataset[i]`` reads them, so a truncated PNG or a stray label is reported before training starts instead of in
the middle of epoch 2.

Cache: a pair found good is remembered by the absolute path, byte size and ``mtime_ns`` of its image and of its
mask, together with a hash of how the dataset reads them (its class, label table, class colours, ignore colours,
``in_channels`` and the maskworks version). Entries live in a JSON file under ``$MASKWORKS_HOME/validated/`` (``MASKWORKS_HOME``
defaults to ``~/.cache/maskworks``), one file per dataset root and reading configuration, replaced atomically.
Bad pairs are never cached, so they are checked again on every call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset

from maskworks.data.folder import PairedFileDataset, format_problems
from maskworks.data.io import DatasetError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_WORKERS = 2
_MAX_ENTRIES = 200_000  # a cache file is pruned to the current dataset's good pairs beyond this


def maskworks_home() -> Path:
    """``$MASKWORKS_HOME``, by default ``~/.cache/maskworks``."""
    return Path(os.environ.get("MASKWORKS_HOME") or Path.home() / ".cache" / "maskworks").expanduser()


def _leaves(dataset: Any, indices: Sequence[int] | None = None) -> Iterator[tuple[PairedFileDataset, list[int]]]:
    """``(file dataset, indices)`` for every file-based dataset inside ``dataset`` (Subset / ConcatDataset /
    wrappers with a ``.dataset`` attribute are unwrapped; datasets without files yield nothing)."""
    if isinstance(dataset, PairedFileDataset):
        n = len(dataset)
        chosen = range(n) if indices is None else indices
        yield dataset, sorted({int(i) % n for i in chosen if -n <= int(i) < n})
    elif hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch.utils.data.Subset and look-alikes
        own = list(dataset.indices)
        yield from _leaves(dataset.dataset, own if indices is None else [own[i] for i in indices])
    elif isinstance(dataset, ConcatDataset):
        starts = [0, *dataset.cumulative_sizes]
        for k, child in enumerate(dataset.datasets):
            lo, hi = starts[k], starts[k + 1]
            child_indices = None if indices is None else [i - lo for i in indices if lo <= i < hi]
            if child_indices is None or child_indices:
                yield from _leaves(child, child_indices)
    elif getattr(dataset, "dataset", None) is not None and dataset.dataset is not dataset:
        yield from _leaves(dataset.dataset, indices)  # a wrapper that keeps the indexing


def _config_hash(dataset: PairedFileDataset) -> str:
    """How ``dataset`` reads its files: a change here (or a new maskworks version) invalidates cached results."""
    import maskworks

    config = {
        "version": CACHE_VERSION,
        "maskworks": getattr(maskworks, "__version__", ""),
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "lut": np.asarray(dataset.lut).tolist(),
        "colors": None if dataset.colors is None else [list(map(int, c)) for c in dataset.colors],
        "ignore_colors": [list(map(int, c)) for c in dataset.ignore_colors],
        "in_channels": int(dataset.in_channels),
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _pair_key(image: Path, mask: Path, config: str) -> str | None:
    """Cache key of a pair from its files' stat (no read), or None when a file cannot be stat-ed."""
    parts = [config]
    for path in (image, mask):
        try:
            st = os.stat(path)
        except OSError:
            return None
        parts += [os.path.abspath(path), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cache_file(dataset: PairedFileDataset, config: str) -> Path:
    paths = [os.path.abspath(p) for pair in dataset.pairs for p in pair]
    root = os.path.commonpath(paths) if paths else ""
    name = hashlib.sha256(f"{config}\0{root}".encode()).hexdigest()[:24]
    return maskworks_home() / "validated" / f"{name}.json"


def _load_cache(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable validation cache %s: %s", path, e)
        return set()
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("good"), list):
        return set()
    return {k for k in data["good"] if isinstance(k, str)}


def _save_cache(path: Path, good: set[str], current: set[str], dataset: PairedFileDataset) -> None:
    """Merge ``good`` into the cache file (re-read first, for concurrent writers) and replace it atomically."""
    try:
        merged = _load_cache(path) | good
        if len(merged) > _MAX_ENTRIES:
            merged &= current
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_VERSION, "dataset": repr(dataset), "good": sorted(merged)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write the validation cache %s: %s (validation still passed)", path, e)


def _check(dataset: PairedFileDataset, index: int) -> str | None:
    """None if sample ``index`` reads cleanly, else why not (naming the file)."""
    try:
        dataset.read_pair(index)
    except DatasetError as e:
        return str(e)
    except Exception as e:  # anything else a decoder or a conversion throws still names the pair
        image, mask = dataset.pairs[index]
        return f"image {image} / mask {mask}: {type(e).__name__}: {e}"
    return None


def validate_dataset(dataset: Any, progress: bool = True, cache: bool = True) -> None:
    """Decode every image and mask file of ``dataset`` and raise one error listing every bad file.

    Each sample is read as ``dataset[i]`` reads it (before any transform): full decode (truncated and non-image
    files fail), image mode convertible to the dataset's ``in_channels``, image and mask of the same size, and mask
    values within the dataset's label table (e.g. ``0..K-1`` and 255) or class colours.

    Works on any maskworks dataset: file-based ones (``FolderDataset``, ``CamVid``, ``ISBI2012``, any
    :class:`~maskworks.data.folder.PairedFileDataset`), a ``torch.utils.data.Subset`` of one (only its indices are
    checked), a ``ConcatDataset`` of them, or a wrapper with a ``.dataset`` attribute. Datasets without files
    (``SyntheticShapes``) pass at once.

    Args:
        dataset: the dataset.
        progress: show a progress bar (tqdm) over the pairs that need reading.
        cache: skip pairs found good before whose files are unchanged (same absolute path, size and mtime_ns) and
            read with the same label table, colours and channels; remember the good ones in
            ``$MASKWORKS_HOME/validated/`` (default ``~/.cache/maskworks/validated/``).

    Raises:
        DatasetError: ``"N problem(s) in M samples of <dataset>:"`` followed by one line per bad sample (the first
            10, then ``"... and K more"``), each naming the file and what was expected.
    """
    groups: dict[int, tuple[PairedFileDataset, set[int]]] = {}
    for leaf, indices in _leaves(dataset):
        groups.setdefault(id(leaf), (leaf, set()))[1].update(indices)
    if not groups:
        log.debug("%s has no files to validate", type(dataset).__name__)
        return
    problems: list[str] = []
    total = 0
    for leaf, index_set in groups.values():
        indices = sorted(index_set)
        total += len(indices)
        problems += _validate_files(leaf, indices, progress, cache)
    if problems:
        raise DatasetError(
            f"{len(problems)} problem(s) in {total} samples of {_describe(dataset)}:\n" + format_problems(problems)
        )


def _describe(dataset: Any) -> str:
    inner = [leaf for leaf, _ in _leaves(dataset)]
    if len(inner) == 1 and inner[0] is not dataset:
        return f"{type(dataset).__name__} of {inner[0]!r}"
    return repr(dataset) if isinstance(dataset, PairedFileDataset) else type(dataset).__name__


def _validate_files(dataset: PairedFileDataset, indices: list[int], progress: bool, cache: bool) -> list[str]:
    """Problems of ``dataset``'s samples ``indices`` (in order); caches the good ones when ``cache``."""
    config = _config_hash(dataset)
    keys = {i: _pair_key(*dataset.pairs[i], config) for i in indices} if cache else {}
    cache_path = _cache_file(dataset, config) if cache else None
    known = _load_cache(cache_path) if cache_path is not None else set()
    todo = [i for i in indices if not cache or keys[i] is None or keys[i] not in known]
    if cache:
        log.info("%s: %d of %d samples unchanged since validated", dataset, len(indices) - len(todo), len(indices))
    results: list[str | None] = []
    if todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"validating {type(dataset).__name__}", unit="pair", dynamic_ncols=True)
        try:
            with ThreadPoolExecutor(max_workers=min(_WORKERS, len(todo))) as pool:
                for result in pool.map(lambda i: _check(dataset, i), todo):
                    results.append(result)
                    if bar is not None:
                        bar.update()
        finally:
            if bar is not None:
                bar.close()
    problems = [r for r in results if r is not None]
    if cache_path is not None and todo:
        good = {keys[i] for i, r in zip(todo, results) if r is None and keys[i] is not None}
        if good:
            current = {keys[i] for i in indices if keys[i] is not None}
            _save_cache(cache_path, good, current, dataset)
    if not problems:
        log.info("%s: all %d samples are readable and consistent", dataset, len(indices))
    return problems
