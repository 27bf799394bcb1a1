"""Everything a run writes for the user: adapter files, metrics, TensorBoard
logs, previews and the resolved config. Used on the main process only."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.atomic import atomic_write_text
from trainer.errors import UserError


def check_writable(folder: Path) -> None:
    """Fail before any model is loaded, not after an hour of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"The output folder {folder} is not writable ({exc.strerror}); set output.dir to a "
            "folder you can write to."
        ) from exc


@dataclass
class RunOutputs:
    folder: Path
    name: str
    keep_last_n: int = 0
    _tensorboard: object = None
    _periodic: list[Path] = field(default_factory=list)

    @property
    def final_file(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    def periodic_file(self, step: int) -> Path:
        return self.folder / f"{self.name}-step{step:06d}.safetensors"

    @property
    def state_root(self) -> Path:
        return self.folder / "state"

    @property
    def samples(self) -> Path:
        return self.folder / "samples"

    def write_config(self, toml_text: str) -> None:
        atomic_write_text(self.folder / "config.toml", toml_text)

    def start_metrics(self, resumed_step: int) -> None:
        """Keep the metrics of steps already done (a resumed run continues the file)."""
        path = self.folder / "metrics.jsonl"
        kept = []
        if resumed_step and path.exists():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resumed_step:
                    kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(
            str(self.folder / "tensorboard"), purge_step=resumed_step + 1
        )

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, **values, "time": round(time.time(), 3)}
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self._tensorboard.add_scalar(f"train/{key}", value, step)

    def remember_periodic(self, path: Path) -> None:
        """Delete the oldest periodic files beyond `keep_last_n` (0 keeps all)."""
        self._periodic.append(path)
        if self.keep_last_n:
            while len(self._periodic) > self.keep_last_n:
                self._periodic.pop(0).unlink(missing_ok=True)

    def save_previews(self, step: int, images: list) -> list[Path]:
        self.samples.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            path = self.samples / f"step{step:06d}-{index}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(path)
        return paths

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
