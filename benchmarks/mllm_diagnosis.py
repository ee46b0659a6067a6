"""Does the MLLM foundation read the image, and what are its wrong answers? (issue 13's diagnosis).

Scores an MLLM foundation export on the held-out questions of ``SceneQuestionDataModule`` (seed 0, 512,
an equal share per kind) three times: with each question's own image, with the images shuffled among the
questions, and with zero images; then sorts the wrong answers of the object-naming kinds into "another
object of the scene" and "an object not in the scene", splits the "where" answers into their row and
column (which half of the place it gets right), and counts prompt tokens per kind::

    python benchmarks/mllm_diagnosis.py checkpoints/tiny/foundations/mllm/export
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from insightedit.data.foundation_captions import HELD_OUT_STREAM
from insightedit.data.scene_chat import conversation
from insightedit.data.scene_questions import QUESTION_KINDS, ask
from insightedit.data.scenes import Scene, random_scene
from insightedit.models.foundations.mllm import AnswerTally, ConversationEncoder, generate_answers, normalise_answer

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


def main() -> None:
    """Print accuracy with true / shuffled / zero images, the wrong answers' kinds and the prompt lengths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an MLLM foundation export folder")
    parser.add_argument("--count", type=int, default=512, help="held-out questions")
    args = parser.parse_args()
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
        print(f"{name}: accuracy {tally.accuracy():.3f} ({per_kind})")
    wrong: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (item, scene), guess in zip(rows, predicted["own images"], strict=True):
        if item["kind"] not in NAMING_KINDS:
            continue
        guess = normalise_answer(guess)
        names = {obj.name for obj in scene.objects}
        verdict = "right" if guess == item["answer"] else "in scene" if guess in names else "not in scene"
        wrong[item["kind"]][verdict] += 1
    for kind, counts in wrong.items():
        print(f"{kind}: {counts['right']} right, {counts['in scene']} another object of the scene, "
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
        print(f"where: row right {rows_right}/{asked_where}, column right {columns_right}/{asked_where}; "
              f"answers given: {dict(guesses.most_common())}")  # fmt: skip
    lengths = collections.defaultdict(list)
    image_id = int(llava.config.image_token_id)
    for item in items:
        head = encoder.head(item["question"])
        lengths[item["kind"]].append(len(head) - head.count(image_id))
    print("prompt tokens besides the image's (mean): " + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in lengths.items()))


if __name__ == "__main__":
    main()
