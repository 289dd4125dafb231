"""train.export and train.predict: folding, the exported model, its model.json, the two CLIs.

The exported model is run in a subprocess that cannot import this project (nor flax): only JAX
and numpy, as a user of the file would. Its logits are compared with the checkpoint's eval-mode
model (jbn.BatchNorm with is_training=False) on the same images.
"""

import collections
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import train_testing
from jax import lax
from PIL import Image
from train_testing import smoke_config

import jbn
from train import data, export, models, predict
from train import train as train_lib

IMAGE_SHAPE = (16, 16, 3)  # configs/smoke.py's synthetic images
NUM_CLASSES = 10
BATCH_SIZES = (1, 7)

# A config with every statistic that could be folded wrongly: zero-debiased moving mean (the
# biased accumulator differs from the mean inference uses), renorm with a renorm decay other than
# the decay (its statistics differ from the moving ones), and a learned gamma.
RENORM_ZERO_DEBIAS = {
    "model.features": (8, 8, 8, 8),
    "model.batch_norm.decay": 0.95,
    "model.batch_norm.scale": True,
    "model.batch_norm.zero_debias_moving_mean": True,
    "model.batch_norm.renorm": True,
    "model.batch_norm.renorm_decay": 0.5,
    "num_train_steps": 8,  # half an epoch: one checkpoint, at step 8, after an evaluation
}

# Runs the exported model with nothing of this project importable: every import of jbn, train,
# configs or flax fails, and none of them may be loaded at the end.
PROJECT_FREE_RUNNER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("jbn", "train", "configs", "flax")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"the exported model must not need {name}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from jax import export

    jobs = json.loads(sys.argv[1])
    for job in jobs:
        with open(job["model"], "rb") as file:
            exported = export.deserialize(bytearray(file.read()))
        np.save(job["output"], np.asarray(exported.call(np.load(job["images"]))))
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print(json.dumps({"in": str(exported.in_avals), "platforms": list(exported.platforms)}))
    """
)


# The train app's fast JAX settings (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("cache_dir")


def run_project_free(tmp_path: pathlib.Path, models_and_images) -> tuple[list[np.ndarray], dict]:
    """Runs each (model bytes, uint8 images) in the project-free subprocess; returns logits."""
    jobs = []
    for index, (serialized, images) in enumerate(models_and_images):
        job = {name: str(tmp_path / f"{name}{index}") for name in ("model", "images", "output")}
        pathlib.Path(job["model"]).write_bytes(serialized)
        np.save(job["images"], images)
        job["images"] += ".npy"
        job["output"] += ".npy"
        jobs.append(job)
    completed = subprocess.run(
        [sys.executable, "-c", PROJECT_FREE_RUNNER, json.dumps(jobs)],
        cwd=tmp_path,  # not the repository: nothing of it on the path from there
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return [np.load(job["output"]) for job in jobs], json.loads(completed.stdout)


def eval_mode_logits(model, variables, images, dataset) -> np.ndarray:
    """The reference: the unfolded model in inference mode on the training's normalization."""
    normalized = data.normalize_images(images, dataset.mean, dataset.std)
    return np.asarray(model.apply(variables, normalized, is_training=False))


def assert_logits_close(actual, expected):
    # Folding reorders a few float32 products per layer.
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def relative_difference(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def first_test_images(dataset, count: int) -> np.ndarray:
    return dataset.test.images[:count]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A short smoke run with renorm and zero-debias, exported through the CLI's main."""
    workdir = tmp_path_factory.mktemp("exported_run")
    result = train_lib.train_and_evaluate(smoke_config(**RENORM_ZERO_DEBIAS), str(workdir))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = export.main(["--workdir", str(workdir)])
    assert status == 0
    return workdir, result, stdout.getvalue()


def test_exported_logits_equal_the_eval_mode_models_without_the_project(exported_run, tmp_path):
    workdir, result, _ = exported_run
    config = smoke_config(**RENORM_ZERO_DEBIAS)
    dataset = data.load_dataset(config.dataset)
    model = models.create_model(config.model, dataset.num_classes)
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    # The statistics a wrong fold would pick up really differ from the right ones.
    bn1 = jax.device_get(variables["batch_stats"]["bn1"])
    assert relative_difference(bn1["moving_mean_biased"], bn1["moving_mean"]) > 0.5
    assert relative_difference(bn1["renorm_mean"], bn1["moving_mean"]) > 0.5
    assert relative_difference(bn1["renorm_stddev"] ** 2, bn1["moving_variance"]) > 0.05

    serialized = (workdir / "export" / "model.jaxexport").read_bytes()
    batches = [first_test_images(dataset, size) for size in BATCH_SIZES]
    logits, described = run_project_free(tmp_path, [(serialized, images) for images in batches])
    assert described["in"] == "(ShapedArray(uint8[batch,16,16,3]),)"
    assert described["platforms"] == ["cpu", "cuda"]
    for images, exported_logits in zip(batches, logits, strict=True):
        assert exported_logits.shape == (len(images), NUM_CLASSES)
        assert exported_logits.dtype == np.float32
        assert_logits_close(exported_logits, eval_mode_logits(model, variables, images, dataset))


def test_model_json_describes_the_model_and_its_checkpoint(exported_run):
    workdir, result, stdout = exported_run
    config = smoke_config(**RENORM_ZERO_DEBIAS)
    dataset = data.load_dataset(config.dataset)
    info = json.loads((workdir / "export" / "model.json").read_text())
    serialized = (workdir / "export" / "model.jaxexport").read_bytes()

    assert info["model_sha256"] == hashlib.sha256(serialized).hexdigest()
    assert info["platforms"] == ["cpu", "cuda"]
    assert info["dataset"] == "synthetic"
    assert info["class_names"] == [f"class {label}" for label in range(NUM_CLASSES)]
    assert info["input"]["shape"] == [None, *IMAGE_SHAPE] and info["input"]["dtype"] == "uint8"
    assert info["output"] == {"shape": [None, NUM_CLASSES], "dtype": "float32", "values": "logits"}
    np.testing.assert_array_equal(np.float32(info["normalization"]["mean"]), dataset.mean)
    np.testing.assert_array_equal(np.float32(info["normalization"]["std"]), dataset.std)
    assert info["batch_norm_folded"] == [
        {"batch_norm": f"bn{i}", "into": f"conv{i}"} for i in range(1, 6)
    ]
    # The checkpoint is the run's last state, and the exported model's own test accuracy is the
    # run's evaluation of it.
    assert info["source"]["step"] == result.summary["steps"] == 8
    assert info["source"]["state_sha256"] == result.summary["state_sha256"]
    assert info["test_examples"] == result.summary["test_examples"] == 200
    assert info["run_test_accuracy"] == result.summary["test_accuracy"]
    assert abs(info["test_accuracy"] - result.summary["test_accuracy"]) <= 1 / 200
    assert f"{info['test_accuracy']:.4f}" in stdout and "5 batch norms folded" in stdout


def test_run_and_exported_files_have_the_umasks_mode(exported_run):
    """Readable by others as far as the umask allows: not the 0600 of a temporary file."""
    workdir = exported_run[0]
    umask = os.umask(0)
    os.umask(umask)
    run_files = ["config.json", "metrics.jsonl", "summary.json"]
    for path in [*run_files, "export/model.jaxexport", "export/model.json"]:
        assert stat.S_IMODE((workdir / path).stat().st_mode) == 0o666 & ~umask, path


def op_counts(stablehlo_text: str) -> collections.Counter:
    """How many times each StableHLO operation is applied (`%x = stablehlo.op ...` lines)."""
    return collections.Counter(re.findall(r"= stablehlo\.(\w+)", stablehlo_text))


def test_exported_graph_has_no_batch_norm_arithmetic(exported_run):
    workdir, result, _ = exported_run
    serialized = (workdir / "export" / "model.jaxexport").read_bytes()
    folded_text = jax.export.deserialize(bytearray(serialized)).mlir_module()
    # The same model unfolded, exported the same way but for a static batch (enough to count
    # the ops); convolutions have one lowering per platform.
    config = smoke_config(**RENORM_ZERO_DEBIAS)
    model = models.create_model(config.model, NUM_CLASSES)
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    unfolded_text = jax.export.export(
        jax.jit(lambda x: model.apply(variables, x, is_training=False)),
        platforms=export.PLATFORMS,
    )(jax.ShapeDtypeStruct((2, *IMAGE_SHAPE), jnp.float32)).mlir_module()
    folded, unfolded = op_counts(folded_text), op_counts(unfolded_text)
    assert unfolded["rsqrt"] >= 5  # the check sees batch norm where there is some
    assert folded["rsqrt"] == 0
    assert folded["convolution"] == unfolded["convolution"] == 5 * len(export.PLATFORMS)


# ----------------------------------------------------------------------------- other models


class ConvNCHW(nn.Module):
    """A TF-style NCHW convolution: (N, C, H, W) data, HWIO kernel (output features last)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[1], self.features)
        )
        bias = self.param("bias", nn.initializers.normal(0.5), (self.features,))
        y = lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW")
        )
        return y + bias[:, None, None]


class NCHWNet(nn.Module):
    """uint8-shaped NHWC images -> NCHW convolutions with NCHW batch norms -> a dense layer."""

    batch_norm_kwargs: dict

    @nn.compact
    def __call__(self, images, is_training):
        x = jnp.transpose(images, (0, 3, 1, 2))
        for index, features in enumerate((6, 5)):
            x = ConvNCHW(features, name=f"conv{index}")(x)
            x = jbn.BatchNorm(data_format="NCHW", name=f"bn{index}", **self.batch_norm_kwargs)(
                x, is_training=is_training
            )
            x = nn.relu(x)
        x = nn.Dense(4, name="dense")(jnp.mean(x, axis=(2, 3)))
        return jbn.BatchNorm(name="bn_dense", **self.batch_norm_kwargs)(x, is_training=is_training)


RANDOM_AFFINE = {"beta": nn.initializers.normal(1.0), "gamma": nn.initializers.uniform(2.0)}


@pytest.mark.parametrize(
    "batch_norm_kwargs",
    [
        dict(decay=0.6, scale=True),
        dict(decay=0.6, scale=True, renorm=True, renorm_decay=0.3, zero_debias_moving_mean=True),
    ],
    ids=["plain", "renorm_zero_debias"],
)
def test_nchw_model_exports_equal_to_its_eval_mode(batch_norm_kwargs, tmp_path):
    model = NCHWNet({**batch_norm_kwargs, "param_initializers": RANDOM_AFFINE})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    mean, std = np.float32([0.3, 0.5, 0.7]), np.float32([0.2, 0.25, 0.3])
    normalized = data.normalize_images(images, mean, std)
    variables = model.init(jax.random.key(0), normalized, is_training=False)
    train_forward = jax.jit(
        lambda v, x: model.apply(v, x, is_training=True, mutable=["batch_stats"])[1]
    )
    for step in range(3):  # moves every statistic away from its initial value
        shifted = normalized * (1.0 + step) + 0.5 * step
        variables = {**variables, **train_forward(variables, shifted)}

    sample = jnp.zeros((1, 8, 8, 3))
    folds = export.find_folds(model, variables, sample, is_training=False)
    assert [(f.batch_norm_path, f.layer_path) for f in folds] == [
        (("bn0",), ("conv0",)),
        (("bn1",), ("conv1",)),
        (("bn_dense",), ("dense",)),
    ]
    params = export.fold_batch_norms(folds, variables)
    exported = export.export_classifier(
        lambda x: export.folded_apply(model, params, x, is_training=False), (8, 8, 3), mean, std
    )
    batches = [images[:size] for size in BATCH_SIZES]
    logits, _ = run_project_free(tmp_path, [(exported.serialize(), b) for b in batches])
    for batch, exported_logits in zip(batches, logits, strict=True):
        expected = model.apply(
            variables, data.normalize_images(batch, mean, std), is_training=False
        )
        assert_logits_close(exported_logits, np.asarray(expected))


def random_batch_stats(batch_stats, rng):
    """Moving means in [-1, 1] and variances in [0.5, 2.5] instead of the initial 0 and 1."""

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        low, high = (0.5, 2.5) if "var" in name else (-1.0, 1.0)
        return jnp.asarray(rng.uniform(low, high, np.shape(leaf)), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, batch_stats)


def test_flax_batch_norm_folds_too():
    config = smoke_config(**{"model.batch_norm_impl": "flax", "model.batch_norm.scale": True})
    model = models.create_model(config.model, NUM_CLASSES)
    x = jax.random.normal(jax.random.key(1), (3, *IMAGE_SHAPE))
    variables = model.init(jax.random.key(0), x, is_training=False)
    variables["batch_stats"] = random_batch_stats(
        variables["batch_stats"], np.random.default_rng(0)
    )
    folds = export.find_folds(model, variables, x, is_training=False)
    assert len(folds) == 5 and all(isinstance(f.batch_norm, nn.BatchNorm) for f in folds)
    params = export.fold_batch_norms(folds, variables)
    assert_logits_close(
        np.asarray(export.folded_apply(model, params, x, is_training=False)),
        np.asarray(model.apply(variables, x, is_training=False)),
    )


def test_a_batch_norm_after_something_else_than_a_layer_is_refused():
    class NormAfterRelu(nn.Module):
        @nn.compact
        def __call__(self, x, is_training):
            return jbn.BatchNorm()(nn.relu(nn.Dense(3)(x)), is_training=is_training)

    model = NormAfterRelu()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(export.ExportError, match=r"BatchNorm_0.*not the output of a layer"):
        export.find_folds(model, variables, x, is_training=False)


def test_a_layer_without_bias_is_refused():
    class NoBias(nn.Module):
        @nn.compact
        def __call__(self, x, is_training):
            y = nn.Dense(3, use_bias=False, name="dense")(x)
            return jbn.BatchNorm(name="bn")(y, is_training=is_training)

    model = NoBias()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x, is_training=False)
    folds = export.find_folds(model, variables, x, is_training=False)
    with pytest.raises(export.ExportError, match="bn into dense: the layer has no bias"):
        export.fold_batch_norms(folds, variables)


def test_a_model_without_batch_norm_is_exported_unfolded_and_says_so(tmp_path):
    overrides = {"model.use_batch_norm": False, "model.features": (4, 4, 4, 4)}
    config = smoke_config(**{**overrides, "num_train_steps": 2})
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export.main(["--workdir", str(tmp_path)]) == 0
    assert "the model has no batch norm, exported unfolded" in stdout.getvalue()
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert info["batch_norm_folded"] == []
    assert info["run_test_accuracy"] == result.summary["test_accuracy"]


# ----------------------------------------------------------------------------- errors


def run_module(module: str, *args: str, cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=train_testing.REPO,
        env=train_testing.fast_jax_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_export_without_a_checkpoint_is_one_error_line(tmp_path, cache_dir):
    completed = run_module("train.export", "--workdir", str(tmp_path), cache_dir=cache_dir)
    assert_one_error_line(completed, "no trained run in", "python -m train --config")
    assert not (tmp_path / "checkpoints").exists()  # looking created nothing


def test_a_run_saved_before_the_batch_norm_group_exports_the_same(exported_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(exported_run[0], workdir)
    shutil.rmtree(workdir / "export")
    for old in train_testing.rewrite_in_the_format_before_issue_22(workdir):
        assert old["model"]["renorm_decay"] == 0.5 and "batch_norm" not in old["model"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main(["--workdir", str(workdir)]) == 0
    # The same model from the same checkpoint: the same folding and test accuracy (the
    # serialized bytes differ from export to export).
    infos = [
        json.loads((run / "export" / "model.json").read_text())
        for run in (workdir, exported_run[0])
    ]
    for info in infos:  # all but where it came from
        del info["model_sha256"], info["source"]["workdir"], info["source"]["checkpoint"]
    assert infos[0] == infos[1]


def test_export_of_a_corrupt_checkpoint_is_one_error_line(exported_run, tmp_path, cache_dir):
    workdir = tmp_path / "run"
    shutil.copytree(exported_run[0], workdir)
    shutil.rmtree(workdir / "export")
    for path in (workdir / "checkpoints" / "8" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    completed = run_module("train.export", "--workdir", str(workdir), cache_dir=cache_dir)
    assert_one_error_line(completed, "checkpoint")
    assert not (workdir / "export").exists()


def test_an_export_that_disagrees_with_the_model_is_refused(exported_run, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(exported_run[0], workdir)
    shutil.rmtree(workdir / "export")
    right = jbn.batch_norm_inference_statistics

    def zero_debias_forgotten(batch_norm, params, batch_stats):
        stats, affine, epsilon = right(batch_norm, params, batch_stats)
        return {**stats, "moving_mean": batch_stats["moving_mean_biased"]}, affine, epsilon

    monkeypatch.setattr(jbn, "batch_norm_inference_statistics", zero_debias_forgotten)
    with pytest.raises(export.ExportError, match="differ from the checkpoint's eval-mode"):
        export.export_run(str(workdir))
    assert not (workdir / "export").exists()


# ----------------------------------------------------------------------------- predict


def write_image(path: pathlib.Path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels.squeeze()).save(path)
    return str(path)


def test_predict_classifies_image_files_as_the_model_does(exported_run, tmp_path, capsys):
    workdir, result, _ = exported_run
    config = smoke_config(**RENORM_ZERO_DEBIAS)
    dataset = data.load_dataset(config.dataset)
    model = models.create_model(config.model, dataset.num_classes)
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    images = first_test_images(dataset, 2)
    exact = [write_image(tmp_path / f"test{i}.png", image) for i, image in enumerate(images)]
    larger = Image.fromarray(images[0]).resize((48, 40))
    larger.convert("L").save(tmp_path / "gray_larger.jpg")  # other size, channels and format
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "missing.png")
    files = [exact[0], str(broken), str(tmp_path / "gray_larger.jpg"), missing, exact[1]]

    assert predict.main(["--workdir", str(workdir), "--json", "--top", "10", *files]) == 1
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == files
    assert "error" in records[1] and "error" in records[3]
    assert err.count("error: ") == 2 and str(broken) in err and missing in err

    # PNG is lossless: the probabilities are the softmax of the eval-mode model's logits.
    expected = jax.nn.softmax(
        eval_mode_logits(model, variables, images, dataset).astype(np.float64)
    )
    for record, probabilities in zip([records[0], records[4]], np.asarray(expected), strict=True):
        ranked = record["predictions"]
        assert [p["label"] for p in ranked] == list(np.argsort(-probabilities, kind="stable"))
        got = [p["probability"] for p in ranked]
        np.testing.assert_allclose(got, probabilities[[p["label"] for p in ranked]], atol=1e-5)
        assert all(p["class"] == f"class {p['label']}" for p in ranked)
    assert len(records[2]["predictions"]) == 10
    assert abs(sum(p["probability"] for p in records[2]["predictions"]) - 1) < 1e-6

    assert predict.main(["--workdir", str(workdir), exact[0]]) == 0
    line = capsys.readouterr().out.strip()
    top = records[0]["predictions"][:3]
    assert line == f"{exact[0]}: " + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in top)


def test_predict_refuses_a_model_file_that_model_json_does_not_describe(exported_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(exported_run[0] / "export", workdir / "export")
    model_file = workdir / "export" / "model.jaxexport"
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"!")
    with pytest.raises(predict.ExportedModelError, match="SHA-256"):
        predict.load_exported_model(str(workdir))


def test_predict_without_an_export_is_one_error_line(tmp_path, cache_dir):
    image = write_image(tmp_path / "x.png", np.zeros(IMAGE_SHAPE, np.uint8))
    completed = run_module("train.predict", "--workdir", str(tmp_path), image, cache_dir=cache_dir)
    assert_one_error_line(completed, "no exported model", "python -m train.export")


def test_read_image_converts_to_the_datasets_channels(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, size=(12, 10), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    np.testing.assert_array_equal(
        predict.read_image(str(tmp_path / "gray16.png"), (12, 10, 1))[..., 0],
        np.round(gray16 / 257.0),  # full range kept, not clipped at 255
    )
    rgb = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601
    gray = predict.read_image(str(tmp_path / "rgb.png"), (12, 10, 1))[..., 0]
    assert np.max(np.abs(gray - luma)) <= 1
    Image.fromarray(gray).save(tmp_path / "gray.png")
    as_rgb = predict.read_image(str(tmp_path / "gray.png"), (6, 5, 3))
    assert as_rgb.shape == (6, 5, 3) and as_rgb.dtype == np.uint8
    np.testing.assert_array_equal(as_rgb[..., 0], as_rgb[..., 2])


# ----------------------------------------------------------------------------- predict: limits


def png_declaring(path: pathlib.Path, width: int, height: int) -> str:
    """A PNG of a few bytes whose header declares width x height 8-bit RGB pixels (its image data
    is one empty row: nothing that size is ever written or, if the size is refused, read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )
    return str(path)


def test_read_image_refuses_more_pixels_than_the_limit_before_decoding(tmp_path, monkeypatch):
    decoded = []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(
        PIL.ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image)
    )
    bomb = png_declaring(tmp_path / "bomb.png", 60000, 60000)
    assert pathlib.Path(bomb).stat().st_size < 100
    with pytest.raises(predict.ImageTooLargeError, match=r"60000 x 60000 = 3600000000 pixels"):
        predict.read_image(bomb, IMAGE_SHAPE)
    # Above the default limit but below Pillow's own (which only warns there).
    with pytest.raises(predict.ImageTooLargeError, match=f"limit of {predict.DEFAULT_MAX_PIXELS}"):
        predict.read_image(png_declaring(tmp_path / "large.png", 9000, 9000), IMAGE_SHAPE)
    assert decoded == []
    assert PIL.Image.MAX_IMAGE_PIXELS is not None  # Pillow's limit is back for everyone else

    # The limit is the caller's: exactly at it passes, one pixel over does not.
    image = write_image(tmp_path / "20x10.png", np.full((10, 20, 3), 7, np.uint8))
    np.testing.assert_array_equal(predict.read_image(image, IMAGE_SHAPE, max_pixels=200), 7)
    with pytest.raises(predict.ImageTooLargeError, match="20 x 10 = 200 pixels"):
        predict.read_image(image, IMAGE_SHAPE, max_pixels=199)


def gradient_image(size: int) -> np.ndarray:
    """uint8 (size, size, 3): smooth ramps in each channel, so that scaling shows in the pixels."""
    ramp = np.linspace(0, 255, size)
    red, green = np.meshgrid(ramp, ramp)
    return np.stack([red, green, (red + green) / 2], axis=-1).astype(np.uint8)


def test_a_large_jpeg_is_decoded_small(tmp_path, monkeypatch):
    pixels = gradient_image(4000)
    Image.fromarray(pixels).save(tmp_path / "large.jpg", quality=95)
    del pixels
    decoded = []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(
        PIL.ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image)
    )
    small = predict.read_image(str(tmp_path / "large.jpg"), IMAGE_SHAPE)
    # Decoded at 1/8 scale, 500 x 500, not 4000 x 4000: still 3 x 16 = 48 pixels or more a side.
    assert decoded and set(decoded) == {(500, 500)}
    monkeypatch.undo()
    with Image.open(tmp_path / "large.jpg") as full:  # the reference: the full image resized
        expected = np.asarray(full.resize(IMAGE_SHAPE[1::-1], Image.Resampling.LANCZOS))
    assert small.shape == IMAGE_SHAPE and small.dtype == np.uint8
    assert np.max(np.abs(small.astype(int) - expected)) <= 2
    # The limit applies to what is decoded.
    predict.read_image(str(tmp_path / "large.jpg"), IMAGE_SHAPE, max_pixels=500 * 500)
    with pytest.raises(predict.ImageTooLargeError, match="4000 x 4000 decoded at 1/8 scale: 500 x"):
        predict.read_image(str(tmp_path / "large.jpg"), IMAGE_SHAPE, max_pixels=500 * 500 - 1)


# Reads one image with nothing but train.predict (no JAX) and prints how far the process's peak
# resident memory rose, in MiB: Linux's VmHWM, which (unlike getrusage's maxrss) starts afresh at
# exec rather than at the forking pytest process's size.
PEAK_MEMORY_RUNNER = textwrap.dedent(
    """
    import re, sys
    from PIL import Image
    from train import predict

    def peak_kib():
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1))

    before = peak_kib()
    pixels = predict.read_image(sys.argv[1], (16, 16, 3))
    print((peak_kib() - before) / 1024, pixels.shape)
    """
)


def test_a_large_png_costs_its_decoded_size_and_no_full_size_copies(tmp_path):
    pixels = gradient_image(4000)
    Image.fromarray(pixels).save(tmp_path / "large.png", compress_level=1)
    del pixels
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_RUNNER, str(tmp_path / "large.png")],
        cwd=train_testing.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    peak_mib, shape = completed.stdout.split(maxsplit=1)
    assert shape.strip() == "(16, 16, 3)"
    # Pillow holds RGB in 4 bytes a pixel: the decoded image is 4000 * 4000 * 4 bytes = 61 MiB.
    # Every further step works on a copy reduced to 3 x 16 pixels a side, not a full-size one.
    assert float(peak_mib) < 61 * 1.5


def test_predict_reports_each_bad_file_and_classifies_the_others(exported_run, tmp_path, cache_dir):
    workdir, _, _ = exported_run
    good = write_image(tmp_path / "good.png", np.zeros(IMAGE_SHAPE, np.uint8))
    bomb = png_declaring(tmp_path / "bomb.png", 60000, 60000)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    small_limit = write_image(tmp_path / "over_limit.png", np.zeros((20, 20, 3), np.uint8))
    completed = run_module(
        "train.predict",
        "--workdir",
        str(workdir),
        "--max-pixels=399",
        bomb,
        good,
        str(broken),
        small_limit,
        cache_dir=cache_dir,
    )
    assert completed.returncode == 1, completed.stderr
    errors = completed.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), errors
    assert errors[0].startswith(f"error: {bomb}: too large: 60000 x 60000")
    assert errors[1].startswith(f"error: {broken}: ")
    assert errors[2] == (
        f"error: {small_limit}: too large: 20 x 20 = 400 pixels, more than the limit of 399 "
        "(--max-pixels raises it)"
    )
    assert re.fullmatch(rf"{re.escape(good)}: class \d .*", completed.stdout.strip())


# ----------------------------------------------------------------------------- predict: model.json


def corrupt_model_json(exported_run, tmp_path, edit) -> tuple[str, str]:
    """A copy of the exported run's export/ whose model.json is `edit(info)`; (workdir, image)."""
    workdir = tmp_path / "run"
    shutil.copytree(exported_run[0] / "export", workdir / "export")
    info_file = workdir / "export" / "model.json"
    info_file.write_text(json.dumps(edit(json.loads(info_file.read_text()))))
    image = write_image(tmp_path / "x.png", np.zeros(IMAGE_SHAPE, np.uint8))
    return str(workdir), image


def without(key):
    return lambda info: {name: value for name, value in info.items() if name != key}


MODEL_JSON_CORRUPTIONS = {
    "class_names_shortened": (
        lambda info: {**info, "class_names": info["class_names"][:-1]},
        "9 'class_names' for 10 logits",
    ),
    "class_names_removed": (without("class_names"), "'class_names' is missing"),
    "input_removed": (without("input"), "'input.shape' is missing"),
    "sha256_removed": (without("model_sha256"), "'model_sha256' is missing"),
    "array": (lambda info: [], "it holds an array, not an object"),
    "null": (lambda info: None, "it holds null, not an object"),
    "input_shape_changed": (
        lambda info: {**info, "input": {**info["input"], "shape": [None, 28, 28, 1]}},
        "the shape (28, 28, 1), the model (16, 16, 3)",
    ),
    "class_count_changed_with_output_shape": (
        lambda info: {
            **info,
            "class_names": info["class_names"][:-1],
            "output": {**info["output"], "shape": [None, 9]},
        },
        "the output of one example the shape (9,), the model (10,)",
    ),
}


@pytest.mark.parametrize("corruption", list(MODEL_JSON_CORRUPTIONS))
def test_predict_refuses_a_model_json_that_does_not_fit_its_schema(
    corruption, exported_run, tmp_path, capsys
):
    edit, message = MODEL_JSON_CORRUPTIONS[corruption]
    workdir, image = corrupt_model_json(exported_run, tmp_path, edit)
    assert predict.main(["--workdir", workdir, "--top", "10", image]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "model.json" in lines[0] and message in lines[0]
    assert "python -m train.export --workdir" in lines[0]


def test_predict_cli_with_a_null_model_json_is_one_error_line(exported_run, tmp_path, cache_dir):
    workdir, image = corrupt_model_json(exported_run, tmp_path, lambda info: None)
    completed = run_module("train.predict", "--workdir", workdir, image, cache_dir=cache_dir)
    assert_one_error_line(completed, "model.json", "it holds null, not an object")


# ----------------------------------------------------------------------------- --help


def help_text(main, flag, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def described_options(text: str) -> dict[str, str]:
    """Each option of an argparse help text and its description (joined continuation lines)."""
    options, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (?:-\w, )?(--[\w-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2) or ""
        elif current and line.startswith("   "):
            options[current] += " " + line.strip()
    return {name: " ".join(description.split()) for name, description in options.items()}


def test_export_and_predict_help_describes_every_flag(capsys):
    for flag in ("--help", "-h"):
        text = help_text(export.main, flag, capsys)
        assert "model.jaxexport" in text and "model.json" in text
        assert described_options(text) == {
            "--help": "show this help message and exit",
            "--workdir": "the run's directory (the --workdir it was trained in)",
        }
    text = help_text(predict.main, "--help", capsys)
    options = described_options(text)
    assert set(options) == {"--help", "--workdir", "--top", "--json", "--max-pixels"}
    assert all(options.values()), options
    assert "more than N pixels" in options["--max-pixels"]
    assert f"default {predict.DEFAULT_MAX_PIXELS}" in options["--max-pixels"]


@pytest.mark.parametrize(("module", "flag"), [("train.export", "-h"), ("train.predict", "--help")])
def test_help_exits_0_from_the_command_line(module, flag, cache_dir):
    completed = run_module(module, flag, cache_dir=cache_dir)
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    assert completed.stdout.startswith(f"usage: python -m {module} [-h] --workdir DIR")
