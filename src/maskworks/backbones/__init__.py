"""Feature extractors, one file per family; importing this package registers them all.

Contract shared by every backbone: ``forward_intermediates(x)`` returns a list of NCHW maps,
``forward_features(x)`` the last one, and ``feature_info`` lists ``{"num_chs", "reduction",
"module"}`` for each map.
"""

from maskworks.backbones import convnext, deit, mit, mobilenet, resnet, swin, swin_v2, vit, vit_hybrid
from maskworks.backbones.convnext import ConvNeXt
from maskworks.backbones.deit import VisionTransformerDistilled
from maskworks.backbones.mit import MixTransformer
from maskworks.backbones.mobilenet import MobileNetV2, MobileNetV3
from maskworks.backbones.resnet import BasicBlock, Bottleneck, ResNet
from maskworks.backbones.swin_v2 import SwinTransformerV2
from maskworks.backbones.vit import VisionTransformer
from maskworks.backbones.vit_hybrid import HybridVisionTransformer

__all__ = [
    "convnext",
    "deit",
    "mit",
    "mobilenet",
    "resnet",
    "swin",
    "swin_v2",
    "vit",
    "vit_hybrid",
    "HybridVisionTransformer",
    "ConvNeXt",
    "MixTransformer",
    "ResNet",
    "SwinTransformerV2",
    "BasicBlock",
    "Bottleneck",
    "MobileNetV2",
    "MobileNetV3",
    "VisionTransformer",
    "VisionTransformerDistilled",
]
