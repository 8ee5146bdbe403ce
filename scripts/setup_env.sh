#!/usr/bin/env bash
# Create ./.venv with the pinned requirements when it is missing or the pins changed.
# torch/torchvision come from the local disk on the CPU machines (pip's own cache/constraints).
# --browser also installs Debian's chromium + chromium-driver when missing (the web demo's browser test;
# scripts/test.sh passes it): apt as root, fatal under CI, a warning elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--browser" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium + chromium-driver (apt) for the browser test"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
      >/tmp/lfllm_apt_chromium.log 2>&1 || {
      echo "[setup] apt-get install chromium chromium-driver failed (log: /tmp/lfllm_apt_chromium.log)" >&2
      [ "${CI:-}" != "true" ] || exit 1
    }
  else
    echo "[setup] chromium/chromedriver missing: install them (apt-get install chromium chromium-driver)" \
      "or the browser test is skipped" >&2
    [ "${CI:-}" != "true" ] || exit 1
  fi
fi
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv (first run installs torch and friends: a few minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
# the project itself, editable: its packages import from any working directory, no sys.path edits
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
.venv/bin/python -I -c "import training, torch, torchvision, transformers, peft, deepspeed, segment_anything, pycocotools, cv2, gradio, selenium" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] .venv ready"
