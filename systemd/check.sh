#!/usr/bin/env bash
# Offline checks of the units: `systemd-analyze verify` (with ExecStart pointed at a built
# binary, since /usr/bin/tinysamd is not installed here) and `systemd-analyze security`, whose
# exposure score must stay at or below 2.0.
#   bash systemd/check.sh path/to/tinysamd
set -euo pipefail
bin=$(realpath "${1:?usage: check.sh path/to/tinysamd}")
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|/usr/bin/tinysamd|$bin|" tinysamd.service >"$work/tinysamd.service"
cp tinysamd.socket "$work/"
out=$(systemd-analyze verify "$work/tinysamd.service" "$work/tinysamd.socket" 2>&1) || true
if [ -n "$out" ]; then
    echo "systemd-analyze verify complained:"; echo "$out"; exit 1
fi
echo "systemd-analyze verify: clean"
score=$(systemd-analyze security --offline=true "$work/tinysamd.service" 2>/dev/null |
    sed -n 's/.*Overall exposure level for tinysamd.service: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security: exposure $score (target <= 2.0)"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
