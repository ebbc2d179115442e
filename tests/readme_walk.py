"""Walk through the README: run every command its shell blocks show, as a newcomer would.

Each command line of a ```sh block is either run (on the test model, with the placeholders the
README uses filled in) or matched by a rule in SKIP that says why it is not run here; a command
no rule covers fails the walk, so the README and this walk cannot drift apart silently.

    python3 tests/readme_walk.py [--bin-dir target/release] [--python models/.venv/bin/python]

Placeholders and stand-ins: IMAGE is a generated 800x700 PNG (the README's coordinates fit it),
FILE a generated config, /path/to/images a folder holding that image; TINYSAM_MODEL points at
the test model (the README says `$TINYSAM_MODEL` picks the model), so `--model models/default`
becomes the test model too; XDG_RUNTIME_DIR is a temporary folder, so the daemon and the clients
agree on the socket. `cargo run --release [--bin B] -- ARGS` runs the built binary B (default
`tinysam`) with ARGS; `tinysam ARGS` and `tinysamd ARGS` likewise.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lines not run here, and why (a regular expression on the command, comment stripped).
SKIP = [
    (r"^bash tests/run-all\.sh$", "this walk is one of its suites"),
    (r"^bash cross/", "run by the test command's aarch64 and VM suites"),
    (r"^bash debian/check\.sh", "run by the test command's package suites"),
    (r"^cd models$|^cd \.\. && ", "the model toolchain needs a real checkpoint; its export is tested by models/tests"),
    (r"^python3 -m venv \.venv", "the test command builds models/.venv itself"),
    (r"^\.venv/bin/python -m tinysam_export export --checkpoint", "needs a real checkpoint (not downloadable here)"),
    (r"^\.venv/bin/python -m tinysam_export distill ",
     "needs a real teacher checkpoint and a GPU; models/tests/test_distill.py runs it on the reduced test models"),
    (r"--source v4l2:", "needs a camera: the VM suites run the daemon on vivid"),
    (r"^tinysam-ros2 (?!.*--check-config)",
     "a middleware node: tests/ros2 runs the bridge in network namespaces (DDS discovery is "
     "multicast) and against a Zenoh router on 127.0.0.1"),
]
# Lines of a block that are not commands: the README's source-tree map.
NOT_COMMANDS = re.compile(r"^(src|clients|docs|fuzz|systemd|debian|cross|examples|models|tests|benches)/")


def png(path: Path, width: int, height: int) -> None:
    """A gradient RGB PNG, written with the standard library only."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in ((x * 255) // width, (y * 255) // height, 128))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def commands(readme: str) -> list[str]:
    """Command lines of the README's sh blocks, comments and blank lines dropped."""
    out, inside = [], False
    for line in readme.splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```sh", "```bash")
            continue
        if not inside:
            continue
        text = re.split(r"\s+#\s", line)[0].strip()
        if text and not text.startswith("#") and not NOT_COMMANDS.match(text):
            out.append(text)
    return out


class Walk:
    def __init__(self, bin_dir: Path, python: str | None, work: Path):
        self.bin_dir, self.python, self.work = bin_dir, python, work
        self.image = work / "image.png"
        png(self.image, 800, 700)
        self.images = work / "images"
        self.images.mkdir()
        png(self.images / "frame.png", 640, 480)
        self.config = work / "config.toml"
        self.config.write_text("[source]\nuri = \"synthetic\"\nfps = 5\n[model]\nthreads = 2\n")
        runtime = work / "run"
        runtime.mkdir(mode=0o700)
        self.env = dict(os.environ, TINYSAM_MODEL=str(ROOT / "tests/fixtures/test_model"), XDG_RUNTIME_DIR=str(runtime))
        self.env.pop("TINYSAMD_CONFIG", None)
        self.socket = runtime / "tinysamd.sock"
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = None

    def argv(self, line: str) -> list[str]:
        """The command as it runs here."""
        for placeholder, value in (
            ("IMAGE", self.image),
            ("FILE", self.config),
            ("/path/to/images", self.images),
            ("/etc/tinysamd/config.toml", self.config),
            ("models/default", ROOT / "tests/fixtures/test_model"),
        ):
            line = re.sub(rf"(?<![\w/]){re.escape(placeholder)}(?![\w/])", str(value), line)
        words = shlex.split(line)
        if words[:2] == ["cargo", "run"]:
            rest = words[2:]
            binary = "tinysam"
            if "--bin" in rest:
                binary = rest[rest.index("--bin") + 1]
            args = rest[rest.index("--") + 1 :] if "--" in rest else []
            return [str(self.bin_dir / binary), *args]
        if words[0] in ("tinysam", "tinysamd", "tinysam-ros2"):
            return [str(self.bin_dir / words[0]), *words[1:]]
        if words[0] == "python3" and words[1].startswith("clients/python/"):
            if self.python is None:
                raise Skip("no Python with the client installed (the test command makes models/.venv)")
            return [self.python, *words[1:]]
        raise Uncovered(line)

    def start_daemon(self, argv: list[str]) -> None:
        self.stop_daemon()
        self.daemon_log = open(self.work / "daemon.log", "w")  # noqa: SIM115 (closed in stop_daemon)
        self.daemon = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=self.daemon_log, stderr=self.daemon_log)
        until = time.time() + 60
        while not self.socket.exists():
            if self.daemon.poll() is not None:
                raise Failed(f"exited {self.daemon.returncode}: {(self.work / 'daemon.log').read_text()[-2000:]}")
            if time.time() > until:
                raise Failed("never listened")
            time.sleep(0.05)

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=10)
        self.daemon = None
        if self.daemon_log is not None:
            self.daemon_log.close()
            self.daemon_log = None

    def run(self, line: str) -> str:
        argv = self.argv(line)
        daemon = Path(argv[0]).name == "tinysamd"
        one_shot = {"--check-config", "--list-cameras", "--help"}
        if daemon and not one_shot.intersection(argv):
            if "--once" in argv:
                # A file source played once: it starts, serves, and keeps serving the ring.
                self.start_daemon(argv)
                self.stop_daemon()
                return "started, listened, stopped"
            self.start_daemon(argv)
            return "started (kept for the client commands that follow)"
        if Path(argv[0]).name == "tinysam" and "sub" in argv and (self.daemon is None or self.daemon.poll() is not None):
            self.start_daemon([str(self.bin_dir / "tinysamd")])
        # From the clone's root, as the README's relative paths are (outputs go to its out/).
        out = subprocess.run(argv, check=False, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise Failed(f"exit {out.returncode}: {(out.stderr or out.stdout)[-2000:]}")
        return (out.stdout.strip().splitlines() or ["(no output)"])[-1][:120]


class Skip(Exception):
    pass


class Uncovered(Exception):
    pass


class Failed(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target/release")
    ap.add_argument("--python", default=None, help="a Python with tinysam_client installed")
    args = ap.parse_args()
    if args.python:
        args.python = str(Path(args.python).absolute())
    lines = commands((ROOT / "README.md").read_text())
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        walk = Walk(args.bin_dir, args.python, Path(tmp))
        try:
            for line in lines:
                reason = next((why for pattern, why in SKIP if re.search(pattern, line)), None)
                if reason:
                    print(f"skip  {line}\n      ({reason})")
                    continue
                started = time.time()
                try:
                    result = walk.run(line)
                    print(f"ok    {line}  [{time.time() - started:.1f} s] {result}")
                except Skip as e:
                    print(f"skip  {line}\n      ({e})")
                except Uncovered:
                    failures += 1
                    print(f"FAIL  {line}\n      no rule runs or skips this README command: add one to tests/readme_walk.py")
                except (Failed, subprocess.TimeoutExpired) as e:
                    failures += 1
                    print(f"FAIL  {line}\n      {e}")
        finally:
            walk.stop_daemon()
    print(f"README walk: {len(lines)} commands, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
