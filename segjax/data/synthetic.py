"""Seeded 2D scenes that exercise what makes segmentation hard (pure numpy, no TF).

Classes (semantic label ids):
  0 background  graded, textured, noisy backdrop whose colour varies per image.
  1 tool        a knife: a dark, saturated handle and a bright metallic blade. The two parts look
                nothing alike, so no single colour threshold groups them into one object.
  2 berry       clusters of round fruit that vary in size, hue (red/purple/blue) and shading
                (radial falloff + specular highlight); berries touch and overlap.
  3 leaf        lens-shaped green/yellow leaves with a lighter midrib, varying in size and angle.

Every example is a pure function of (seed, split, index): the same arguments give the same bytes,
and examples can be generated in any order or in parallel. Objects are painted back to front, so
later objects occlude earlier ones; the instance map numbers the visible objects 1..K.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np

CLASS_NAMES = ("background", "tool", "berry", "leaf")
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class SceneParams:
    """Knobs of the generator; every field is mirrored in `config.data.synthetic`."""

    image_size: int = 64
    noise: float = 0.05  # std of additive Gaussian pixel noise (image range 0..1)
    contrast: float = 1.0  # 1 = full object/background contrast, 0 = objects take the bg colour
    min_objects: int = 2
    max_objects: int = 5


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


class _Canvas:
    """Image, semantic and instance maps that objects are painted onto, back to front."""

    def __init__(self, size: int, rng: np.random.Generator, params: SceneParams):
        self.size = size
        self.rng = rng
        self.params = params
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        self.yy, self.xx = yy, xx
        self.image = self._background()
        self.bg_mean = self.image.reshape(-1, 3).mean(0)
        self.label = np.zeros((size, size), np.uint8)
        self.instances = np.zeros((size, size), np.int32)
        self.next_id = 1

    def _background(self) -> np.ndarray:
        rng, s = self.rng, self.size
        base = _hsv(rng.uniform(), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.7))
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * self.xx + np.sin(angle) * self.yy) / s - 0.5
        grad = rng.uniform(0.1, 0.3) * ramp
        texture = np.zeros((s, s), np.float32)
        for _ in range(3):
            freq = rng.uniform(2, 8) / s * 2 * np.pi
            phi = rng.uniform(0, 2 * np.pi)
            theta = rng.uniform(0, np.pi)
            arg = freq * (np.cos(theta) * self.xx + np.sin(theta) * self.yy) + phi
            texture += rng.uniform(0.02, 0.06) * np.sin(arg)
        return base[None, None, :] + (grad + texture)[..., None]

    def _colour(self, rgb: np.ndarray) -> np.ndarray:
        return self.bg_mean + self.params.contrast * (rgb - self.bg_mean)

    def paint(self, region: np.ndarray, pixels: np.ndarray, cls: int) -> None:
        """Paint one object instance: `pixels` is [H,W,3], only `region` pixels are used."""
        if not region.any():
            return
        self.image[region] = self._colour(pixels[region])
        self.label[region] = cls
        self.instances[region] = self.next_id
        self.next_id += 1

    def rotated(self, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u along `angle`, v across it) centred on (cy, cx)."""
        dy, dx = self.yy - cy, self.xx - cx
        c, s = np.cos(angle), np.sin(angle)
        return c * dx + s * dy, -s * dx + c * dy


def _paint_tool(cv: _Canvas) -> None:
    rng, s = cv.rng, cv.size
    length = rng.uniform(0.45, 0.8) * s
    width = rng.uniform(0.08, 0.13) * s
    cy, cx = rng.uniform(0.2, 0.8, size=2) * s
    u, v = cv.rotated(cy, cx, rng.uniform(0, 2 * np.pi))
    split = -length / 2 + rng.uniform(0.35, 0.45) * length
    handle = (u >= -length / 2) & (u < split) & (np.abs(v) < 0.6 * width)
    taper = np.clip((length / 2 - u) / (0.35 * length), 0, 1)  # the blade narrows to a tip
    blade = (u >= split) & (u <= length / 2) & (np.abs(v) < 0.5 * width * taper) & (v > -0.5 * width)
    handle_rgb = _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.12, 0.35))
    steel = rng.uniform(0.75, 0.95)
    sheen = 0.12 * np.cos(np.pi * v / width)  # metallic highlight across the blade
    pixels = np.empty(cv.image.shape, np.float32)
    pixels[:] = handle_rgb
    blade_rgb = (steel + sheen)[..., None] * np.array([0.97, 0.99, 1.0], np.float32)
    pixels = np.where(blade[..., None], blade_rgb, pixels)
    cv.paint(handle | blade, pixels, 1)


def _paint_berries(cv: _Canvas) -> None:
    rng, s = cv.rng, cv.size
    cy, cx = rng.uniform(0.15, 0.85, size=2) * s
    for _ in range(rng.integers(1, 6)):
        r = rng.uniform(0.04, 0.1) * s
        by, bx = cy + rng.normal(0, 0.07 * s), cx + rng.normal(0, 0.07 * s)
        d2 = ((cv.yy - by) ** 2 + (cv.xx - bx) ** 2) / r**2
        hue = rng.choice([rng.uniform(0.95, 1.02), rng.uniform(0.75, 0.85), rng.uniform(0.6, 0.68)])
        rgb = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.45, 0.85))
        shade = 1.0 - 0.45 * np.clip(d2, 0, 1)
        hl = np.exp(-(((cv.yy - by + 0.35 * r) ** 2 + (cv.xx - bx + 0.35 * r) ** 2) / (0.2 * r) ** 2))
        pixels = rgb * shade[..., None] + 0.5 * hl[..., None]
        cv.paint(d2 <= 1.0, pixels, 2)


def _paint_leaf(cv: _Canvas) -> None:
    rng, s = cv.rng, cv.size
    half_len = rng.uniform(0.12, 0.25) * s
    half_wid = half_len * rng.uniform(0.3, 0.5)
    cy, cx = rng.uniform(0.15, 0.85, size=2) * s
    u, v = cv.rotated(cy, cx, rng.uniform(0, 2 * np.pi))
    # Lens shape: width shrinks to zero at both tips.
    inside = np.abs(v) <= half_wid * np.clip(1 - (u / half_len) ** 2, 0, None)
    rgb = _hsv(rng.uniform(0.18, 0.36), rng.uniform(0.5, 0.9), rng.uniform(0.35, 0.75))
    rib = np.exp(-((v / (0.08 * half_wid + 0.5)) ** 2)) * (np.abs(u) < half_len)
    pixels = rgb + 0.25 * rib[..., None]
    cv.paint(inside, pixels, 3)


_PAINTERS = (_paint_tool, _paint_berries, _paint_leaf)


def render_scene(seed: int, split: str, index: int, params: SceneParams) -> dict[str, np.ndarray]:
    """One example: `image` uint8 [S,S,3], `label` uint8 [S,S], `instances` uint16 [S,S],
    `present` int32 [num_classes] (1 where the class has at least one visible pixel)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    cv = _Canvas(params.image_size, rng, params)
    for _ in range(rng.integers(params.min_objects, params.max_objects + 1)):
        _PAINTERS[rng.integers(len(_PAINTERS))](cv)
    noisy = cv.image + rng.normal(0, params.noise, cv.image.shape).astype(np.float32)
    image = np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)
    # Renumber the instances that are still visible after occlusion as 1..K.
    ids = np.unique(cv.instances)
    ids = ids[ids > 0]
    lut = np.zeros(cv.next_id, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    present = np.bincount(cv.label.ravel(), minlength=len(CLASS_NAMES)) > 0
    return {
        "image": image,
        "label": cv.label,
        "instances": lut[cv.instances],
        "present": present.astype(np.int32),
    }
