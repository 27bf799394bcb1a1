"""The built-in demo: the tiny model and a small generated dataset, created
on first use in the cache folder, so `model.path = "demo"` and
`dataset.path = "demo"` run a complete training without any download."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from core.paths import cache_root
from trainer.demo_toy import TOY_DATASET_KEYWORD, TOY_MODEL_KEYWORD

DEMO_KEYWORD = "demo"
# The built-in models and datasets: "demo" (random weights, for tests) and the
# toy that draws coloured shapes with the concept it learns (trainer/demo_toy.py).
MODEL_KEYWORDS = (DEMO_KEYWORD, TOY_MODEL_KEYWORD)
DATASET_KEYWORDS = (DEMO_KEYWORD, TOY_DATASET_KEYWORD)
_SHAPES = ("circle", "square", "triangle")
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
DEMO_TRIGGER = "demoshape"


def demo_dir() -> Path:
    return cache_root() / "demo-v1"


def ensure_demo_model() -> Path:
    """The demo model's diffusers folder, generated on first use (seconds)."""
    from trainer.demo_model import make_demo_model

    folder = demo_dir() / "model"
    if not (folder / "diffusers" / "model_index.json").is_file():
        make_demo_model(folder, seed=0)
    return folder / "diffusers"


def builtin_model(path: str) -> Path | None:
    """The diffusers folder that a model keyword names (made on first use), else None."""
    if path == DEMO_KEYWORD:
        return ensure_demo_model()
    if path == TOY_MODEL_KEYWORD:
        from trainer.demo_toy import ensure_toy_model

        return ensure_toy_model()
    return None


def builtin_dataset(path: str) -> Path | None:
    """The folder that a dataset keyword names (made on first use), else None."""
    if path == DEMO_KEYWORD:
        return ensure_demo_dataset()
    if path == TOY_DATASET_KEYWORD:
        from trainer.demo_toy import ensure_concept_dataset

        return ensure_concept_dataset()
    return None


def ensure_demo_dataset() -> Path:
    """Nine coloured shapes with captions in a kohya `N_name` folder."""
    root = demo_dir() / "dataset"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".dataset."))
    try:
        write_demo_dataset(staging)
        staging.rename(root)
    except FileExistsError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return root


def write_demo_dataset(root: Path, size: int = 96) -> None:
    from PIL import Image, ImageDraw

    folder = root / f"4_{DEMO_TRIGGER}"
    folder.mkdir(parents=True)
    for shape_index, shape in enumerate(_SHAPES):
        for colour, rgb in _COLOURS.items():
            image = Image.new("RGB", (size, size), (245, 245, 240))
            draw = ImageDraw.Draw(image)
            box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif shape == "square":
                draw.rectangle(box, fill=rgb)
            else:
                draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=rgb)
            name = f"{shape_index}-{shape}-{colour}"
            image.save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(
                f"{DEMO_TRIGGER}, {colour} {shape}, plain background\n"
            )
