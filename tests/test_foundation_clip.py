"""The tiny CLIP foundation: scene captions, its data, the retrieval metric, a short fit and its export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _training_runs import REPO, environment, fit_command
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel, LlavaForConditionalGeneration

from insightedit.data.foundation_captions import (
    CaptionStream,
    HeldOutCaptions,
    SceneCaptionDataModule,
    caption_pair,
    shape_twin,
)
from insightedit.data.images import clip_preprocess
from insightedit.data.scene_captions import (
    MAX_TOKENS,
    largest_index,
    scene_captions,
    size_word,
    token_count,
    true_captions,
)
from insightedit.data.scenes import Scene, SceneObject, random_scene, to_image
from insightedit.errors import UserError
from insightedit.models.bridging.presets import build_bridging
from insightedit.models.comprehension.presets import TINY_VISION_CONFIG, tiny_llava_config
from insightedit.models.comprehension.tiny_tokenizer import train_tiny_tokenizer
from insightedit.models.foundations.clip import TinyClip, retrieval_top1, tiny_clip_config
from insightedit.models.foundations.export import FOUNDATION_FILE
from insightedit.models.loading import load_pretrained
from insightedit.models.text_encoder import tiny_clip_text_config
from insightedit.systems.foundation_clip import FoundationClipSystem

RECIPE = REPO / "lightning_configs" / "tiny" / "foundations" / "clip.yaml"
STEPS = 4  # a multiple of the checkpoint interval (2): last.ckpt holds the exported weights
# a large red circle bottom left, a small blue square bottom right, a small green triangle top right (32 px)
CIRCLE, SQUARE, TRIANGLE = SceneObject("circle", "red", 7, 24, 5), SceneObject("square", "blue", 25, 24, 2), \
    SceneObject("triangle", "green", 25, 6, 3)  # fmt: skip
SCENE = Scene(32, ("grey",), "none", (CIRCLE, SQUARE, TRIANGLE))


def test_captions_of_a_hand_built_scene() -> None:
    captions = scene_captions(SCENE, np.random.default_rng(0))
    assert captions[0] == "a red circle, a green triangle and a blue square on grey"  # left to right
    assert [size_word(o, 32) for o in SCENE.objects] == ["large", "small", "small"]
    assert largest_index(SCENE) == 0
    assert not any("bottom" in c for c in captions)  # three objects' places are over 77 tokens: left out
    two = Scene(32, ("grey",), "none", (CIRCLE, TRIANGLE))
    assert "a red circle in the bottom left and a green triangle in the top right on grey" in scene_captions(
        two, np.random.default_rng(0)
    )
    sizes = next(c for c in captions if "small" in c)
    for word in ("a large red circle", "a small blue square", "a small green triangle"):
        assert word in sizes
    largest = next(c for c in captions if "largest" in c)
    assert largest.startswith("the red circle is the largest, beside a ")
    relation = next(c for c in captions if " of " in c or "above" in c or "below" in c)
    expected = {  # what the first-named object is to the second, whichever pair the seed put first
        ("red circle", "blue square"): "left of", ("blue square", "red circle"): "right of",
        ("green triangle", "blue square"): "above", ("blue square", "green triangle"): "below",
        ("red circle", "green triangle"): "left of", ("green triangle", "red circle"): "right of",
    }  # fmt: skip
    assert any(relation.startswith(f"a {a} {word} a {b}") for (a, b), word in expected.items()), relation
    one = Scene(32, ("grey", "beige"), "vertical", (SQUARE,))
    assert scene_captions(one, np.random.default_rng(0))[:3] == [
        "a blue square on grey and beige", "a small blue square on grey and beige",
        "a blue square in the bottom right on grey and beige",
    ]  # fmt: skip


def _drawn(seed: int, index: int) -> tuple[Scene, list[str]]:
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng, 32)
    return scene, scene_captions(scene, rng)


def test_captions_name_every_object_fit_the_tokenizer_and_are_deterministic() -> None:
    tokenizer = TinyClip().tokenizer
    phrasings = 0
    for index in range(200):
        scene, captions = _drawn(7, index)
        assert captions == _drawn(7, index)[1]
        phrasings += len(captions)
        for caption in captions:
            assert len(tokenizer(caption).input_ids) == token_count(caption) <= MAX_TOKENS, caption
            for obj in scene.objects:
                assert obj.name in caption or (obj.colour in caption and obj.shape in caption), caption
    assert phrasings >= 3 * 200  # several phrasings per scene
    first, again = caption_pair(3, 0, 5), caption_pair(3, 0, 5)
    assert first["caption"] == again["caption"] and torch.equal(first["pixels"], again["pixels"])


def test_pixels_are_the_projects_clip_preprocessing_and_streams_are_disjoint() -> None:
    rng = np.random.default_rng([0, 0, 4])
    scene = random_scene(rng, 32)
    expected = clip_preprocess(32)(to_image(scene.render()))
    torch.testing.assert_close(caption_pair(0, 0, 4)["pixels"], expected, rtol=0, atol=1e-6)
    held_out = HeldOutCaptions(0, 8)
    stream = CaptionStream(0, batch_size=4)
    batches = iter(stream)
    train = [next(batches) for _ in range(2)]
    assert train[1]["caption"] == stream.batch(1)["caption"]
    train_pixels = torch.cat([b["pixels"] for b in train])
    for item in held_out.items:  # other seeds: no held-out image is a training image
        assert not any(torch.equal(item["pixels"], p) for p in train_pixels)
    resumed = next(iter(CaptionStream(0, batch_size=4, start=1)))  # a resumed run continues the stream
    assert resumed["caption"] == train[1]["caption"] and torch.equal(resumed["pixels"], train[1]["pixels"])
    module = SceneCaptionDataModule(num_val=8, batch_size=4)
    module.load_state_dict({"next_batch": 5})
    assert next(iter(module.train_dataloader()))["caption"] == stream.batch(5)["caption"]
    held = next(iter(module.val_dataloader()))
    assert len(held["caption"]) == 8  # the held-out set in one batch, each with the captions true of it
    assert all(caption in true for caption, true in zip(held["caption"], held["true_captions"], strict=True))
    assert true_captions(SCENE) >= set(scene_captions(SCENE, np.random.default_rng(5)))
    assert "a blue square, a red circle and a green triangle" not in true_captions(SCENE)  # plain: left to right


def test_a_shape_twin_differs_in_one_object_s_shape_alone() -> None:
    for index in range(40):
        scene = random_scene(np.random.default_rng([3, index]), 32)
        twin = shape_twin(scene, np.random.default_rng(index))
        assert twin is not None and len(twin.objects) == len(scene.objects)
        changed = [(a, b) for a, b in zip(scene.objects, twin.objects, strict=True) if a != b]
        assert len(changed) == 1
        ((old, new),) = changed
        assert new.shape != old.shape and (new.colour, new.x, new.y, new.radius) == (
            old.colour,
            old.x,
            old.y,
            old.radius,
        )
        assert len({o.name for o in twin.objects}) == len(twin.objects)  # names stay distinct
        assert (twin.render() != scene.render()).any(axis=-1).sum() > 0
    # red circle + red square + red triangle: no object can take another shape without repeating a name
    crowded = Scene(32, ("grey",), "none", tuple(SceneObject(s, "red", 6 + 10 * i, 16, 3) for i, s in
                                                 enumerate(("circle", "square", "triangle"))))  # fmt: skip
    assert shape_twin(crowded, np.random.default_rng(0)) is None
    assert shape_twin(Scene(32, ("grey",), "none", ()), np.random.default_rng(0)) is None


def test_shape_twins_pair_up_the_first_share_of_each_batch() -> None:
    plain, twinned = CaptionStream(0, batch_size=8).batch(3), CaptionStream(0, batch_size=8, shape_twins=0.5).batch(3)
    # pairs 1 and 3 are twins of pairs 0 and 2: same colours in the same places, one object reshaped
    for k in range(8):
        same = torch.equal(plain["pixels"][k], twinned["pixels"][k])
        assert same == (k not in (1, 3)), k
    for k in (1, 3):
        previous, twin = twinned["pixels"][k - 1], twinned["pixels"][k]
        differ = (previous != twin).any(dim=0)
        assert 0 < int(differ.sum()) < 60  # one small object's outline, not a new scene
    with pytest.raises(ValueError, match="shape_twins"):
        SceneCaptionDataModule(shape_twins=1.5)


def test_retrieval_top1_on_a_hand_made_case() -> None:
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    # image 0 -> caption 0 (right), image 1 -> caption 2 (wrong), image 2 -> caption 3 (same text as 2: right),
    # image 3 -> caption 3 (right)
    images = torch.tensor([[2.0, 0.1], [-1.0, 0.0], [0.1, -1.0], [0.0, -3.0]])
    captions = ["a", "b", "c", "c"]
    image_to_text, text_to_image = retrieval_top1(images, texts, captions)
    assert image_to_text == pytest.approx(3 / 4)
    # caption 0 -> image 0 (right), 1 -> image 0 (wrong), 2 -> image 1 (wrong: "b"), 3 -> image 3 (right)
    assert text_to_image == pytest.approx(2 / 4)
    # image 1's retrieved caption "c" is true of it too: right when the true captions are given
    true = [frozenset({"a"}), frozenset({"b", "c"}), frozenset({"c"}), frozenset({"c"})]
    assert retrieval_top1(images, texts, captions, true) == (pytest.approx(1.0), pytest.approx(3 / 4))


def test_the_tiny_clip_has_the_twin_s_towers() -> None:
    config = tiny_clip_config()
    assert config.projection_dim == 32
    assert config.text_config.to_dict() == CLIPModel(config).config.text_config.to_dict()
    for key, value in tiny_clip_text_config().to_dict().items():
        if key not in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            assert getattr(config.text_config, key) == value, key
    for key, value in TINY_VISION_CONFIG.items():
        assert getattr(config.vision_config, key) == value, key


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The recipe for a few steps (small batches, 16 held-out scenes, CSV logs), run by ``insightedit fit``."""
    base = tmp_path_factory.mktemp("clip-foundation")
    root = base / "clip"
    config = yaml.safe_load(RECIPE.read_text())
    config["trainer"].update(
        max_steps=STEPS,
        val_check_interval=2,
        log_every_n_steps=1,
        default_root_dir=str(root),
        enable_progress_bar=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
    )
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    config["data"]["init_args"].update(batch_size=8, num_val=16, num_workers=0)
    path = base / "clip.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(fit_command(path), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


def _trained(root: Path) -> FoundationClipSystem:
    system = FoundationClipSystem()
    state = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    system.load_state_dict(state)
    return system.eval()


def test_a_short_fit_of_the_recipe_prints_logs_and_exports(fitted: tuple[Path, str]) -> None:
    root, stdout = fitted
    export = root / "export"
    record = json.loads((export / FOUNDATION_FILE).read_text())
    assert record["kind"] == "clip" and record["steps"] == STEPS and record["commit"] and record["date"]
    top1 = record["metric"]["retrieval_top1"]
    assert 0.0 <= top1 <= 1.0
    line = next(line for line in stdout.splitlines() if line.startswith("clip foundation:"))
    assert f"held-out retrieval top-1 {top1:.3f}" in line and "among 16 scenes" in line
    assert f"after {STEPS} steps" in line and f"any true caption: {record['metric']['retrieval_top1_true']:.3f}" in line
    metrics = (next(root.rglob("metrics.csv"))).read_text()
    assert "val/retrieval_top1" in metrics and "train/loss" in metrics and "final/retrieval_top1" in metrics
    # the exported metric is the final weights' (recomputed here from last.ckpt on the same held-out scenes)
    held_out = SceneCaptionDataModule(num_val=16)
    assert _trained(root).evaluate(held_out.val_dataloader())["retrieval_top1"] == pytest.approx(top1)


def test_only_the_clip_and_its_temperature_train(fitted: tuple[Path, str]) -> None:
    root, _ = fitted
    initial, trained = FoundationClipSystem(), _trained(root)
    assert initial.clip.model.logit_scale.requires_grad
    names = [name for name, _ in initial.named_parameters()]
    assert all(name.startswith("clip.model.") for name in names) and "clip.model.logit_scale" in names
    before, after = initial.state_dict(), trained.state_dict()
    assert before.keys() == after.keys() == set(names)  # nothing but the CLIP (no buffers, no other part)
    changed = [name for name in names if not torch.equal(before[name], after[name])]
    assert changed == names  # every CLIP tensor and the temperature moved


def test_the_exported_towers_load_exactly(fitted: tuple[Path, str]) -> None:
    root, _ = fitted
    export, clip = root / "export", _trained(root).clip
    tokenizer = CLIPTokenizer.from_pretrained(str(export))
    texts = ["a red circle and a blue square on grey", "a small green triangle"]
    assert tokenizer(texts).input_ids == clip.tokenizer(texts).input_ids
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    text_model = CLIPTextModel.from_pretrained(str(export)).eval()
    with torch.no_grad():
        expected = clip.model.text_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(text_model(input_ids=ids).last_hidden_state, expected, rtol=0, atol=1e-6)
    pixels = torch.stack([caption_pair(0, 1, i)["pixels"] for i in range(4)])
    # the tiny LLaVA's vision tower takes the export's weights, every key, and gives the same features
    llava = LlavaForConditionalGeneration(tiny_llava_config(train_tiny_tokenizer())).eval()
    vision = CLIPVisionModel.from_pretrained(str(export))
    llava.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    with torch.no_grad():
        expected = clip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        got = llava.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        image_embeds = clip.model.get_image_features(pixel_values=pixels).pooler_output
    # the IAA target built from the export gives CLIPModel.get_image_features
    bridging = build_bridging("tiny", clip_pretrained=str(export))
    assert load_pretrained(bridging) == ["clip_image_encoder"]
    torch.testing.assert_close(bridging.clip_target(pixels), image_embeds, rtol=0, atol=1e-5)


def test_a_missing_or_wrong_clip_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="insightedit foundations"):
        load_pretrained(build_bridging("tiny", clip_pretrained=str(tmp_path / "clip" / "export")))
    other = CLIPModel(tiny_clip_config().__class__(
        text_config=tiny_clip_text_config().to_dict(), vision_config={**TINY_VISION_CONFIG, "num_hidden_layers": 1},
        projection_dim=32,
    ))  # fmt: skip
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(UserError, match="does not fit the bridging CLIP"):
        load_pretrained(build_bridging("tiny", clip_pretrained=str(tmp_path / "other")))
