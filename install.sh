#!/usr/bin/env bash
# Installs everything: the Python packages, and (on Debian/Ubuntu, as root) Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .  # the console scripts retrieval-index, -search, -web (pins: above)
# test oracle for `search eval`; --no-deps: its metrics need only torch, its other requirements are heavy
python -m pip install -q --no-deps clip-benchmark==1.6.2
# test oracle for the clip-retrieval compatible API (its ClipClient); --no-deps: its pins (torch, faiss,
# pandas, flask_restful …) would fight ours, and the client needs only requests
python -m pip install -q --no-deps clip-retrieval==2.45.0

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  echo "chromium: $(chromium --version 2>/dev/null || echo present)"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # Playwright drives the system browser: its own browser download is not needed
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  echo "chromium: $(chromium --version)"
else
  echo "note: install Chromium (e.g. apt-get install chromium) to run the browser tests; they are skipped without it"
fi
