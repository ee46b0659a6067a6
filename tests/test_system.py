"""The InsightEdit member in EditorSystem: losses, what each stage trains, BIM neutrality, stage checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from insightedit.systems.editor_system import EditorSystem


def make_batch(system: EditorSystem, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = system.editor.comprehension.image_size
    instructions = ["remove the red circle", "add a blue square", "replace the star with a moon", "do nothing"]
    captions = ["a green square", "a red circle and a blue square", "a moon", "a star"]
    return {
        "source": torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
        "target": torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
        "mllm_source": torch.randn(batch, 3, size, size, generator=g),
        "clip_target": torch.randn(batch, 3, 32, 32, generator=g),
        "instruction": instructions[:batch],
        "target_caption": captions[:batch],
    }


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def loader(system, n=2):
    return DataLoader(Batches([make_batch(system, seed=i) for i in range(n)]), batch_size=None)


@pytest.fixture(scope="module")
def stage3() -> EditorSystem:
    torch.manual_seed(0)
    return EditorSystem(preset="tiny", stage=3)


def _expected(system: EditorSystem, stage: int) -> set[str]:
    names = {n for n, _ in system.named_parameters()}
    lora = {n for n in names if n.startswith("editor.comprehension.") and "lora_" in n}
    rows = {n for n in names if n.startswith("editor.comprehension.") and n.endswith("new_rows")}
    qformer = {n for n in names if n.startswith("editor.bridging.qformer.")}
    mapper = {n for n in names if n.startswith("editor.bridging.mapper.")}
    bim = {n for n in names if n.startswith("editor.bridging.bim.")}
    unet = {n for n in names if n.startswith("editor.generation.unet.")}
    assert lora and rows and qformer and mapper and bim and unet
    return {1: lora | rows | qformer | mapper, 2: lora | rows | qformer | mapper | unet}.get(
        stage, lora | rows | qformer | mapper | unet | bim
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_parts_and_a_step_changes_only_those(stage):
    torch.manual_seed(0)
    system = EditorSystem(preset="tiny", stage=stage)
    trainable = system.trainable_names()
    assert trainable == _expected(system, stage)
    # tensors: [MM] input+output rows 2, LoRA A/B 16 (q,k,v,o x 2 layers x A/B), Q-Former 47, Mapper 6;
    # + UNet 220 in stages 2 and 3; + BIM 92 in stage 3
    expected_counts = {1: 2 + 16 + 47 + 6, 2: 2 + 16 + 47 + 6 + 220, 3: 2 + 16 + 47 + 6 + 220 + 92}
    assert len(trainable) == expected_counts[stage], len(trainable)
    elements = {1: 4096 + 8192 + 54320 + 6368, 2: 4096 + 8192 + 54320 + 6368 + 4001200}
    elements[3] = elements[2] + 121984
    assert sum(p.numel() for p in system.parameters() if p.requires_grad) == elements[stage]
    frozen = {n for n, _ in system.named_parameters()} - trainable
    assert any("vision_tower" in n for n in frozen) and any("clip_image_encoder" in n for n in frozen)
    assert any(n.startswith("editor.generation.text_encoder.") for n in frozen)

    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    optimizer = system.configure_optimizers()["optimizer"]
    system.train()
    losses = system.compute_losses(make_batch(system))
    losses["loss"].backward()
    optimizer.step()
    changed = {n for n, p in system.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    # everything that received a gradient moved, and every trained group received gradient somewhere
    # (the BIM's inner transformer gets none while its zero-initialised heads are zero)
    with_grad = {n for n, p in system.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= changed
    for group, members in system.parameter_groups().items():
        if group in system.stage.train:
            assert set(members) & with_grad, group


def test_losses_per_stage_are_finite_and_weighted(stage3):
    losses = stage3.compute_losses(make_batch(stage3))
    assert set(losses) == {"llm", "iaa", "align", "diff", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    total = losses["llm"] + losses["iaa"] + losses["align"] + losses["diff"]
    torch.testing.assert_close(losses["loss"], total)
    stage1 = EditorSystem(preset="tiny", stage=1, stage_settings={"loss_weights": {"llm": 2.0, "iaa": 0.5}})
    losses1 = stage1.compute_losses(make_batch(stage1))
    assert set(losses1) == {"llm", "iaa", "loss"}
    torch.testing.assert_close(losses1["loss"], 2.0 * losses1["llm"] + 0.5 * losses1["iaa"])


def test_fit_logs_every_loss(tmp_path):
    torch.manual_seed(0)
    system = EditorSystem(preset="tiny", stage=3)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(system, loader(system))
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/loss_llm", "train/loss_iaa", "train/loss_align", "train/loss_diff"):
        assert key in logged and torch.isfinite(logged[key])


def test_fresh_bim_changes_nothing_in_the_unet_prediction(stage3):
    torch.manual_seed(0)
    system = EditorSystem(preset="tiny", stage=3)
    system.eval()
    batch = make_batch(system)
    with torch.no_grad():
        understood = system.editor.comprehension(batch["mllm_source"], batch["instruction"], compute_loss=False)
        grid = system.editor.comprehension.vision_grid
        with_bim = system.editor.bridging(understood.h, understood.vision_features, grid, (8, 8))
        system.editor.bridging.use_bim = False
        without = system.editor.bridging(understood.h, understood.vision_features, grid, (8, 8))
        system.editor.bridging.use_bim = True
        assert with_bim.v_txt is not None and without.v_txt is None
        noisy = torch.randn(2, 48, 8, 8)
        source = torch.randn(2, 48, 8, 8)
        t = torch.tensor([10, 900])
        unet = system.editor.generation.unet
        a = unet(noisy, source, t, with_bim.f_txt, image_embeds=with_bim.image_embeds, v_txt=with_bim.v_txt)
        b = unet(noisy, source, t, without.f_txt, image_embeds=without.image_embeds)
    assert torch.equal(a, b)


def test_stage2_checkpoint_starts_stage3_with_identical_shared_weights(tmp_path):
    torch.manual_seed(0)
    stage2 = EditorSystem(preset="tiny", stage=2)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(stage2, loader(stage2, 1))
    path = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    # only trained weights (and the bridge's persistent buffers) travel: no frozen LLM base, vision
    # tower, VAE/CLIP, text encoder
    assert set(saved) == stage2.trainable_names() | {"editor.bridging.bim.positional.positional_embedding"}
    assert not any("base_layer" in k or "vision_tower" in k or "text_encoder" in k for k in saved)

    torch.manual_seed(123)  # a different seed: everything shared must come from the checkpoint
    stage3 = EditorSystem(preset="tiny", stage=3, init_from=str(path))
    own = {**dict(stage3.named_parameters()), **dict(stage3.named_buffers())}
    for name, value in saved.items():
        assert torch.equal(own[name], value), name
    fresh2 = {**dict(stage2.named_parameters()), **dict(stage2.named_buffers())}
    # frozen bases are the same fixed tiny twins in both runs
    for name in own:
        if name not in saved and not name.startswith("editor.bridging.bim."):
            assert torch.equal(own[name], fresh2[name]), name
    # stage 3's checkpoint carries stage 2's weights plus the BIM (and its positional buffer, which
    # came from the stage-2 checkpoint, not from this run's different seed)
    assert stage3.saved_names() == set(saved) | stage3.trainable_names()
    assert torch.equal(
        own_buffers := dict(stage3.named_buffers())["editor.bridging.bim.positional.positional_embedding"],
        saved["editor.bridging.bim.positional.positional_embedding"],
    ), own_buffers


def test_init_from_a_missing_or_corrupt_checkpoint_is_a_user_error(tmp_path):
    from insightedit.errors import UserError

    with pytest.raises(UserError, match="not found"):
        EditorSystem(preset="tiny", stage=3, init_from=str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        EditorSystem(preset="tiny", stage=3, init_from=str(bad))


@pytest.mark.parametrize("target", ["plain_instruction", "instruction", "target_caption"])
def test_alignment_loss_reads_the_chosen_text(target):
    system = EditorSystem(preset="tiny", stage=1, align_target=target)
    batch = make_batch(system)
    batch["plain_instruction"] = ["remove the red circle", "add a blue square at the top left"]
    torch.manual_seed(0)
    got = system.compute_losses(batch)["align"]
    with torch.no_grad():
        understood = system.editor.comprehension(batch["mllm_source"], batch["instruction"], compute_loss=False)
        q = system.editor.bridging.qformer(understood.h, None)
        expected = torch.nn.functional.mse_loss(q, system.editor.generation.encode_text(batch[target]))
    torch.testing.assert_close(got, expected)


def test_unknown_alignment_target_is_refused():
    with pytest.raises(ValueError, match="align_target"):
        EditorSystem(preset="tiny", stage=1, align_target="caption")
