"""Does the MLLM foundation read the image, and what are its wrong answers? (issue 13's diagnosis).

Scores an MLLM foundation export on the held-out questions of ``SceneQuestionDataModule`` (seed 0, 512,
an equal share per kind) three times: with each question's own image, with the images shuffled among the
questions, and with zero images; then sorts the wrong answers of the object-naming kinds into "another
object of the scene" and "an object not in the scene", splits the "where" answers into their row and
column (which half of the place it gets right), counts prompt tokens per kind, and probes where an image
patch's place goes: a linear least-squares probe of each patch token's grid row and column from its
features at the vision tower's embeddings and at the layer the projector reads, after the trained
projector, and after the same projector re-initialised (fit on 200 scenes, scored on 100)::

    python benchmarks/mllm_diagnosis.py checkpoints/tiny/foundations/mllm/export --out benchmarks/results

``--out`` writes the printed report to ``mllm_diagnosis.md`` with the command, commit and date.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from insightedit.data.foundation_captions import HELD_OUT_STREAM, normalize_image
from insightedit.data.scene_chat import conversation
from insightedit.data.scene_questions import QUESTION_KINDS, ask
from insightedit.data.scenes import Scene, random_scene
from insightedit.models.foundations.mllm import AnswerTally, ConversationEncoder, generate_answers, normalise_answer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

NAMING_KINDS = ("smallest", "largest", "left_of", "above")
MAX_DRAWS = 100  # as insightedit.data.scene_chat


def held_out(count: int, seed: int = 0) -> list[tuple[dict, Scene]]:
    """The held-out conversations, each with the scene it asks about (redrawn as ``conversation`` draws it)."""
    rows = []
    for index in range(count):
        kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
        item = conversation(seed, HELD_OUT_STREAM, index, QUESTION_KINDS, kind=kind)
        rng = np.random.default_rng([seed, HELD_OUT_STREAM, index])
        for _ in range(MAX_DRAWS):
            scene = random_scene(rng, 32, max_objects=3)
            asked = ask(scene, kind, rng)
            if asked is not None:
                break
        assert asked is not None and asked.answer == item["answer"]
        rows.append((item, scene))
    return rows


def place_parts(phrase: str) -> tuple[str, str]:
    """(row, column) of a place phrase of :func:`insightedit.data.scenes.where`: ``in the top left`` ->
    ``("top", "left")``, ``on the right`` -> ``("middle", "right")``, ``at the top`` -> ``("top", "centre")``;
    ``("?", "?")`` for anything else."""
    words = phrase.split()
    middle_row = phrase.startswith(("on the", "in the centre"))
    centre_column = phrase.startswith(("at the", "in the centre"))
    row = next((w for w in words if w in ("top", "bottom")), "middle" if middle_row else "?")
    column = next((w for w in words if w in ("left", "right")), "centre" if centre_column else "?")
    return row, column


def answers(llava, encoder, pixels: torch.Tensor, questions: list[str], batch: int = 128) -> list[str]:
    """Greedy answers in batches."""
    out: list[str] = []
    for start in range(0, len(questions), batch):
        out += generate_answers(llava, encoder, pixels[start : start + batch], questions[start : start + batch])
    return out


def probe_accuracy(features: torch.Tensor, fit: int) -> dict[str, float]:
    """Held-out accuracy of linear probes of each patch token's grid row and column from ``features`` (N, T, D).

    Least squares onto one-hot labels with a bias, fit on the first ``fit`` images' tokens, scored on the rest.
    """
    count, tokens, width = features.shape
    side = round(tokens**0.5)
    index = torch.arange(tokens)
    inputs = torch.cat([features.reshape(-1, width), torch.ones(count * tokens, 1)], dim=1).double()
    split = fit * tokens
    scores = {}
    for name, label in (("row", index // side), ("column", index % side)):
        labels = label.repeat(count)
        targets = torch.nn.functional.one_hot(labels, side).double()
        weights = torch.linalg.lstsq(inputs[:split], targets[:split]).solution
        scores[name] = float(((inputs[split:] @ weights).argmax(1) == labels[split:]).float().mean())
    return scores


@torch.no_grad()
def position_probe(llava, scenes: int = 300, fit: int = 200, seed: int = 5) -> list[tuple[str, dict[str, float]]]:
    """Row and column probe accuracy at the tower's embeddings, the projector's input and output (trained and
    re-initialised), on ``scenes`` scenes drawn as the held-out questions draw them."""
    rng = np.random.default_rng(seed)
    pixels = torch.stack([normalize_image(random_scene(rng, 32, max_objects=3).render()) for _ in range(scenes)])
    hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    read = hidden[llava.config.vision_feature_layer][:, 1:]  # the patch tokens the projector reads (no CLS)
    fresh = copy.deepcopy(llava.model.multi_modal_projector)
    torch.manual_seed(0)
    for module in fresh.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return [
        ("the tower's embeddings (patch + position)", probe_accuracy(hidden[0][:, 1:], fit)),
        (f"tower, layer {llava.config.vision_feature_layer} (the projector's input)", probe_accuracy(read, fit)),
        (
            "after the trained projector (what the LLM reads)",
            probe_accuracy(llava.model.multi_modal_projector(read), fit),
        ),
        ("after the projector re-initialised", probe_accuracy(fresh(read), fit)),
    ]


def main() -> None:
    """Print accuracy with true / shuffled / zero images, the wrong answers' kinds and the prompt lengths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an MLLM foundation export folder")
    parser.add_argument("--count", type=int, default=512, help="held-out questions")
    parser.add_argument("--out", type=Path, default=None, help="write the report to <out>/mllm_diagnosis.md")
    args = parser.parse_args()
    if not (Path(args.export) / "config.json").is_file():
        parser.error(f"{args.export}: no MLLM foundation export (no config.json); `insightedit foundations` builds one")
    report: list[str] = []

    def say(line: str) -> None:
        """A line of the report: to the console and to the results file."""
        report.append(line)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    torch.set_num_threads(1)
    llava = LlavaForConditionalGeneration.from_pretrained(args.export).eval()
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(args.export), llava)
    rows = held_out(args.count)
    items = [item for item, _ in rows]
    pixels = torch.stack([item["pixels"] for item in items])
    questions, truth, kinds = ([item[k] for item in items] for k in ("question", "answer", "kind"))
    shuffled = pixels[torch.randperm(len(items), generator=torch.Generator().manual_seed(0))]
    predicted = {}
    for name, images in (("own images", pixels), ("shuffled images", shuffled), ("zero images", 0 * pixels)):
        predicted[name] = answers(llava, encoder, images, questions)
        tally = AnswerTally()
        tally.add(predicted[name], truth, kinds)
        per_kind = ", ".join(f"{k} {v:.2f}" for k, v in tally.per_kind().items())
        say(f"{name}: accuracy {tally.accuracy():.3f} ({per_kind})")
    wrong: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (item, scene), guess in zip(rows, predicted["own images"], strict=True):
        if item["kind"] not in NAMING_KINDS:
            continue
        guess = normalise_answer(guess)
        names = {obj.name for obj in scene.objects}
        verdict = "right" if guess == item["answer"] else "in scene" if guess in names else "not in scene"
        wrong[item["kind"]][verdict] += 1
    for kind, counts in wrong.items():
        say(f"{kind}: {counts['right']} right, {counts['in scene']} another object of the scene, "
              f"{counts['not in scene']} an object not in it")  # fmt: skip
    rows_right = columns_right = asked_where = 0
    guesses: collections.Counter = collections.Counter()
    for item, guess in zip(items, predicted["own images"], strict=True):
        if item["kind"] != "where":
            continue
        asked_where += 1
        guess = normalise_answer(guess)
        guesses[guess] += 1
        true_row, true_column = place_parts(item["answer"])
        row, column = place_parts(guess)
        rows_right += row == true_row
        columns_right += column == true_column
    if asked_where:
        say(f"where: row right {rows_right}/{asked_where}, column right {columns_right}/{asked_where}; "
              f"answers given: {dict(guesses.most_common())}")  # fmt: skip
    lengths = collections.defaultdict(list)
    image_id = int(llava.config.image_token_id)
    for item in items:
        head = encoder.head(item["question"])
        lengths[item["kind"]].append(len(head) - head.count(image_id))
    say("prompt tokens besides the image's (mean): " + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in lengths.items()))
    for place, scores in position_probe(llava):
        say(f"patch place, linear probe, {place}: row {scores['row']:.3f}, column {scores['column']:.3f}")
    if args.out is not None:
        made = provenance()
        head = [f"# The MLLM foundation's diagnosis ({args.export})", "",
                f"`{made['command']}` at `{made['commit']}`, {made['date']}.", "", "```"]  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mllm_diagnosis.md").write_text("\n".join([*head, *report, "```", ""]))


if __name__ == "__main__":
    main()
