#!/usr/bin/env bash
# System programs some tests drive: `ip` (iproute2) for the multi-host netns test and Debian's headless Chromium
# for the web explorer's browser test. Installed when missing and we are root with apt-get; otherwise say so.
set -uo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} for the tests (about a minute)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "could not install ${need[*]}: the tests that need them will fail"
else
  echo "missing ${need[*]}: install them (e.g. apt-get install ${need[*]}) or the tests that need them fail"
fi
exit 0
