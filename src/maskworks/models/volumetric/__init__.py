"""Volumetric (3D) segmentation models: ``unet3d``, ``dynunet``, ``unetr``, ``swin_unetr``, and the nnU-Net-style
planner (:mod:`maskworks.models.volumetric.planner`) that configures ``dynunet`` from a dataset fingerprint."""

from maskworks.models.volumetric.dynunet import DynUNet, UNet3D, nnunet_ds_weights
from maskworks.models.volumetric.planner import Fingerprint, Plan, compute_fingerprint, plan_experiment
from maskworks.models.volumetric.swin_unetr import SwinUNETR
from maskworks.models.volumetric.unetr import UNETR

__all__ = [
    "DynUNet",
    "Fingerprint",
    "Plan",
    "SwinUNETR",
    "UNETR",
    "UNet3D",
    "compute_fingerprint",
    "nnunet_ds_weights",
    "plan_experiment",
]
