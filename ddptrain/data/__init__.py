"""The data: the HDF5 data file (format, writer, the child-process check), IDX sets and where they
come from, the known data sets, in-memory arrays, and which rank reads which rows (sampler)."""
