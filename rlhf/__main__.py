import os
import sys

# Idle OpenMP threads sleep instead of spinning (before torch loads libgomp): with another process on the cores a
# 2-thread job then slows ~1.2x instead of ~2.7x (measured on the development machine; docs/benchmarks.md, Speed). Set
# OMP_WAIT_POLICY=ACTIVE to trade that for ~10% on an otherwise idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rlhf.cli import main  # noqa: E402

if __name__ == "__main__":  # a worker process (multiprocessing forkserver/spawn) imports this module again
    sys.exit(main())
