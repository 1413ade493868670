#!/usr/bin/env bash
# System tools the tests of examples/ need (C++ against libtorch, onnxruntime-node, the
# browser page in headless Chromium), installed with apt-get only when missing; a no-op
# when they are there. The tests install their npm packages themselves (npm install
# --ignore-scripts into ~/.cache/gru-deploy; no browser download).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -n "$(fc-list 2>/dev/null | head -n 1)" ] || need+=(fonts-liberation)  # readable screenshots
if [ "${#need[@]}" -gt 0 ]; then
  sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
