"""The synthetic world: kinds of regions, random scenes and their rendered images.

Every image shows one scene from a single generator (``make_scene``): textured background bands
of stuff, an occasional void blob, and many small, mutually occluding things (discs, squares,
triangles, stars, hexagons, bars), each kind with its own colour and texture, over clutter and
noise.  Each dataset names the same kinds in its own vocabulary (``CATEGORIES``).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "DATASETS", "KINDS", "VOID", "Kind", "Scene", "make_scene", "render_image",
           "synthetic_sample"]

#: the datasets ``make_synthetic_datasets`` can write, and the folder each one owns under root
# dataset -> its folder; LVIS annotates COCO's images (written with "coco")
DATASETS = {"ade20k": "ADEChallengeData2016", "coco": "coco", "cityscapes": "cityscapes", "lvis": "lvis"}


@dataclass(frozen=True)
class Kind:
    """A class of the synthetic world: how it looks, whether it is a countable thing."""

    name: str
    is_thing: bool
    color: tuple
    texture: str


#: stuff kinds first, then thing kinds; a scene refers to them by index
KINDS = (
    Kind("wall", False, (150, 138, 118), "grain"),
    Kind("sky", False, (112, 160, 214), "waves"),
    Kind("grass", False, (72, 138, 60), "grain"),
    Kind("road", False, (96, 90, 102), "bricks"),
    Kind("disc", True, (228, 58, 48), "rings"),
    Kind("square", True, (238, 204, 40), "checker"),
    Kind("triangle", True, (50, 86, 232), "stripes"),
    Kind("star", True, (204, 60, 222), "solid"),
    Kind("hexagon", True, (36, 212, 200), "dots"),
    Kind("bar", True, (250, 140, 24), "zigzag"),
)
_STUFF = [i for i, k in enumerate(KINDS) if not k.is_thing]
_THINGS = [i for i, k in enumerate(KINDS) if k.is_thing]
#: region kind of unlabelled pixels (ADE20K 255, COCO void, Cityscapes "static")
VOID = -1

#: kind -> category name in each dataset's vocabulary, spelled as detectron2's
#: ADE20K_SEM_SEG_CATEGORIES / COCO_CATEGORIES / LVIS v1 categories and cityscapesscripts'
#: labels spell it (LVIS has things only)
CATEGORIES = {
    # kind        ADE20K              COCO                  Cityscapes    LVIS
    "wall": ("wall", "wall-other-merged", "building", None),
    "sky": ("sky", "sky-other-merged", "sky", None),
    "grass": ("grass", "grass-merged", "vegetation", None),
    "road": ("road, route", "road", "road", None),
    "disc": ("ball", "sports ball", "person", "ball"),
    "square": ("box", "suitcase", "car", "suitcase"),
    "triangle": ("signboard, sign", "kite", "rider", "kite"),
    "star": ("flower", "potted plant", "bicycle", "flowerpot"),
    "hexagon": ("clock", "clock", "bus", "clock"),
    "bar": ("pole", "baseball bat", "truck", "baseball_bat"),
}


@dataclass
class Scene:
    """One synthetic image's content.

    Attributes:
        regions: ``[(kind, polygon)]`` in painting order (later regions cover earlier ones);
            ``kind`` indexes ``KINDS`` or is ``VOID``; ``polygon`` is a list of integer
            ``(x, y)`` pixel vertices, rasterised like PIL's ``ImageDraw.polygon`` (which is
            what cityscapesscripts uses).  Region 0 covers the whole canvas.
        region_map: ``h x w`` int32, the index of the region visible at each pixel.
    """

    regions: list
    region_map: np.ndarray

    @property
    def height(self):
        return self.region_map.shape[0]

    @property
    def width(self):
        return self.region_map.shape[1]

    def kind_map(self):
        """``h x w`` int64 kind index of every pixel (``VOID`` where unlabelled)."""
        kinds = np.array([kind for kind, _ in self.regions], dtype=np.int64)
        return kinds[self.region_map]


def _rasterise(regions, height, width):
    canvas = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index, (_, polygon) in enumerate(regions):
        draw.polygon([tuple(p) for p in polygon], fill=index)
    return np.asarray(canvas, dtype=np.int32)


def _regular_polygon(cx, cy, radius, sides, angle, inner=None):
    """Vertices of a regular polygon (or star when ``inner`` is a radius ratio)."""
    steps = sides * 2 if inner else sides
    t = angle + np.arange(steps) * 2 * np.pi / steps
    r = np.full(steps, float(radius))
    if inner:
        r[1::2] *= inner
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _thing_polygon(name, cx, cy, size, angle):
    if name == "disc":
        return _regular_polygon(cx, cy, size, int(np.clip(size, 8, 28)), angle)
    if name == "square":
        return _regular_polygon(cx, cy, size * 1.2, 4, angle)
    if name == "triangle":
        return _regular_polygon(cx, cy, size * 1.2, 3, angle)
    if name == "star":
        return _regular_polygon(cx, cy, size * 1.3, 5, angle, inner=0.45)
    if name == "hexagon":
        return _regular_polygon(cx, cy, size, 6, angle)
    if name == "bar":
        half_w = max(size * 0.28, 1.5)
        corners = np.array([[-size * 1.4, -half_w], [size * 1.4, -half_w],
                            [size * 1.4, half_w], [-size * 1.4, half_w]])
        c, s = np.cos(angle), np.sin(angle)
        return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
    raise ValueError(f"unknown thing kind {name!r}")


def _to_pixels(points, height, width):
    """Round to integer pixel vertices inside the canvas; ``None`` if degenerate."""
    pixels = np.rint(points).astype(np.int64)
    pixels[:, 0] = np.clip(pixels[:, 0], 0, width - 1)
    pixels[:, 1] = np.clip(pixels[:, 1], 0, height - 1)
    keep = np.ones(len(pixels), dtype=bool)
    keep[1:] = np.any(pixels[1:] != pixels[:-1], axis=1)
    pixels = pixels[keep]
    if len(pixels) < 3 or np.ptp(pixels[:, 0]) == 0 or np.ptp(pixels[:, 1]) == 0:
        return None
    return [(int(x), int(y)) for x, y in pixels]


def _band_polygon(rng, y, height, width):
    """A band from a wobbly line at height ``y`` down to the bottom of the canvas."""
    xs = np.linspace(0, width - 1, 6)
    ys = y + rng.uniform(-0.08, 0.08, size=xs.shape) * height
    top = np.stack([xs, ys], axis=1)
    bottom = np.array([[width - 1, height - 1], [0, height - 1]], dtype=np.float64)
    return _to_pixels(np.concatenate([top, bottom]), height, width)


def make_scene(rng, height, width, max_things=12, min_thing_area=20):
    """Draw a random scene.

    Args:
        rng (np.random.Generator): the only source of randomness.
        height, width (int): canvas size in pixels.
        max_things (int): at most this many things are placed (at least 3).
        min_thing_area (int): things with fewer visible pixels are left out.

    Returns:
        Scene
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size must be at least 16 x 16 pixels, got {height} x {width}")
    regions = [(int(rng.choice(_STUFF)), [(0, 0), (width - 1, 0), (width - 1, height - 1),
                                         (0, height - 1)])]
    for y in np.sort(rng.uniform(0.2, 0.85, size=rng.integers(0, 3))) * height:
        stuff = int(rng.choice([k for k in _STUFF if k != regions[-1][0]]))
        polygon = _band_polygon(rng, y, height, width)
        if polygon is not None:
            regions.append((stuff, polygon))
    if rng.random() < 0.35:
        blob = _regular_polygon(rng.uniform(0, width), rng.uniform(0, height),
                                rng.uniform(4, 12), 7, rng.uniform(0, np.pi))
        blob += rng.normal(scale=1.5, size=blob.shape)
        polygon = _to_pixels(blob, height, width)
        if polygon is not None:
            regions.append((VOID, polygon))
    # log-uniform sizes: many small things, a few large ones
    max_size = max(0.4 * min(height, width), 6.0)
    for _ in range(rng.integers(3, max(3, max_things) + 1)):
        kind = int(rng.choice(_THINGS))
        size = float(np.exp(rng.uniform(np.log(4.0), np.log(max_size))))
        points = _thing_polygon(KINDS[kind].name, rng.uniform(0, width), rng.uniform(0, height),
                                size, rng.uniform(0, 2 * np.pi))
        polygon = _to_pixels(points, height, width)
        if polygon is not None:
            regions.append((kind, polygon))

    region_map = _rasterise(regions, height, width)
    area = np.bincount(region_map.ravel(), minlength=len(regions))
    keep = [i for i, (kind, _) in enumerate(regions)
            if area[i] >= (min_thing_area if kind != VOID and KINDS[kind].is_thing else 1)]
    regions = [regions[i] for i in keep]
    return Scene(regions=regions, region_map=_rasterise(regions, height, width))


def _texture(name, xx, yy, rng):
    """Brightness pattern in [0, 1] over the canvas coordinates ``xx, yy`` (``h x w``)."""
    phase = rng.uniform(0, 2 * np.pi)
    if name == "solid":
        return np.ones_like(xx)
    if name == "stripes":
        return (np.sin(0.9 * (xx + yy) + phase) > 0).astype(np.float32)
    if name == "checker":
        return ((xx // 3 + yy // 3) % 2).astype(np.float32)
    if name == "dots":
        return (((xx % 4) - 1.5) ** 2 + ((yy % 4) - 1.5) ** 2 < 2.0).astype(np.float32)
    if name == "rings":
        cx, cy = rng.uniform(0, xx.shape[1]), rng.uniform(0, xx.shape[0])
        return (np.sin(1.3 * np.hypot(xx - cx, yy - cy) + phase) > 0).astype(np.float32)
    if name == "zigzag":
        return ((yy + 2 * np.abs((xx % 6) - 3)) % 5 < 2).astype(np.float32)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(0.15 * yy + 0.8 * np.sin(0.1 * xx + phase))
    if name == "grain":
        coarse = rng.random((xx.shape[0] // 4 + 2, xx.shape[1] // 4 + 2)).astype(np.float32)
        return coarse[(yy // 4).astype(np.int64), (xx // 4).astype(np.int64)]
    if name == "bricks":
        row = yy // 5
        return (((yy % 5) > 0) & (((xx + 5 * (row % 2)) % 10) > 0)).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def render_image(scene, rng):
    """Paint ``scene``: each region in its kind's colour and texture, plus clutter and noise.

    Returns:
        ``h x w x 3`` uint8 RGB image.
    """
    h, w = scene.height, scene.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), dtype=np.float32)
    for index, (kind, _) in enumerate(scene.regions):
        mask = scene.region_map == index
        if not mask.any():
            continue
        if kind == VOID:
            image[mask] = rng.uniform(0, 255, size=(int(mask.sum()), 3))
            continue
        color = np.asarray(KINDS[kind].color, dtype=np.float32) + rng.normal(scale=10, size=3)
        pattern = _texture(KINDS[kind].texture, xx, yy, rng)[mask]
        image[mask] = color * (0.6 + 0.4 * pattern[:, None])
    # clutter on the background: thin random strokes that belong to no object
    is_stuff = np.isin(scene.kind_map(), _STUFF)
    clutter = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(2, 7)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        length, angle = rng.uniform(5, 25), rng.uniform(0, 2 * np.pi)
        grey = int(rng.integers(40, 200))
        draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))],
                  fill=(grey, grey, grey), width=1)
    strokes = np.asarray(clutter, dtype=np.float32)
    stroke_mask = is_stuff & (strokes.sum(axis=2) > 0)
    image[stroke_mask] = strokes[stroke_mask]
    image += rng.normal(scale=8, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_sample(seed, dataset, split, index, min_side=64, max_side=160,
                     cityscapes_size=(128, 256)):
    """The scene and image of one file of one split, as ``make_synthetic_datasets`` writes it.

    Every image draws from its own generator seeded by ``(seed, dataset, split, index)``, so a
    file does not depend on how many others are written.

    Returns:
        (Scene, ``h x w x 3`` uint8 RGB image)
    """
    rng = np.random.default_rng(
        [seed, list(DATASETS).index(dataset), ("train", "val").index(split), index])
    if dataset == "cityscapes":
        height, width = cityscapes_size
    else:
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    # about one thing per 900 pixels: many small things on the larger canvases
    scene = make_scene(rng, height, width, max_things=int(np.clip(height * width / 900, 8, 24)))
    return scene, render_image(scene, rng)
