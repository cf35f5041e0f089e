#!/usr/bin/env bash
# How docs/wireshark-e1000e-realize.png was taken: Wireshark's GUI under Xvfb
# (Debian: apt-get install wireshark-qt xvfb imagemagick xdotool), the
# dissector loaded with -X, a QEMU realize of an e1000e exported to pcapng.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/wireshark-e1000e-realize.png}
tmp=$(mktemp -d)
trap 'kill "$ws" "$xvfb" 2>/dev/null || true; rm -rf "$tmp"' EXIT
vfioproxy trace export --format pcapng -o "$tmp/e1000e.pcapng" \
    traces/qemu-realize-qemu-server-e1000e-001.trace
Xvfb :99 -screen 0 1600x1250x24 & xvfb=$!
export DISPLAY=:99 XDG_RUNTIME_DIR=$tmp
sleep 2
wireshark -X "lua_script:$(vfioproxy wireshark --path)" -r "$tmp/e1000e.pcapng" \
    -Y 'vfio_user.command == "DEVICE_SET_IRQS" || vfio_user.register' & ws=$!
sleep 12
win=$(xdotool search --onlyvisible --name e1000e | head -1)
xdotool windowmove "$win" 0 0 windowsize "$win" 1600 1250
sleep 2
xdotool mousemove 400 300 click 1 key End sleep 1 key Home sleep 1   # draw every row
xdotool key ctrl+g sleep 1 type 60; xdotool key Return; sleep 2     # frame 60: SET_IRQS ERR
xdotool mousemove 130 698 click 1 sleep 1 key shift+Right sleep 1   # open vfio-user
xdotool mousemove 130 713 click 1 sleep 0.5 key shift+Left          # fold the pseudo-header
xdotool mousemove 130 698 click 1 sleep 1
import -window root "$tmp/shot.png"
convert "$tmp/shot.png" -colors 128 -strip "$out"   # a smaller PNG, as legible
echo "$out"
