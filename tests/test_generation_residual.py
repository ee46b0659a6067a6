"""The generator's residual clean-sample parameterisation and high-noise timestep bias (via GenerationModule)."""

import pytest
import torch
from torch import nn

from insightedit.models.generation.generator import EditGenerator
from insightedit.systems.generation import GenerationModule

SMALL_UNET = {"block_out_channels": (32, 64), "norm_num_groups": 8}


def residual_module(**kwargs) -> EditGenerator:
    torch.manual_seed(0)
    module = GenerationModule(preset="tiny", unet_config=SMALL_UNET, prediction_type="sample", residual=True, **kwargs)
    return module.model.eval()


class Oracle(nn.Module):
    """Stands in for the UNet: predicts a fixed clean latent whatever the input (a perfect denoiser)."""

    def __init__(self, clean: torch.Tensor, latent_channels: int) -> None:
        super().__init__()
        self.clean = clean
        self.latent_channels = latent_channels
        self.image_projection = None

    def forward(self, sample: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.clean.repeat(sample.shape[0] // self.clean.shape[0], 1, 1, 1)


def test_residual_sampler_reproduces_the_target_exactly_from_a_perfect_prediction():
    module = residual_module()
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    target = source.clone()
    target[:, :, 4:12, 4:12] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red patch, residual up to 2
    residual = module.latent_space.encode_target(target) - module.latent_space.encode_source(source)
    module.unet = Oracle(residual, residual.shape[1])  # type: ignore[assignment]
    f_txt = torch.zeros(2, 77, 32)
    for guidance in ((1.0, 1.0), (7.5, 1.5)):
        edited = module.edit(
            source,
            f_txt=f_txt,
            text_guidance=guidance[0],
            image_guidance=guidance[1],
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(1),
        )
        assert (edited - target).abs().max() < 1e-5, ((edited - target).abs().max(), guidance)


def test_residual_sampler_does_not_clip_a_change_of_two():
    module = residual_module()
    assert module.sampling_scheduler().config.clip_sample_range == pytest.approx(2.0)
    assert EditGenerator(preset="tiny", unet_config=SMALL_UNET).sampling_scheduler().config.clip_sample_range == 1.0


def test_residual_sample_loss_goal_is_target_minus_source():
    module = residual_module(drop_text_prob=0, drop_source_prob=0, drop_both_prob=0)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    target = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    residual = module.latent_space.encode_target(target) - module.latent_space.encode_source(source)
    module.unet = Oracle(residual, residual.shape[1])  # type: ignore[assignment]
    loss = module.diffusion_loss(source, target, torch.zeros(3, 77, 32), generator=torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_timestep_power_biases_towards_high_noise_and_one_is_uniform():
    uniform = GenerationModule(preset="tiny", unet_config=SMALL_UNET).model
    biased = EditGenerator(preset="tiny", unet_config=SMALL_UNET, timestep_power=0.5)
    cpu = torch.device("cpu")
    t_uniform = uniform._sample_timesteps(100_000, torch.Generator().manual_seed(0), cpu)
    expected = torch.randint(0, 1000, (100_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(t_uniform, expected)  # p = 1 keeps the original draw exactly
    t_biased = biased._sample_timesteps(100_000, torch.Generator().manual_seed(0), cpu)
    assert int(t_biased.min()) >= 0 and int(t_biased.max()) <= 999
    assert float(t_biased.float().mean()) == pytest.approx(1000 * 2 / 3, rel=0.02)  # E[u^0.5] = 2/3
    for build in (GenerationModule, EditGenerator):
        with pytest.raises(ValueError, match="timestep_power"):
            build(preset="tiny", unet_config=SMALL_UNET, timestep_power=0.0)


def test_residual_sample_training_drives_the_loss_down():
    torch.manual_seed(0)
    module = GenerationModule(
        preset="tiny",
        prediction_type="sample",
        residual=True,
        learning_rate=2e-3,
        weight_decay=0.0,
        drop_text_prob=0,
        drop_both_prob=0,
        drop_source_prob=0,
    )
    g = torch.Generator().manual_seed(0)
    source = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    target = source.clone()
    target[:, 0, 8:20, 8:20] = 1.0
    generator = module.model
    f_txt = generator.encode_text(["paint a red square"] * 4)

    def held_loss() -> float:
        with torch.no_grad():
            return float(
                torch.stack(
                    [
                        generator.diffusion_loss(source, target, f_txt, generator=torch.Generator().manual_seed(s))
                        for s in range(8)
                    ]
                ).mean()
            )

    before = held_loss()
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(100):
        generator.diffusion_loss(source, target, f_txt).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.eval()
    assert held_loss() < 0.5 * before
