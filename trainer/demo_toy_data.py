"""Synthetic pictures for the toy demo model (`trainer/demo_toy.py`): what
its base model was pretrained on and the concept its demo teaches.

The base draws the `BASE_SHAPES` in the `BASE_COLOURS` from captions like
"a red circle". The concept, "mychar" (a yellow star), is neither a colour
nor a shape the base was shown, so the base cannot draw it before training.
The VAE is a general picture coder, as SD's is: it is trained on random
colours and random polygons (`vae_image`), so it can encode and decode the
concept images, but it never learnt what any caption means.

Pictures are drawn at 4x and downsampled, for smooth edges. Every function
takes a `random.Random`, so a seed gives the same pictures on every machine.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

SIZE = 64  # pixels: the toy works in 8 x 8 latents
BACKGROUND = (245, 245, 240)
BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
                "purple": (140, 50, 190)}
CONCEPT_WORD = "mychar"
CONCEPT_RGB = (245, 200, 20)  # yellow: no base colour is near it
CONCEPT_IMAGES = 8
_SUPER = 4  # supersampling factor


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def base_captions() -> list[str]:
    return [caption(c, s) for s in BASE_SHAPES for c in BASE_COLOURS]


def _canvas(background=BACKGROUND):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE * _SUPER, SIZE * _SUPER), background)
    return image, ImageDraw.Draw(image)


def _done(image):
    from PIL import Image

    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _place(rng: random.Random, low: float = 0.26, high: float = 0.38) -> tuple[float, float, float]:
    """Centre x, y and radius, in supersampled pixels: a shape near the middle."""
    full = SIZE * _SUPER
    radius = rng.uniform(low, high) * full
    jitter = 0.1 * full
    return full / 2 + rng.uniform(-jitter, jitter), full / 2 + rng.uniform(-jitter, jitter), radius


def _draw_shape(draw, shape: str, x: float, y: float, r: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        side = r * 0.9
        draw.rectangle((x - side, y - side, x + side, y + side), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)],
                     fill=rgb)
    elif shape == "star":
        draw.polygon(star_points(x, y, r), fill=rgb)
    else:
        raise ValueError(shape)


def star_points(x: float, y: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    inner = r * 0.45
    return [(x + (r if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             y - (r if i % 2 == 0 else inner) * math.cos(math.pi * i / points))
            for i in range(2 * points)]


def base_image(rng: random.Random, colour: str, shape: str):
    """One training picture of the base model: `caption(colour, shape)`."""
    image, draw = _canvas()
    _draw_shape(draw, shape, *_place(rng), BASE_COLOURS[colour])
    return _done(image)


def concept_image(rng: random.Random):
    """A yellow star, a little bigger or smaller and off-centre each time."""
    image, draw = _canvas()
    _draw_shape(draw, "star", *_place(rng, 0.3, 0.42), CONCEPT_RGB)
    return _done(image)


def vae_image(rng: random.Random):
    """A random picture for the VAE: one or two shapes of any colour on the
    background, a random polygon (convex or not) among them."""
    image, draw = _canvas()
    for _ in range(rng.choice((1, 1, 2))):
        rgb = tuple(rng.randrange(256) for _ in range(3))
        x, y, r = _place(rng, 0.12, 0.42)
        kind = rng.choice(("circle", "square", "triangle", "polygon", "polygon"))
        if kind == "polygon":
            corners = rng.randrange(3, 13)
            angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(corners))
            draw.polygon([(x + r * rng.uniform(0.35, 1) * math.cos(a),
                           y + r * rng.uniform(0.35, 1) * math.sin(a)) for a in angles], fill=rgb)
        else:
            _draw_shape(draw, kind, x, y, r, rgb)
    return _done(image)


def write_concept_dataset(root: Path, seed: int = 0) -> None:
    """`root/10_mychar/`: CONCEPT_IMAGES yellow stars captioned "mychar"."""
    folder = root / f"10_{CONCEPT_WORD}"
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for index in range(CONCEPT_IMAGES):
        name = f"{CONCEPT_WORD}-{index}"
        concept_image(rng).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{CONCEPT_WORD}\n")
