"""``insightedit data build``: the AdvancedEdit construction pipeline (caption → masks → edits → instructions → filter).

Modules: :mod:`.config` (the yaml), :mod:`.roles` (what each step asks of a backend), :mod:`.chat` and
:mod:`.prompts` (OpenAI-compatible and transformers chat backends), :mod:`.models` (GroundedSAM and
diffusers inpainting), :mod:`.oracle` (exact backends for synthetic photos), :mod:`.steps` (the five
steps), :mod:`.store` (atomic per-(image, step) commits), :mod:`.runner` (Lightning predict jobs over
shards) and :mod:`.summary` (manifest, counts, pass rate). Guide: docs/data.md.
"""

from insightedit.data.build.config import BuildConfig, load_config, parse_steps
from insightedit.data.build.oracle import render_photos
from insightedit.data.build.runner import build_dataset

__all__ = ["BuildConfig", "build_dataset", "load_config", "parse_steps", "render_photos"]
