from vitlens.data.normalization import IMAGENET_MEAN, IMAGENET_STD, backbone_normalization, denormalize, normalize
