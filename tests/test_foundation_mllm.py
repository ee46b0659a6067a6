"""The tiny MLLM foundation: scene questions, its data, the two phases, the accuracy metric and the export."""

import json

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer
from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration

from insightedit.data.scene_chat import SceneQuestionDataModule, conversation
from insightedit.data.scene_questions import CAPTION_KIND, QUESTION_KINDS, ask, questions
from insightedit.data.scenes import Scene, SceneObject
from insightedit.errors import UserError
from insightedit.models.comprehension.presets import TINY_VISION_CONFIG, build_comprehension
from insightedit.models.foundations.export import FOUNDATION_FILE
from insightedit.models.foundations.mllm import (
    AnswerTally,
    ConversationEncoder,
    build_foundation_llava,
    normalise_answer,
)
from insightedit.models.loading import load_pretrained
from insightedit.systems.foundation_mllm import MllmFoundation

# a large red circle bottom left, a small blue square bottom right, a green triangle top right (32 px):
# the circle is left of the square, the triangle above it; every other pair lies on a diagonal (no relation)
CIRCLE, SQUARE, TRIANGLE = SceneObject("circle", "red", 7, 24, 5), SceneObject("square", "blue", 25, 24, 2), \
    SceneObject("triangle", "green", 25, 6, 4)  # fmt: skip
SCENE = Scene(32, ("grey",), "none", (CIRCLE, SQUARE, TRIANGLE))


def _asked(kind, seeds=range(20)):
    return [ask(SCENE, kind, np.random.default_rng(seed)) for seed in seeds]


def test_questions_about_a_hand_built_scene_have_the_right_answers():
    assert {q.answer for q in _asked("smallest")} == {"blue square"}
    assert {q.answer for q in _asked("largest")} == {"red circle"}
    assert {q.answer for q in _asked("count")} == {"3"}
    for q in _asked("left_of"):  # only the square has exactly one object clearly to its left
        assert q.answer == "red circle" and q.question.endswith(("the square?", "the blue square?")), q
    for q in _asked("above"):
        assert q.answer == "green triangle" and "square" in q.question, q
    colours = {"circle": "red", "square": "blue", "triangle": "green"}
    places = {"circle": "in the bottom left", "square": "in the bottom right", "triangle": "in the top right"}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        q = ask(SCENE, "colour", rng)
        assert q.answer == colours[next(s for s in colours if s in q.question)], q
        q = ask(SCENE, "where", rng)
        assert q.answer == places[next(s for s in places if s in q.question)], q
    checked = 0
    for q in _asked("rewrite", range(80)):
        assert q.answer.startswith(("remove the ", "change the ")), q
        if "the smallest object" in q.question:
            assert q.answer.startswith(("remove the blue square", "change the blue square to ")), q
            checked += 1
        if "the largest object" in q.question:
            assert q.answer.startswith(("remove the red circle", "change the red circle to ")), q
            checked += 1
    assert checked >= 2
    assert ask(SCENE, CAPTION_KIND, np.random.default_rng(0)).answer  # a caption of the scene
    assert [q.kind for q in questions(SCENE, np.random.default_rng(0))] == list(QUESTION_KINDS)


def test_questions_are_not_asked_where_the_answer_is_ambiguous():
    one = Scene(32, ("grey",), "none", (CIRCLE,))
    for kind in ("smallest", "largest", "left_of", "above"):
        assert ask(one, kind, np.random.default_rng(0)) is None
    # two squares of radius 3 and 3: no smallest; on a diagonal: no relation; on a cell border: no place
    squares = (SceneObject("square", "red", 5, 5, 3), SceneObject("square", "blue", 20, 21, 3))
    twins = Scene(32, ("grey",), "none", squares)
    for kind in ("smallest", "largest", "left_of", "above", "colour"):
        assert ask(twins, kind, np.random.default_rng(0)) is None, kind
    assert ask(twins, "where", np.random.default_rng(0)).answer == "in the top left"  # (20, 21) is at a border


def test_data_is_deterministic_balanced_and_held_out_differs():
    a = SceneQuestionDataModule(num_val=16, batch_size=4)
    b = SceneQuestionDataModule(num_val=16, batch_size=4)
    a.setup(), b.setup()
    texts = [[x["question"] + x["answer"] for x in m.held_out.items] for m in (a, b)]
    assert texts[0] == texts[1]
    assert [x["kind"] for x in a.held_out.items] == list(QUESTION_KINDS) * 2
    train = next(iter(a.train_dataloader()))
    assert train["pixels"].shape == (4, 3, 32, 32) and len(train["caption"]) == 4
    held = a.held_out.items[0]
    assert not any(torch.equal(held["pixels"], p) for p in train["pixels"])
    assert torch.equal(conversation(0, 0, 3, QUESTION_KINDS)["pixels"], train["pixels"][3])


def test_answer_accuracy_is_exact_match_after_case_and_space():
    tally = AnswerTally()
    kinds = ["smallest", "smallest", "count"]
    tally.add(["Red  Circle ", "blue square", "2"], ["red circle", "blue circle", "2"], kinds)
    tally.add(["in the top", "in the top left"], ["in the top left", "in the top left"], ["where", "where"])
    assert tally.accuracy() == pytest.approx(3 / 5)
    assert tally.per_kind() == {"smallest": 0.5, "count": 1.0, "where": 0.5}
    assert normalise_answer("  In THE\ttop  left ") == "in the top left"
    assert AnswerTally().accuracy() == 0.0


def test_only_the_answer_and_its_end_token_are_labelled():
    llava, tokenizer = build_foundation_llava()
    encoder = ConversationEncoder(tokenizer, llava)
    batch = encoder(["What is above the square?", "How many objects are there?"], ["green triangle", "3"])
    for row, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        kept = [t for t in labels if t != -100]
        assert row[-len(kept):] == kept and kept[-1] == tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in row if t != -100]) for row in batch.labels.tolist()]
    assert texts == ["green triangle</s>", "3</s>"]
    assert batch.input_ids[0].tolist().count(llava.config.image_token_id) == 64  # one per patch of the 8x8 grid
    # head + answer tokenised apart == the whole turn tokenised at once
    head = encoder.prompts.head("What is above the square?")
    whole = encoder.prompts._expand_image(tokenizer(head + " green triangle")["input_ids"]) + [tokenizer.eos_token_id]
    assert batch.input_ids[0].tolist()[-len(whole):] == whole


def _clip_export(path):
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99},
        vision_config=dict(TINY_VISION_CONFIG), projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(3)
    clip = CLIPModel(config)
    clip.save_pretrained(path)
    return clip


def test_the_vision_tower_is_read_from_a_clip_export_and_a_missing_one_is_one_line(tmp_path):
    clip = _clip_export(tmp_path / "clip")
    llava, _ = build_foundation_llava(tmp_path / "clip")
    theirs = clip.vision_model.state_dict()
    ours = llava.model.vision_tower.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(UserError, match="no CLIP foundation export at .*insightedit foundations"):
        build_foundation_llava(tmp_path / "absent")


class _Snapshots(Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in module.llava.state_dict().items()})


def _changed(before, after, prefix):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_fit_trains_projector_then_llm_never_the_vision_tower_and_exports(tmp_path, capsys):
    _clip_export(tmp_path / "clip")
    system = MllmFoundation(vision_tower=str(tmp_path / "clip"), align_steps=2, warmup_steps=1, max_new_tokens=4)
    assert {n.split(".")[2] for n in system.trainable_names()} == {"multi_modal_projector"}
    start = {k: v.clone() for k, v in system.llava.state_dict().items()}
    data = SceneQuestionDataModule(batch_size=4, num_val=8, val_batch_size=8)
    snapshots = _Snapshots()
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=4,
                      default_root_dir=str(tmp_path / "run"), callbacks=[snapshots])  # fmt: skip
    trainer.fit(system, datamodule=data)
    aligned, instructed = snapshots.states[1], snapshots.states[3]
    assert _changed(start, aligned, "model.multi_modal_projector")  # align: the projector only
    assert not _changed(start, aligned, "model.language_model") and not _changed(start, aligned, "lm_head")
    assert _changed(aligned, instructed, "model.multi_modal_projector")  # instruct: projector and whole LLM
    trained = _changed(aligned, instructed, "model.language_model") | _changed(aligned, instructed, "lm_head")
    llm = {k for k in start if k.startswith(("model.language_model", "lm_head"))}
    assert trained == llm - {"model.language_model.norm.weight"} or trained == llm
    assert not _changed(start, instructed, "model.vision_tower")
    # the end of fit measures the model, prints one line and writes the export
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("mllm foundation:")]
    assert len(line) == 1 and "after 4 steps" in line[0]
    export = tmp_path / "run" / "export"
    record = json.loads((export / FOUNDATION_FILE).read_text())
    assert record["kind"] == "mllm" and record["steps"] == 4 and set(record) >= {"metric", "commit", "date"}
    assert 0.0 <= record["metric"]["answer_accuracy"] <= 1.0 and set(record["per_kind"]) == set(QUESTION_KINDS)
    # the validation at step 4 measured it: logged, recorded, and what evaluating the final model again gives
    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(record["metric"]["answer_accuracy"])
    assert system.evaluate(data.val_dataloader()) == {**record["metric"], **record["per_kind"]}

    # the export is the twin's comprehension.pretrained: same logits as the trained model, [MM] rows after it
    model = build_comprehension("tiny", pretrained=str(export), num_mm_tokens=4, lora_rank=0)
    load_pretrained(model)
    assert model.first_mm_id == len(system.tokenizer) and model.tokenizer.convert_tokens_to_ids("[MM0]") == 384
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    turns = system.encoder(["Where is the red circle?", "How many objects are there?"], ["on the left", "2"])
    inputs = {"input_ids": turns.input_ids, "attention_mask": turns.attention_mask,
              "position_ids": turns.position_ids, "pixel_values": pixels}  # fmt: skip
    system.llava.eval(), model.eval()
    with torch.no_grad():
        expected = system.llava(**inputs).logits
        base = model.base_model
        hidden = base.model(**inputs).last_hidden_state
        logits = model.output_rows(hidden)[..., : expected.shape[-1]]
        reloaded = LlavaForConditionalGeneration.from_pretrained(str(export)).eval()(**inputs).logits
    assert torch.equal(reloaded, expected)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_options_read_the_last_vision_layer_and_train_the_tower_in_instruct(tmp_path):
    _clip_export(tmp_path / "clip")
    system = MllmFoundation(vision_tower=str(tmp_path / "clip"), align_steps=1, warmup_steps=1, max_new_tokens=2,
                            vision_feature_layer=-1, train_vision_tower=True)  # fmt: skip
    llava = system.llava
    assert llava.config.vision_feature_layer == -1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the projector reads the tower's last hidden state (CLS dropped), not layer -2
        last = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        features = llava.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.cat(list(features)), llava.model.multi_modal_projector(last).flatten(0, 1))
    start = {k: v.clone() for k, v in llava.state_dict().items()}
    snapshots = _Snapshots()
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(tmp_path / "run"), callbacks=[snapshots])  # fmt: skip
    trainer.fit(system, datamodule=SceneQuestionDataModule(batch_size=4, num_val=8, val_batch_size=8))
    aligned, instructed = snapshots.states
    assert not _changed(start, aligned, "model.vision_tower")  # align: still the projector only
    assert _changed(aligned, instructed, "model.vision_tower")  # instruct: the tower trains too
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["vision_feature_layer"] == -1  # the twin's comprehension model reads the same layer
    with pytest.raises(UserError, match="vision_feature_layer: -4 is not a hidden state"):
        MllmFoundation(vision_feature_layer=-4)
