"""Image input: a path, raw bytes or a PIL image, checked before anything expensive happens."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from leanvlm.errors import TooLargeError, UserError

# A 12k x 12k photo is fine; a 100-megapixel PNG of 20 KB is a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 64 * 1024 * 1024


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open and fully decode `image` as RGB, or raise UserError naming what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), "image bytes"
        if len(data) > MAX_IMAGE_BYTES:
            raise TooLargeError(f"{name}: {len(data)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
        source = io.BytesIO(data)
    elif isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        name = str(path)
        if not path.is_file():
            raise UserError(f"image {name}: no such file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise TooLargeError(f"image {name}: {path.stat().st_size} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
        source = path
    else:
        raise UserError(f"image: expected a path, bytes or a PIL image, got {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            img = Image.open(source)
        with img:
            _check_pixels(img.size, max_pixels, name)  # header only: before decoding a bomb
            img.load()
            return img.convert("RGB")
    except UserError:
        raise
    except UnidentifiedImageError as e:
        raise UserError(f"{name}: not a readable image (unknown or corrupt format)") from e
    except Image.DecompressionBombError as e:
        raise TooLargeError(f"{name}: rejected as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: could not be decoded ({e}); is the file truncated?") from e


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise UserError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise TooLargeError(f"{name}: {w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel limit "
                        "(decompression-bomb guard); downscale it first")
