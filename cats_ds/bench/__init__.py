"""Benchmarks (`python -m cats_ds.bench ...`, suite.py), the expert-placement benchmark
(experts.py), model FLOPs (flops.py) and launch/gpu_check.sh's summary (gpu_check.py).
Nothing outside bench/ imports it (cli.py excepted)."""
