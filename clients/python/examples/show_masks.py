"""Show live masks from tinysamd: prints each frame's masks as text and writes the latest one as
a PGM image (no dependencies beyond the client).

    python clients/python/examples/show_masks.py --socket /tmp/tinysamd-1000.sock --point 320,240
"""

import argparse
import sys

from tinysam_client import Client, DEFAULT_SOCKET, ServerError, decode_rle


def point(text):
    """`x,y` or `x,y,label` (label 1 foreground, 0 background), for argparse."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("%r: expected x,y or x,y,label (numbers)" % text) from None
    if len(values) not in (2, 3) or (len(values) == 3 and values[2] not in (0.0, 1.0)):
        raise argparse.ArgumentTypeError("%r: expected x,y or x,y,label with label 0 or 1" % text)
    return values if len(values) == 3 else values + [1.0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=DEFAULT_SOCKET)
    ap.add_argument("--point", type=point, action="append", default=[], help="x,y[,label] in frame pixels")
    ap.add_argument("--everything", action="store_true")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--pgm", help="also write the newest frame's first mask to this PGM file")
    args = ap.parse_args()

    try:
        with Client(args.socket, name="show_masks.py") as c:
            if args.everything:
                c.subscribe(1, "everything")
            else:
                points = args.point or [[320.0, 240.0, 1.0]]
                c.subscribe(1, "prompts", prompts=[{"points": points}])
            for r in c.results(count=args.count):
                show(r, args.pgm)
    except ServerError as e:
        sys.exit("tinysamd refused it: %s" % e)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sys.exit("cannot connect to tinysamd at %s (is tinysamd running, and is this its socket?): %s"
                 % (args.socket, e.strerror or e))
    except ConnectionError as e:
        sys.exit("the connection to tinysamd ended: %s" % e)


def show(r, pgm):
    """Print one result; write its first mask to `pgm` if given."""
    w, h = r["width"], r["height"]
    print("frame %d: %d mask(s), dropped %d" % (r["frame_seq"], len(r["masks"]), r["dropped"]))
    for m in r["masks"]:
        print("  score %.3f stability %.3f area %d bbox %s" % (m["score"], m["stability"], m["area"], m["bbox"]))
    if pgm and r["masks"] and r["masks"][0].get("rle"):
        pixels = decode_rle(r["masks"][0]["rle"], w, h)
        with open(pgm, "wb") as f:
            f.write(b"P5 %d %d 255\n" % (w, h))
            f.write(bytes(255 if v else 0 for v in pixels))


if __name__ == "__main__":
    main()
