"""Foreign checkpoints -> maskworks state dicts, one converter function per source format.

:func:`load_weights` is the entry point: it reads a local ``.safetensors`` / ``.pt`` / ``.pth`` /
``.bin`` file (never unpickling arbitrary objects), detects or takes the source format, converts
the keys and loads them, refusing any shape mismatch and (unless ``strict=False``) a checkpoint that fills
less than half of the model (:data:`DEFAULT_MIN_FRACTION`). Unreadable files raise
:class:`maskworks.checkpoint.CheckpointError`.
"""

from maskworks.convert.convnext import (
    convert_hf_convnext,
    convert_timm_convnext,
    convert_torchvision_convnext,
    is_hf_convnext_state_dict,
    is_torchvision_convnext_state_dict,
)
from maskworks.convert.deeplab import convert_torchvision_deeplabv3
from maskworks.convert.deit import convert_hf_deit, convert_timm_deit
from maskworks.convert.detection import (
    convert_torchvision_detection,
    is_torchvision_detection_state_dict,
    is_torchvision_mask_rcnn_state_dict,
)
from maskworks.convert.dynunet import convert_monai_dynunet, is_monai_dynunet_state_dict
from maskworks.convert.load import (
    CONVERTERS,
    DEFAULT_MIN_FRACTION,
    LoadResult,
    convert_hf,
    convert_official,
    convert_timm,
    convert_torchvision,
    load_weights,
    read_state_dict,
)
from maskworks.convert.lraspp import convert_torchvision_lraspp, is_torchvision_lraspp_state_dict
from maskworks.convert.mae import convert_hf_vitmae
from maskworks.convert.mobilenet import convert_torchvision_mobilenet
from maskworks.convert.monai_transformers import (
    convert_monai,
    convert_monai_swin_unetr,
    convert_monai_unetr,
    is_monai_state_dict,
    is_monai_swin_unetr_state_dict,
    is_monai_unetr_state_dict,
)
from maskworks.convert.resnet import adapt_input_conv, convert_timm_resnet, convert_torchvision_resnet
from maskworks.convert.sam import convert_hf_sam, convert_segment_anything
from maskworks.convert.sam2 import convert_hf_sam2
from maskworks.convert.segformer import (
    convert_hf_segformer,
    convert_nvlabs_mit,
    convert_smp_mit,
    is_hf_segformer_state_dict,
)
from maskworks.convert.smp import convert_smp
from maskworks.convert.swin import (
    convert_hf_swin,
    convert_timm_swin,
    convert_torchvision_swin,
    is_hf_swin_state_dict,
    is_torchvision_swin_state_dict,
)
from maskworks.convert.transunet import convert_transunet_official, is_transunet_official_state_dict
from maskworks.convert.vit import convert_timm_vit
from maskworks.convert.vit_hf_tv import convert_hf_vit, convert_torchvision_vit

__all__ = [
    "convert_monai",
    "convert_monai_dynunet",
    "convert_monai_swin_unetr",
    "convert_monai_unetr",
    "is_monai_dynunet_state_dict",
    "is_monai_state_dict",
    "is_monai_swin_unetr_state_dict",
    "is_monai_unetr_state_dict",
    "convert_hf_sam",
    "convert_hf_sam2",
    "convert_segment_anything",
    "convert_torchvision_detection",
    "is_torchvision_detection_state_dict",
    "is_torchvision_mask_rcnn_state_dict",
    "convert_official",
    "convert_transunet_official",
    "is_transunet_official_state_dict",
    "CONVERTERS",
    "DEFAULT_MIN_FRACTION",
    "LoadResult",
    "adapt_input_conv",
    "convert_hf",
    "convert_hf_convnext",
    "convert_hf_deit",
    "convert_hf_segformer",
    "convert_hf_swin",
    "convert_hf_vit",
    "convert_hf_vitmae",
    "convert_nvlabs_mit",
    "convert_smp",
    "convert_smp_mit",
    "convert_timm",
    "convert_timm_convnext",
    "convert_timm_deit",
    "convert_timm_resnet",
    "convert_timm_swin",
    "convert_timm_vit",
    "convert_torchvision",
    "convert_torchvision_convnext",
    "convert_torchvision_deeplabv3",
    "convert_torchvision_lraspp",
    "convert_torchvision_mobilenet",
    "convert_torchvision_resnet",
    "convert_torchvision_swin",
    "convert_torchvision_vit",
    "is_hf_convnext_state_dict",
    "is_hf_segformer_state_dict",
    "is_hf_swin_state_dict",
    "is_torchvision_convnext_state_dict",
    "is_torchvision_lraspp_state_dict",
    "is_torchvision_swin_state_dict",
    "load_weights",
    "read_state_dict",
]
