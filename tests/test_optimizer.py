"""AdamW fused where the parameters allow it: the same updates as torch's per-tensor AdamW."""

import torch

from insightedit.training.optimizer import adamw, can_fuse


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (8, 8, 3, 3), (1,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def test_fused_adamw_matches_the_per_tensor_loop_over_steps():
    """Two parameter groups (own lr, own decay), 20 steps of the same gradients: fused == for-loop to ~1e-6."""
    fused_params, loop_params = _params(0), _params(0)
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]  # noqa: E731
    fused = adamw(groups(fused_params), weight_decay=0.05)
    loop = torch.optim.AdamW(groups(loop_params), weight_decay=0.05, foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(fused_params, loop_params, strict=True):
            grad = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    assert (fused_params[0] - _params(0)[0]).abs().max() > 0.1  # 20 steps of lr 1e-2 moved them
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_state_loads_into_the_default_optimizer_and_back():
    """A checkpoint written by one resumes in the other (a run resumed across versions)."""
    params = _params(0)
    fused = adamw(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    fused.step()
    loop = torch.optim.AdamW(_params(0), lr=1e-2, foreach=False)
    loop.load_state_dict(fused.state_dict())
    assert float(loop.state_dict()["state"][0]["step"]) == 1.0
    again = adamw(_params(0), lr=1e-2)
    again.load_state_dict(loop.state_dict())
    assert float(again.state_dict()["state"][0]["step"]) == 1.0


def test_only_plain_float_tensors_on_one_cpu_or_cuda_device_are_fused():
    assert can_fuse(_params(0))
    assert not can_fuse([])
    assert not can_fuse([torch.nn.Parameter(torch.empty(2, device="meta"))])
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])
    meta = torch.nn.Parameter(torch.empty(2, device="meta"))
    assert adamw([meta], lr=1e-3).defaults["fused"] is None  # torch's default choice
