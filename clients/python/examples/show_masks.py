"""Show live masks from tinysamd: prints each frame's masks as text and writes the latest one as
a PGM image (no dependencies beyond the client).

    python clients/python/examples/show_masks.py --socket /tmp/tinysamd-1000.sock --point 320,240
"""

import argparse

from tinysam_client import Client, DEFAULT_SOCKET, decode_rle


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=DEFAULT_SOCKET)
    ap.add_argument("--point", action="append", default=[], help="x,y[,label] in frame pixels")
    ap.add_argument("--everything", action="store_true")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--pgm", default="latest-mask.pgm", help="where to write the newest mask")
    args = ap.parse_args()

    with Client(args.socket, name="show_masks.py") as c:
        if args.everything:
            c.subscribe(1, "everything")
        else:
            points = [[float(v) for v in p.split(",")] + [1.0] for p in args.point or ["320,240"]]
            c.subscribe(1, "prompts", prompts=[{"points": [p[:3] for p in points]}])
        for r in c.results(count=args.count):
            w, h = r["width"], r["height"]
            print("frame %d: %d mask(s), dropped %d" % (r["frame_seq"], len(r["masks"]), r["dropped"]))
            for m in r["masks"]:
                print("  score %.3f stability %.3f area %d bbox %s" % (m["score"], m["stability"], m["area"], m["bbox"]))
            if r["masks"] and r["masks"][0].get("rle"):
                pixels = decode_rle(r["masks"][0]["rle"], w, h)
                with open(args.pgm, "wb") as f:
                    f.write(b"P5 %d %d 255\n" % (w, h))
                    f.write(bytes(255 if v else 0 for v in pixels))


if __name__ == "__main__":
    main()
