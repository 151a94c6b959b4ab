#!/usr/bin/env bash
# Screenshot a ddrl report (REPORT_DIR/report.html) in headless Chromium, full page, as a
# 1400 px wide window sees it, so that a change to the report can be looked at.
#
#   benchmarks/screenshot_report.sh REPORT_DIR OUT.png [WIDTH]
#
# Needs Debian's chromium (`apt-get install -y chromium`). The height is measured from the page
# first (a --dump-dom pass that prints document height), so the PNG holds the whole page.
set -euo pipefail

usage="usage: $0 REPORT_DIR OUT.png [WIDTH (default 1400)]"
[[ $# -ge 2 && $# -le 3 ]] || { echo "$usage" >&2; exit 2; }
dir=$1 out=$2 width=${3:-1400}
page="$dir/report.html"
[[ -f $page ]] || { echo "screenshot_report: error: $page does not exist; allowed: a folder with report.html" >&2; exit 2; }
[[ $width =~ ^[0-9]+$ && $width -ge 200 ]] || { echo "screenshot_report: error: WIDTH $width; allowed: an integer >= 200" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "screenshot_report: error: no chromium on PATH; install it with apt-get install -y chromium" >&2; exit 2; }

url="file://$(cd "$dir" && pwd)/report.html"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --disable-dev-shm-usage
       --virtual-time-budget=5000 --run-all-compositor-stages-before-draw)
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags+=(--user-data-dir="$profile")

# The page's full height at this width: a tiny script writes it into the DOM for --dump-dom.
probe=$(mktemp --suffix=.html)
trap 'rm -rf "$profile" "$probe"' EXIT
cat > "$probe" <<HTML
<!DOCTYPE html><html><body style="margin:0"><iframe id="f" src="$url"
 style="width:${width}px;height:100px;border:0"></iframe><pre id="h"></pre><script>
document.getElementById('f').onload = function () {
  var d = this.contentDocument; document.getElementById('h').textContent =
    'HEIGHT=' + Math.max(d.documentElement.scrollHeight, d.body.scrollHeight);
};</script></body></html>
HTML
height=$("$browser" "${flags[@]}" --allow-file-access-from-files --window-size="$width,800" \
  --dump-dom "file://$probe" 2>/dev/null | sed -n 's/.*HEIGHT=\([0-9]*\).*/\1/p' | head -1)
[[ -n $height ]] || height=6000
mkdir -p "$(dirname "$out")"
"$browser" "${flags[@]}" --window-size="$width,$height" --screenshot="$out" "$url" 2>/dev/null
echo "$out: ${width}x${height} of $url"
