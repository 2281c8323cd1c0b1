#!/usr/bin/env python3
"""Generate the small 64x64 PNG illustrations for the built-in ad catalogue.

Deterministic (seeded per ad_id), PIL only, no network. Reads ads.csv next to
this script and draws one image for every row whose ``image`` column is set.

    python data/catalog/make_images.py
"""

from __future__ import annotations

import csv
import random
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "ads.csv"
SIZE = 64

# category -> (background palette, accent palette)
PALETTES = {
    "running": ([(214, 48, 49), (225, 112, 85), (243, 156, 18)], [(255, 255, 255), (45, 52, 54)]),
    "travel": ([(116, 185, 255), (129, 207, 224), (9, 132, 227)], [(253, 203, 110), (255, 255, 255)]),
    "personal_finance": ([(0, 148, 50), (39, 174, 96), (22, 160, 133)], [(241, 196, 15), (255, 234, 167)]),
    "gaming": ([(108, 92, 231), (142, 68, 173), (72, 52, 212)], [(0, 206, 201), (253, 121, 168), (255, 255, 255)]),
    "cooking": ([(250, 177, 160), (255, 234, 167), (225, 112, 85)], [(99, 110, 114), (214, 48, 49)]),
    "pets": ([(223, 190, 150), (178, 137, 99), (245, 222, 179)], [(99, 66, 40), (45, 52, 54)]),
    "skincare": ([(255, 204, 221), (253, 121, 168), (250, 215, 230)], [(255, 255, 255), (232, 67, 147)]),
    "home_office": ([(178, 190, 195), (99, 110, 114), (223, 230, 233)], [(45, 52, 54), (116, 185, 255)]),
    "gardening": ([(85, 239, 196), (0, 184, 148), (106, 176, 76)], [(253, 121, 168), (253, 203, 110), (120, 84, 50)]),
    "cars": ([(45, 52, 54), (99, 110, 114), (30, 39, 46)], [(214, 48, 49), (9, 132, 227), (253, 203, 110)]),
}


def _jitter(c, rng, amt=18):
    return tuple(max(0, min(255, v + rng.randint(-amt, amt))) for v in c)


def _draw_running(d, rng, acc):
    # a stylised shoe: sole + upper + laces
    x0, y0 = rng.randint(6, 14), rng.randint(30, 40)
    col = rng.choice(acc)
    d.rectangle([x0, y0 + 12, x0 + 44, y0 + 17], fill=(45, 52, 54))
    d.polygon([(x0, y0 + 12), (x0 + 4, y0), (x0 + 22, y0 + 2), (x0 + 44, y0 + 12)], fill=col)
    for i in range(3):
        d.line([x0 + 8 + 5 * i, y0 + 3, x0 + 11 + 5 * i, y0 + 8], fill=(214, 48, 49), width=1)
    for _ in range(rng.randint(2, 4)):  # speed lines
        y = rng.randint(8, 28)
        d.line([rng.randint(2, 20), y, rng.randint(30, 60), y], fill=(255, 255, 255), width=1)


def _draw_travel(d, rng, acc):
    r = rng.randint(7, 11)
    cx, cy = rng.randint(12, 50), rng.randint(10, 22)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=acc[0])
    for _ in range(rng.randint(1, 3)):  # clouds
        x, y = rng.randint(0, 48), rng.randint(20, 36)
        d.ellipse([x, y, x + 16, y + 7], fill=(255, 255, 255))
    # sea / hills
    d.rectangle([0, 48, 63, 63], fill=(9, 132, 227) if rng.random() < 0.5 else (85, 170, 85))
    if rng.random() < 0.6:  # a little plane
        px, py = rng.randint(8, 44), rng.randint(32, 42)
        d.polygon([(px, py), (px + 14, py - 2), (px + 14, py + 1)], fill=(255, 255, 255))


def _draw_personal_finance(d, rng, acc):
    for _ in range(rng.randint(3, 6)):
        r = rng.randint(5, 9)
        cx, cy = rng.randint(r, 63 - r), rng.randint(r, 63 - r)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=acc[0], outline=(183, 149, 11))
        d.ellipse([cx - r + 3, cy - r + 3, cx + r - 3, cy + r - 3], outline=(183, 149, 11))
    # rising bar chart
    base = rng.randint(4, 10)
    for i in range(4):
        h = 6 + i * rng.randint(3, 6)
        d.rectangle([base + i * 7, 62 - h, base + i * 7 + 4, 62], fill=acc[1])


def _draw_gaming(d, rng, acc):
    for _ in range(rng.randint(4, 8)):
        w, h = rng.randint(4, 14), rng.randint(4, 14)
        x, y = rng.randint(0, 63 - w), rng.randint(0, 63 - h)
        d.rectangle([x, y, x + w, y + h], fill=rng.choice(acc))
    # controller silhouette
    cx, cy = rng.randint(22, 42), rng.randint(30, 44)
    d.rounded_rectangle([cx - 16, cy - 7, cx + 16, cy + 7], radius=6, fill=(30, 30, 30))
    d.rectangle([cx - 11, cy - 1, cx - 5, cy + 1], fill=(255, 255, 255))
    d.rectangle([cx - 9, cy - 3, cx - 7, cy + 3], fill=(255, 255, 255))
    d.ellipse([cx + 6, cy - 3, cx + 9, cy], fill=acc[0])
    d.ellipse([cx + 10, cy, cx + 13, cy + 3], fill=acc[1])


def _draw_cooking(d, rng, acc):
    cx, cy = rng.randint(26, 38), rng.randint(30, 40)
    r = rng.randint(14, 18)
    d.ellipse([cx - r, cy - r // 2, cx + r, cy + r // 2 + 6], fill=acc[0])  # pot
    d.rectangle([cx + r - 2, cy, cx + r + 10, cy + 3], fill=acc[0])  # handle
    for _ in range(rng.randint(2, 4)):  # steam
        x = cx + rng.randint(-10, 10)
        d.arc([x - 3, cy - r - 6, x + 3, cy - r // 2], 90, 270, fill=(255, 255, 255))
    for _ in range(rng.randint(2, 5)):  # tomatoes / peppers
        x, y = rng.randint(2, 58), rng.randint(50, 58)
        d.ellipse([x, y, x + 5, y + 5], fill=acc[1])


def _draw_pets(d, rng, acc):
    # paw prints
    for _ in range(rng.randint(2, 4)):
        x, y = rng.randint(6, 46), rng.randint(6, 46)
        c = rng.choice(acc)
        d.ellipse([x, y + 5, x + 10, y + 13], fill=c)
        for dx, dy in ((-2, 0), (2, -2), (7, -2), (11, 0)):
            d.ellipse([x + dx, y + dy, x + dx + 3, y + dy + 4], fill=c)
    if rng.random() < 0.5:  # bone
        y = rng.randint(48, 56)
        d.rectangle([16, y, 46, y + 3], fill=(255, 255, 255))
        for x in (12, 44):
            d.ellipse([x, y - 3, x + 5, y + 2], fill=(255, 255, 255))
            d.ellipse([x, y + 1, x + 5, y + 6], fill=(255, 255, 255))


def _draw_skincare(d, rng, acc):
    # bottle + drop + sparkles
    x = rng.randint(10, 30)
    h = rng.randint(26, 36)
    d.rounded_rectangle([x, 60 - h, x + 14, 60], radius=3, fill=acc[0])
    d.rectangle([x + 4, 60 - h - 6, x + 10, 60 - h], fill=acc[1])
    dx, dy = rng.randint(36, 50), rng.randint(14, 30)
    d.ellipse([dx, dy + 4, dx + 10, dy + 14], fill=(255, 255, 255))
    d.polygon([(dx + 1, dy + 7), (dx + 5, dy - 2), (dx + 9, dy + 7)], fill=(255, 255, 255))
    for _ in range(rng.randint(2, 5)):
        sx, sy = rng.randint(4, 60), rng.randint(4, 24)
        d.line([sx - 2, sy, sx + 2, sy], fill=acc[1])
        d.line([sx, sy - 2, sx, sy + 2], fill=acc[1])


def _draw_home_office(d, rng, acc):
    # desk + monitor + mug
    desk_y = rng.randint(44, 50)
    d.rectangle([4, desk_y, 59, desk_y + 3], fill=(120, 84, 50))
    d.rectangle([10, desk_y + 3, 13, 63], fill=(120, 84, 50))
    d.rectangle([50, desk_y + 3, 53, 63], fill=(120, 84, 50))
    mx = rng.randint(12, 24)
    d.rectangle([mx, desk_y - 24, mx + 26, desk_y - 6], fill=acc[0])
    d.rectangle([mx + 2, desk_y - 22, mx + 24, desk_y - 8], fill=acc[1])
    d.rectangle([mx + 11, desk_y - 6, mx + 15, desk_y], fill=acc[0])
    if rng.random() < 0.7:
        ux = rng.randint(44, 52)
        d.rectangle([ux, desk_y - 7, ux + 6, desk_y], fill=(255, 255, 255))


def _draw_gardening(d, rng, acc):
    d.rectangle([0, 50, 63, 63], fill=acc[2])  # soil
    for _ in range(rng.randint(2, 5)):
        x = rng.randint(6, 58)
        top = rng.randint(18, 38)
        d.line([x, 50, x, top], fill=(0, 110, 60), width=2)
        d.ellipse([x - 6, top + 6, x, top + 10], fill=(0, 140, 70))
        r = rng.randint(3, 5)
        d.ellipse([x - r, top - r, x + r, top + r], fill=rng.choice(acc[:2]))


def _draw_cars(d, rng, acc):
    # road + car
    d.rectangle([0, 48, 63, 63], fill=(60, 60, 60))
    for x in range(rng.randint(0, 6), 64, 14):
        d.rectangle([x, 55, x + 7, 56], fill=(255, 255, 255))
    cx = rng.randint(6, 18)
    col = rng.choice(acc)
    d.rounded_rectangle([cx, 34, cx + 40, 46], radius=3, fill=col)
    d.polygon([(cx + 8, 34), (cx + 14, 25), (cx + 28, 25), (cx + 34, 34)], fill=col)
    d.polygon([(cx + 11, 33), (cx + 15, 27), (cx + 27, 27), (cx + 31, 33)], fill=(200, 230, 255))
    for wx in (cx + 6, cx + 28):
        d.ellipse([wx, 41, wx + 9, 50], fill=(20, 20, 20))
        d.ellipse([wx + 3, 44, wx + 6, 47], fill=(180, 180, 180))


DRAWERS = {
    "running": _draw_running,
    "travel": _draw_travel,
    "personal_finance": _draw_personal_finance,
    "gaming": _draw_gaming,
    "cooking": _draw_cooking,
    "pets": _draw_pets,
    "skincare": _draw_skincare,
    "home_office": _draw_home_office,
    "gardening": _draw_gardening,
    "cars": _draw_cars,
}


def make_image(ad_id: str, category: str) -> Image.Image:
    # stable per-ad seed (crc32 is deterministic across runs, unlike hash())
    rng = random.Random(zlib.crc32(ad_id.encode("utf-8")))
    bg_pal, acc = PALETTES[category]
    img = Image.new("RGB", (SIZE, SIZE), _jitter(rng.choice(bg_pal), rng))
    d = ImageDraw.Draw(img)
    # soft horizontal band for variation
    band = _jitter(rng.choice(bg_pal), rng, 25)
    y = rng.randint(0, 40)
    d.rectangle([0, y, 63, y + rng.randint(6, 20)], fill=band)
    DRAWERS[category](d, rng, acc)
    # quantise to a small palette: keeps files tiny and output deterministic
    return img.quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def main() -> None:
    with CSV_PATH.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["image"].strip()]
    for r in rows:
        out = HERE / r["image"]
        out.parent.mkdir(parents=True, exist_ok=True)
        make_image(r["ad_id"], r["category"]).save(out, format="PNG", optimize=True)
    print(f"wrote {len(rows)} images under {HERE / 'images'}")


if __name__ == "__main__":
    main()
