"""invite-worker: send Datadog shared-dashboard invitations in bulk."""

import os

# numpy (the compact per-token state) loads OpenBLAS, which starts a thread per core that
# spins for a while: about 0.1 s of CPU per process, for matrix work the worker never
# does. One thread unless the environment says otherwise (OpenBLAS reads its own variable
# before OMP_NUM_THREADS, so that one is left to win too); read when numpy is imported.
if "OPENBLAS_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

__version__ = "0.1.0"
