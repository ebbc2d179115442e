"""COCO RLE (pycocotools' compressed `counts` strings): decode to pixels, pure Python."""


def _counts(s):
    """Run lengths from pycocotools' LEB128-like string form."""
    counts = []
    i = 0
    data = s.encode("ascii") if isinstance(s, str) else s
    while i < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if i >= len(data):
                raise ValueError("RLE string ends mid-number")
            c = data[i] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_area(s):
    """Foreground pixels of a compressed RLE string."""
    return sum(_counts(s)[1::2])


def decode_rle(s, width, height):
    """Row-major bytes (0 or 1), width * height long, from a column-major COCO RLE string."""
    counts = _counts(s)
    if sum(counts) != width * height or any(c < 0 for c in counts):
        raise ValueError("RLE does not cover a %dx%d mask" % (width, height))
    column_major = bytearray(width * height)
    pos = 0
    value = 0
    for run in counts:
        if value:
            column_major[pos : pos + run] = b"\x01" * run
        pos += run
        value ^= 1
    out = bytearray(width * height)
    for x in range(width):
        col = column_major[x * height : (x + 1) * height]
        out[x::width] = col
    return bytes(out)


def mask_to_numpy(mask, width, height):
    """A result mask (any pixel encoding) as an (height, width) uint8 numpy array of 0/1."""
    import numpy as np

    if mask.get("rle") is not None:
        return np.frombuffer(decode_rle(mask["rle"], width, height), np.uint8).reshape(height, width)
    if mask.get("bitmap") is not None:
        return (np.frombuffer(mask["bitmap"], np.uint8).reshape(height, width) > 0).astype(np.uint8)
    raise ValueError("mask has no pixel encoding (polygon or bbox); subscribe with rle or bitmap")
