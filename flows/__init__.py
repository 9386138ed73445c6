"""Orchestration: the Prefect flow and its tasks, the cache, reruns and comparisons, and the
`mmdiag` command line (`cli`). Prefect's hosting lives in `hosting/`, the benchmarks in `bench/`."""
