"""Optional speed machinery, each piece with a plain numpy path that works without it: the library
of the matrix products (``gemm``: numpy's or MKL's), the BLAS's fused axpby, denormals flushed to
zero, and the BLAS threads of each rank."""
