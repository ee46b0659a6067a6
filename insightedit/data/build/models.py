"""Local-model backends of steps 2 and 3: GroundedSAM (Grounding DINO → SAM) and a diffusers inpainting pipeline.

Both load from local folders (``save_pretrained`` / hub snapshot layout) in ``setup(device)``, once per
rank of the predict job, and never download (the folders must exist; ``HF_HUB_OFFLINE`` is respected).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from insightedit.data.build.chat import torch_dtype
from insightedit.data.build.config import InpaintConfig, SegmentConfig
from insightedit.data.build.roles import Detection, EditRequest
from insightedit.errors import UserError


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


class GroundedSAM:
    """Step 2: for each phrase the best Grounding DINO box above the thresholds, then SAM's mask in that box.

    SAM embeds the image once and decodes all boxes of the image in one call
    (``multimask_output=False``: one mask per box).
    """

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config
        self.dtype = torch_dtype(config.dtype)
        self.device = "cpu"

    def setup(self, device: str) -> None:
        """Load both models and processors onto ``device``."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars, once per rank and step
        self.device = device
        dino, sam = (str(Path(p or "").expanduser()) for p in (self.config.grounding_dino, self.config.sam))
        try:
            self.dino_processor = AutoProcessor.from_pretrained(dino)
            dino_model: Any = GroundingDinoForObjectDetection.from_pretrained(dino)
            self.dino = dino_model.to(device=device, dtype=self.dtype).eval()
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load Grounding DINO from {dino!r}: {_first_line(error)}") from None
        try:
            self.sam_processor = SamProcessor.from_pretrained(sam)
            sam_model: Any = SamModel.from_pretrained(sam)
            self.sam = sam_model.to(device=device, dtype=self.dtype).eval()
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load SAM from {sam!r}: {_first_line(error)}") from None

    def _box(self, image: Image.Image, phrase: str) -> tuple[list[float], float] | None:
        """The highest-scoring box for ``phrase`` (x0, y0, x1, y1 in pixels), or ``None``."""
        inputs = self.dino_processor(images=image, text=phrase.rstrip(".") + ".", return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.dino(**inputs)
        result = self.dino_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold, target_sizes=[(image.height, image.width)],
        )[0]  # fmt: skip
        if len(result["scores"]) == 0:
            return None
        best = int(result["scores"].argmax())
        x0, y0, x1, y1 = (float(v) for v in result["boxes"][best].float().cpu())
        x0, x1 = sorted((min(max(x0, 0.0), image.width), min(max(x1, 0.0), image.width)))
        y0, y1 = sorted((min(max(y0, 0.0), image.height), min(max(y1, 0.0), image.height)))
        return [x0, y0, x1, y1], float(result["scores"][best])

    @torch.no_grad()
    def segment(self, image_id: str, image: Image.Image, names: list[str]) -> list[Detection | None]:
        """A detection per phrase (``None`` where Grounding DINO finds no box above the thresholds)."""
        boxes = [self._box(image, name) for name in names]
        found = [box for box in boxes if box is not None]
        if not found:
            return [None] * len(names)
        inputs = self.sam_processor(images=image, input_boxes=[[box for box, _ in found]], return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.sam(**inputs, multimask_output=False)
        masks = self.sam_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]  # (boxes, 1, H, W) bool
        detections: list[Detection | None] = []
        index = 0
        for box in boxes:
            if box is None:
                detections.append(None)
                continue
            detections.append(Detection(box[0], masks[index, 0].numpy().astype(bool), box[1]))
            index += 1
        return detections


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a bool mask by ``pixels`` (a square max filter)."""
    if pixels <= 0:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(image) > 0


def working_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the long side at ``resolution``, both multiples of 8 (what SD-style pipelines accept)."""
    scale = resolution / max(width, height)
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


class DiffusersInpainter:
    """Step 3 with any diffusers inpainting pipeline folder (``AutoPipelineForInpainting``).

    The pipeline runs at :func:`working_size`; its output is resized back and pasted into the source
    inside the dilated mask (as BrushNet's blending does), so everything outside stays the source's.
    Each edit has its own seed, so a rerun reproduces it.
    """

    def __init__(self, config: InpaintConfig) -> None:
        self.config = config
        self.dtype = torch_dtype(config.dtype)

    def setup(self, device: str) -> None:
        """Load the pipeline onto ``device``."""
        from diffusers import AutoPipelineForInpainting
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
        path = str(Path(self.config.model or "").expanduser())
        try:
            pipe = AutoPipelineForInpainting.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load the inpainting pipeline from {path!r}: {_first_line(error)}") from None
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device, self.dtype)
        self.accepts_negative = "negative_prompt" in inspect.signature(pipe.__call__).parameters

    def inpaint(
        self, image_id: str, image: Image.Image, mask: np.ndarray, request: EditRequest
    ) -> tuple[Image.Image, np.ndarray]:
        """Inpaint the dilated mask with ``request.prompt``; return the blended image and the region."""
        region = dilate(mask, self.config.mask_dilation)
        width, height = working_size(image.width, image.height, self.config.resolution)
        options = {}
        if self.accepts_negative and self.config.negative_prompt:
            options["negative_prompt"] = self.config.negative_prompt.replace("{object}", request.class_origin)
        mask_image = Image.fromarray(region.astype(np.uint8) * 255, mode="L")
        result = self.pipe(
            prompt=request.prompt, image=image.resize((width, height), Image.Resampling.BICUBIC),
            mask_image=mask_image.resize((width, height), Image.Resampling.NEAREST), height=height, width=width,
            num_inference_steps=self.config.num_inference_steps, guidance_scale=self.config.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(request.seed), output_type="pil", **options,
        ).images[0]  # fmt: skip
        result = result.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)
        blended = np.where(region[..., None], np.asarray(result), np.asarray(image.convert("RGB")))
        return Image.fromarray(blended.astype(np.uint8), mode="RGB"), region
