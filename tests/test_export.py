"""``ddptrain export``: a checkpoint's model as ONNX that onnxruntime runs on the raw images with
ddptrain's outputs, and its arrays as safetensors under their ddptrain names.

Each model is trained for an epoch on a small, noisy data set (so that its
test accuracy is neither 0 nor 100%), exported from its ``best.h5``, and the
ONNX model is run in onnxruntime on the test split's uint8 images, as the data
file stores them. ddptrain's outputs are those ``evaluate`` computes: the
checkpoint's model in evaluation mode on the images divided by 255.
"""

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ddptrain
import helpers
from ddptrain import cli, nn
from ddptrain.data.format import read_rows
from ddptrain.data.writer import write_dataset
from ddptrain.errors import UserError
from ddptrain.export import default_output, export
from ddptrain.run import checkpoint as ckpt_io

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(helpers.ROOT / "scripts"))
from custom_model import build_model  # noqa: E402  (a model with a layer of its own, PReLU)

TOLERANCE = 1e-5   # float32: onnxruntime sums the products in another order than BLAS

# name: (--model spec, or a function building the model; images of the data: (H, W) or (C, H, W))
MODELS = {
    "MLP": ("784-24-12-10", (28, 28)),
    "MLP with batch normalisation and dropout": ("784-32-bn-drop0.2-16-bn-10", (28, 28)),
    "cnn": ("cnn", (28, 28)),
    "lenet5 (padding, average pooling)": ("lenet5", (28, 28)),
    # 11 -> conv k3 s2 p1: 6 -> maxpool3s2: 2 (the floor rule; 3 with ceil) -> conv k1 p1: 4 (its
    # border is the bias) -> avgpool3s2: 1 (2 with ceil)
    "strides, padding, overlapping windows of both poolings": (
        "conv8k3s2p1-bn-maxpool3s2-conv16k1p1-drop0.1-avgpool3s2-flatten-10", (11, 11)),
    "colour images (C x H x W)": ("conv4k3p1-bn-maxpool2-conv6k3s2p1-avgpool2-flatten-12-10",
                                  (3, 8, 8)),
    "a model built in Python, without Flatten": (
        lambda: nn.Sequential([nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10, init="glorot")]),
        (8, 8)),
}
models = pytest.mark.parametrize("name", MODELS)
SMALL_CNN = "strides, padding, overlapping windows of both poolings"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


def noisy_data(folder, image_shape):
    """A data file of 10 classes of ``image_shape`` images, each its class's template plus so much
    noise that a small model trained for a few epochs gets some test images right and some wrong;
    returns its path."""
    # the same signal to noise for every image size: a class shows in all of an image's pixels
    noise = 90 * np.sqrt(np.prod(image_shape) / 784)
    path = folder / f"data-{'x'.join(map(str, image_shape))}.h5"
    if not path.exists():
        rng = np.random.default_rng(0)
        templates = rng.uniform(0, 255, size=(10, *image_shape))

        def split(n):
            labels = rng.integers(0, 10, size=n)
            images = templates[labels] + rng.normal(0, noise, size=(n, *image_shape))
            return np.clip(images, 0, 255).astype(np.uint8), labels

        write_dataset(path, *split(192), *split(150), class_names=[f"c{i}" for i in range(10)],
                      attrs={"source": "synthetic test data"})
    return str(path)


def trained(workdir, name, dtype="float32"):
    """``(checkpoint, data file)``: ``best.h5`` of MODELS[name] after five epochs (once)."""
    return _trained(Path(workdir), name, dtype)


@functools.cache
def _trained(workdir, name, dtype):
    model, image_shape = MODELS[name]
    data = noisy_data(workdir, image_shape)
    run_dir = workdir / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{dtype}"
    # a model built in Python has its own dtype; a spec's is an option
    options = {"model": model()} if callable(model) else {"model": model, "dtype": dtype}
    ddptrain.train(data=data, run_dir=str(run_dir), epochs=5, batch_size=32, lr=0.1, quiet=True,
                   **options)
    return str(run_dir / "checkpoints" / "best.h5"), data


def ddptrain_logits(checkpoint, data):
    """What ``evaluate`` computes: the checkpoint's model, in evaluation mode, on the test images
    divided by 255; and the labels."""
    loaded = ckpt_io.load(checkpoint)
    model = nn.Sequential.from_description(loaded.model, dtype=loaded.dtype)
    model.load_state(loaded.params, loaded.buffers)
    model.eval()
    x, y = read_rows(data, "test", [(0, 150)], loaded.dtype)
    return model.forward(model.as_input(x)).copy(), y


def raw_test_images(data):
    return read_rows(data, "test", [(0, 150)], np.uint8)[0]


def session(path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1   # the machine's cores are the other tests' too
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exported(workdir, name, kind="onnx", **options):
    """``(export, checkpoint, data file)``: MODELS[name] exported as ``kind`` with ``options``
    (once)."""
    checkpoint, data = trained(workdir, name, options.pop("dtype", "float32"))
    given = "".join(f"-{key}-{value}" for key, value in sorted(options.items()))
    output = default_output(checkpoint, kind).with_name(f"exported{given}.{kind}")
    if not output.exists():
        export(checkpoint, kind, output=output, **options)
    return output, checkpoint, data


# ---------------------------------------------------------------- ONNX: the same outputs


@models
def test_onnxruntime_gives_ddptrains_outputs_on_the_raw_images(workdir, name):
    path, checkpoint, data = exported(workdir, name)
    ours, _ = ddptrain_logits(checkpoint, data)
    logits, probabilities = session(path).run(None, {"images": raw_test_images(data)})
    assert logits.dtype == np.float32 and logits.shape == ours.shape
    np.testing.assert_allclose(logits, ours, rtol=TOLERANCE, atol=TOLERANCE)
    softmax = np.exp(ours - ours.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, softmax / softmax.sum(axis=1, keepdims=True),
                               rtol=TOLERANCE, atol=1e-7)


@models
def test_the_exported_models_test_accuracy_is_the_checkpoints(workdir, name, capsys):
    path, checkpoint, data = exported(workdir, name)
    logits, = session(path).run(["logits"], {"images": raw_test_images(data)})
    labels = read_rows(data, "test", [(0, 150)], np.uint8)[1]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert 0.2 < accuracy < 1   # some right and some wrong: a comparison that can fail
    assert accuracy == ckpt_io.load(checkpoint).state["best_accuracy"]
    assert cli.main(["evaluate", checkpoint]) == 0
    assert f"test accuracy {100 * accuracy:.2f}%" in capsys.readouterr().out


def test_the_batch_dimension_is_dynamic(workdir):
    path, _, data = exported(workdir, "cnn")
    images, run = raw_test_images(data), session(path).run
    whole, = run(["logits"], {"images": images})
    for rows in (slice(0, 1), slice(3, 10), slice(10, 150)):
        np.testing.assert_allclose(run(["logits"], {"images": images[rows]})[0], whole[rows],
                                   rtol=TOLERANCE, atol=TOLERANCE)


def test_scaled_input_takes_the_images_divided_by_255(workdir):
    path, checkpoint, data = exported(workdir, "cnn", input="scaled")
    ours, _ = ddptrain_logits(checkpoint, data)
    scaled = read_rows(data, "test", [(0, 150)], np.float32)[0]
    logits, _ = session(path).run(None, {"images": scaled})
    np.testing.assert_allclose(logits, ours, rtol=TOLERANCE, atol=TOLERANCE)
    assert onnx.load(path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("name", ["MLP with batch normalisation and dropout", SMALL_CNN])
def test_a_float64_checkpoint_is_exported_in_float32(workdir, name):
    path, checkpoint, data = exported(workdir, name, dtype="float64")
    ours, labels = ddptrain_logits(checkpoint, data)
    logits, _ = session(path).run(None, {"images": raw_test_images(data)})
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ours, rtol=TOLERANCE, atol=TOLERANCE)
    assert np.array_equal(logits.argmax(axis=1), ours.argmax(axis=1))


def test_the_model_declares_its_input_outputs_opset_and_metadata(workdir):
    path, checkpoint, data = exported(workdir, "cnn")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version == 8   # the oldest that holds opset 17: older runtimes load it

    def interface(value):
        tensor = value.type.tensor_type
        return (value.name, tensor.elem_type,
                [d.dim_param or d.dim_value for d in tensor.shape.dim])

    assert [interface(v) for v in model.graph.input] == [
        ("images", onnx.TensorProto.UINT8, ["batch", 28, 28])]
    assert [interface(v) for v in model.graph.output] == [
        ("logits", onnx.TensorProto.FLOAT, ["batch", 10]),
        ("probabilities", onnx.TensorProto.FLOAT, ["batch", 10])]
    metadata = {p.key: p.value for p in model.metadata_props}
    loaded = ckpt_io.load(checkpoint)
    assert metadata["ddptrain_version"] == ddptrain.__version__ == model.producer_version
    assert metadata["step"] == str(loaded.state["step"]) and metadata["checkpoint"] == "best.h5"
    assert json.loads(metadata["classes"]) == [f"c{i}" for i in range(10)]
    assert json.loads(metadata["model_description"]) == loaded.model
    assert "uint8 pixels" in model.doc_string
    # one node per layer, named as the layer, its arrays under the checkpoint's names
    layers = [entry["name"] for entry in loaded.model]
    assert [node.name for node in model.graph.node if not node.name.startswith(
        ("scale.", "output."))] == layers
    assert ({init.name for init in model.graph.initializer} - {"scale.pixel_max", "scale.shape"}
            == set(loaded.params) | set(loaded.buffers))


def test_the_documented_onnxruntime_example_runs_as_written(workdir, monkeypatch):
    path, checkpoint, data = exported(workdir, "lenet5 (padding, average pooling)")
    code = documented_code("## ONNX", "onnxruntime.InferenceSession")
    code = code.replace("runs/run-<date-time>/checkpoints/best.onnx", str(path))
    code = code.replace('os.path.expanduser("~/.cache/ddptrain/mnist.h5")', repr(data))
    found = {}
    exec(compile(code, "docs/export.md", "exec"), found)
    ours, labels = ddptrain_logits(checkpoint, data)
    np.testing.assert_allclose(found["logits"], ours, rtol=TOLERANCE, atol=TOLERANCE)
    assert np.array_equal(found["predicted"], ours.argmax(axis=1))


# ---------------------------------------------------------------- safetensors


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_safetensors_holds_the_checkpoints_arrays_under_their_names(workdir, dtype):
    path, checkpoint, data = exported(workdir, SMALL_CNN, kind="safetensors", dtype=dtype)
    loaded = ckpt_io.load(checkpoint)
    arrays = safetensors_numpy.load_file(str(path))
    expected = {**loaded.params, **loaded.buffers}
    assert set(arrays) == set(expected) and "batchnorm1.running_var" in arrays
    for name, array in expected.items():
        assert arrays[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(arrays[name], array)   # bit for bit
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    assert json.loads(metadata["model_description"]) == loaded.model
    assert (metadata["trained_dtype"], metadata["step"]) == (dtype, str(loaded.state["step"]))
    assert json.loads(metadata["input_shape"]) == [1, 11, 11] and "transpose" in metadata["layout"]


def test_the_documented_loading_into_ddptrain_gives_the_checkpoints_outputs(workdir):
    path, checkpoint, data = exported(workdir, "cnn", kind="safetensors")
    code = documented_code("## safetensors", "load_file").replace(
        "runs/run-<date-time>/checkpoints/best.safetensors", str(path))
    found = {}
    exec(compile(code, "docs/export.md", "exec"), found)
    model = found["model"].eval()
    ours, _ = ddptrain_logits(checkpoint, data)
    x = read_rows(data, "test", [(0, 150)], np.float32)[0]
    np.testing.assert_array_equal(model.forward(model.as_input(x)), ours)


@pytest.mark.slow   # PyTorch runs in a process of its own (see tests/test_against_pytorch.py)
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="PyTorch is not installed (optional, never a dependency of ddptrain)")
@pytest.mark.parametrize("name", ["MLP with batch normalisation and dropout", "cnn",
                                  "colour images (C x H x W)"])
def test_the_documented_pytorch_model_gives_ddptrains_outputs(workdir, name):
    path, checkpoint, data = exported(workdir, name, kind="safetensors")
    code = documented_code("## Into PyTorch", "import torch")
    code = code.replace("runs/run-<date-time>/checkpoints/best.safetensors", str(path))
    code = code.replace('os.path.expanduser("~/.cache/ddptrain/mnist.h5")', repr(data))
    code += "\nimport json; print(json.dumps(logits.tolist()))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=helpers.clean_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, _ = ddptrain_logits(checkpoint, data)
    theirs = np.array(json.loads(proc.stdout.splitlines()[-1]))
    np.testing.assert_allclose(theirs, ours[:len(theirs)], rtol=TOLERANCE, atol=TOLERANCE)


def documented_code(section, containing):
    """The Python blocks of docs/export.md's ``section`` that hold ``containing``, joined."""
    text = (helpers.ROOT / "docs" / "export.md").read_text()
    body = text.split(section + "\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert any(containing in block for block in blocks), section
    return "\n".join(blocks)


# ---------------------------------------------------------------- refusals, one line each


def refusal(capsys, argv):
    """The one line ``python -m ddptrain ARGV`` prints, run in this process, exiting with 2."""
    status, lines = helpers.in_process(argv, capsys)
    assert status == 2 and len(lines) == 1, lines
    return lines[0]


def test_a_layer_of_the_users_own_is_refused_naming_it_and_nothing_is_written(
        workdir, tmp_path, capsys):
    data = noisy_data(workdir, (8, 8))
    ddptrain.train(build_model(hidden=(16,), n_inputs=64), data=data,
                   run_dir=str(tmp_path / "run"), epochs=1, batch_size=32, lr=0.02, quiet=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "best.h5"
    line = refusal(capsys, ["export", checkpoint, "--format", "onnx"])
    assert line == (f"ddptrain: error: {checkpoint}: layer prelu1 (PReLU) cannot be exported to "
                    "ONNX: only ddptrain's own layers can (AvgPool2d, BatchNorm, Conv2d, Dropout, "
                    "Flatten, Linear, MaxPool2d, ReLU, Softmax)")
    assert not default_output(checkpoint, "onnx").exists()
    # its arrays are arrays all the same
    assert helpers.in_process(["export", checkpoint, "--format", "safetensors"], capsys)[0] == 0
    assert "prelu1.slope" in safetensors_numpy.load_file(default_output(checkpoint,
                                                                          "safetensors"))


def test_a_subclass_of_a_ddptrain_layer_is_a_layer_of_ones_own(workdir, tmp_path):
    class Scaled(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    from ddptrain.nn.layer import LAYER_TYPES
    try:
        model = nn.Sequential([nn.Linear(64, 16), Scaled(), nn.Linear(16, 10)])
        ddptrain.train(model, data=noisy_data(workdir, (8, 8)), run_dir=str(tmp_path / "run"),
                       epochs=1, batch_size=64, quiet=True)
        with pytest.raises(UserError, match=r"layer scaled1 \(Scaled\) cannot"):
            export(tmp_path / "run" / "checkpoints" / "best.h5", "onnx")
    finally:
        LAYER_TYPES.pop("Scaled")


def test_a_corrupt_checkpoint_is_refused_as_evaluate_refuses_it(workdir, tmp_path, capsys):
    checkpoint = tmp_path / "corrupt.h5"
    checkpoint.write_bytes(open(trained(workdir, "MLP")[0], "rb").read())
    helpers.flip_a_byte_of(checkpoint)
    line = refusal(capsys, ["export", checkpoint, "--format", "onnx"])
    assert line == f"ddptrain: error: {checkpoint}: checksum mismatch, the checkpoint is corrupt"
    assert refusal(capsys, ["evaluate", checkpoint]) == line
    assert refusal(capsys, ["export", checkpoint, "--format", "safetensors"]) == line
    assert sorted(os.listdir(tmp_path)) == ["corrupt.h5"]


@pytest.mark.parametrize("kind, module", [("onnx", "onnx"), ("safetensors", "safetensors")])
def test_a_missing_library_is_one_line_saying_how_to_install_it(
        workdir, capsys, monkeypatch, kind, module):
    checkpoint = trained(workdir, "MLP")[0]
    monkeypatch.setitem(sys.modules, module, None)   # import fails, as when it is not installed
    assert refusal(capsys, ["export", checkpoint, "--format", kind]) == (
        f"ddptrain: error: export --format {kind} needs the {module} package, which is not "
        f"installed: pip install 'ddptrain[{kind}]' (or pip install {module})")


def test_a_model_that_does_not_fit_the_data_given_is_refused(workdir, capsys):
    checkpoint = trained(workdir, "MLP")[0]
    line = refusal(capsys, ["export", checkpoint, "--format", "onnx",
                            "--data", noisy_data(workdir, (8, 8))])
    assert "model 784-24-12-10 does not fit" in line and "its images are 8x8" in line


def test_a_model_trained_on_arrays_takes_the_image_shape_from_the_data_given(
        workdir, tmp_path, capsys):
    data = noisy_data(workdir, (8, 8))
    arrays = tuple(read_rows(data, split, [(0, n)], np.uint8) for split, n in
                   (("train", 192), ("test", 150)))
    ddptrain.train("64-16-10", data=(*arrays[0], *arrays[1]), run_dir=str(tmp_path / "run"),
                   epochs=1, batch_size=64, quiet=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "best.h5"
    assert refusal(capsys, ["export", checkpoint, "--format", "onnx"]) == (
        f"ddptrain: error: {checkpoint}: the model was trained on in-memory arrays: give a data "
        "file of its kind of images with --data FILE")
    assert cli.main(["export", str(checkpoint), "--format", "onnx", "--data", data]) == 0
    dims = onnx.load(default_output(checkpoint, "onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, 8]


def test_input_scaled_is_for_onnx_only(workdir, capsys):
    checkpoint = trained(workdir, "MLP")[0]
    assert refusal(capsys, ["export", checkpoint, "--format", "safetensors", "--input",
                            "scaled"]) == ("ddptrain: error: --input scaled is for --format onnx "
                                           "(a safetensors file holds arrays, no input)")


# ---------------------------------------------------------------- where the file goes


def test_the_export_goes_beside_the_checkpoint_and_is_replaced_only_with_force(
        workdir, tmp_path, capsys):
    checkpoint = tmp_path / "best.h5"
    checkpoint.write_bytes(open(trained(workdir, "MLP")[0], "rb").read())
    status, _ = helpers.in_process(["export", checkpoint, "--format", "onnx"], capsys)
    assert status == 0 and sorted(os.listdir(tmp_path)) == ["best.h5", "best.onnx"]
    written = (tmp_path / "best.onnx").read_bytes()
    (tmp_path / "best.onnx").write_bytes(b"mine")
    assert refusal(capsys, ["export", checkpoint, "--format", "onnx"]) == (
        f"ddptrain: error: {tmp_path / 'best.onnx'} exists (--force replaces it)")
    assert (tmp_path / "best.onnx").read_bytes() == b"mine"
    assert helpers.in_process(["export", checkpoint, "--format", "onnx", "--force"], capsys)[0] == 0
    assert (tmp_path / "best.onnx").read_bytes() == written   # the same bytes from the same model
    # no temporary file left beside it
    assert sorted(os.listdir(tmp_path)) == ["best.h5", "best.onnx"]


def test_output_names_the_file_and_says_what_it_holds(workdir, tmp_path, capsys):
    checkpoint = trained(workdir, "cnn")[0]
    output = tmp_path / "model.onnx"
    assert cli.main(["export", checkpoint, "--format", "onnx", "--output", str(output)]) == 0
    assert output.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {output}: ONNX opset 17, input 'images' uint8 batch x 28 x "
                              "28, outputs 'logits' and 'probabilities' (batch x 10); model cnn")


@pytest.mark.parametrize("where, problem", [
    ("the checkpoint", " is the checkpoint itself: give another --output"),
    ("a folder", " is a folder: give the file to write with --output"),
    ("a missing folder", ": cannot write the export (No such file or directory)"),
])
def test_an_output_that_cannot_be_written_is_refused(workdir, tmp_path, capsys, where, problem):
    checkpoint = tmp_path / "best.h5"
    checkpoint.write_bytes(open(trained(workdir, "MLP")[0], "rb").read())
    output = {"the checkpoint": checkpoint, "a folder": tmp_path,
              "a missing folder": tmp_path / "missing" / "model.onnx"}[where]
    assert refusal(capsys, ["export", checkpoint, "--format", "onnx", "--output", output,
                            "--force"]) == f"ddptrain: error: {output}{problem}"
    assert sorted(os.listdir(tmp_path)) == ["best.h5"]
