"""One rank of the meta-first loading test: build deferred, load into FSDP2 shards, write the gathered model.

Run as ``python _sharded_loading_rank.py RANK WORLD STORE SETTINGS.json OUT_DIR``; every rank writes
``OUT_DIR/rank<RANK>.json`` (the weight files it opened, the load lines it logged) and rank 0 also
``OUT_DIR/gathered.pt`` (every parameter gathered from the shards, every buffer).
"""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

rank, world, store, settings_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
settings = json.loads(Path(settings_file).read_text())
weight_files = {str(Path(p).resolve()) for p in settings.pop("weight_files")}
opened: list[str] = []


def audit(event: str, args: tuple) -> None:
    """Record every open of one of the weight files (torch.load and open() raise the ``open`` event)."""
    if event == "open" and isinstance(args[0], str | Path) and str(Path(args[0]).resolve()) in weight_files:
        opened.append(str(args[0]))


sys.addaudithook(audit)
torch.set_num_threads(1)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from insightedit.models.loads import LOADS_LOGGER  # noqa: E402
from insightedit.systems.editor_system import EditorSystem  # noqa: E402
from insightedit.training.sharded_loading import deferred_pretrained_loading, load_into_shards  # noqa: E402
from insightedit.training.sharding import shard_system  # noqa: E402

lines: list[str] = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
logging.getLogger(LOADS_LOGGER).addHandler(handler)
logging.getLogger(LOADS_LOGGER).setLevel(logging.INFO)

dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
with deferred_pretrained_loading():
    system = EditorSystem(**settings)
built_meta = sum(p.is_meta for p in system.parameters())
pending = system.loading_pending
shard = lambda: shard_system(system, mesh, system.sharding)  # noqa: E731 - what configure_model passes
load_into_shards(system, system.finish_loading, shard, state=("_carried",), group_bytes=256 * 1024)  # many groups

gathered = {}
for name, parameter in system.named_parameters():  # the same order on every rank: full_tensor() is collective
    value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
    gathered[name] = value.detach().clone()
sharded = sum(isinstance(p, DTensor) for p in system.parameters())
buffers = {name: b.clone() for name, b in system.named_buffers()}
meta_left = sorted(n for n, t in [*system.named_parameters(), *system.named_buffers()] if t.is_meta)
trainable = sorted(n for n, p in system.named_parameters() if p.requires_grad)
report = {"opened": opened, "lines": lines, "pending": pending, "sharded": sharded, "meta_left": meta_left,
          "built_meta": built_meta, "trainable": trainable, "carried": sorted(system._carried)}
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
if rank == 0:
    torch.save({"parameters": gathered, "buffers": buffers}, Path(out_dir, "gathered.pt"))
dist.barrier()
dist.destroy_process_group()
