"""Where a command's peak host memory comes from: its resident set sampled over time, with the code running.

Runs ``insightedit <args>`` in this process while a thread reads ``RssAnon`` and ``RssFile`` from
``/proc/self/status`` every 20 ms. It keeps a timeline (a row whenever the resident set moved by 0.25 GiB
or the running ``insightedit`` frames changed) and, at the highest total, the main thread's stack (the
project's, Lightning's and the model libraries' frames). ``RssFile`` counts the pages of memory-mapped
files (safetensors, checkpoints) that were read: clean page cache the kernel can drop, unlike ``RssAnon``.
A launcher that re-runs the script (Lightning's for ``--trainer.devices=2``) gives each rank its own file.

    python benchmarks/rss_timeline.py --out /tmp/stage1 -- fit --config lightning_configs/stage1.yaml ...
    # -> /tmp/stage1.rank0.json ({"peak": {...}, "timeline": [[s, anon GiB, file GiB, frame, insightedit frames]]})
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

GiB_KIB = 2**20
LIBRARIES = ("insightedit", "lightning", "transformers", "diffusers", "peft", "torch/optim", "torch/distributed",
             "safetensors", "torch/nn/modules/module.py", "torch/serialization")  # fmt: skip


def resident() -> dict[str, float]:
    """This process's anonymous and file-backed resident memory, GiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            key, value = line.split(":")
            values[key] = int(value.split()[0]) / GiB_KIB
    return values


def frames(frame: FrameType) -> list[str]:
    """``file:line function`` of the frames of ``frame``'s stack that belong to the project or its libraries."""
    return [f"{Path(f.filename).name if 'insightedit' not in f.filename else f.filename.split('/insightedit/')[-1]}"
            f":{f.lineno} {f.name}" for f in traceback.extract_stack(frame)
            if any(part in f.filename for part in LIBRARIES)]  # fmt: skip


class Sampler(threading.Thread):
    """Samples the resident set every ``interval`` seconds while the main thread runs."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.main = threading.main_thread().ident
        self.interval = interval
        self.started = time.monotonic()
        self.peak: dict[str, Any] = {"total_gib": 0.0}
        self.timeline: list[list[Any]] = []

    def run(self) -> None:
        """Sample until the main thread ends."""
        last_key = None
        while True:
            time.sleep(self.interval)
            frame = sys._current_frames().get(self.main or 0)
            if frame is None:
                return
            rss, stack = resident(), frames(frame)
            total, now = rss["RssAnon"] + rss["RssFile"], round(time.monotonic() - self.started, 1)
            if total > self.peak["total_gib"]:
                self.peak = {"total_gib": round(total, 3), "anon_gib": round(rss["RssAnon"], 3),
                             "file_gib": round(rss["RssFile"], 3), "seconds": now, "stack": stack}  # fmt: skip
            key = " > ".join(f for f in stack if f.startswith(("insightedit", "cli.py", "sharded")))
            moved = not self.timeline or abs(total - self.timeline[-1][1] - self.timeline[-1][2]) > 0.25
            if moved or (key != last_key and now - self.timeline[-1][0] > 2):
                self.timeline.append([now, round(rss["RssAnon"], 2), round(rss["RssFile"], 2),
                                      stack[-1] if stack else "?", key])  # fmt: skip
                last_key = key


def main() -> int:
    """``rss_timeline.py --out PREFIX -- <insightedit args>``: run, then write ``PREFIX.rank<N>.json``."""
    if "--" not in sys.argv or sys.argv[1:2] != ["--out"]:
        raise SystemExit(__doc__)
    out = Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    sampler = Sampler()
    sampler.start()
    from insightedit.cli import main as insightedit

    try:
        code = insightedit(args)
    finally:
        path = out.with_name(f"{out.name}.rank{os.environ.get('LOCAL_RANK', '0')}.json")
        path.write_text(json.dumps({"args": args, "peak": sampler.peak, "timeline": sampler.timeline}, indent=1))
        peak = sampler.peak
        print(f"peak {peak['total_gib']} GiB (anon {peak.get('anon_gib')}, file {peak.get('file_gib')}) "
              f"at {peak.get('seconds')} s; {path}", file=sys.stderr)  # fmt: skip
    return code


if __name__ == "__main__":
    raise SystemExit(main())
