#!/usr/bin/env bash
# The test suite on a CPU machine (a few minutes), with what it needs installed first. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first and pinned: this release is a CPU build on our machines, where an unpinned one pulls gigabytes of CUDA
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
# triton: triton_kernels.py's tests run in its CPU interpreter (CUDA builds of torch bring their own)
"$PYTHON" -c "import triton" 2>/dev/null || "$PYTHON" -m pip install -q triton==3.5.0
"$PYTHON" -m pip install -q -r requirements.txt pytest
exec "$PYTHON" -m pytest -q tests "$@"
