"""PNG compress_level against encode time and size at 512x512, to choose the default of the
worker's PNG compression setting; and whether Pillow releases the GIL while it encodes.

    .venv/bin/python docs/bench/png_levels.py [--repeats 9]

Two images, both deterministic (seeded):

* ``noise``: uniform random uint8 RGB, what a model with random weights outputs. It does
  not compress at all: every level only costs time.
* ``photo``: photo-like. A smooth two-colour gradient (sky to ground), a few soft-edged
  shapes (a sun disc, a hill, a window-like rectangle) in flat colours, multi-octave value
  noise for texture (smooth random fields at 64, 32, 16, 8 and 4 px, weaker as they get
  finer) and mild per-pixel sensor noise (sigma 2 levels). It compresses as a real 512x512
  photo does (raw 786 kB to a few hundred kB), which flat or clean synthetic images do not:
  checked once against a detailed real photo (a circuit board, cropped and resized to
  512x512), which came out at 533 / 497 kB at levels 1 / 6, this image at 440 / 374 kB.

Each image is encoded once per level to warm up, then ``--repeats`` times; the table gives
the median milliseconds per encode and the encoded size (kB = 1000 bytes). Pillow's default
when ``compress_level`` is not given is zlib's default, level 6. Timings depend on the zlib
Pillow was built with (its wheels ship zlib-ng; recorded in the JSON's ``env``).

The GIL check encodes 8 ``photo`` images at level 1 and at level 6 on one thread, then on a
ThreadPoolExecutor of 2: a speedup near 2 on a 2-core machine means the encoder runs with
the GIL released; near 1, that it holds it.

Writes the results as JSON next to this script (``png-levels.json``) and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features
from tqdm import tqdm

SIZE = 512
LEVELS = (0, 1, 2, 3, 6, 9)
GIL_IMAGES = 8
GIL_LEVELS = (1, 6)
OUT = Path(__file__).with_name("png-levels.json")


def noise_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _smooth_field(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Value noise: a coarse grid of N(0, 1) values, one per ``cell`` px, resized smoothly."""
    coarse = rng.standard_normal((size // cell + 2, size // cell + 2)).astype(np.float32)
    big = Image.fromarray(coarse, "F").resize((size + 2 * cell, size + 2 * cell), Image.Resampling.BICUBIC)
    return np.asarray(big)[cell : cell + size, cell : cell + size]


def photo_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    sky = np.array([90, 140, 210], np.float32)
    horizon = np.array([235, 190, 150], np.float32)
    ground = np.array([70, 95, 50], np.float32)
    t = np.clip(y / 0.6, 0, 1)[..., None]
    img = sky * (1 - t) + horizon * t
    # A hill: ground below a sine-shaped ridge, edge softened over ~2 px.
    ridge = 0.55 + 0.08 * np.sin(2 * np.pi * (x * 1.3 + 0.2))
    img = _blend(img, ground + 40 * (1 - y[..., None]), (y - ridge) * size / 2)
    # A sun disc and a window-like rectangle.
    sun = 0.06 - np.hypot(x - 0.72, y - 0.25)
    img = _blend(img, np.array([255, 235, 180], np.float32), sun * size / 2)
    box = np.minimum(np.minimum(x - 0.12, 0.34 - x), np.minimum(y - 0.62, 0.9 - y))
    img = _blend(img, np.array([150, 110, 90], np.float32), box * size / 2)
    # Texture: value noise at several scales, plus sensor noise.
    texture = sum(_smooth_field(rng, size, cell) * amp for cell, amp in ((64, 10), (32, 7), (16, 5), (8, 4), (4, 3)))
    img = img + texture[..., None] * np.array([1.0, 0.9, 0.8], np.float32)
    img = img + rng.normal(0, 2, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def _blend(img: np.ndarray, colour: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``colour`` where ``inside`` > 0, with a linear ramp one unit wide at the edge."""
    alpha = np.clip(inside + 0.5, 0, 1)[..., None]
    return img * (1 - alpha) + colour * alpha


def encode(image: Image.Image, level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def time_encodes(image: Image.Image, level: int, repeats: int, bar: tqdm) -> tuple[float, int]:
    data = encode(image, level)  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(image, level)
        times.append(time.perf_counter() - started)
        bar.update()
    return statistics.median(times) * 1000, len(data)


def gil_check(image: Image.Image, level: int, rounds: int = 3) -> dict:
    """Best of ``rounds`` for 8 encodes on 1 thread and on 2 (least disturbed by others)."""
    images = [image.copy() for _ in range(GIL_IMAGES)]
    result = {}
    for threads in (1, 2):
        walls, cpus = [], []
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda im: encode(im, level), images[:threads]))  # start the threads
            for _ in range(rounds):
                wall, cpu = time.perf_counter(), time.process_time()
                list(pool.map(lambda im: encode(im, level), images))
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        best = min(range(rounds), key=walls.__getitem__)
        result[f"threads_{threads}"] = {"wall_ms": walls[best] * 1000, "cpu_ms": cpus[best] * 1000}
    result["speedup"] = result["threads_1"]["wall_ms"] / result["threads_2"]["wall_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed encodes per image and level (median)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    images = {"noise": noise_image(), "photo": photo_image()}
    rows = []
    with tqdm(total=len(images) * len(LEVELS) * args.repeats, desc="encodes", unit="png") as bar:
        for name, image in images.items():
            for level in LEVELS:
                ms, size = time_encodes(image, level, args.repeats, bar)
                rows.append({"image": name, "level": level, "median_ms": ms, "kB": size / 1000})
    gil = {f"photo_level_{level}": gil_check(images["photo"], level) for level in GIL_LEVELS}

    result = {
        "size": SIZE,
        "repeats": args.repeats,
        "raw_kB": SIZE * SIZE * 3 / 1000,
        "rows": rows,
        "gil": gil,
        "env": {
            "pillow": PIL.__version__,
            "zlib": features.version("zlib"),
            "zlib_ng": features.version("zlib_ng") if "zlib_ng" in features.features else None,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    by = {(r["image"], r["level"]): r for r in rows}
    print(f"\nPNG encode at {SIZE}x{SIZE} RGB (raw {result['raw_kB']:.0f} kB), median of {args.repeats}:\n")
    print("| compress_level | noise ms | noise kB | photo ms | photo kB |")
    print("|---:|---:|---:|---:|---:|")
    for level in LEVELS:
        n, p = by["noise", level], by["photo", level]
        print(f"| {level} | {n['median_ms']:.1f} | {n['kB']:.0f} | {p['median_ms']:.1f} | {p['kB']:.0f} |")
    print(f"\n{GIL_IMAGES} photo encodes, 1 thread vs 2 ({os.cpu_count()} CPUs), best of 3:\n")
    print("| level | 1 thread ms | 2 threads ms | speedup | CPU ms / wall ms (2 threads) |")
    print("|---:|---:|---:|---:|---:|")
    for level in GIL_LEVELS:
        g = gil[f"photo_level_{level}"]
        one, two = g["threads_1"], g["threads_2"]
        print(
            f"| {level} | {one['wall_ms']:.0f} | {two['wall_ms']:.0f} | {g['speedup']:.2f}x"
            f" | {two['cpu_ms'] / two['wall_ms']:.2f} |"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
