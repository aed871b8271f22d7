"""Foreign checkpoints -> maskworks state dicts, one converter function per source format.

:func:`load_weights` is the entry point: it reads a local ``.safetensors`` / ``.pt`` / ``.pth`` /
``.bin`` file (never unpickling arbitrary objects), detects or takes the source format, converts
the keys and loads them, refusing any shape mismatch.
"""

from maskworks.convert.deeplab import convert_torchvision_deeplabv3
from maskworks.convert.load import CONVERTERS, LoadResult, convert_torchvision, load_weights, read_state_dict
from maskworks.convert.mobilenet import convert_torchvision_mobilenet
from maskworks.convert.resnet import adapt_input_conv, convert_timm_resnet, convert_torchvision_resnet
from maskworks.convert.smp import convert_smp

__all__ = [
    "CONVERTERS",
    "LoadResult",
    "adapt_input_conv",
    "convert_smp",
    "convert_timm_resnet",
    "convert_torchvision",
    "convert_torchvision_deeplabv3",
    "convert_torchvision_mobilenet",
    "convert_torchvision_resnet",
    "load_weights",
    "read_state_dict",
]
