"""``python -m ddptrain plot RUN_DIR``: loss and accuracy curves from metrics.jsonl, as a PNG.

matplotlib is an optional extra (``pip install 'ddptrain[plot]'``); without
it the command says so and exits with status 2.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ddptrain.durable import write_atomically
from ddptrain.errors import EXIT_OK, UserError
from ddptrain.files import open_regular


def read_metrics(run_dir):
    """The per-epoch records and the per-step records (``--metrics-every``) of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    with open_regular(path, "metrics file",
                      missing=f"no such file (is {run_dir} a ddptrain run folder?)") as f:
        text = f.read().decode("utf-8", errors="replace")
    epochs, steps = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON object") from None
        (steps if record.get("kind") == "step" else epochs).append(record)
    if not epochs and not steps:
        raise UserError(f"{path}: no metrics yet")
    return epochs, steps


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional extra: pip install "
                        "'ddptrain[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")   # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir, output=None):
    """Write the curves of ``run_dir`` to ``output`` (default RUN_DIR/curves.png); returns the
    path."""
    epochs, steps = read_metrics(run_dir)
    plt = _import_pyplot()
    output = Path(output) if output else Path(run_dir) / "curves.png"
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))

    if steps:
        loss_axes.plot([r["step"] for r in steps], [r["train_loss"] for r in steps],
                       color="tab:blue", alpha=0.35, linewidth=1,
                       label="train loss (running, per step record)")
    if epochs:
        x = [r["step"] for r in epochs]
        loss_axes.plot(x, [r["train_loss"] for r in epochs], "o-", color="tab:blue",
                       label="train loss (epoch)")
        loss_axes.plot(x, [r["test_loss"] for r in epochs], "s-", color="tab:orange",
                       label="test loss")
        accuracy_axes.plot(x, [100 * r["test_accuracy"] for r in epochs], "s-", color="tab:green",
                           label="test accuracy")
        if "train_accuracy" in epochs[0]:
            accuracy_axes.plot(x, [100 * r["train_accuracy"] for r in epochs], "o--",
                               color="tab:blue", label="train accuracy")
    loss_axes.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    loss_axes.set_yscale("log")
    accuracy_axes.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"ddptrain run {Path(run_dir).resolve().name}")
    figure.tight_layout()
    try:
        png = io.BytesIO()   # durable writes it: whole or not at all, and through no link
        figure.savefig(png, format="png", dpi=100)
        write_atomically(output, png.getbuffer())
    except OSError as error:
        raise UserError(f"{output}: cannot write the plot ({error.strerror or error})") from None
    finally:
        plt.close(figure)
    return output


def run(args):
    output = plot_run(args.run_dir, args.output)
    print(f"wrote {output}")
    return EXIT_OK
