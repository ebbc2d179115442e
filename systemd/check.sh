#!/usr/bin/env bash
# Offline checks of the units: `systemd-analyze verify` (with ExecStart pointed at built
# binaries, since /usr/bin is not where they are here) and `systemd-analyze security`, whose
# exposure score must stay at or below 2.0 for each service (the ROS 2 bridge needs the network,
# the daemon does not).
#   bash systemd/check.sh path/to/tinysamd path/to/tinysam-ros2
set -euo pipefail
daemon=$(realpath "${1:?usage: check.sh path/to/tinysamd path/to/tinysam-ros2}")
bridge=$(realpath "${2:?usage: check.sh path/to/tinysamd path/to/tinysam-ros2}")
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|/usr/bin/tinysamd|$daemon|" tinysamd.service >"$work/tinysamd.service"
sed -e "s|/usr/bin/tinysam-ros2|$bridge|" tinysam-ros2.service >"$work/tinysam-ros2.service"
cp tinysamd.socket "$work/"
out=$(systemd-analyze verify "$work/tinysamd.service" "$work/tinysamd.socket" \
    "$work/tinysam-ros2.service" 2>&1) || true
if [ -n "$out" ]; then
    echo "systemd-analyze verify complained:"; echo "$out"; exit 1
fi
echo "systemd-analyze verify: clean"
for unit in tinysamd.service tinysam-ros2.service; do
    score=$(systemd-analyze security --offline=true "$work/$unit" 2>/dev/null |
        sed -n "s/.*Overall exposure level for $unit: \([0-9.]*\).*/\1/p")
    echo "systemd-analyze security $unit: exposure $score (target <= 2.0)"
    awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
done
