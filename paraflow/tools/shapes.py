"""The procedural world the embedded model is trained on: one shape, in a named colour, at a named
place, on a plain background, with a caption that says so. No downloads; deterministic per seed.

    "a red circle on the left, blue background"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Where each named place puts the shape's centre, as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"}
SIZE = 0.36  # the shape's extent as a fraction of the image side (before jitter)
JITTER = 0.04  # how far the centre wanders, as a fraction of the side
VOCABULARY = sorted({"a", "background", *COLOURS, *SHAPES,
                     *(w for phrase in PLACE_PHRASES.values() for w in phrase.split())})


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str
    shape: str
    position: str
    dx: float = 0.0  # jitter of the centre, fractions of the side
    dy: float = 0.0
    scale: float = 1.0

    @property
    def caption(self) -> str:
        return (f"a {self.colour} {self.shape} {PLACE_PHRASES[self.position]}, "
                f"{self.background} background")

    def attributes(self) -> dict[str, str]:
        return {"background": self.background, "colour": self.colour, "shape": self.shape,
                "position": self.position}


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    colour = [n for n in names if n != background][rng.integers(len(names) - 1)]
    return Scene(background, colour, SHAPES[rng.integers(len(SHAPES))],
                 list(POSITIONS)[rng.integers(len(POSITIONS))],
                 dx=float(rng.uniform(-JITTER, JITTER)), dy=float(rng.uniform(-JITTER, JITTER)),
                 scale=float(rng.uniform(0.9, 1.1)))


def random_scenes(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption asks for (those it names); the inverse of Scene.caption."""
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str] = {}
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in COLOURS:
            found["background"] = words[i - 1]
    for i, word in enumerate(words):
        if word in SHAPES:
            found["shape"] = word
            if i > 0 and words[i - 1] in COLOURS:
                found["colour"] = words[i - 1]
        elif word in POSITIONS:
            found["position"] = word
    return found


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw `scene` at `size`² pixels, antialiased by drawing larger and box-filtering down."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + scene.dx) * big, (fy + scene.dy) * big
    half = SIZE * scene.scale * big / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        side = half * 0.89  # a square of the same area as the circle looks the same size
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:  # an upright triangle, its box centred on the centre
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def render_batch(scenes: list[Scene], size: int = 64) -> np.ndarray:
    """uint8 array (N, size, size, 3)."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])
