"""maskworks: image segmentation with CNNs and vision transformers in pure PyTorch."""

from maskworks.checkpoint import CheckpointError, load_model, load_training_state, save_model
from maskworks.convert import load_weights
from maskworks.hub import WeightsUnavailable, format_pretrained_table, list_pretrained
from maskworks.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "register_model",
    "load_weights",
    "list_pretrained",
    "format_pretrained_table",
    "WeightsUnavailable",
    "save_model",
    "load_model",
    "load_training_state",
    "CheckpointError",
]
