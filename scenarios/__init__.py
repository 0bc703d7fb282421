"""The scenarios that `mistnet demo` and the benchmarks run: their data paths, numbers and dataset folders.

Below the CLI (``mistnet``) and the benchmarks (``bench``), which both build on it; above the agents."""
