"""The build's output folder: the official AdvancedEdit layout plus per-(image, step) commit markers.

Every file is written to a temporary file in its own folder and moved into place with ``os.replace``,
so a reader never sees half a file. A step is *done* for an image when its marker
``.build/done/<n>_<step>/<id>.json`` exists; the marker is written last, after every file of that
step, so a crash or a kill before it means the step is redone, rewriting the same names. Files an
unfinished attempt planned are listed first in ``.build/pending/`` and removed before the next attempt,
so a changed plan leaves nothing behind. Failures go to ``failures/<n>_<step>/<id>.json`` with their
reason; a later success removes them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from insightedit.data.build.config import STEP_NAMES
from insightedit.redaction import redact

SOURCE_DIR = "0_source_img"
RECAPTION_DIR = "1_caption_object_extraction/1_1_recaption"
OBJECTS_DIR = "1_caption_object_extraction/1_2_object_extraction"
MASKS_DIR = "2_mask_generation"
PAIRS_DIR = "3_editing_pair_construction"
RECAPTION_RECORDS_DIR = "4_instruction_recaption"
QUALITY_DIR = "5_quality_evaluation"
GROUPS: tuple[str, ...] = ("remove_add", "replace")
RECORD_DIRS: dict[int, str] = {3: PAIRS_DIR, 4: RECAPTION_RECORDS_DIR, 5: QUALITY_DIR}
WORK_DIR = ".build"
SUMMARY_NAME = "summary.json"


def step_label(step: int) -> str:
    """``3_inpaint``: the folder name of a step's markers and failures."""
    return f"{step}_{STEP_NAMES[step]}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (deterministic: same value, same bytes)."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_write_png(path: Path, image: Image.Image) -> None:
    """Write ``image`` as an RGB PNG (deterministic bytes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


class BuildStore:
    """Paths, atomic commits, failures and per-rank logs of one output folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.work = self.root / WORK_DIR
        self._log_lock = threading.Lock()

    # --- the official layout -------------------------------------------------------------------
    def source(self, image_id: str) -> Path:
        """The source image as step 1 stored it (RGB PNG)."""
        return self.root / SOURCE_DIR / f"{image_id}.png"

    def recaption(self, image_id: str) -> Path:
        """Step 1's global caption file."""
        return self.root / RECAPTION_DIR / f"{image_id}.json"

    def objects(self, image_id: str) -> Path:
        """Step 1's object list file."""
        return self.root / OBJECTS_DIR / f"{image_id}.json"

    def masks(self, image_id: str) -> Path:
        """Step 2's annotations (class, box, COCO RLE mask per object)."""
        return self.root / MASKS_DIR / f"{image_id}.json"

    def records(self, step: int, group: str, image_id: str) -> Path:
        """The record file of a step (3, 4 or 5) and group (``remove_add`` or ``replace``)."""
        if step == 3:
            return self.root / PAIRS_DIR / group / "json_file" / f"{image_id}.json"
        return self.root / RECORD_DIRS[step] / group / f"{image_id}.json"

    def target(self, group: str, name: str) -> Path:
        """An edited image of step 3."""
        return self.root / PAIRS_DIR / group / "target_imgs" / name

    def relative(self, path: Path) -> str:
        """``path`` relative to the output folder (as records store it)."""
        return path.relative_to(self.root).as_posix()

    def read_records(self, step: int, image_id: str) -> dict[str, dict[str, dict[str, Any]]]:
        """``{group: {key: record}}`` of a step's record files for an image (absent groups are empty)."""
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for group in GROUPS:
            path = self.records(step, group, image_id)
            found[group] = read_json(path) if path.is_file() else {}
        return found

    # --- commits -------------------------------------------------------------------------------
    def _marker(self, kind: str, step: int, image_id: str) -> Path:
        return self.work / kind / step_label(step) / f"{image_id}.json"

    def failure_path(self, step: int, image_id: str) -> Path:
        """Where the failure of (image, step) is recorded."""
        return self.root / "failures" / step_label(step) / f"{image_id}.json"

    def is_done(self, step: int, image_id: str) -> bool:
        """Whether (image, step) was committed."""
        return self._marker("done", step, image_id).is_file()

    def done_info(self, step: int, image_id: str) -> dict[str, Any]:
        """The commit marker of (image, step)."""
        return dict(read_json(self._marker("done", step, image_id)))

    def failure(self, step: int, image_id: str) -> dict[str, Any] | None:
        """The recorded failure of (image, step), or ``None``."""
        path = self.failure_path(step, image_id)
        return dict(read_json(path)) if path.is_file() else None

    def begin(self, step: int, image_id: str, planned: list[Path]) -> None:
        """Remove what an unfinished earlier attempt planned, then record this attempt's plan."""
        pending = self._marker("pending", step, image_id)
        if pending.is_file():
            for name in read_json(pending).get("files", []):
                if name not in {self.relative(p) for p in planned}:
                    (self.root / name).unlink(missing_ok=True)
        atomic_write_json(pending, {"files": [self.relative(p) for p in planned]})

    def commit(self, step: int, image_id: str, files: list[Path], info: dict[str, Any]) -> None:
        """Mark (image, step) done; its ``files`` must already be written. Clears an old failure."""
        marker = {"step": step, "image_id": image_id, "files": [self.relative(p) for p in files], **info}
        atomic_write_json(self._marker("done", step, image_id), marker)
        self._marker("pending", step, image_id).unlink(missing_ok=True)
        self.failure_path(step, image_id).unlink(missing_ok=True)

    def record_failure(self, step: int, image_id: str, reason: str, rank: int, details: str | None = None) -> None:
        """Record why (image, step) failed (the step stays not done; ``--retry-failed`` retries it).

        ``details`` (a traceback, for errors that are not a known kind of bad input) is kept beside the reason.
        Secrets (an API key a server echoed in its error) are masked in both.
        """
        previous = self.failure(step, image_id)
        attempts = int(previous.get("attempts", 0)) + 1 if previous else 1
        failure = {"step": step, "name": STEP_NAMES[step], "image_id": image_id, "reason": redact(reason),
                   "attempts": attempts, "rank": rank}  # fmt: skip
        if details:
            failure["traceback"] = redact(details)
        atomic_write_json(self.failure_path(step, image_id), failure)

    def log(self, rank: int, entry: dict[str, Any]) -> None:
        """Append a line to this rank's log of the (image, step) pairs it handled."""
        path = self.work / "ranks" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_lock, path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({**entry, "time": round(time.time(), 3)}) + "\n")

    def remove_stale_temporaries(self) -> int:
        """Delete ``*.tmp`` files a killed run left behind (call when no rank is writing)."""
        stale = [path for path in self.root.rglob(".*.tmp") if path.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)
