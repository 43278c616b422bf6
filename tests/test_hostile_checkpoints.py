"""Hostile checkpoints: files crafted with a valid header, not damaged ones.

Each is a checkpoint ddptrain wrote, with one piece rewritten by h5py and the
header's SHA-256 and length recomputed, so that it passes the byte check: the
checksum proves the bytes are whole, not that ddptrain wrote them. ``evaluate``
and ``--resume`` must each refuse it with one line and status 2, before
allocating more than the model's size or reading values from outside the file.
"""

import hashlib
import json
import shutil
import tracemalloc

import h5py
import numpy as np
import pytest

from ddptrain.errors import EXIT_USAGE
from ddptrain.run import checkpoint as ckpt_io
from helpers import in_process, make_dataset, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]
WEIGHT = "params/linear1.weight"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(data file, the step-15 checkpoint of one epoch on it)``."""
    from ddptrain import cli
    folder = tmp_path_factory.mktemp("hostile")
    data = make_dataset(folder / "small.h5")
    assert cli.main(["--data", data, *SMALL, "--epochs", "1", "--run-dir",
                     str(folder / "run")]) == 0
    return data, ckpt_io.step_path(folder / "run" / "checkpoints", 15)


def hostile(checkpoint, path, edit):
    """A copy of ``checkpoint`` at ``path`` with ``edit(h5py file)`` applied, its header rewritten
    for the new bytes: it passes ddptrain's checksum."""
    shutil.copyfile(checkpoint, path)
    with h5py.File(path, "a") as f:     # h5py keeps the 512-byte user block
        edit(f)
    content = bytearray(path.read_bytes())
    body = bytes(content[ckpt_io.HEADER_SIZE:])
    header = (f"ddptrain checkpoint\nformat 2\nsha256 {hashlib.sha256(body).hexdigest()}\n"
              f"bytes {len(body)}\n").encode()
    path.write_bytes(header.ljust(ckpt_io.HEADER_SIZE, b"\0") + body)
    return path


def set_json(attribute, change):
    """An edit that replaces JSON attribute ``attribute`` by ``change(its value)``."""
    def edit(f):
        f.attrs[attribute] = json.dumps(change(json.loads(f.attrs[attribute])))
    return edit


def replace_weight(**create):
    """An edit that replaces linear1.weight by ``create_dataset(**create)``."""
    def edit(f):
        del f[WEIGHT]
        f.create_dataset(WEIGHT, **create)
    return edit


def refusals(trained, forged, tmp_path, capsys):
    """``[(status, stderr lines)]`` of ``evaluate`` and of a ``--resume`` from ``forged``."""
    data, _ = trained
    return [in_process(["evaluate", forged, "--data", data], capsys),
            in_process(["--data", data, *SMALL, "--epochs", "2", "--run-dir", tmp_path / "again",
                        "--resume", forged], capsys)]


def assert_refused(outcomes, forged, *phrases):
    for status, lines in outcomes:
        assert status == EXIT_USAGE and len(lines) == 1, lines
        assert lines[0].startswith(f"ddptrain: error: {forged}: "), lines
        assert all(phrase in lines[0] for phrase in phrases), lines


def test_the_crafting_helper_makes_files_that_pass_the_checksum(trained, tmp_path):
    data, checkpoint = trained
    copy = hostile(checkpoint, tmp_path / "same.h5", lambda f: None)
    assert ckpt_io.load(copy).state == ckpt_io.load(checkpoint).state


def test_json_nested_deeper_than_the_stack_is_refused(trained, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    forged = hostile(trained[1], tmp_path / "deep.h5", lambda f: f.attrs.update(state=deep))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged, "state: nested too deep")


# early stopping's state (--early-stop) as a checkpoint holds it
EARLY_STOP = {"metric": "test_loss", "min_delta": 0.0, "best": 0.5, "best_epoch": 1,
              "bad_epochs": 0}

WRONG_TYPES = {
    "config is a list": ("config", lambda config: [], "config must be an object"),
    "a config option of another type": ("config", lambda c: {**c, "seed": "0"}, "config.seed"),
    "state is a string": ("state", lambda state: "epoch 1", "state must be an object"),
    "a negative step": ("state", lambda s: {**s, "step": -1}, "state.step must be an integer"),
    "a step as a string": ("state", lambda s: {**s, "step": "15"}, "state.step"),
    "a step of 1e30": ("state", lambda s: {**s, "step": 1e30}, "state.step"),
    "an epoch of 1.5": ("state", lambda s: {**s, "epoch": 1.5}, "state.epoch"),
    "train sums as a number": ("state", lambda s: {**s, "train_sums": 3}, "state.train_sums"),
    "a train sum missing": ("state", lambda s: {**s, "train_sums": {"loss_sum": 1.0}},
                            "state.train_sums.correct is missing"),
    "model is an object": ("model", lambda model: {}, "model must be a list"),
    "a layer argument that is a list": (
        "model", lambda m: [{**m[0], "args": {**m[0]["args"], "n_in": [64]}}, *m[1:]],
        "model[0].args['n_in']"),
    "metrics is an object": ("metrics", lambda metrics: {}, "metrics must be a list"),
    "optimiser steps as a string": ("optimizer", lambda o: {**o, "steps": "15"},
                                    "optimizer.steps"),
    "early stopping's state as a list": ("state", lambda s: {**s, "early_stop": [3]},
                                         "state.early_stop must be an object"),
    "early stopping on another metric": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "metric": "train_loss"}},
        "state.early_stop.metric must be test_loss or test_accuracy"),
    "early stopping's best as a string": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "best": "0.3"}},
        "state.early_stop.best must be a finite number or null"),
    "early stopping's best of NaN": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "best": float("nan")}},
        "state.early_stop.best"),
    "a negative minimum change": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "min_delta": -1}},
        "state.early_stop.min_delta must be a finite number from 0"),
    "epochs without improvement of 1e30": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "bad_epochs": 1e30}},
        "state.early_stop.bad_epochs must be an integer"),
    "early stopping's best epoch missing": (
        "state", lambda s: {**s, "early_stop": {k: v for k, v in EARLY_STOP.items()
                                                if k != "best_epoch"}},
        "state.early_stop.best_epoch is missing"),
    "an unknown key in early stopping's state": (
        "state", lambda s: {**s, "early_stop": {**EARLY_STOP, "patience": 3}},
        "state.early_stop holds an unexpected key 'patience'"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_metadata_of_the_wrong_type_or_range_is_refused(trained, tmp_path, capsys, case):
    attribute, change, phrase = WRONG_TYPES[case]
    forged = hostile(trained[1], tmp_path / "forged.h5", set_json(attribute, change))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged, "malformed checkpoint",
                   phrase)


def test_every_problem_is_named_in_the_one_line(trained, tmp_path, capsys):
    forged = hostile(trained[1], tmp_path / "forged.h5",
                     set_json("state", lambda s: {**s, "step": "15", "epoch": 1.5}))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged, "state.step",
                   "state.epoch")


@pytest.mark.parametrize("dtype", [np.dtype([("a", "<f4"), ("b", "<f4")]),
                                   h5py.string_dtype()], ids=["compound", "object"])
def test_a_parameter_of_another_type_is_refused_unread(trained, tmp_path, capsys, dtype):
    with h5py.File(trained[1], "r") as f:
        shape = f[WEIGHT].shape
    forged = hostile(trained[1], tmp_path / "forged.h5", replace_weight(shape=shape, dtype=dtype))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged,
                   "parameter linear1.weight holds")


def test_a_parameter_of_10_to_the_11_elements_without_storage_is_refused_unallocated(
        trained, tmp_path, capsys):
    """373 GiB described in a few bytes: refused from its shape, before it is read."""
    forged = hostile(trained[1], tmp_path / "huge.h5",
                     replace_weight(shape=(10 ** 11,), dtype=np.float32))
    tracemalloc.start()
    try:
        outcomes = refusals(trained, forged, tmp_path, capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_refused(outcomes, forged, "parameter linear1.weight is 100000000000 there")
    assert peak < 200 * 2 ** 20


def test_a_parameter_of_the_right_shape_without_storage_is_refused(trained, tmp_path, capsys):
    """HDF5 would read it as zeros (its fill value): values no one wrote."""
    with h5py.File(trained[1], "r") as f:
        shape = f[WEIGHT].shape
    forged = hostile(trained[1], tmp_path / "empty.h5",
                     replace_weight(shape=shape, dtype=np.float32))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged,
                   "parameter linear1.weight is not stored whole in the file")


def test_a_virtual_dataset_reading_another_file_is_refused(trained, tmp_path, capsys):
    """h5py on the file reads the other file's values; ddptrain, from the verified bytes, would
    read zeros: the two would silently disagree."""
    with h5py.File(trained[1], "r") as f:
        weight = f[WEIGHT][()]
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["w"] = weight + 1

    def make_virtual(f):
        layout = h5py.VirtualLayout(shape=weight.shape, dtype=weight.dtype)
        layout[...] = h5py.VirtualSource(str(source), "w", shape=weight.shape)
        del f[WEIGHT]
        f["params"].create_virtual_dataset("linear1.weight", layout)

    forged = hostile(trained[1], tmp_path / "virtual.h5", make_virtual)
    with h5py.File(forged, "r") as f:
        assert np.array_equal(f[WEIGHT][()], weight + 1)       # what h5py shows
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged, "virtual dataset")


def test_external_storage_and_external_links_are_refused(trained, tmp_path, capsys):
    with h5py.File(trained[1], "r") as f:
        weight = f[WEIGHT][()]
    raw = tmp_path / "weight.bin"
    raw.write_bytes(weight.tobytes())
    forged = hostile(trained[1], tmp_path / "external.h5",
                     replace_weight(shape=weight.shape, dtype=weight.dtype,
                                    external=[(str(raw), 0, weight.nbytes)]))
    assert_refused(refusals(trained, forged, tmp_path, capsys), forged, "external files")

    def link(f):
        del f[WEIGHT]
        f[WEIGHT] = h5py.ExternalLink(str(tmp_path / "source.h5"), "w")

    linked = hostile(trained[1], tmp_path / "linked.h5", link)
    assert_refused(refusals(trained, linked, tmp_path, capsys), linked, "is a link")


def test_a_chunked_parameter_stored_whole_in_the_file_is_read(trained, tmp_path):
    """The layouts the checksum covers are read: a chunked copy of a checkpoint loads equal."""
    with h5py.File(trained[1], "r") as f:
        weight = f[WEIGHT][()]
    copy = hostile(trained[1], tmp_path / "chunked.h5",
                   replace_weight(data=weight, chunks=(5, 5)))
    assert np.array_equal(ckpt_io.load(copy).params["linear1.weight"], weight)


# ---------------------------------------------------------------- the data it was trained on


def content_sha256(data):
    with h5py.File(data, "r") as f:
        return f.attrs["content_sha256"].decode()     # a fixed-length string: bytes in h5py


def test_a_checkpoint_records_the_content_checksum_of_its_data(trained):
    data, checkpoint = trained
    assert ckpt_io.load(checkpoint).state["data_sha256"] == content_sha256(data)


def test_resuming_on_other_data_of_as_many_rows_is_refused_unless_allowed(trained, tmp_path,
                                                                          capsys):
    data, checkpoint = trained
    other = make_dataset(tmp_path / "other.h5", seed=1)       # 240 + 60 rows, other images
    ours, theirs = content_sha256(data), content_sha256(other)
    resume = ["--data", other, *SMALL, "--epochs", "2", "--resume", checkpoint]
    status, lines = in_process([*resume, "--run-dir", tmp_path / "refused"], capsys)
    assert status == EXIT_USAGE and len(lines) == 1
    assert lines[0] == (f"ddptrain: error: {checkpoint}: checkpoint was trained on data of "
                        f"content_sha256 {ours}, this data file's is {theirs}; resume with "
                        "--allow-other-data if it holds the same data")
    status, lines = in_process([*resume, "--run-dir", tmp_path / "allowed",
                                "--allow-other-data"], capsys)
    assert status == 0
    assert any("resuming on it (--allow-other-data)" in line for line in lines), lines


def test_early_stopping_s_state_as_ddptrain_writes_it_loads(trained, tmp_path):
    forged = hostile(trained[1], tmp_path / "forged.h5",
                     set_json("state", lambda s: {**s, "early_stop": EARLY_STOP}))
    assert ckpt_io.load(forged).state["early_stop"] == EARLY_STOP


def test_a_checkpoint_from_before_data_checksums_resumes_saying_the_data_was_not_compared(
        trained, tmp_path, capsys):
    data, checkpoint = trained

    def older(state):
        return {key: value for key, value in state.items() if key != "data_sha256"}

    old = hostile(checkpoint, tmp_path / "old.h5", set_json("state", older))
    status, lines = in_process(["--data", data, *SMALL, "--epochs", "2", "--run-dir",
                                tmp_path / "run", "--resume", old], capsys)
    assert status == 0
    assert any("the data could not be compared" in line and "written before checkpoints "
               "recorded it" in line for line in lines), lines
