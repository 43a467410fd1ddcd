"""Data: readers (image folder, CSV manifest, CUB-200-2011), transforms, toy birds."""
from vitlens.data.normalization import IMAGENET_MEAN, IMAGENET_STD, backbone_normalization, denormalize, normalize
from vitlens.data.errors import CorruptImageError, DataError, MissingFileError
from vitlens.data.images import IMAGE_EXTENSIONS, read_image, read_mask, to_rgb
from vitlens.data.transforms import eval_transform, train_transform
from vitlens.data.sources import Sample, describe_source, index_source, stratified_split
from vitlens.data.dataset import ImageDataset
from vitlens.data.datamodule import ImageDataModule
from vitlens.data.toybirds import generate_toybirds, shortcut_box, toybird_species_names

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "CorruptImageError", "DataError", "ImageDataModule",
    "ImageDataset", "MissingFileError", "Sample", "backbone_normalization", "denormalize", "describe_source",
    "eval_transform", "generate_toybirds", "index_source", "normalize", "read_image", "read_mask",
    "shortcut_box", "stratified_split", "to_rgb", "toybird_species_names", "train_transform",
]
