"""Training methods beyond plain supervision: knowledge distillation (DeiT; segmentation KD losses), noisy labels
(co-teaching), microscopy instances (semantic + boundary + distance heads, marker-controlled watershed)."""

from maskworks.methods.distillation import (
    AttentionTransfer,
    ChannelWiseKD,
    DistillationLoss,
    FeatureKD,
    PairwiseKD,
    PixelKD,
    SoftTargetCrossEntropy,
    distillation_loss,
)
from maskworks.methods.microscopy import (
    HEDJitter,
    IntensityJitter,
    MicroscopyLoss,
    connected_component_instances,
    decode_outputs,
    id_map_to_instances,
    instance_map_from_masks,
    instance_targets,
    isbi_instances,
    microscopy_model,
    predict_instances,
    watershed_instances,
)
from maskworks.methods.noisy_labels import CoTeaching, coteaching_forget_rate, small_loss_selection

__all__ = [
    "HEDJitter",
    "IntensityJitter",
    "MicroscopyLoss",
    "connected_component_instances",
    "decode_outputs",
    "id_map_to_instances",
    "instance_map_from_masks",
    "instance_targets",
    "isbi_instances",
    "microscopy_model",
    "predict_instances",
    "watershed_instances",
    "AttentionTransfer",
    "ChannelWiseKD",
    "CoTeaching",
    "DistillationLoss",
    "FeatureKD",
    "PairwiseKD",
    "PixelKD",
    "SoftTargetCrossEntropy",
    "coteaching_forget_rate",
    "distillation_loss",
    "small_loss_selection",
]
