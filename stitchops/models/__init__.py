"""Models: the timm-compatible ViT (DeiT / DeiT-III, FlexiViT patch sizes), stitched ViTs
(SN-Net, SN-Netv2, ESTA; official checkpoints), segmentation models on any of them
(``Segmenter``, ``FASeg``), and Expedit's insertion into a trained model (``expedite``)."""

from stitchops.models.expedit import expedite, expedited, expedition, unexpedite
from stitchops.models.faseg import FASegDecoder, FASegHead
from stitchops.models.flexi import pi_resize_patch_embed, resize_pos_embed
from stitchops.models.flops import vit_flops
from stitchops.models.necks import FPNDecoder, MultiScaleNeck
from stitchops.models.official import OfficialLoad, load_official_checkpoint
from stitchops.models.segmentation import FASeg, Segmenter
from stitchops.models.stitched import Stitch, StitchedViT
from stitchops.models.vit import (
    MODELS,
    VisionTransformer,
    ViTConfig,
    create_model,
    deit3_base_patch16_224,
    deit3_large_patch16_224,
    deit3_medium_patch16_224,
    deit3_small_patch16_224,
    deit_base_patch16_224,
    deit_small_patch16_224,
    deit_tiny_patch16_224,
    vit_small_test,
)

__all__ = [
    "MODELS",
    "FASeg",
    "FASegDecoder",
    "FASegHead",
    "FPNDecoder",
    "MultiScaleNeck",
    "OfficialLoad",
    "Segmenter",
    "Stitch",
    "StitchedViT",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "deit3_base_patch16_224",
    "deit3_large_patch16_224",
    "deit3_medium_patch16_224",
    "deit3_small_patch16_224",
    "deit_base_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_patch16_224",
    "expedite",
    "expedited",
    "expedition",
    "load_official_checkpoint",
    "pi_resize_patch_embed",
    "resize_pos_embed",
    "unexpedite",
    "vit_flops",
    "vit_small_test",
]
