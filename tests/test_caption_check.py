"""The caption checker: accurate on exact renders, strict about wrong captions, and tolerant of
the noise, specks and blur a generated image brings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from paraflow.tools.caption_check import ATTRIBUTES, read_scene, score
from paraflow.tools.shapes import COLOURS, POSITIONS, SHAPES, Scene, random_scenes, render_batch

from .conftest import REPO


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return random_scenes(123, 600)


@pytest.fixture(scope="module")
def renders(scenes: list[Scene]) -> np.ndarray:
    return render_batch(scenes, 64)


def report(label: str, accuracy: dict[str, float]) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


@pytest.mark.parametrize("size,count", [(64, 600), (128, 80), (256, 40)])
def test_reads_renders(scenes: list[Scene], renders: np.ndarray, size: int, count: int) -> None:
    chosen = scenes[:count]
    images = renders if size == 64 else render_batch(chosen, size)
    result = score(images, [s.caption for s in chosen])
    report(f"renders {size}² x{count}", result["accuracy"])
    assert all(v >= 0.99 for v in result["accuracy"].values()), result["accuracy"]


def _other(value: str, choices: list[str], rng: np.random.Generator) -> str:
    return str(rng.choice([c for c in choices if c != value]))


@pytest.mark.parametrize("attribute", ["colour", "shape", "position", "background"])
def test_wrong_captions_fail(scenes: list[Scene], renders: np.ndarray, attribute: str) -> None:
    """Captions with one attribute swapped: that attribute scores (near) zero, the rest still
    score high, so the checker does compare what it reads."""
    rng = np.random.default_rng(0)
    choices = {"colour": list(COLOURS), "background": list(COLOURS), "shape": list(SHAPES),
               "position": list(POSITIONS)}[attribute]
    captions = []
    for scene in scenes[:120]:
        named = scene.attributes()
        named[attribute] = _other(named[attribute], choices, rng)
        captions.append(Scene(named["background"], named["colour"], named["shape"],
                              named["position"]).caption)
    result = score(renders[:120], captions)
    report(f"{attribute} swapped", result["accuracy"])
    assert result["accuracy"][attribute] <= 0.02
    assert result["accuracy"]["all"] <= 0.02
    assert all(result["accuracy"][a] >= 0.99 for a in ATTRIBUTES if a != attribute)


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild blur, Gaussian noise of 10 grey levels, and four 2x2 specks of random colour."""
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8 * image.shape[0] / 64))
    noisy = np.asarray(blurred, dtype=np.float64) + rng.normal(0.0, 10.0, image.shape)
    for _ in range(4):
        y, x = rng.integers(0, image.shape[0] - 2, size=2)
        noisy[y:y + 2, x:x + 2] = rng.integers(0, 256, size=3)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_tolerates_noise_specks_and_blur(scenes: list[Scene], renders: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    images = [_degrade(image, rng) for image in renders[:300]]
    images += [_degrade(image, rng) for image in render_batch(scenes[300:330], 256)]
    result = score(images, [s.caption for s in scenes[:330]])
    report("degraded x330", result["accuracy"])
    assert all(v >= 0.95 for v in result["accuracy"].values()), result["accuracy"]


def test_blank_image_has_no_object() -> None:
    blank = np.full((64, 64, 3), COLOURS["green"], dtype=np.uint8)
    blank[10:12, 20:22] = COLOURS["white"]  # a speck is not an object
    assert read_scene(blank) == {"background": "green", "colour": "none", "shape": "none",
                                 "position": "none"}


def test_self_test_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "paraflow.tools.caption_check", "--self-test", "--count", "24",
         "--out", str(tmp_path)], cwd=REPO, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    record = json.loads((tmp_path / "caption_check.json").read_text())
    assert record["count"] == 24 and len(record["details"]) == 24
    assert record["accuracy"]["all"] >= 0.95
    assert "| shape |" in (tmp_path / "caption_check.md").read_text()
