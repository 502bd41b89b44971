#!/usr/bin/env bash
# A separate virtualenv with fairseq for the peer benchmark (python -m cats_ds.bench peer).
# fairseq is NOT a dependency of cats_ds: the peer bench only needs the path to a python
# that can import it (--fairseq-python VENV/bin/python).
#
#   bash launch/fairseq_env.sh [VENV]          # default .venv-fairseq
#   BUILD_LOCK=/tmp/cats_cpu.lock bash launch/fairseq_env.sh VENV   # compile under flock
#
# The recipe (Python 3.11, torch 2.13 CPU):
#   * torch==2.13.0 first (the CPU build; an unpinned torch pulls GBs of CUDA wheels)
#   * fairseq-fixed==0.12.3.1 (fairseq 0.12 with Python 3.11 fixes) built from its sdist
#     WITHOUT build isolation (its pyproject asks for an unpinned torch in the build env) and
#     WITHOUT its dependency list (it asks for torchaudio, which would replace torch); its
#     Cython / C++ extensions build against the venv's numpy and torch.
#   * its runtime dependencies pinned by hand, minus torchaudio (speech tasks only).
set -euo pipefail
VENV=${1:-.venv-fairseq}
PY=${PYTHON:-python3.11}
$PY -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade "pip" "setuptools<81" wheel
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "numpy<2" "cython<3.1" "hydra-core==1.3.2" "omegaconf==2.3.0" \
    cffi regex "sacrebleu>=1.4.12" tqdm bitarray scikit-learn packaging sentencepiece pyyaml
${BUILD_LOCK:+flock "$BUILD_LOCK"} "$VENV/bin/pip" install -q --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
"$VENV/bin/python" - <<'PY'
import torch, fairseq
from fairseq.data import data_utils_fast  # the Cython batching helpers
print("fairseq", fairseq.__version__, "torch", torch.__version__, "OK")
PY
