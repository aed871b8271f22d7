"""Model compression: structured channel pruning (torch-pruning's DepGraph) and unstructured magnitude pruning.

``pip install maskworks[compress]`` installs torch-pruning, which :func:`prune_channels` needs; the other
functions (and loading pruned checkpoints) work without it.
"""

from __future__ import annotations

from maskworks.compress.pruning import (
    CRITERIA,
    PruneReport,
    apply_structure,
    magnitude_prune,
    prune_channels,
    pruned_structure,
)

__all__ = [
    "CRITERIA",
    "PruneReport",
    "apply_structure",
    "magnitude_prune",
    "prune_channels",
    "pruned_structure",
]
