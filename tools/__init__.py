"""The memory plan (plan.py), the GPU check (gpu_check.py), DeepSpeed's CPU ops build, and what the demos, benchmarks
and tests share (common.py, reference.py). Run them from the repository root: python -m tools.plan --help."""
