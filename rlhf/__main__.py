import os
import sys

# Idle OpenMP threads sleep instead of spinning (before torch loads libgomp): with another process on the cores a
# 2-thread job then slows ~1.2x instead of ~2.7x (measured on the development machine; docs/benchmarks.md, Speed). Set
# OMP_WAIT_POLICY=ACTIVE to trade that for ~10% on an otherwise idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __name__ == "__main__" and os.environ.get("RLHF_STAGE_SERVER"):  # started by fork from a warm server (tests, CI)
    from rlhf.stage_server import delegate
    code = delegate(sys.argv[1:])  # None: no server there, or it was started with another environment
    if code is not None:
        sys.exit(code)

from rlhf.cli import main  # noqa: E402

if __name__ == "__main__":  # a worker process (multiprocessing forkserver/spawn) imports this module again
    sys.exit(main())
