"""Layout planning and scaling benchmarks: `rapidnlp plan` (hardware.py: the GPU table; cost.py:
the step-time and memory model; search.py: enumerate, rank, write the config) and `rapidnlp bench`
(bench.py: the real trainer over layouts and world sizes). Nothing here starts processes except
bench.py, and nothing here changes how training runs."""
