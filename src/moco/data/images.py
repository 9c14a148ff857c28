"""Decoding image files defensively: every file is either usable or skipped with a reason.

Real folders hold truncated JPEGs, empty files, text saved as ``.png``, 16-bit scans, palettes
with transparency and images far too large to decode. :func:`probe` finds what can be found
cheaply (size, permissions, header), at start-up; :func:`decode` finds the rest (a truncated
body) while training, and says why in one line instead of a traceback from a worker.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImageError(ValueError):
    """An image file cannot be used; the message names the file and the reason, on one line.

    A DataLoader worker re-raises exceptions in the main process as ``type(message + worker
    traceback)``; the constructor keeps only the original line, so the user never sees the
    worker's traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


class BadImageWarning(UserWarning):
    """Some files of an image folder were skipped (data.on_bad_image=skip)."""


def _pixel_limit() -> int | None:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def _too_large(width: int, height: int) -> str | None:
    limit = _pixel_limit()
    if limit and width * height > limit:
        return (f"{width}x{height} pixels is over PIL's decompression-bomb limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS)")
    return None


GRAY_MODES = ("1", "L", "LA", "I", "F", *SIXTEEN_BIT_MODES)


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: why it cannot be used (None if it looks fine), its size and
    whether it is single-channel."""

    reason: str | None
    width: int = 0
    height: int = 0
    gray: bool = False


def inspect(path: Path) -> ImageInfo:
    """:class:`ImageInfo` of ``path``, judged from its size, permissions and header."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return ImageInfo("empty file (0 bytes)")
        with path.open("rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                (width, height), mode = image.size, image.mode
    except PermissionError:
        return ImageInfo("permission denied")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageInfo("over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)")
    except UnidentifiedImageError:
        return ImageInfo("not an image file PIL can identify")
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        return ImageInfo(f"unreadable ({type(err).__name__}: {err})")
    if width < 1 or height < 1:
        return ImageInfo(f"has no pixels ({width}x{height})")
    return ImageInfo(_too_large(width, height), width, height, mode in GRAY_MODES)


def probe(path: Path) -> str | None:
    """Why ``path`` cannot be used, judged from its size, permissions and header; None if it looks fine."""
    return inspect(path).reason


def to_uint8_array(image, channels: int) -> np.ndarray:
    """H x W x C uint8 pixels with C = ``channels`` from any PIL mode (16-bit, palette, alpha...)."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit (or 32-bit integer) grey: keep the top 8 bits of 16
        wide = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks for this before dropping palette transparency
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels are shown on white: converting would drop the alpha and keep whatever
        # colour lies under it (black in most clip art, leftover paint in some).
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    pixels = np.array(image.convert("L" if channels == 1 else "RGB"))  # a writable copy
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def decode(path: Path, channels: int, draft_size: int = 0) -> torch.Tensor:
    """The image at ``path`` as a C x H x W uint8 tensor; :class:`BadImageError` if it cannot be used.

    ``draft_size`` lets JPEG decoding shrink by a power of two while both sides stay >= it,
    which makes huge photos cheap when they are resized down anyway.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with path.open("rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                reason = _too_large(*image.size)
                if reason:
                    raise BadImageError(f"{path}: {reason}")
                if draft_size and image.format == "JPEG":
                    image.draft("L" if channels == 1 else "RGB", (draft_size, draft_size))
                image.load()  # a truncated body fails here, not at open
                pixels = to_uint8_array(image, channels)
    except BadImageError:
        raise
    except PermissionError:
        raise BadImageError(f"{path}: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(f"{path}: over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError, struct.error) as err:  # truncated or corrupt data
        raise BadImageError(f"{path}: cannot be decoded ({type(err).__name__}: {err})") from None
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()


def describe(problems: list[tuple[Path, str]], total: int, root: os.PathLike | str, verb: str = "skipped",
             shown: int = 3) -> str:
    """One line: how many files were skipped, the first ``shown`` with their reasons."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in problems[:shown])
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{verb} {len(problems)} of {total} files in {root}: {listed}{more}"
