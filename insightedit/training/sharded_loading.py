"""Meta-first loading under FSDP2: pretrained weights are read once, by rank 0, and land in the shards.

Without it every rank of a sharded run builds the system and reads every pretrained weight (the 7B LLaVA,
the SD UNet, CLIP) into host memory in full before ``configure_model`` shards it: ``N`` ranks hold ``N``
copies at start. With it (:func:`deferred_pretrained_loading`, which :class:`~insightedit.lightning_cli.InsightEditCLI`
enters when the trainer's strategy is a ``ModelParallelStrategy``), the constructor builds and loads
nothing; then, in ``configure_model`` (:func:`load_into_shards`):

1. rank 0 alone runs the loading step as a single process would (``pretrained``, the stage's freezing,
   ``init_from``), with the random state the constructor left, so its model is the single-process model;
2. rank 0 keeps the loaded tensors in a state dict and every rank (rank 0 too) swaps the editor for a
   *skeleton* of rank 0's: the same modules, names, dtypes, ``requires_grad`` flags, tokenizers and
   settings, every weight on ``meta`` (no memory) except the non-persistent buffers (small, outside any
   state dict), which travel with their values;
3. every rank shards (``fully_shard``: meta parameters become meta shards);
4. ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` broadcasts rank 0's
   tensors, a group of about 512 MiB per call; each rank keeps only its shard of each, and rank 0 frees
   the full tensors of each group once sent.

Host memory at start, by design: rank 0 holds the loaded model once, every other rank its shards plus one
group in flight, whatever the number of ranks. Measured (``benchmarks/sharded_loading.py``, 2 ranks): the
other ranks start lower than before, and rank 0 peaks about 0.4 GiB higher than on the old path: not
anonymous memory but the pages of the memory-mapped weight files it reads in full to broadcast them (each
rank read only its half when sharding a loaded model itself); a file's pages stay mapped until its last
tensor is freed (docs/training.md).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from insightedit.errors import UserError

_DEFERRED: list[bool] = [False]


@contextlib.contextmanager
def deferred_pretrained_loading(enabled: bool = True) -> Iterator[None]:
    """Systems built inside this block leave their pretrained weights and ``init_from`` for after sharding."""
    previous = _DEFERRED[0]
    _DEFERRED[0] = enabled
    try:
        yield
    finally:
        _DEFERRED[0] = previous


def loading_is_deferred() -> bool:
    """Whether a system built now should leave its loading step to :func:`load_into_shards`."""
    return _DEFERRED[0]


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter and persistent buffer on ``meta`` (dtype, shape and flags kept).

    Non-persistent buffers (outside state dicts, so outside the broadcast) keep their values; everything
    that is not a tensor (tokenizers, configs, settings) is copied as it is. Tied tensors stay tied.
    """
    memo: dict[int, Any] = {}
    for _, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) not in memo:
            shell = torch.empty_like(parameter, device="meta")
            memo[id(parameter)] = nn.Parameter(shell, requires_grad=parameter.requires_grad)
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set and id(buffer) not in memo:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class _Failure:
    """What rank 0 tells the other ranks when its loading step failed (they stop with the same line)."""

    user_error: bool
    message: str

    def error(self) -> Exception:
        """The exception a rank other than 0 raises."""
        if self.user_error:
            return UserError(self.message)
        return RuntimeError(f"rank 0 could not load the pretrained weights: {self.message}")


def load_into_shards(
    system: nn.Module,
    load: Callable[[], None],
    shard: Callable[[], None],
    part: str = "editor",
    state: tuple[str, ...] = (),
    group_bytes: int = 512 * 1024**2,
) -> None:
    """Run ``load`` on rank 0 only, give the other ranks its skeleton, ``shard`` everywhere, broadcast the weights.

    Args:
        system: the module to load and shard (its ``part`` child is what ``load`` fills in).
        load: the single-process loading step, run on rank 0 before sharding.
        shard: applies ``fully_shard`` to ``system`` (on every rank, after the skeleton is in place).
        part: the child of ``system`` that ``load`` changes (replaced by rank 0's skeleton elsewhere).
        state: other attributes of ``system`` that ``load`` sets (sent from rank 0 as they are).
        group_bytes: how much rank 0 broadcasts per ``set_model_state_dict`` call; it frees each group's
            full tensors after sending them, so it never holds the loaded model and all its shards at once.

    Needs an initialised default process group whose ranks all shard ``system`` (data parallel only).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    full: dict[str, Any] = {}
    payload: list[Any] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            load()
            full = system.state_dict()  # references to the loaded tensors, no copies
            payload = [(meta_skeleton(getattr(system, part)), {name: getattr(system, name) for name in state})]
        except Exception as error:  # noqa: BLE001 - sent on, so no rank waits for a skeleton that never comes
            failure = error
            payload = [_Failure(isinstance(error, UserError), str(error) or type(error).__name__)]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    if isinstance(payload[0], _Failure):
        raise payload[0].error()
    skeleton, attributes = payload[0]
    payload.clear()
    _release(getattr(system, part))  # the loaded (or built) tensors now live only in ``full``, even if
    setattr(system, part, skeleton)  # something still holds the old editor (a reference cycle, a hook)
    gc.collect()  # and whatever the loaders left in reference cycles (a transient from_pretrained model)
    if rank != 0:
        for name, value in attributes.items():
            setattr(system, name, value)
    del skeleton
    shard()  # meta parameters become meta shards, on every rank
    # a group of tensors at a time: each rank fills its shards, and rank 0 frees the full tensors sent
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for group in _groups(full, rank, group_bytes):
        set_model_state_dict(system, {name: full.pop(name) for name in group}, options=options)
    left = sorted(name for name, value in system.state_dict().items() if value.is_meta)
    if left:  # the skeleton has rank 0's names, so this is a bug, never a user's error
        raise RuntimeError(f"sharded loading left {len(left)} tensors on meta, e.g. {left[:3]}")


def _release(module: nn.Module) -> None:
    """Drop ``module``'s own references to its parameters and buffers (it is not used again)."""
    for owner in module.modules():
        owner._parameters.clear()
        owner._buffers.clear()


def _groups(full: dict[str, Any], rank: int, group_bytes: int) -> Iterator[list[str]]:
    """Rank 0's tensor names in groups of about ``group_bytes``; the same number of groups on every rank."""
    import torch.distributed as dist

    groups: list[list[str]] = [[]]
    size = 0
    for name, value in full.items():
        if size >= group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
    count = [len(groups) if rank == 0 else 0]
    dist.broadcast_object_list(count, src=0)
    for index in range(int(count[0])):
        yield groups[index] if rank == 0 else []


__all__ = ["deferred_pretrained_loading", "load_into_shards", "loading_is_deferred", "meta_skeleton"]
