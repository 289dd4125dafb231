"""Command line: classify image files with a run's exported model.

    python -m train.predict --workdir runs/default shoe.png shirt.jpg [--top 3] [--json]

Reads `DIR/export/model.jaxexport` and `DIR/export/model.json` (written by `python -m
train.export --workdir DIR`) and needs nothing of this project to run the model: only JAX
(`jax.export.deserialize`), numpy and Pillow. Each image is converted to the dataset's channels
(grayscale or RGB) and stretched to its height and width, then all of them go through the model
in one batch. One line per file: the top classes with their probabilities, or, with `--json`, one
JSON object per line (`{"file", "predictions": [{"label", "class", "probability"}, ...]}`).

A file that cannot be read as an image gets one `error:` line on stderr (and with `--json` an
`{"file", "error"}` object), and the others are still classified. Exit status: 0 when every file
was classified, 1 when some were not, 2 when nothing could run (no export, bad arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

# Where `train.export` writes a run's exported model, relative to the run's workdir.
EXPORT_DIR = "export"
MODEL_FILE = "model.jaxexport"
INFO_FILE = "model.json"

USAGE_ERROR = 2
SOME_FILES_FAILED = 1


class ExportedModelError(Exception):
    """The exported model is missing, unreadable, or does not match its model.json."""


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


def load_exported_model(workdir: str) -> ExportedModel:
    """Deserializes the exported model of the run in `workdir`, checked against its model.json.

    Raises:
      ExportedModelError: no export, unreadable files, or a model file whose SHA-256 is not the
        one model.json records (the two come from different exports).
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
    if hashlib.sha256(serialized).hexdigest() != info.get("model_sha256"):
        raise ExportedModelError(
            f"{model_path} is not the model that {info_path} describes (SHA-256 differs); "
            f"export again: python -m train.export --workdir {workdir}"
        )
    try:
        exported = export.deserialize(bytearray(serialized))
    except Exception as error:  # flatbuffers and JAX raise many types for a bad file.
        raise ExportedModelError(f"cannot deserialize {model_path}: {error}") from None
    return ExportedModel(exported=exported, info=info)


def read_image(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Reads an image file as uint8 (H, W, C) in the dataset's size and channels.

    EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits; color images become
    grayscale for C=1 (ITU-R 601 luma) and grayscale ones RGB for C=3; the image is stretched
    (not cropped) to H x W.

    Raises:
      OSError, ValueError: the file is missing or not an image Pillow can decode.
    """
    from PIL import Image, ImageOps

    height, width, channels = image_shape
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
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
        description="Classify image files with the exported model of a training run.",
    )
    parser.add_argument("--workdir", required=True, help="the run's directory (holds export/)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    parser.add_argument("--top", type=int, default=3, help="classes to print per file (3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
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
            images.append(read_image(path, model.image_shape))
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
