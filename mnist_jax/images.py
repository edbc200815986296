"""Image files to MNIST-style inputs: greyscale, white digit on black, 28x28.

A 28x28 image is taken as it is (it is already in MNIST's format). Anything else is converted
the way MNIST itself was made: the digit's bounding box is scaled so its longer side is 20
pixels, keeping the aspect ratio, and placed in a 28x28 field so that its centre of mass sits
at the centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_jax.errors import UserError

SIZE = 28  # MNIST's side; a dataset spec with another side passes its own
BOX_FRACTION = 20 / 28  # MNIST fits each digit's bounding box into 20x20 of the 28x28 field
INK = 32  # a grey level above this is ink, not background


def has_ink(image_HxW: np.ndarray) -> bool:
    """Whether anything is written: a blank image gets a label, but it means nothing."""
    return bool((np.asarray(image_HxW) > INK).any())


def load_digit(path: str | Path, *, invert: bool = False, size: int = SIZE) -> np.ndarray:
    """Reads one PNG/JPEG/... file as uint8 [size, size]; `invert` for dark digits on light
    paper."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            grey = np.asarray(_flatten_alpha(image, invert).convert("L"), np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if invert:
        grey = 255 - grey
    if grey.shape == (size, size):
        return grey
    return to_mnist_layout(grey, size)


def _flatten_alpha(image, invert: bool):
    """Transparent pixels become background: black, like MNIST's; white for dark ink
    (`invert`), which then becomes black."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        from PIL import Image

        rgba = image.convert("RGBA")
        colour = (255, 255, 255, 255) if invert else (0, 0, 0, 255)
        background = Image.new("RGBA", rgba.size, colour)
        return Image.alpha_composite(background, rgba)
    return image


def to_mnist_layout(grey_HxW: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Fits the digit's bounding box into 20x20 and centres its mass in 28x28 (scaled for
    another `size`)."""
    from PIL import Image

    ink = grey_HxW > INK
    if not ink.any():
        return np.asarray(Image.fromarray(grey_HxW).resize((size, size), Image.LANCZOS), np.uint8)
    rows, cols = np.where(ink)
    crop = grey_HxW[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    scale = round(size * BOX_FRACTION) / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    digit = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.LANCZOS), np.float64)
    total = digit.sum()
    cy = (digit.sum(1) * np.arange(new_h)).sum() / total
    cx = (digit.sum(0) * np.arange(new_w)).sum() / total
    # MNIST's centres of mass sit at pixel index 14 (measured on the test split: 14.0, std 0.3).
    top = int(round(size / 2 - cy))
    left = int(round(size / 2 - cx))
    top = min(max(top, 0), size - new_h)
    left = min(max(left, 0), size - new_w)
    field = np.zeros((size, size), np.float64)
    field[top : top + new_h, left : left + new_w] = digit
    return np.clip(np.rint(field), 0, 255).astype(np.uint8)
