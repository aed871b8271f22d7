"""Fetching published weights into the cache: URLs through torch.hub's downloader, hub repositories through
``huggingface_hub``; checksums, offline mode, and the errors a user can act on.

See :mod:`maskworks.hub` for the rules (cache layout, environment variables, errors).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

from maskworks.hub.table import PretrainedWeights

__all__ = [
    "ChecksumError",
    "WeightsUnavailable",
    "fetch_weights",
    "hub_cache_dir",
    "is_offline",
    "manual_path",
    "maskworks_home",
    "sha256_file",
    "weights_dir",
]

log = logging.getLogger(__name__)

_OFFLINE_VARS = ("MASKWORKS_OFFLINE", "HF_HUB_OFFLINE")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsUnavailable(OSError):  # noqa: N818 - the name says what happened, as FileNotFoundError does
    """Published weights could not be obtained: offline with nothing cached, no network, an HTTP error, a missing
    repository, or a file that fails its checksum. An ``OSError``; the one-line message names the URL or hub
    repository and :attr:`path`, the place where a file downloaded by hand is picked up.

    Attributes:
        source: the URL, or ``repo/file`` for a hub file.
        path: where a manually downloaded copy of the file is used from (``None`` when not applicable).
    """

    def __init__(self, message: str, source: str | None = None, path: Path | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.path = path

    def __str__(self) -> str:
        return self.args[0]


class ChecksumError(WeightsUnavailable):
    """A downloaded or cached file's SHA-256 differs from the published one (a :class:`WeightsUnavailable`).
    A failed download leaves nothing in the cache."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def maskworks_home() -> Path:
    """``$MASKWORKS_HOME``, by default ``~/.cache/maskworks``."""
    return Path(os.environ.get("MASKWORKS_HOME") or Path.home() / ".cache" / "maskworks").expanduser()


def weights_dir() -> Path:
    """``$MASKWORKS_HOME/weights``: URL downloads, and files placed by hand."""
    return maskworks_home() / "weights"


def hub_cache_dir() -> Path:
    """The huggingface_hub cache that hub files go to: ``$HF_HUB_CACHE`` (or the legacy ``$HUGGINGFACE_HUB_CACHE``),
    else ``$HF_HOME/hub``, else ``$MASKWORKS_HOME/hub``. Read on each call, so it follows the environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return maskworks_home() / "hub"


def is_offline() -> bool:
    """Whether downloads are off: ``MASKWORKS_OFFLINE`` or ``HF_HUB_OFFLINE`` is ``1`` / ``true`` / ``yes`` / ``on``."""
    return any(_truthy(os.environ.get(var)) for var in _OFFLINE_VARS)


def _offline_reason() -> str:
    var = next(v for v in _OFFLINE_VARS if _truthy(os.environ.get(v)))
    return f"downloads are off ({var}={os.environ[var]})"


def manual_path(entry: PretrainedWeights) -> Path:
    """Where a copy of ``entry``'s file downloaded by hand is picked up: ``$MASKWORKS_HOME/weights/<file name>``
    for a URL, ``$MASKWORKS_HOME/weights/<owner>--<repo>/<file>`` for a hub file (its first file name)."""
    if entry.is_hub:
        return weights_dir() / entry.repo.replace("/", "--") / entry.files[0]
    return weights_dir() / os.path.basename(urlparse(entry.resolve_url()).path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Checksums: hashing a multi-GB file on every load would be slow, so a verified file gets a small stamp (size,
# mtime, inode, digest) under $MASKWORKS_HOME/weights/.verified/; a file whose stamp no longer matches is hashed again.
# ---------------------------------------------------------------------------------------------------------------


def _stamp_path(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return weights_dir() / ".verified" / key


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def verify_file(path: Path, expected: str) -> bool:
    """Whether ``path``'s SHA-256 starts with ``expected`` (a full digest or a prefix), re-using the stamp of an
    earlier check when the file has not changed since."""
    expected = expected.lower()
    stamp_file = _stamp_path(path)
    stamp = _stamp(path)
    try:
        recorded_stamp, recorded_digest = stamp_file.read_text().splitlines()[:2]
        if recorded_stamp == stamp and recorded_digest.startswith(expected):
            return True
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if not digest.startswith(expected):
        return False
    try:
        _write_atomic(stamp_file, f"{stamp}\n{digest}\n")
    except OSError as exc:  # a read-only cache still works, it just hashes every time
        log.debug("could not record the checksum of %s: %s", path, exc)
    return True


# ---------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------


def _fetch_url(entry: PretrainedWeights, progress: bool) -> Path:
    url = entry.resolve_url()
    expected = entry.expected_sha256()
    dest = manual_path(entry)
    check = f"SHA-256 {'prefix ' if expected and len(expected) < 64 else ''}{expected}"
    if dest.is_file():
        if expected is None or verify_file(dest, expected):
            return dest
        if is_offline():
            raise ChecksumError(
                f"{dest} (the cached copy of {url}) does not match its {check} and {_offline_reason()}: delete it, "
                f"or replace it with the file from {url}",
                url,
                dest,
            )
        log.warning("%s does not match its %s; downloading %s again", dest, check, url)
    elif is_offline():
        raise WeightsUnavailable(
            f"{entry.name}: {url} is not in the cache and {_offline_reason()}; download it by hand to {dest}",
            url,
            dest,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    from torch.hub import download_url_to_file

    # download_url_to_file writes <dest>.<uuid>.partial, checks the hash prefix and only then renames it to dest
    # (atomic on one file system), removing the partial file on any failure: concurrent downloads are safe.
    try:
        download_url_to_file(url, str(dest), hash_prefix=expected, progress=progress)
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise
        raise ChecksumError(
            f"{entry.name}: the file downloaded from {url} does not match its {check} ({exc}); nothing was saved",
            url,
            dest,
        ) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        raise WeightsUnavailable(
            f"{entry.name}: could not download {url} ({reason}); download it by hand to {dest}", url, dest
        ) from exc
    if expected is not None:
        verify_file(dest, expected)  # records the stamp, so the next load does not hash it again
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face hub
# ---------------------------------------------------------------------------------------------------------------


def _lfs_sha256(path: Path) -> str | None:
    """The SHA-256 a hub-cache file must have: the name of the blob its snapshot entry links to, when that is an
    LFS object id (a git blob id has 40 hex digits, and a cache without symlinks copies the file: ``None`` then)."""
    if not path.is_symlink():
        return None
    name = Path(os.path.realpath(path)).name
    return name if _SHA256.match(name) else None


def _fetch_hub(entry: PretrainedWeights, progress: bool) -> Path:
    for name in entry.files:  # a file placed by hand
        placed = manual_path(entry).with_name(name)
        if placed.is_file():
            if entry.sha256 and not verify_file(placed, entry.sha256):
                raise ChecksumError(
                    f"{placed} (placed by hand for {entry.repo}/{name}) does not match its SHA-256 {entry.sha256}",
                    f"{entry.repo}/{name}",
                    placed,
                )
            return placed

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline()
    where = manual_path(entry)
    source = f"{entry.repo}/{entry.files[0]}"
    kwargs = {
        "revision": entry.revision,
        "cache_dir": hub_cache_dir(),
        "library_name": "maskworks",
        "local_files_only": offline,
    }
    if not progress:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
    failures: list[str] = []
    try:
        for name in entry.files:
            try:
                path = Path(hf_hub_download(entry.repo, name, **kwargs))
            except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
                raise WeightsUnavailable(
                    f"{entry.name}: the hub repository {entry.repo}"
                    f"{'@' + entry.revision if entry.revision else ''} is not available "
                    f"({type(exc).__name__}); download {entry.files[0]} by hand to {where}",
                    source,
                    where,
                ) from exc
            except LocalEntryNotFoundError:  # not cached, and offline or the hub unreachable
                failures.append(f"{name}: not cached and the hub is unreachable")
                continue
            except EntryNotFoundError:  # the repository has no such file: try the next name
                failures.append(f"{name}: not in the repository")
                continue
            except (HfHubHTTPError, OSError) as exc:
                failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            expected = entry.sha256 or _lfs_sha256(path)
            if expected and not verify_file(path, expected):
                if offline:
                    raise ChecksumError(
                        f"{entry.name}: the cached {path} ({entry.repo}/{name}) does not match its SHA-256 {expected} "
                        f"and {_offline_reason()}: delete it, or download the file by hand to {where}",
                        f"{entry.repo}/{name}",
                        where,
                    )
                log.warning(
                    "%s (%s/%s) does not match its SHA-256 %s; downloading it again", path, entry.repo, name, expected
                )
                path = Path(hf_hub_download(entry.repo, name, force_download=True, **kwargs))
                if not verify_file(path, expected):
                    raise ChecksumError(
                        f"{entry.name}: {entry.repo}/{name} downloaded again still does not match its SHA-256 "
                        f"{expected}",
                        f"{entry.repo}/{name}",
                        where,
                    )
            return path
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    why = _offline_reason() if offline else "; ".join(failures)
    raise WeightsUnavailable(
        f"{entry.name}: {entry.repo} ({' or '.join(entry.files)}) could not be fetched from the hub ({why}); "
        f"download {entry.files[0]} by hand to {where}",
        source,
        where,
    )


def fetch_weights(entry: PretrainedWeights, progress: bool = True) -> Path:
    """The local path of ``entry``'s file, downloading it into the cache when needed.

    Args:
        entry: a row of :data:`maskworks.hub.PRETRAINED`.
        progress: show a progress bar while downloading.

    Returns:
        The path of the verified file.

    Raises:
        WeightsUnavailable: offline with nothing cached, no network, or the source refused (message: the URL or
            repository and the path where a file downloaded by hand is picked up).
        ChecksumError: the file fails its SHA-256 check (a failed download leaves nothing behind).
    """
    if entry.is_hub:
        return _fetch_hub(entry, progress)
    return _fetch_url(entry, progress)
