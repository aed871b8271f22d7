"""Semantic segmentation models: logits ``(B, K, H, W)`` at input resolution."""

from maskworks.models.semantic.attention_unet import AttentionGate, AttentionUNet
from maskworks.models.semantic.bisenet import BiSeNetV1, BiSeNetV2
from maskworks.models.semantic.deeplab import DeepLabV3, DeepLabV3Plus
from maskworks.models.semantic.fast_scnn import FastSCNN
from maskworks.models.semantic.fpn import FPN
from maskworks.models.semantic.lraspp import LRASPP, LRASPPHead
from maskworks.models.semantic.pspnet import PSPNet
from maskworks.models.semantic.segformer import SegFormer, SegFormerHead
from maskworks.models.semantic.setr import SETR, MLANeck, SETRMLAHead, SETRUPHead
from maskworks.models.semantic.transunet import TransUNet
from maskworks.models.semantic.unet import UNet, UNetVanilla, valid_input_size, valid_output_size
from maskworks.models.semantic.unetpp import UNetPlusPlus
from maskworks.models.semantic.upernet import FCNHead, UPerHead, UPerNet

__all__ = [
    "AttentionGate",
    "AttentionUNet",
    "BiSeNetV1",
    "BiSeNetV2",
    "DeepLabV3",
    "DeepLabV3Plus",
    "FCNHead",
    "FPN",
    "FastSCNN",
    "LRASPP",
    "LRASPPHead",
    "MLANeck",
    "PSPNet",
    "SETR",
    "SegFormer",
    "SegFormerHead",
    "SETRMLAHead",
    "SETRUPHead",
    "TransUNet",
    "UNet",
    "UNetPlusPlus",
    "UNetVanilla",
    "UPerHead",
    "UPerNet",
    "valid_input_size",
    "valid_output_size",
]
