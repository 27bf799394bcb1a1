"""`sample.compare`: the sample prompts with the adapter and without it, side
by side, in one grid per run (`samples/compare.png`, core/run_layout.py)
that gains a row at every sampling point (up to `MAX_ROWS`: the first and
the newest).

Rows are sampling points, newest last; columns are prompts, each a "with" |
"without" pair. The "with" cells are read back from the previews in
samples/, so they are exactly those files and a resumed run's grid keeps the
rows from before the resume. Prompts of different sizes (`--w/--h`) are
centred in slots of the largest width and the largest height.

The "without" images are the base model's (the adapters disabled, an LCM-LoRA
of `sample.lcm_lora` still attached so both halves take the same 4 steps):
they never change during a run, so they are rendered once per process and
reused, and a compare costs one extra set of renders per run, not per save.
"""

from __future__ import annotations

import weakref

from core.run_layout import RunLayout, preview_position

LABEL_WIDTH = 40  # left of each row: its step
HEADER_HEIGHT = 14  # above each column: "with" / "without"
# Rows kept: the first sampling point and the newest ones. 12 rows of two
# 512 px prompts are a 2088 x 6158 PNG; more is slow to write (seconds) and to view.
MAX_ROWS = 12
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)

# sd.unet -> (what the images depend on, the images): gone with the model.
_WITHOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def without_images(config, sd, network) -> list | None:
    """The base model's samples, with the settings the previews use; None
    unless `sample.compare`. Call while the previews' LCM-LoRA is attached."""
    if not config.sample.compare:
        return None
    from trainer.preview import preview_settings
    from trainer.sampling import generate

    settings = preview_settings(config)
    key = (repr(settings), config.sample.lcm_lora)
    cached = _WITHOUT.get(sd.unet)
    if cached is not None and cached[0] == key:
        return cached[1]
    enabled = [adapter.enabled for adapter in network.adapters]
    network.set_enabled(False)
    try:
        images = generate(sd, settings)
    finally:
        for adapter, was in zip(network.adapters, enabled, strict=True):
            adapter.enabled = was
    _WITHOUT[sd.unet] = (key, images)
    return images


def write_compare_grid(outputs, step: int, without: list, every: int):
    """Rewrite the grid with every sampling point's previews up to `step`."""
    rows = kept_rows(preview_rows(outputs.layout, step, every, len(without)))
    return outputs.save_compare_grid(grid_image(loaded(rows), without))


def kept_rows(rows: list) -> list:
    """The first row (the adapter barely trained) and the newest ones."""
    return rows if len(rows) <= MAX_ROWS else [rows[0], *rows[1 - MAX_ROWS:]]


def preview_rows(layout: RunLayout, step: int, every: int, prompts: int) -> list[tuple]:
    """(step, preview paths) of each sampling point up to `step` whose
    previews are all in samples/: multiples of `every`, and `step` itself (a
    run's end). Previews of other steps (a run with other settings before)
    are left out."""
    found: dict[int, dict[int, object]] = {}
    if layout.samples.is_dir():
        for path in layout.samples.iterdir():
            position = preview_position(path.name)
            if position is not None:
                found.setdefault(position[0], {})[position[1]] = path
    rows = []
    for at in sorted(found):
        due = at == step or (every and at % every == 0)
        if at <= step and due and set(found[at]) == set(range(prompts)):
            rows.append((at, [found[at][index] for index in range(prompts)]))
    return rows


def loaded(rows: list[tuple]) -> list[tuple]:
    from PIL import Image

    images = []
    for at, paths in rows:
        row = []
        for path in paths:
            with Image.open(path) as image:
                row.append(image.convert("RGB"))
        images.append((at, row))
    return images


def slot_size(images) -> tuple[int, int]:
    """The largest width and the largest height: every cell's slot."""
    return max(i.width for i in images), max(i.height for i in images)


def grid_size(rows: int, prompts: int, slot: tuple[int, int]) -> tuple[int, int]:
    return LABEL_WIDTH + 2 * prompts * slot[0], HEADER_HEIGHT + rows * slot[1]


def grid_image(rows: list[tuple[int | str, list]], without: list, corner: str = "step"):
    """Rows of (step, "with" image per prompt); each prompt's "with" image
    then its "without" image, centred in slots of the largest size."""
    from PIL import Image, ImageDraw, ImageFont

    every_image = [*without, *(image for _, images in rows for image in images)]
    slot = slot_size(every_image)
    grid = Image.new("RGB", grid_size(len(rows), len(without), slot), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((2, 2), corner, fill=INK, font=font)
    for column in range(2 * len(without)):
        draw.text((LABEL_WIDTH + column * slot[0] + 2, 2), ("with", "without")[column % 2],
                  fill=INK, font=font)
    for row, (step, images) in enumerate(rows):
        top = HEADER_HEIGHT + row * slot[1]
        draw.text((2, top + 2), str(step), fill=INK, font=font)
        pairs = zip(images, without, strict=True)
        for column, image in enumerate(image for pair in pairs for image in pair):
            left = LABEL_WIDTH + column * slot[0]
            grid.paste(image, (left + (slot[0] - image.width) // 2,
                               top + (slot[1] - image.height) // 2))
    return grid
