"""Sample grids of the default model, for the README: random captions of the shapes world drawn
in one paraflow run and tiled into one PNG, captions listed beside it in a .txt.

    python -m paraflow.tools.samples --size 64 --out docs/samples_64.png
    python -m paraflow.tools.samples --size 256 --count 8 --columns 4 \
        --out docs/samples_256.png   # 4x the native size
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from omegaconf import open_dict
from PIL import Image

from paraflow.api import compose, generate
from paraflow.tools.shapes import random_scenes


def tile(paths: list[Path], columns: int) -> Image.Image:
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * ((len(images) + columns - 1) // columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a grid of samples of the default model")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="extra paraflow overrides")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)

    captions = [s.caption for s in random_scenes(args.seed + 100, args.count)]
    cfg = compose([f"height={args.size}", f"width={args.size}", f"steps={args.steps}",
                   f"seed={args.seed}", *shlex.split(args.overrides)])
    with open_dict(cfg):
        cfg.prompt = captions  # captions hold commas, which the override grammar would split
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        generate(cfg, run)
        grid = tile(sorted((run / "images").glob("*.png")), args.columns)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    args.out.with_suffix(".txt").write_text(
        "\n".join(f"{i}: {c}" for i, c in enumerate(captions)) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
