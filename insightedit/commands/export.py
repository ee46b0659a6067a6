"""``insightedit export``: a checkpoint of any member → a self-contained model folder for ``edit`` and ``demo``.

The :class:`EditorSystem` is rebuilt from the checkpoint's hyperparameters (its ``member``, the frozen
parts from their presets or named weights), the trained weights are loaded, and
:meth:`EditPipeline.save_pretrained` writes the member's parts one by one (layout:
:mod:`insightedit.pipeline.folder`). A tiny model's folder holds every weight. A full-size folder of a
member with an MLLM references the frozen LLaVA base by the hub id or folder the checkpoint was trained
on, unless ``--include-base`` copies it (13.5 GB); everything else (LoRA, [MM] rows, bridge or head,
UNet, VAE, text encoder) is included.

The folder is written to a hidden temporary folder beside ``--out``, checked (every weight file and
config reads back whole) and only then renamed to ``--out``: a full disk or a crash never leaves a
half-written model folder, and with ``--overwrite`` the old folder stays until the new one is complete.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from insightedit.atomic_write import OutputNotWritten, atomic_folder, check_writable_folder, explain
from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError


def load_system(ckpt_path: str | Path, training_seed: int = 0) -> tuple[Any, int | None]:
    """The :class:`EditorSystem` of any member's checkpoint, rebuilt for inference, and the data's resolution.

    The system is built after ``torch.manual_seed(training_seed)``, as LightningCLI builds it after
    ``seed_everything``, so random buffers that a checkpoint does not keep come out as they were in
    training when the seeds agree; a note names any buffer the member says a checkpoint must keep
    (:meth:`Editor.persistent_buffers`) that this one lacks.
    """
    import torch

    from insightedit.models.zoo import get_member
    from insightedit.systems.editor_system import EditorSystem
    from insightedit.training.safe_load import load_checkpoint

    path = Path(ckpt_path)
    checkpoint = load_checkpoint(path)  # weights only: a file that would run code is refused in one line
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or "preset" not in hparams:
        raise UserError(f"{path} is not an InsightEdit system checkpoint (no system hyperparameters)")
    member = get_member(str(hparams.get("member", "insightedit")))  # checkpoints from before the zoo: insightedit
    overrides: dict[str, Any] = {"init_from": None}
    if "bridging" in member.sections:  # the CLIP tower that supervised the IAA Mapper is not exported
        overrides["bridging"] = {**(hparams.get("bridging") or {}), "clip_pretrained": None}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(training_seed)
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        system = EditorSystem.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    kept = {f"editor.{name}" for name in system.editor.persistent_buffers()}
    rebuilt = sorted(kept - set(checkpoint["state_dict"]))
    if rebuilt:
        print(f"note: {path} lacks buffers {rebuilt}; rebuilt under seed {training_seed}", file=sys.stderr)
    resolution = (checkpoint.get("datamodule_hyper_parameters") or {}).get("resolution")
    return system.eval(), (int(resolution) if resolution else None)


def export(
    ckpt_path: str | Path,
    out: str | Path,
    include_base: bool = False,
    overwrite: bool = False,
    training_seed: int = 0,
) -> Path:
    """Write the model folder of ``ckpt_path`` (any member) to ``out``; return ``out``."""
    from safetensors import SafetensorError

    from insightedit.pipeline import EditPipeline
    from insightedit.pipeline.folder import read_model_index

    out = Path(out)
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_writable_folder(out.parent, f"the model folder {out.name}")  # before the checkpoint is read
    system, resolution = load_system(ckpt_path, training_seed)
    pipeline = EditPipeline.from_system(system, resolution=resolution)
    base = None
    if pipeline.preset == "full" and pipeline.mllm is not None and not include_base:
        base = (system.hparams.get("comprehension") or {}).get("pretrained")
        if not base:
            raise UserError("the checkpoint names no LLaVA base (comprehension.pretrained); use --include-base")
    kept = f"the existing {out} is unchanged" if occupied else "nothing was left behind"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out) as staging:
            pipeline.save_pretrained(staging, base=base)
            try:
                read_model_index(staging)  # every file reads back whole (a full disk can truncate silently)
            except UserError as error:
                raise OSError(f"the written folder does not read back ({error})") from error
    except (OSError, SafetensorError) as error:
        raise OutputNotWritten(f"cannot write the model folder {out}: {explain(error)}; {kept}") from error
    return out


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit export``."""
    parser = CommandParser(prog="insightedit export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a checkpoint of EditorSystem (any member)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument(
        "--include-base", action="store_true", help="copy the frozen LLaVA base too (full size; tiny always does)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--training-seed", type=int, default=0, help="seed_everything of the training run (default 0, as the yamls)"
    )
    args = parser.parse_args(argv)
    folder = export(args.ckpt_path, args.out, args.include_base, args.overwrite, args.training_seed)
    print(f"exported {args.ckpt_path} to {folder}")
    return 0
