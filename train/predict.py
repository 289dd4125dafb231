"""Command line: classify image files with a run's exported model.

    python -m train.predict --workdir runs/default shoe.png shirt.jpg [--top 3] [--json] \\
        [--max-pixels N]

Reads `DIR/export/model.jaxexport` and `DIR/export/model.json` (written by `python -m
train.export --workdir DIR`) and needs nothing of this project to run the model: only JAX
(`jax.export.deserialize`), numpy and Pillow. Each image is converted to the dataset's channels
(grayscale or RGB) and stretched to its height and width, then all of them go through the model
in one batch. One line per file: the top classes with their probabilities, or, with `--json`, one
JSON object per line (`{"file", "predictions": [{"label", "class", "probability"}, ...]}`).

A file that cannot be read as an image, or that has more pixels than `--max-pixels` allows, gets
one `error:` line on stderr (and with `--json` an `{"file", "error"}` object), and the others are
still classified. Exit status: 0 when every file was classified, 1 when some were not, 2 when
nothing could run (no export, a model.json that does not fit its schema, bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Where `train.export` writes a run's exported model, relative to the run's workdir.
EXPORT_DIR = "export"
MODEL_FILE = "model.jaxexport"
INFO_FILE = "model.json"

USAGE_ERROR = 2
SOME_FILES_FAILED = 1

# The most pixels (width x height, as decoded) an image may have: 4096 x 4096, 64 MiB at Pillow's
# 4 bytes a pixel, ample for inputs of 28 x 28 or 32 x 32 (`--max-pixels` raises it). Checked
# before anything is decoded; Pillow's own limit (a warning from 89 million pixels) is not used.
DEFAULT_MAX_PIXELS = 4096 * 4096
# A large image is shrunk by whole factors, to no less than this many times the input's side,
# before the Lanczos resize: a JPEG while it is decoded (DCT scaling, Pillow's `draft`), any image
# by box averages right after (`reduce`). From 3 on the result is close to resizing the full image
# (Pillow's `reducing_gap`; within 2 levels of 255 in tests/test_export.py), and the copies that
# follow the decoding are small.
REDUCING_GAP = 3
# The modes Pillow's `reduce` takes; others are converted first.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")


class ExportedModelError(Exception):
    """The exported model is missing, unreadable, or does not match its model.json."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than the limit `read_image` was given."""


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A deserialized `jax.export.Exported` and the model.json written beside it."""

    exported: Any  # jax.export.Exported
    info: dict[str, Any]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one input image."""
        return tuple(self.info["input"]["shape"][1:])

    @property
    def class_names(self) -> list[str]:
        return self.info["class_names"]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, classes) logits of uint8 (B, H, W, C) images, any B >= 1."""
        return np.asarray(self.exported.call(images))


def export_paths(workdir: str) -> tuple[str, str]:
    """(model file, info file) of the export of the run in `workdir`."""
    directory = os.path.join(workdir, EXPORT_DIR)
    return os.path.join(directory, MODEL_FILE), os.path.join(directory, INFO_FILE)


def check_model_info(info: Any) -> None:
    """Checks what predict reads of a parsed model.json against the schema `train.export` writes.

    `model_sha256` a string; `class_names` a non-empty list of strings; `input.shape`
    `[null, H, W, C]` with positive integers and C 1 or 3; `output.shape` `[null, classes]` with as
    many classes as class names. Other keys are not read.

    Raises:
      ValueError: the first thing that does not fit, named by its key.
    """

    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not isinstance(info, dict):
        kind = {list: "an array", type(None): "null", str: "a string"}.get(type(info), "a number")
        raise ValueError(f"it holds {kind}, not an object")
    if not isinstance(info.get("model_sha256"), str):
        raise ValueError("'model_sha256' is missing or not a string")
    names = info.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("'class_names' is missing or not a non-empty list of strings")
    for key, length in (("input", 4), ("output", 2)):
        shape = info.get(key).get("shape") if isinstance(info.get(key), dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) == length
            and shape[0] is None
            and all(is_count(size) for size in shape[1:])
        ):
            raise ValueError(
                f"'{key}.shape' is missing or not [null, {length - 1} positive integers]"
            )
    if info["input"]["shape"][3] not in (1, 3):
        raise ValueError(f"'input.shape' has {info['input']['shape'][3]} channels, not 1 or 3")
    if info["output"]["shape"][1] != len(names):
        raise ValueError(
            f"{len(names)} 'class_names' for {info['output']['shape'][1]} logits ('output.shape')"
        )


def load_exported_model(workdir: str) -> ExportedModel:
    """Deserializes the exported model of the run in `workdir`, checked against its model.json.

    Raises:
      ExportedModelError: no export, unreadable files, a model.json that does not fit its schema
        (`check_model_info`), or a model file that is not the one model.json describes (another
        SHA-256, or other input or output shapes).
    """
    from jax import export  # Imported here: --help and argument errors need no JAX.

    model_path, info_path = export_paths(workdir)
    if not os.path.isfile(model_path) or not os.path.isfile(info_path):
        raise ExportedModelError(
            f"no exported model in {os.path.dirname(model_path)}; export the run first: "
            f"python -m train.export --workdir {workdir}"
        )
    try:
        with open(info_path) as file:
            info = json.load(file)
        with open(model_path, "rb") as file:
            serialized = file.read()
    except (OSError, ValueError) as error:
        raise ExportedModelError(f"cannot read the exported model: {error}") from None
    again = f"export again: python -m train.export --workdir {workdir}"
    try:
        check_model_info(info)
    except ValueError as error:
        raise ExportedModelError(f"{info_path} does not fit its schema: {error}; {again}") from None
    if hashlib.sha256(serialized).hexdigest() != info["model_sha256"]:
        raise ExportedModelError(
            f"{model_path} is not the model that {info_path} describes (SHA-256 differs); "
            f"export again: python -m train.export --workdir {workdir}"
        )
    try:
        exported = export.deserialize(bytearray(serialized))
    except Exception as error:  # flatbuffers and JAX raise many types for a bad file.
        raise ExportedModelError(f"cannot deserialize {model_path}: {error}") from None
    # The digest is of the model file only: model.json may have been edited since the export.
    for key, avals in (("input", exported.in_avals), ("output", exported.out_avals)):
        model_shape, described = tuple(avals[0].shape[1:]), tuple(info[key]["shape"][1:])
        if model_shape != described:
            raise ExportedModelError(
                f"{info_path} gives the {key} of one example the shape {described}, the model "
                f"{model_shape}; {again}"
            )
    return ExportedModel(exported=exported, info=info)


@contextlib.contextmanager
def _without_pillows_pixel_limit() -> Iterator[None]:
    """Turns off Pillow's process-wide limit (`Image.MAX_IMAGE_PIXELS`) meanwhile: it judges a
    JPEG by its full size before `draft` can shrink it, and warns on stderr below its error."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(
    path: str, image_shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Reads an image file as uint8 (H, W, C) in the dataset's size and channels.

    EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits; color images become
    grayscale for C=1 (ITU-R 601 luma) and grayscale ones RGB for C=3; the image is stretched
    (not cropped) to H x W. A large image is decoded small: a JPEG at 1/2, 1/4 or 1/8 scale, and
    any image box-averaged by whole factors right after decoding, as long as it stays at least
    `REDUCING_GAP` times the larger of H and W on each side.

    Raises:
      ImageTooLargeError: the image, at the size it would be decoded, has more than
        `max_pixels` pixels (checked before decoding).
      OSError, ValueError: the file is missing or not an image Pillow can decode.
    """
    from PIL import Image, ImageOps

    height, width, channels = image_shape
    # One side for both axes: the EXIF orientation, applied last, may swap them.
    side = REDUCING_GAP * max(height, width)
    with _without_pillows_pixel_limit(), Image.open(path) as image:
        declared = image.size
        image.draft("L" if channels == 1 else "RGB", (side, side))  # JPEG only; nothing decoded
        if image.width * image.height > max_pixels:
            scaled = ""
            if image.size != declared:
                scale = round(declared[0] / image.width)
                scaled = f"{declared[0]} x {declared[1]} decoded at 1/{scale} scale: "
            raise ImageTooLargeError(
                f"{scaled}{image.width} x {image.height} = {image.width * image.height} pixels, "
                f"more than the limit of {max_pixels} (--max-pixels raises it)"
            )
        sixteen_bit = image.mode.startswith("I;16")
        if sixteen_bit:
            image = image.convert("I")  # exact, and reducible
        elif image.mode not in REDUCIBLE_MODES:  # e.g. palette or 1-bit
            image = image.convert("L" if channels == 1 else "RGB")
        factors = (max(image.width // side, 1), max(image.height // side, 1))
        if factors != (1, 1):
            image = image.reduce(factors)
        image = ImageOps.exif_transpose(image)
        if sixteen_bit:
            # Pillow's conversion of 16-bit grayscale to 8 bits clips; scale it instead.
            scaled = np.round(np.asarray(image, np.float64) / 257.0).astype(np.uint8)
            image = Image.fromarray(scaled)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, np.uint8)
    return pixels.reshape(height, width, channels)


def _why_unreadable(error: Exception) -> str:
    """What went wrong reading an image, without repeating its path."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image file that Pillow can read"
    if isinstance(error, ImageTooLargeError):
        return f"too large: {error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # e.g. 'No such file or directory'
    return f"cannot decode the image ({error})"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def top_predictions(
    probabilities: np.ndarray, class_names: Sequence[str], top: int
) -> list[dict[str, Any]]:
    """The `top` most probable classes of one example, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:top]
    return [
        {
            "label": int(label),
            "class": class_names[label],
            "probability": float(probabilities[label]),
        }
        for label in order
    ]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.predict",
        description=(
            "Classify image files with the exported model of a training run (written by "
            "python -m train.export). Prints one line per file with its most probable classes; "
            "a file that cannot be read gets an 'error:' line on stderr and the others are "
            "still classified. Exit status: 0 all classified, 1 some not, 2 nothing could run."
        ),
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="the run's directory (reads export/model.jaxexport and export/model.json in it)",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    parser.add_argument("--top", type=int, default=3, help="classes to print per file (3)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per line instead of text"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse, before decoding, an image with more than N pixels (width x height; a "
        "JPEG's at the 1/2 to 1/8 scale it is decoded at) "
        f"(default {DEFAULT_MAX_PIXELS} = 4096 x 4096)",
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    if args.max_pixels < 1:
        parser.error(f"--max-pixels must be at least 1, got {args.max_pixels}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model = load_exported_model(args.workdir)
    except ExportedModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR

    images, readable, failures = [], [], {}
    for path in args.images:
        try:
            images.append(read_image(path, model.image_shape, args.max_pixels))
            readable.append(path)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's decoders raise these.
            failures[path] = f"{path}: {_why_unreadable(error)}"
            print(f"error: {failures[path]}", file=sys.stderr)

    predictions = {}
    if images:
        probabilities = softmax(model.logits(np.stack(images)))
        top = min(args.top, len(model.class_names))
        for path, row in zip(readable, probabilities, strict=True):
            predictions[path] = top_predictions(row, model.class_names, top)

    for path in args.images:  # In the order given, the failures in their place.
        if args.json:
            record = {"file": path}
            if path in failures:
                record["error"] = failures[path]
            else:
                record["predictions"] = predictions[path]
            print(json.dumps(record))
        elif path in predictions:
            ranked = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in predictions[path])
            print(f"{path}: {ranked}")
    return SOME_FILES_FAILED if failures else 0


if __name__ == "__main__":
    sys.exit(main())
