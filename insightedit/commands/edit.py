"""``insightedit edit``: edit one image with an exported model folder (any member of the zoo) and save the result.

Everything the user gives is checked before the model is loaded, and every problem (a missing or
non-image file, an image too large to decode safely, an empty instruction, an unreadable model folder,
an output name PIL cannot write, an output folder that is not writable) is one ``error:`` line and exit
status 2. The image is written atomically (temporary file beside it, fsync, rename): a failed write (a
full or read-only disk) is one line too and leaves an existing file at ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from insightedit.atomic_write import OutputNotWritten, atomic_write, check_writable_file, explain
from insightedit.commands.parsing import CommandParser
from insightedit.errors import UserError
from insightedit.image_reader import DEFAULT_MAX_PIXELS  # light: the pipeline (torch) loads after the arguments

SCHEDULER_NAMES = ("ddim", "euler_a", "dpm++")
MEMORY_MODE_NAMES = ("full", "low", "sequential")  # EditPipeline's memory_mode


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose how the model folder is loaded (shared with ``demo``)."""
    parser.add_argument("--model", required=True, type=Path, help="folder written by 'insightedit export'")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16/fp16 on a GPU, fp32 on the CPU), float32, bfloat16, float16"
    )
    bits = parser.add_mutually_exclusive_group()
    bits.add_argument(
        "--4bit", dest="quantization", action="store_const", const="4bit",
        help="load the MLLM's language model in 4 bit (bitsandbytes NF4; members with an MLLM)",
    )  # fmt: skip
    bits.add_argument(
        "--8bit", dest="quantization", action="store_const", const="8bit",
        help="load the MLLM's language model in 8 bit (bitsandbytes LLM.int8; members with an MLLM)",
    )  # fmt: skip
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--memory",
        choices=MEMORY_MODE_NAMES,
        default="full",
        help="where the weights live during an edit: full (all on the accelerator; fastest), low (what reads the "
        "instruction, e.g. the MLLM and bridge, then the UNet and VAE, take turns on it), sequential (as low, and "
        "the MLLM stays in CPU memory and streams to the accelerator one layer at a time: least memory, ~2.2 GiB "
        "at 512x512 for full-size InsightEdit, slowest; not with --4bit/--8bit; members without an MLLM: as low). "
        "Default: full",
    )
    memory.add_argument(
        "--low-memory", dest="memory", action="store_const", const="low", help="the same as --memory low"
    )


def load_model(args: argparse.Namespace) -> Any:
    """The :class:`~insightedit.pipeline.EditPipeline` that :func:`add_model_arguments`' options describe."""
    from insightedit.pipeline import EditPipeline

    return EditPipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        memory_mode=args.memory,
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse model options that cannot go together, before anything is loaded."""
    if args.memory == "sequential" and args.quantization:
        flag = f"--{args.quantization}"
        raise UserError(f"--memory sequential streams the 16-bit MLLM; with {flag} use --memory low")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``insightedit edit``."""
    parser = CommandParser(prog="insightedit edit", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, type=Path, help="the image to edit")
    parser.add_argument("--instruction", required=True, help="what to change, in words")
    parser.add_argument("--out", required=True, type=Path, help="where to write the edited image (.png, .jpg...)")
    parser.add_argument(
        "--lambda", dest="image_scale", type=float, default=None, metavar="LAMBDA",
        help="λ, the image branch's weight (members with one; default: the model folder's own, 1.0 in the shipped "
        "configs)",
    )  # fmt: skip
    parser.add_argument("--text-guidance", type=float, default=7.5, help="text guidance scale s_T (default 7.5)")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale s_I (default 1.5)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim", help="sampler (default ddim)")
    parser.add_argument(
        "--resolution", type=int, default=None, metavar="N", help="working size ≈ N² pixels (default: the model's)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"refuse larger images, against decompression bombs (default {DEFAULT_MAX_PIXELS:,})",
    )  # fmt: skip
    return parser


class StatusLine:
    """What ``edit`` is doing, as one line on ``stream`` rewritten in place, when ``stream`` is a terminal.

    Nothing is written otherwise (logs and captured output get only the final ``wrote ...`` line); the
    line is erased when the block ends, so an error or the result prints on a clean line.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())

    def show(self, text: str) -> None:
        """Replace the line with ``text``."""
        if self.live:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the line."""
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def check_output(path: Path) -> str:
    """The PIL format to write ``path`` in; raise :class:`UserError` if ``path`` cannot be written.

    Checked before any work: a file name PIL can write, not a folder, in a folder that exists (or can be
    created) and is writable.
    """
    extension = path.suffix.lower()
    formats = Image.registered_extensions()
    if extension not in formats or formats[extension] not in Image.SAVE:
        raise UserError(f"cannot write an image named {path} (use .png, .jpg, .webp...)")
    check_writable_file(path, "the edited image")
    return formats[extension]


def save_image(image: Image.Image, path: Path, image_format: str) -> None:
    """Write ``image`` to ``path`` atomically; a failed write is an :class:`OutputNotWritten` line."""
    existed = path.is_file()
    try:
        with atomic_write(path) as stream:
            image.save(stream, format=image_format)
    except OSError as error:
        kept = f"the existing {path.name} is unchanged" if existed else "no file was left"
        raise OutputNotWritten(f"cannot write the edited image {path}: {explain(error)}; {kept}") from error


def main(argv: list[str]) -> int:
    """Entry point of ``insightedit edit``."""
    args = build_parser().parse_args(argv)
    if not args.instruction.strip():
        raise UserError("the instruction is empty: say what to change")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    check_model_arguments(args)
    out_format = check_output(args.out)
    from insightedit.pipeline.images import read_image

    source = read_image(args.image, max_pixels=args.max_pixels)
    with StatusLine(sys.stderr) as status:
        status.show(f"loading {args.model} ...")
        pipeline = load_model(args)
        if args.image_scale is not None and not pipeline.has_image_branch:
            status.clear()
            print(f"note: member {pipeline.member} has no image branch; --lambda changes nothing", file=sys.stderr)
        status.show(
            f"editing {args.image.name}: {args.steps} denoising steps ({args.scheduler}) on {pipeline.device} ..."
        )
        result = pipeline(
            source,
            args.instruction,
            image_scale=args.image_scale,
            text_guidance=args.text_guidance,
            image_guidance=args.image_guidance,
            num_inference_steps=args.steps,
            seed=args.seed,
            scheduler=args.scheduler,
            resolution=args.resolution,
        )
    edited = result.images[0]
    save_image(edited, args.out, out_format)
    timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.timings.items())
    print(f"wrote {args.out} ({edited.width}x{edited.height}; {timings})")
    return 0
