"""Checkpoint unwrapping shared by the converters: ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and the
``module.`` (DataParallel / DDP) and ``_orig_mod.`` (``torch.compile``) key prefixes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["WRAPPER_PREFIXES", "strip_prefixes", "strip_wrapper_prefixes", "unwrap_state_dict"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def strip_prefixes(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """``key`` without each of ``prefixes`` in turn (``module._orig_mod.x`` -> ``x``)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with :data:`WRAPPER_PREFIXES` stripped from every key."""
    return {strip_prefixes(key): value for key, value in state_dict.items()}


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": ...}`` then ``{"state_dict": ...}`` (each when it holds a mapping) and strip
    :data:`WRAPPER_PREFIXES` from the keys."""
    for wrapper in ("model", "state_dict"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
    return strip_wrapper_prefixes(state_dict)
