"""The bridging module: Q-Former, BIM and IAA between the MLLM and the diffusion model."""

from insightedit.models.bridging.bim import BidirectionalInteraction
from insightedit.models.bridging.iaa import ClipImageEncoder, Mapper, build_clip_image_encoder
from insightedit.models.bridging.model import BridgeOutput, BridgingModel
from insightedit.models.bridging.presets import PRESETS, BridgingSizes, build_bridging, build_bridging_from_sizes
from insightedit.models.bridging.qformer import QFormerBridge

__all__ = [
    "PRESETS",
    "BidirectionalInteraction",
    "BridgeOutput",
    "BridgingModel",
    "BridgingSizes",
    "ClipImageEncoder",
    "Mapper",
    "QFormerBridge",
    "build_bridging",
    "build_bridging_from_sizes",
    "build_clip_image_encoder",
]
