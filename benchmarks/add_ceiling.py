"""What a templated *add* instruction determines: the in-mask PSNR of editors that read only its facts.

``add a blue triangle in the top left`` names the kind, the colour and the 3x3 cell of the new object, but
not its exact centre or size (the synthetic world draws the radius from 2-5 px and the centre anywhere in
the cell, :func:`insightedit.data.scenes.random_scene`). Remove and replace are fully determined by the
instruction and the source (the named object is unique; a replacement keeps its centre and size), so an
editor can reach any in-mask PSNR on them; on add it cannot. This benchmark measures how far the
instruction's facts can take an editor on add, by the zoo's in-mask PSNR (per image at the data's 32 px,
then averaged), on scenes drawn as the synthetic world draws them (``--scenes``, a fixed seed):

* ``identity``: the source as the edit (the zoo's baseline row);
* ``placed``: the named object painted at the centre of the named cell, at the middle radius — a sharp
  guess, as a decisive editor would draw it;
* ``expected``: each pixel the expected colour over every centre and radius the phrase allows (the
  MSE-optimal prediction from the instruction alone, Monte Carlo over ``--draws`` placements): the
  blurry edit that a regressor converges to.

The zoo's target asks ≥ 3 dB over the identity edit on add; this shows whether the instruction permits it.

    python benchmarks/add_ceiling.py --out benchmarks/results

Writes ``add_ceiling.md`` and ``add_ceiling.json`` (command, commit, date) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

from insightedit.data.scenes import COLOURS, SceneObject, random_scene, where  # noqa: E402
from insightedit.evaluation.metrics import PSNR_CAP_DB, psnr_in_region, to_unit_tensor  # noqa: E402

EDITORS = ("identity", "placed", "expected")


def radius_range(size: int) -> tuple[int, int]:
    """The radii :func:`random_scene` draws from at ``size`` px (inclusive)."""
    return max(2, round(size * 0.07)), max(3, round(size * 0.16))


def psnr_in_mask(edited: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) of uint8-scaled (H, W, 3) images inside ``mask``, capped as the zoo caps it."""
    weights = torch.from_numpy(np.asarray(mask, dtype=np.float64))[None, None]
    scaled = [to_unit_tensor(np.asarray(image, dtype=np.float64) / 255.0) for image in (edited, target)]
    value = psnr_in_region(*scaled, weights)
    assert value is not None, "an add's mask is never empty"
    return value.value


def placements(obj: SceneObject, size: int, count: int, rng: np.random.Generator) -> list[SceneObject]:
    """``count`` objects of ``obj``'s kind and colour, centred and sized as ``random_scene`` draws, in its cell."""
    low, high = radius_range(size)
    cell, found = where(obj, size), []
    while len(found) < count:
        radius = int(rng.integers(low, high + 1))
        x, y = int(rng.integers(radius, size - radius)), int(rng.integers(radius, size - radius))
        candidate = SceneObject(obj.shape, obj.colour, x, y, radius)
        if where(candidate, size) == cell:
            found.append(candidate)
    return found


def edits(obj: SceneObject, source: np.ndarray, size: int, draws: int, rng: np.random.Generator) -> dict:
    """Each editor's output for adding ``obj`` (known only by kind, colour and cell) to ``source``."""
    allowed = placements(obj, size, draws, rng)
    colour = np.array(COLOURS[obj.colour], dtype=np.float64)
    coverage = np.mean([candidate.mask(size) for candidate in allowed], axis=0)[..., None]
    low, high = radius_range(size)
    centre = SceneObject(
        obj.shape, obj.colour, round(np.mean([c.x for c in allowed])), round(np.mean([c.y for c in allowed])),
        round((low + high) / 2),
    )  # fmt: skip
    placed = source.copy()
    placed[centre.mask(size)] = COLOURS[obj.colour]
    return {"identity": source, "placed": placed, "expected": coverage * colour + (1 - coverage) * source}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score the three editors on every object of ``--scenes`` scenes, write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--size", type=int, default=32, help="the tiny twin's data resolution")
    parser.add_argument("--draws", type=int, default=200, help="placements averaged by the expected editor")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    for option in ("scenes", "draws"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be ≥ 1")
    if args.size < 16:
        parser.error("--size must be ≥ 16 (the synthetic world's smallest)")
    started = time.perf_counter()
    scenes, draws = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1)
    scores: dict[str, list[float]] = {name: [] for name in EDITORS}
    for _ in range(args.scenes):
        scene = random_scene(scenes, args.size)
        target = scene.render()
        for index, obj in enumerate(scene.objects):
            source, mask = scene.without(index).render(), obj.mask(args.size)
            for name, edited in edits(obj, source, args.size, args.draws, draws).items():
                scores[name].append(psnr_in_mask(edited, target, mask))
    identity = float(np.mean(scores["identity"]))
    summary = {
        name: {
            "psnr_in_mask": float(np.mean(v)),
            "gain_over_identity": float(np.mean(v)) - identity,
            "median": float(np.median(v)),
            "exact": int(sum(p >= PSNR_CAP_DB for p in v)),
            "n": len(v),
        }
        for name, v in scores.items()
    }
    seconds = round(time.perf_counter() - started, 1)
    results = {**provenance(), "settings": vars(args) | {"out": None}, "seconds": seconds, "editors": summary}
    lines = [
        "# What a templated add instruction determines (in-mask PSNR of editors that read only its facts)",
        "",
        f"`{results['command']}` at `{results['commit']}`, {results['date']}; {summary['identity']['n']} adds "
        f"from {args.scenes} scenes drawn as the synthetic world draws them ({args.size} px, seed {args.seed}); "
        f"{results['seconds']} s. See the docstring of `benchmarks/add_ceiling.py` for the editors.",
        "",
        f"| editor | in-mask PSNR (dB), mean | over the identity edit | median | exact (the {PSNR_CAP_DB:g}-dB cap) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {s['psnr_in_mask']:.2f} | {s['gain_over_identity']:+.2f} | {s['median']:.2f} | {s['exact']} |"
            for name, s in summary.items()
        ),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "add_ceiling.md").write_text("\n".join(lines))
    (args.out / "add_ceiling.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
