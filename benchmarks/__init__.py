"""Benchmark scripts that print tables, each run from the repository root as `python -m benchmarks.NAME` (--help for
its options); baselines are measured in the same run. Not part of the installed packages."""
