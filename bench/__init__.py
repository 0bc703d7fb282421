"""Benchmarks of the whole system, each reported as a ratio against a bare baseline measured in the
same run, interleaved (baseline, system, baseline, system, ...), as medians.

Entry point: ``mistnet bench`` (:func:`bench.runner.run_bench`); results go to ``bench/results/``
and ``docs/benchmarks.md``. ``bench.procs`` holds the processes the benchmarks start.
"""

# The parts of ``mistnet bench`` (``--only``), here where the CLI reads them without importing torch.
PARTS = ("edge", "runtimes", "transport", "train", "memory", "scaling", "train_scaling")
