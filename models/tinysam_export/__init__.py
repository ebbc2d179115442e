"""Turn TinySAM checkpoints (or synthetic weights) into the ONNX files tinysam-edge runs."""

__version__ = "0.1.0"
