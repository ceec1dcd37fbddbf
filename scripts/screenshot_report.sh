#!/usr/bin/env bash
# Screenshot a run's dataset report (report.html) with headless Chromium (Debian's
# `chromium`: apt-get install -y chromium):
#   scripts/screenshot_report.sh RUN_DIR OUT.png [WIDTH,HEIGHT]
# A local run directory; re-render first with `mathmill report RUN_DIR` if it has no
# report.html. The page is 1280 px wide; the height defaults to 4000 px.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_DIR OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
run_dir=$(cd "$1" && pwd)
out=$(realpath -m "$2")
size=${3:-1280,4000}
if [ ! -f "$run_dir/report.html" ]; then
  echo "error: $run_dir/report.html not found (run: mathmill report $1)" >&2
  exit 1
fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "error: no chromium found (apt-get install -y chromium)" >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$profile" --screenshot="$out" --window-size="$size" \
  "file://$run_dir/report.html" >/dev/null 2>&1
test -s "$out"
echo "$out"
