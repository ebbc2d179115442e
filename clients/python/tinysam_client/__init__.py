"""Client for tinysamd, the TinySAM segmentation daemon (protocol v1, see docs/protocol.md).

    from tinysam_client import Client
    with Client("/run/tinysamd/tinysamd.sock") as c:
        c.subscribe(1, "prompts", prompts=[{"points": [[320, 240, 1]]}])
        for result in c.results(count=10):
            for mask in result["masks"]:
                pixels = decode_rle(mask["rle"], result["width"], result["height"])
"""

from .client import Client, ServerError, ProtocolError, DEFAULT_SOCKET
from .rle import decode_rle, rle_area, mask_to_numpy

__all__ = [
    "Client",
    "ServerError",
    "ProtocolError",
    "DEFAULT_SOCKET",
    "decode_rle",
    "rle_area",
    "mask_to_numpy",
]
