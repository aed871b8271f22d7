"""Datasets, joint transforms and file reading: every dataset returns the sample dict of :mod:`maskworks.data.io`."""

from maskworks.data.ade20k import ADE20K
from maskworks.data.camvid import CamVid
from maskworks.data.cityscapes import Cityscapes
from maskworks.data.coco import CocoInstances, coco_layout, coco_results, mask_to_polygons, write_coco_results
from maskworks.data.coco_panoptic import (
    CocoPanoptic,
    coco_panoptic_layout,
    id_to_rgb,
    instances_to_panoptic,
    read_id_png,
    rgb_to_id,
    save_id_png,
    write_coco_panoptic,
)
from maskworks.data.cocostuff import CocoStuff
from maskworks.data.copy_paste import BankedObject, RareClassCopyPaste, extract_objects
from maskworks.data.folder import FolderDataset, PairedFileDataset
from maskworks.data.io import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    DatasetError,
    SegmentationDataset,
    collate_samples,
    masks_to_boxes,
    raw_sample,
    read_image,
    read_mask,
)
from maskworks.data.isbi import ISBI2012, ISBI2012Instances
from maskworks.data.palette import default_palette, read_class_file
from maskworks.data.sampling import image_class_presence, repeat_factors
from maskworks.data.synthetic import SyntheticShapes
from maskworks.data.transforms import (
    GaussianNoise,
    InstanceMasks,
    RandomCrop,
    RandomScale,
    build_transforms,
    normalize_image,
    segmentation_fill,
)
from maskworks.data.validate import validate_dataset
from maskworks.data.voc import VOCSegmentation

__all__ = [
    "ADE20K",
    "BankedObject",
    "RareClassCopyPaste",
    "extract_objects",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "CamVid",
    "CocoInstances",
    "CocoPanoptic",
    "coco_panoptic_layout",
    "id_to_rgb",
    "instances_to_panoptic",
    "read_id_png",
    "rgb_to_id",
    "save_id_png",
    "write_coco_panoptic",
    "ISBI2012Instances",
    "coco_layout",
    "coco_results",
    "mask_to_polygons",
    "write_coco_results",
    "Cityscapes",
    "CocoStuff",
    "DatasetError",
    "FolderDataset",
    "GaussianNoise",
    "ISBI2012",
    "InstanceMasks",
    "PairedFileDataset",
    "RandomCrop",
    "RandomScale",
    "SegmentationDataset",
    "SyntheticShapes",
    "VOCSegmentation",
    "build_transforms",
    "collate_samples",
    "default_palette",
    "masks_to_boxes",
    "normalize_image",
    "raw_sample",
    "read_class_file",
    "read_image",
    "read_mask",
    "segmentation_fill",
    "image_class_presence",
    "repeat_factors",
    "validate_dataset",
]
