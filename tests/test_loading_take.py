"""assign_or_copy(take=True): a just-loaded model's tensors are taken, not copied (same values, one copy)."""

import torch
from torch import nn

from insightedit.models.loading import assign_or_copy


def _pair(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    built = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    loaded = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(dtype)
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.add_(1.0)
    return built, loaded.state_dict()


def test_take_uses_the_loaded_tensors_themselves_and_keeps_requires_grad():
    built, state = _pair()
    built[1].requires_grad_(False)
    expected = {k: v.clone() for k, v in state.items()}
    assign_or_copy(built, state, take=True)
    for name, tensor in built.state_dict(keep_vars=True).items():
        assert tensor.data_ptr() == state[name].data_ptr()  # no copy
        assert torch.equal(tensor, expected[name])
    assert [p.requires_grad for p in built.parameters()] == [True, True, False, False]
    assert all(isinstance(p, nn.Parameter) for p in built.parameters())


def test_without_take_or_with_another_dtype_the_values_are_copied_into_the_built_tensors():
    for take, dtype in ((False, torch.float32), (True, torch.float64)):
        built, state = _pair(dtype)
        before = {k: v.data_ptr() for k, v in built.state_dict().items()}
        assign_or_copy(built, state, take=take)
        after = built.state_dict()
        assert {k: v.data_ptr() for k, v in after.items()} == before
        assert all(v.dtype == torch.float32 and torch.equal(v, state[k].float()) for k, v in after.items())


def test_take_leaves_tensors_the_state_lacks_as_they_were():
    built, state = _pair()
    bias = built[0].bias
    del state["0.bias"]
    missing, unexpected = assign_or_copy(built, state, strict=False, take=True)
    assert missing == ["0.bias"] and unexpected == []
    assert built[0].bias is bias and built[0].weight.data_ptr() == state["0.weight"].data_ptr()
