"""Architecture hyper-parameters of TinySAM (`vit_t`), of SAM's ViT teachers, and of the reduced
test configurations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class VitConfig:
    """SAM's plain-ViT image encoder (ViT-B/L/H): the teachers of distillation."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """Every number that shapes the network; the full configuration matches `tinysam.pth`."""

    name: str
    image_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    num_classes: int = 1000
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    vit: VitConfig | None = None
    """Set for SAM's ViT encoders; None for TinyViT (the fields above describe it then)."""
    extra: dict = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding (image_size / 16)."""
        return self.image_size // 16

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        """Plain-JSON form, for manifests."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        if d["vit"] is None:
            d.pop("vit")
        return d


FULL = ModelConfig(name="tinysam_vit_t")
"""TinySAM / MobileSAM `vit_t`: TinyViT-5M encoder, SAM prompt encoder and mask decoder."""

TEST = ModelConfig(
    name="tinysam_test",
    image_size=256,
    embed_dims=(16, 24, 32, 48),
    depths=(2, 2, 6, 2),
    num_heads=(1, 1, 1, 2),
    window_sizes=(7, 7, 14, 7),
    num_classes=10,
    prompt_embed_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=128,
    decoder_heads=2,
    iou_head_hidden_dim=32,
)
"""The same graph at a quarter of the width and input size, for fast tests and fixtures."""

CONFIGS = {"full": FULL, "test": TEST}

SAM_VIT_B = ModelConfig(name="sam_vit_b", vit=VitConfig(768, 12, 12, (2, 5, 8, 11)))
SAM_VIT_L = ModelConfig(name="sam_vit_l", vit=VitConfig(1024, 24, 16, (5, 11, 17, 23)))
SAM_VIT_H = ModelConfig(name="sam_vit_h", vit=VitConfig(1280, 32, 16, (7, 15, 23, 31)))
SAM_VIT_TEST = dataclasses.replace(
    TEST, name="sam_vit_test", vit=VitConfig(48, 4, 2, (1, 3), window_size=6)
)
"""A four-block ViT at the test configuration's size and prompt width: a teacher for fast tests
(6-wide windows on the 16x16 grid, so window padding is exercised)."""

TEACHER_CONFIGS = {"vit_h": SAM_VIT_H, "vit_l": SAM_VIT_L, "vit_b": SAM_VIT_B, "vit_t": FULL, "vit_test": SAM_VIT_TEST,
                   "test": TEST}
"""Teacher architectures of `distill --teacher-arch`: SAM's ViTs, TinySAM/MobileSAM (`vit_t`) and
the two reduced test sizes."""
