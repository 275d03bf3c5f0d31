#!/usr/bin/env bash
# Set up SlicerSGP in ./.venv: torch, the official sam2 package (no torchvision, no CUDA
# extension), the engine and the `sgp` command (with DICOM SEG output). `--test` adds what the
# test suite needs.
# SGP_TORCH overrides the torch requirement (default: torch==2.13.0; e.g. SGP_TORCH=torch for
# the newest CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[dicom]"
[ "${1:-}" = "--test" ] && extras="[dicom,test]"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }

pip_q "${SGP_TORCH:-torch==2.13.0}" numpy
pip_q "hydra-core>=1.3.2" "iopath>=0.1.10" setuptools wheel
# sam2 is an sdist whose build needs torch already installed; its CUDA extension only adds
# optional hole filling, so it is skipped (it needs nvcc and matches one torch build only).
python -c "import sam2" 2>/dev/null ||
  SAM2_BUILD_CUDA=0 pip_q --no-build-isolation --no-deps "sam2==1.1.0"
pip_q -e ".${extras}"
echo "note: pip may say that sam2 requires torchvision; that is expected, nothing here uses it."
python -c "import torch, sam2, SlicerSGP; print(f'SlicerSGP {SlicerSGP.__version__} ready: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
