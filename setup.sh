#!/usr/bin/env bash
# Set up headstart in ./.venv: torch (CPU build where one lies on disk), the package with export,
# serve and int8, and the test tools.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned: an unpinned or newer torch would pull a multi-GB CUDA build on this machine.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[export,serve,int8,test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import headstart, torch, PIL, safetensors, matplotlib; print('headstart', headstart.__version__, 'torch', torch.__version__)"
