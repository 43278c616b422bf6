#!/usr/bin/env python3
"""Peak memory and time of converting a large synthetic set to a data file (docs/data.md).

    python scripts/convert_memory.py make DIR [--megabytes 1024]
    python scripts/convert_memory.py run DIR KIND [KIND ...]

``make`` writes one set of 3x32x32 images (``--megabytes`` of pixels, 6/7
for training, 1/7 for test, in 10 classes) in every input form to DIR: the
four IDX files (``idx/``), gzipped (``idx-gz/``), a folder of ``.npy``
chunks of 50,000 rows (``npy/``) and one ``.npy`` file per array
(``whole/``). ``run`` converts it, once per KIND, each in a fresh process,
and prints the process's peak resident memory (``VmHWM`` of
``/proc/self/status``, which counts the pages of a memory map it touched),
how much of it the conversion added (above the process after its imports),
and the wall time:

    idx       prepare --idx-dir idx/
    idx-gz    prepare --idx-dir idx-gz/
    npy-dir   prepare --npy-dir npy/ (before ddptrain had it: every chunk loaded, concatenated,
              and given to write_dataset, the way to do it then)
    memmap    write_dataset of the arrays of whole/ opened with np.load(mmap_mode="r")

Run from a checkout (it imports the ddptrain beside it); give ``--checkout
PATH`` to measure another one (an older ddptrain, for the numbers before).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent.parent
ROWS_PER_NPY_CHUNK = 50_000
IMAGE_SHAPE = (3, 32, 32)
KINDS = ("idx", "idx-gz", "npy-dir", "memmap")


def make(folder, megabytes):
    import gzip
    import struct

    import numpy as np

    rows = megabytes * 2 ** 20 // int(np.prod(IMAGE_SHAPE))
    n_test = rows // 7
    counts = {"train": rows - n_test, "test": n_test}
    rng = np.random.default_rng(0)
    names = {("train", "images"): "train-images-idx3-ubyte",
             ("train", "labels"): "train-labels-idx1-ubyte",
             ("test", "images"): "t10k-images-idx3-ubyte",
             ("test", "labels"): "t10k-labels-idx1-ubyte"}
    for sub in ("idx", "idx-gz", "npy", "whole"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # images: made and written a slice at a time, so that making them needs little memory
        whole = np.lib.format.open_memmap(folder / "whole" / f"{split}_images.npy", "w+",
                                          np.uint8, (n, *IMAGE_SHAPE))
        for start in range(0, n, ROWS_PER_NPY_CHUNK):
            block = rng.integers(0, 256, (min(ROWS_PER_NPY_CHUNK, n - start), *IMAGE_SHAPE),
                                 dtype=np.uint8)
            whole[start:start + len(block)] = block
            np.save(folder / "npy" / f"{split}_images_{start // ROWS_PER_NPY_CHUNK:03d}.npy", block)
            np.save(folder / "npy" / f"{split}_labels_{start // ROWS_PER_NPY_CHUNK:03d}.npy",
                    labels[start:start + len(block)])
        whole.flush()
        del whole
        np.save(folder / "whole" / f"{split}_labels.npy", labels)
        for kind, shape in (("images", (n, *IMAGE_SHAPE)), ("labels", (n,))):
            name = names[(split, kind)]
            header = bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
            source = np.load(folder / "whole" / f"{split}_{kind}.npy", mmap_mode="r")
            with open(folder / "idx" / name, "wb") as raw, \
                    gzip.open(folder / "idx-gz" / f"{name}.gz", "wb", compresslevel=1) as packed:
                for out in (raw, packed):
                    out.write(header)
                for start in range(0, n, ROWS_PER_NPY_CHUNK):
                    rows = source[start:start + ROWS_PER_NPY_CHUNK]
                    data = memoryview(np.ascontiguousarray(rows))
                    raw.write(data)
                    packed.write(data)
    print(f"{folder}: {counts['train']} + {counts['test']} images of "
          f"{'x'.join(map(str, IMAGE_SHAPE))} ({megabytes} MiB) as idx/, idx-gz/, npy/, whole/")


CHILD = r"""
import json, os, sys, time
import numpy as np
from ddptrain.data import datasets, writer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

kind, folder, output = sys.argv[1:4]
after_imports = status("VmRSS")
start = time.perf_counter()
if kind in ("idx", "idx-gz"):
    datasets.prepare("synthetic", output, os.path.join(folder, kind), log=lambda line: None)
elif kind == "npy-dir" and "npy_dir" in datasets.prepare.__code__.co_varnames:
    datasets.prepare("synthetic", output, npy_dir=os.path.join(folder, "npy"),
                     log=lambda line: None)
elif kind == "npy-dir":   # before --npy-dir: load every chunk, concatenate, write
    def load(split, what):
        names = sorted(n for n in os.listdir(os.path.join(folder, "npy"))
                       if n.startswith(f"{split}_{what}_"))
        return np.concatenate([np.load(os.path.join(folder, "npy", n)) for n in names])
    writer.write_dataset(output, load("train", "images"), load("train", "labels"),
                         load("test", "images"), load("test", "labels"))
else:
    arrays = [np.load(os.path.join(folder, "whole", f"{split}_{what}.npy"), mmap_mode="r")
              for split in ("train", "test") for what in ("images", "labels")]
    writer.write_dataset(output, *arrays)
seconds = time.perf_counter() - start
print(json.dumps({"kind": kind, "peak": status("VmHWM"), "after_imports": after_imports,
                  "seconds": seconds, "output_bytes": os.path.getsize(output),
                  "ddptrain": os.path.dirname(writer.__file__)}))
"""


def run(folder, kinds, checkout):
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}; {os.cpu_count()} cores; ddptrain from {checkout}")
    with tempfile.TemporaryDirectory(dir=folder) as out:
        for kind in kinds:
            output = os.path.join(out, f"{kind}.h5")
            # in the checkout: python -c puts the current folder first on sys.path
            done = subprocess.run([sys.executable, "-c", CHILD, kind, str(folder), output],
                                  env=env, capture_output=True, text=True, cwd=checkout)
            if done.returncode != 0:
                print(f"{kind}: failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            mib = 2 ** 20
            print(f"{kind:8s} peak {result['peak'] / mib:7.0f} MiB  (conversion: "
                  f"{(result['peak'] - result['after_imports']) / mib:6.0f} MiB)  "
                  f"{result['seconds']:6.1f} s  -> {result['output_bytes'] / mib:.0f} MiB file "
                  f"(ddptrain of {result['ddptrain']})")
            os.unlink(output)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    maker = commands.add_parser("make")
    maker.add_argument("folder", type=pathlib.Path)
    maker.add_argument("--megabytes", type=int, default=1024)
    runner = commands.add_parser("run")
    runner.add_argument("folder", type=pathlib.Path)
    runner.add_argument("kinds", nargs="+", choices=KINDS)
    runner.add_argument("--checkout", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder, args.megabytes)
    else:
        run(args.folder.resolve(), args.kinds, args.checkout.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
