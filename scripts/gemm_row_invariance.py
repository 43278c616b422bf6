"""Does row i of ``X @ W`` depend on the other rows of the call, or on the BLAS threads?

A measurement for issue 26 (bitwise the same results on any number of ranks):
P ranks multiply their own rows, so a row's bits must not depend on how many
rows share its call. Prints, per layer shape, the call sizes M whose rows
differ from the same rows inside one 600-row call.

    python scripts/gemm_row_invariance.py [float32|float64] [threads]
"""

import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

SHAPES = [(784, 512), (512, 256), (256, 10), (784, 128), (128, 10), (288, 64), (25, 32),
          (800, 500), (500, 10)]
CALL_ROWS = (1, 2, 3, 4, 5, 8, 16, 21, 32, 64, 128, 256, 512)


def main():
    dtype = np.dtype(sys.argv[1] if len(sys.argv) > 1 else "float32")
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print([(lib["internal_api"], lib.get("version"), lib.get("architecture"))
           for lib in threadpool_info()], dtype, f"{threads} thread(s)")
    rng = np.random.default_rng(1)
    with threadpool_limits(threads):
        for k, n in SHAPES:
            w = rng.standard_normal((k, n)).astype(dtype)
            pool = rng.standard_normal((600, k)).astype(dtype)
            reference = pool @ w
            differing = []
            for m in CALL_ROWS:
                rows = rng.permutation(len(pool))[:m]
                changed = int((pool[rows] @ w != reference[rows]).any(axis=1).sum())
                if changed:
                    differing.append(f"M={m}: {changed} row(s)")
            print(f"{k}x{n}:", ", ".join(differing) or "every row the same")


if __name__ == "__main__":
    main()
