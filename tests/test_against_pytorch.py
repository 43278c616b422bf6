"""ddptrain against PyTorch on the same model with the same weights, in float64.

Each model is built from its --model spec in ddptrain and, layer for layer,
in PyTorch by the mapping the benchmark's PyTorch rows use
(scripts/bench/torch_rows.py, so that those rows compare like with like);
ddptrain's initial weights are copied into the PyTorch modules. One batch of
random MNIST-shaped images then goes forward through both with the softmax
cross-entropy loss, and backward; and a few steps of SGD with momentum train
both. Dropout draws different masks in the two libraries, so the specs leave
it out (``cnn`` is here without its dropout).

The comparisons run in a fresh interpreter, never in the test session's:
once torch is imported into a process it stays, with its OpenMP runtime
(libgomp), beside which ddptrain refuses MKL (its threads would multiply
wrongly there): the MKL tests after this module (tests/test_gemm.py's) could
not run.

PyTorch is never a dependency of ddptrain: ``.venv/bin/pip install
torch==2.13.0``. Without it, this module is skipped.
"""

import functools
import importlib
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import helpers
from ddptrain.nn import Sequential, SoftmaxCrossEntropy
from ddptrain.optim.optimizers import SGD

pytestmark = [
    pytest.mark.slow,   # each model is compared in a process of its own
    # find_spec, not importorskip: the test session must not import torch (see above).
    pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                       reason="PyTorch is not installed (optional, never a dependency of ddptrain: "
                              ".venv/bin/pip install torch==2.13.0)"),
]

SCRIPTS, TESTS = helpers.ROOT / "scripts", helpers.ROOT / "tests"
sys.path.insert(0, str(SCRIPTS))   # the benchmark's package: scripts/bench/
torch_rows = importlib.import_module("bench.torch_rows")
workload = importlib.import_module("bench.workload")

TOLERANCE = 1e-10   # largest difference, relative to the largest value compared
BATCH, STEPS, LR, MOMENTUM = 16, 3, 0.05, 0.9
MODELS = {"cnn without its dropout": "conv16k5-bn-maxpool2-conv32k5-bn-maxpool2-flatten-128-10",
          "lenet5 (padding, average pooling)": "lenet5",
          "MLP with batch normalisation": "784-512-bn-256-10"}
specs = pytest.mark.parametrize("spec", MODELS.values(), ids=MODELS.keys())


@specs
def test_ddptrain_gives_pytorchs_outputs_and_gradients_for_the_same_weights(spec):
    found = differences_from_pytorch(spec)["outputs and gradients of one batch"]
    assert "output (logits)" in found and any(name.endswith(".weight") for name in found)
    assert max(found.values()) <= TOLERANCE, found


@specs
def test_a_few_sgd_steps_with_momentum_leave_the_parameters_pytorch_leaves(spec):
    found = differences_from_pytorch(spec)[f"parameters after {STEPS} SGD steps"]
    assert max(found.values()) <= TOLERANCE, found


@functools.cache
def differences_from_pytorch(spec):
    """``compare_with_pytorch(spec)``, run in a fresh interpreter (once per spec)."""
    code = (f"import json, sys; sys.path[:0] = {[str(TESTS), str(SCRIPTS)]!r}; "
            f"from test_against_pytorch import compare_with_pytorch; "
            f"print(json.dumps(compare_with_pytorch({spec!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=helpers.ROOT, env=helpers.clean_env(), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


# ------------------------------------------------------------------ in the fresh interpreter


def compare_with_pytorch(spec):
    """{comparison: {what: largest relative difference}} between ddptrain and PyTorch."""
    return {"outputs and gradients of one batch": one_batch(spec),
            f"parameters after {STEPS} SGD steps": sgd_steps(spec)}


def one_batch(spec):
    model, reference, pairs = twin_models(spec)
    x, y = random_batch(np.random.default_rng(0))
    ours = ddptrain_gradient(model, x, y)
    theirs = pytorch_gradient(spec, reference, x, y)
    found = {"output (logits)": relative_difference(ours, theirs.detach().numpy())}
    for layer, module in pairs:
        for name, parameter in module.named_parameters():
            found[f"{layer.name}.{name}"] = relative_difference(layer.grads[name],
                                                                as_ours(parameter.grad.numpy()))
    return found


def sgd_steps(spec):
    import torch

    model, reference, pairs = twin_models(spec)
    ours = SGD(momentum=MOMENTUM)
    theirs = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        x, y = random_batch(rng)
        ddptrain_gradient(model, x, y)
        ours.step(model.params, model.grads, LR)
        theirs.zero_grad()
        pytorch_gradient(spec, reference, x, y)
        theirs.step()
    return {f"{layer.name}.{name}": relative_difference(layer.params[name],
                                                        as_ours(parameter.detach().numpy()))
            for layer, module in pairs for name, parameter in module.named_parameters()}


def relative_difference(ours, theirs):
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-300))


def as_ours(array):
    """A PyTorch weight in ddptrain's layout: Linear weights are (in, out) there, (out, in) in
    PyTorch; convolutions' are alike."""
    return array.T if array.ndim == 2 else array


def twin_models(spec):
    """ddptrain's model of ``spec`` and PyTorch's, holding the same weights; and the pairs (ddptrain
    layer, PyTorch module) of the layers that have parameters."""
    import torch

    model = Sequential.from_spec(spec, dtype=np.float64, input_shape=workload.IMAGE, seed=1)
    reference = torch.nn.Sequential(*torch_rows.torch_layers(spec)).double()
    ours = [layer for layer in model.layers if layer.params]
    theirs = [module for module in reference if any(True for _ in module.parameters())]
    assert len(ours) == len(theirs)
    assert sum(p.numel() for p in reference.parameters()) == model.params.size
    with torch.no_grad():
        for layer, module in zip(ours, theirs):
            for name, parameter in module.named_parameters():
                parameter.copy_(torch.from_numpy(as_ours(layer.params[name]).copy()))
    return model, reference, list(zip(ours, theirs))


def random_batch(rng):
    return rng.random((BATCH, *workload.IMAGE)), rng.integers(0, 10, BATCH)


def ddptrain_gradient(model, x, y):
    """Forward, loss and backward in ddptrain: the gradient of the batch's mean loss in
    ``model.grads``; returns the logits."""
    loss = SoftmaxCrossEntropy()
    logits = model.forward(model.as_input(x))
    loss.forward(logits, y, len(x))
    model.backward(loss.backward())
    return logits


def pytorch_gradient(spec, reference, x, y):
    import torch

    logits = reference(torch.from_numpy(x.reshape(len(x), *torch_rows.torch_input_shape(spec))))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    return logits
