"""How much slower a prompt request is when requests come spaced out than back to back, on an
idle daemon (its one frame encoded, nothing else running): the probe behind the "spaced requests"
paragraph of benches/daemon-scheduling-results.md.

    models/.venv/bin/python benches/daemon_spacing_probe.py FRAMES_DIR

FRAMES_DIR holds one 640x480 image (the probe of 2026-12-03 used a flat colour). Starts
`target/release/tinysamd` on the default model at 2 threads with that folder as a `--once` file
source, then sends 30 one-point requests back to back, 30 with 0.2 s between them, and both again,
printing p50 and p90 of each set. Compare with `tinysam bench --precisions int8 --batches 1
--runs 15 --threads 2` run right after.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_scheduling as ds


class Args:
    model = ds.ROOT / "models" / "default"
    bin_dir = ds.ROOT / "target" / "release"
    threads = 2


def main():
    frames = sys.argv[1]
    with ds.Daemon(Args, ["--source", "file:" + frames, "--once", "--fps", "0"]) as d:
        d.wait_for_frames(1)
        time.sleep(1)
        with d.client("probe") as c:
            for gap in [0.0, 0.2, 0.0, 0.2]:
                lat = []
                for i in range(30):
                    time.sleep(gap)
                    t0 = time.monotonic()
                    c.prompt(i + 1, [ds.POINT])
                    lat.append(time.monotonic() - t0)
                lat.sort()
                print(f"gap {gap:.1f} s: p50 {1e3 * lat[15]:.1f} ms p90 {1e3 * lat[27]:.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
