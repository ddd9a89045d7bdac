"""Does an image show what its caption asks for? An automatic checker for the shapes world.

    python -m paraflow.tools.caption_check [--count 96] [--steps 25] [--guidance 5.0]
        [--seed 0] [--size 64] [--out DIR] [--overrides "+strategy=data ..."]
    python -m paraflow.tools.caption_check --self-test   # on exact renders: its own accuracy

`read_scene` reads background, object colour, shape and position back from pixels, written to
tolerate what a small model draws (lumpy edges, colour shifts, specks, blur); `score` compares
readings with captions. The command generates random captions in one paraflow run and scores them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from paraflow.tools.shapes import COLOURS, POSITIONS, parse_caption, random_scenes, render_batch

ATTRIBUTES = ("background", "colour", "shape", "position")
WORK_SIDE = 64  # read scenes at this size: the world has no finer detail, and averaging pixels
# down calms noise and keeps the pure-Python flood fill cheap at any size
OBJECT_DISTANCE = 40.0  # RGB distance from the background that marks a pixel as "something";
# half the closest pair of named colours (orange/yellow, 81 apart)
MIN_OBJECT_AREA = 0.01  # smaller regions, as a fraction of the image, are specks
TRIANGLE_WIDENING = 0.65  # a triangle's width at 1/4 of its height over that at 3/4 is ~1/3
CORNER = 0.2  # corner patches of the bounding box, as a fraction of its sides
SQUARE_CORNERS = 0.45  # a square fills its corner patches (~1), a circle barely (~0.15)


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, any leading shape) to CIE Lab (D65), where distance tracks perception."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.2126, 0.0193],
                             [0.3576, 0.7152, 0.1192],
                             [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_NAMES = list(COLOURS)
_NAMED_LAB = _to_lab(np.array([COLOURS[n] for n in _NAMES]))


def colour_name(rgb: np.ndarray) -> str:
    """The named colour nearest to `rgb` in Lab."""
    return _NAMES[int(np.argmin(np.linalg.norm(_NAMED_LAB - _to_lab(rgb), axis=-1)))]


def _resample(image: np.ndarray) -> np.ndarray:
    """The image at WORK_SIDE², as floats: thresholds and the 3x3 steps below assume that scale."""
    if image.shape[:2] == (WORK_SIDE, WORK_SIDE):
        return image.astype(np.float64)
    # Box-average down (calms noise); bilinear up, so a small image's edges stay soft, not blocky.
    method = Image.Resampling.BOX if image.shape[0] > WORK_SIDE else Image.Resampling.BILINEAR
    resized = Image.fromarray(image).resize((WORK_SIDE, WORK_SIDE), method)
    return np.asarray(resized, dtype=np.float64)


def _box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 mean (edges repeated): per-pixel noise drops threefold before thresholding."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return np.mean([padded[y:y + h, x:x + w] for y in range(3) for x in range(3)], axis=0)


def _largest_region(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected region of `mask` as a mask, or None when mask is empty."""
    # Flood fill on a flat copy framed by a False border: neighbours are plain index offsets
    # and need no bounds checks, which keeps this Python loop quick.
    framed = np.pad(mask, 1)
    width = framed.shape[1]
    todo = framed.ravel().tolist()
    best: list[int] = []
    for start in np.flatnonzero(framed).tolist():
        if not todo[start]:
            continue
        todo[start] = False
        region, stack = [], [start]
        while stack:
            i = stack.pop()
            region.append(i)
            for j in (i - width, i + width, i - 1, i + 1):
                if todo[j]:
                    todo[j] = False
                    stack.append(j)
        if len(region) > len(best):
            best = region
    if not best:
        return None
    out = np.zeros(framed.size, dtype=bool)
    out[best] = True
    return out.reshape(framed.shape)[1:-1, 1:-1]


def _neighbours(mask: np.ndarray, combine: Any) -> np.ndarray:
    """`mask` combined (np.logical_or: dilate, np.logical_and: erode) with its 3x3 neighbours."""
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    return combine.reduce([padded[y:y + h, x:x + w] for y in range(3) for x in range(3)])


def _open(mask: np.ndarray) -> np.ndarray:
    """Erode then dilate: shaves the one-pixel hairs noise leaves on an edge, keeps corners."""
    opened = _neighbours(_neighbours(mask, np.logical_and), np.logical_or)
    return opened if opened.any() else mask


def _box(mask: np.ndarray, least: float = 0.0) -> np.ndarray:
    """The bounding box of `mask`, less its outer rows and columns that hold no more than
    `least` of the fullest one's pixels (a lump on an edge is thin, the shape's body is not)."""
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    ys = np.flatnonzero(rows > least * rows.max())
    xs = np.flatnonzero(cols > least * cols.max())
    return mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]


def _shape_of(mask: np.ndarray) -> str:
    widths = _box(mask).sum(axis=1)
    height = len(widths)
    # Rows near 1/4 and 3/4 of the height, averaged over a few so that one lump doesn't decide.
    band = max(1, height // 8)
    upper = widths[height // 4 - band // 2: height // 4 + band // 2 + 1].mean()
    lower = widths[3 * height // 4 - band // 2: 3 * height // 4 + band // 2 + 1].mean()
    if upper < TRIANGLE_WIDENING * lower:
        return "triangle"
    # Corners tell a square from a circle better than the overall fill does: noise and blur
    # nibble at a square's edges, but leave its corners mostly filled. A circle's thin caps are
    # trimmed with the lumps, which only nudges its (near-empty) corners.
    box = _box(mask, least=0.25)
    ch, cw = max(1, round(CORNER * box.shape[0])), max(1, round(CORNER * box.shape[1]))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(),
                       box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    return "square" if corners >= SQUARE_CORNERS else "circle"


def read_scene(image: np.ndarray) -> dict[str, str]:
    """Background, object colour, shape and position of a uint8 HxWx3 image, as caption words;
    shape, colour and position are "none" when nothing but specks differs from the background."""
    pixels = _resample(np.asarray(image, dtype=np.uint8)[..., :3])
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    found = {"background": colour_name(background),
             "colour": "none", "shape": "none", "position": "none"}

    rough = np.linalg.norm(_box_blur(pixels) - background, axis=-1) > OBJECT_DISTANCE
    region = _largest_region(rough)
    if region is None or region.mean() < MIN_OBJECT_AREA:
        return found
    inner = _neighbours(region, np.logical_and)
    colour = np.median(pixels[inner if inner.any() else region], axis=0)
    found["colour"] = colour_name(colour)

    # Redraw the outline where each pixel is nearer the object's colour than the background's:
    # an antialiased edge pixel counts when it is over half covered, so the geometry is exact.
    axis = colour - background
    share = (_box_blur(pixels) - background) @ axis / max(float(axis @ axis), 1e-6)
    outline = _largest_region(_open((share > 0.5) & _neighbours(region, np.logical_or)))
    shape_mask = outline if outline is not None else region
    found["shape"] = _shape_of(shape_mask)

    # Place by the bounding box's centre, as render() does: a triangle's centroid sits low.
    side = shape_mask.shape[0]
    ys, xs = np.nonzero(shape_mask)
    centre = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]) / side
    names = list(POSITIONS)
    anchors = np.array([POSITIONS[n] for n in names])
    found["position"] = names[int(np.argmin(np.linalg.norm(anchors - centre, axis=-1)))]
    return found


def score(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
    """Per-attribute accuracy ("all": every attribute right) and each image's reading."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    details, hits = [], []
    for image, caption in zip(images, captions):
        wanted = parse_caption(caption)
        read = read_scene(image)
        right = {a: read[a] == wanted.get(a) for a in ATTRIBUTES}
        right["all"] = all(right.values())
        hits.append(right)
        details.append({"caption": caption, "wanted": wanted, "read": read, "correct": right})
    n = max(len(hits), 1)
    accuracy = {a: sum(h[a] for h in hits) / n for a in (*ATTRIBUTES, "all")}
    return {"count": len(details), "accuracy": accuracy, "details": details}


def generate_images(captions: list[str], args: argparse.Namespace, out: Path) -> tuple[
        list[np.ndarray], str]:
    """All captions in one paraflow run; returns the images in caption order and the run dir."""
    from omegaconf import open_dict

    from paraflow.api import compose, generate

    overrides = [f"steps={args.steps}", f"guidance_scale={args.guidance}", f"seed={args.seed}",
                 f"height={args.size}", f"width={args.size}", "images_per_prompt=1",
                 *shlex.split(args.overrides)]
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.prompt = captions  # set directly: captions hold commas that overrides would parse
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=out))  # kept, to look at the images
    generate(cfg, run_dir)
    paths = sorted((run_dir / "images").glob("*.png"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths], str(run_dir)


def _markdown(result: dict[str, Any], setup: dict[str, Any]) -> str:
    lines = ["# Caption check", "", "Setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()),
             "", "| attribute | accuracy |", "|---|---|"]
    lines += [f"| {a} | {v:.1%} |" for a, v in result["accuracy"].items()]
    misses = [d for d in result["details"] if not d["correct"]["all"]]
    if misses:
        lines += ["", f"## Misses ({len(misses)})", "", "| # | caption | read |", "|---|---|---|"]
        for i, d in enumerate(result["details"]):
            if not d["correct"]["all"]:
                read = ", ".join(f"{a}={d['read'][a]}" for a in ATTRIBUTES if not d["correct"][a])
                lines.append(f"| {i} | {d['caption']} | {read} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="bench-results/caption_check")
    parser.add_argument("--overrides", default="", help='extra paraflow overrides, e.g. '
                        '"+strategy=sync_patch launcher.devices=2"')
    parser.add_argument("--self-test", action="store_true",
                        help="score exact renders instead of generating: the checker's accuracy")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    scenes = random_scenes(args.seed, args.count)
    captions = [s.caption for s in scenes]
    setup: dict[str, Any] = {"count": args.count, "seed": args.seed, "size": args.size}
    if args.self_test:
        setup["source"] = "renders (self-test)"
        images: list[np.ndarray] = list(render_batch(scenes, args.size))
    else:
        setup.update(source="paraflow", steps=args.steps, guidance=args.guidance,
                     overrides=args.overrides)
        images, setup["run_dir"] = generate_images(captions, args, out)

    result = score(images, captions)
    print(f"caption check, {result['count']} images ({setup['source']}):")
    for attribute, value in result["accuracy"].items():
        print(f"  {attribute:<10} {value:7.1%}")
    (out / "caption_check.json").write_text(json.dumps({"setup": setup, **result}, indent=2))
    (out / "caption_check.md").write_text(_markdown(result, setup))
    print(f"wrote {out / 'caption_check.json'} and {out / 'caption_check.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
