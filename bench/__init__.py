"""Benchmarks of jaxnets against torchref: training and inference throughput, compilation and
warm-up apart from steady state, medians over repeats, peak memory, and each configuration's
achieved GFLOP/s against the machine's matmul peak measured in the same run."""
