"""Reading images and masks as RGB / boolean numpy arrays, whatever their mode."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

from vitlens.data.errors import CorruptImageError, MissingFileError, one_line

__all__ = ["IMAGE_EXTENSIONS", "UNSUPPORTED_IMAGE_EXTENSIONS", "image_extension", "read_image", "read_mask", "to_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm") + ((".avif",) if features.check("avif") else ())
# image-like files that this Pillow cannot read: reported (with counts) instead of dropped silently
UNSUPPORTED_IMAGE_EXTENSIONS = tuple(e for e in (".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".cr3",
                                                 ".nef", ".arw", ".orf", ".raf", ".rw2", ".raw", ".svg", ".psd")
                                     if e not in IMAGE_EXTENSIONS)


def image_extension(name: str) -> str:
    """The lower-case extension of a file name, ignoring trailing spaces/dots ("a.JPG " -> ".jpg")."""
    return os.path.splitext(name.rstrip(" ."))[1].lower()

# transparent pixels are composited onto this colour
BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> HxWx3 uint8 RGB.

    Grayscale and bilevel are replicated, palette is looked up, CMYK / YCbCr converted,
    transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white,
    16-bit and 32-bit integer images are scaled from 0..65535, float images from 0..1 (or
    clipped to 0..255 when their values exceed 1).
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit files open as these)
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if np.nanmax(values, initial=0.0) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.round(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now: truncated / corrupt data fails here, not later
        # EXIF orientation (phone photos): pixels as the photo is shown, not as the sensor stored them
        transposed = ImageOps.exif_transpose(image)
        if transposed is not image:
            image.close()
        return transposed
    except FileNotFoundError:
        raise MissingFileError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise CorruptImageError(f"{what} path is a folder, not a file: {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read {what} {path}: {one_line(error)}") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as HxWx3 uint8 RGB (see `to_rgb` for the mode rules).

    Raises `MissingFileError` or `CorruptImageError` (unreadable, truncated) naming the file.
    """
    path = Path(path)
    with _open(path, "image") as image:
        try:
            return to_rgb(image)
        except (OSError, ValueError) as error:
            raise CorruptImageError(f"cannot convert image {path} (mode {image.mode}) to RGB: {one_line(error)}") from None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """The object mask at `path` as an HxW bool array: any non-zero pixel is object.

    Palette masks count non-zero indices; colour masks, a non-zero value in any colour
    channel (an alpha channel is ignored).
    """
    path = Path(path)
    with _open(path, "mask") as mask:
        if mask.mode in ("RGBA", "LA", "PA"):
            mask = mask.convert(mask.mode[:-1])
        values = np.asarray(mask)
    return values.any(axis=2) if values.ndim == 3 else values != 0
