"""The generation model: InstructPix2Pix's UNet with InsightEdit's ``v_txt`` and decoupled cross-attention."""

from insightedit.models.generation.edit_unet import EditUNet
from insightedit.models.generation.latent_space import LatentSpace, PixelUnshuffleLatentSpace, VaeLatentSpace
from insightedit.models.generation.presets import GenerationComponents, build_generation_components
from insightedit.models.generation.sampling import sample_with_dual_guidance

__all__ = [
    "EditUNet",
    "GenerationComponents",
    "LatentSpace",
    "PixelUnshuffleLatentSpace",
    "VaeLatentSpace",
    "build_generation_components",
    "sample_with_dual_guidance",
]
