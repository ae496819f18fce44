"""Small shared pieces: augmentations, pictures, progress lines, the CLI wrapper, registries, devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hnm_ray.training.augment import AugmentConfig, augment, two_views
from hnm_ray.run.cli import entry_point
from hnm_ray.run.cluster import torch_device
from hnm_ray.core.errors import ConfigError, HnmError
from hnm_ray.run.progress import Progress
from hnm_ray.core.registry import Registry, load_plugin
from hnm_ray.report import ScoreScale, heatmap, plot_roc, score_overlay
from hnm_ray.report.plots import OVERLAY_ALPHA, score_colours
from hnm_ray.report.slides import ScoredSlide, tumour_and_normal
from hnm_ray.store.manifest import SlideRecord


def _tiles(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_two_views_keep_layout_differ_and_are_seeded():
    tiles = _tiles()
    a1, a2 = two_views(tiles, AugmentConfig(), torch.Generator().manual_seed(1))
    b1, _ = two_views(tiles, AugmentConfig(), torch.Generator().manual_seed(1))
    assert a1.shape == tiles.shape and a1.dtype == torch.uint8
    assert torch.equal(a1, b1)
    assert not torch.equal(a1, a2)
    assert augment(tiles, AugmentConfig(out_size=32), torch.Generator().manual_seed(0)).shape == (4, 32, 32, 3)


@pytest.mark.parametrize("orientations, allowed", [("none", 1), ("hflip", 2), ("dihedral", 8)])
def test_views_take_only_the_orientations_asked_for(orientations, allowed):
    """finetune.orientations: with no crop or jitter a view is one of the tile's 8 flips/turns; "none" keeps the
    tile as it lies (a 6 must not become a 9), "hflip" the tile or its mirror, "dihedral" any of the 8 (all seen)."""
    tiles = _tiles(n=1, size=16).expand(256, -1, -1, -1).contiguous()
    plain = AugmentConfig(crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0, saturation=0.0, orientations=orientations)
    views = augment(tiles, plain, torch.Generator().manual_seed(0))
    tile = tiles[0]
    square = [torch.rot90(t, k, dims=(0, 1)) for t in (tile, tile.flip(1)) for k in range(4)]
    seen = {next(i for i, s in enumerate(square) if torch.equal(v, s)) for v in views}  # StopIteration: not one of 8
    assert len(seen) == allowed
    assert seen <= ({0} if orientations == "none" else {0, 4} if orientations == "hflip" else set(range(8)))
    with pytest.raises(ValueError, match="orientations"):
        augment(tiles, AugmentConfig(orientations="upside_down"), torch.Generator().manual_seed(0))


def test_fine_tuning_views_follow_the_orientations_knob(monkeypatch):
    """The joint: the fine-tuning loop's views (and so the warm start's, which runs it) get finetune.orientations."""
    from dataclasses import asdict

    from hnm_ray.config import FinetuneConfig
    from hnm_ray.training import augment as augment_module
    from hnm_ray.training import finetune

    seen = []
    monkeypatch.setattr(augment_module, "two_views", lambda tiles, cfg, gen, kind: seen.append(cfg) or (tiles, tiles))
    fc = asdict(FinetuneConfig(orientations="none"))
    finetune._views(np.zeros((2, 8, 8, 3), np.uint8), lambda x: x, fc, None, "cpu", "rgb_imagenet")
    assert [c.orientations for c in seen] == ["none"]


def test_default_views_vary_brightness_like_stain_variation():
    """Default colour jitter scales a tile's brightness by up to +-60 %: at +-30 % stain and brightness still told
    tiles apart, and the warm start's tile probe was 0.912 +- 0.052 against 0.932 +- 0.025 (benchmarks/README)."""
    grey = torch.full((256, 8, 8, 3), 128, dtype=torch.uint8)
    views = augment(grey, AugmentConfig(), torch.Generator().manual_seed(0)).float().mean((1, 2, 3)) / 128
    assert views.min() < 0.5 and views.max() > 1.5


def _reference_view(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """`augment` written out of place, one image at a time (the generator's draws in the same order)."""
    import torch.nn.functional as F

    x = tiles.permute(0, 3, 1, 2).float() / 255.0
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*cfg.crop_scale, generator=gen)
    side = (area.sqrt() * min(h, w)).clamp(min=8).round()
    ox = (torch.rand(b, generator=gen) * (w - side + 1)).floor()
    oy = (torch.rand(b, generator=gen) * (h - side + 1)).floor()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2], theta[:, 1, 2] = (2 * ox + side) / w - 1, (2 * oy + side) / h - 1
    x = F.grid_sample(x, F.affine_grid(theta, [b, 3, h, w], align_corners=False), mode="bilinear",
                      padding_mode="reflection", align_corners=False)
    flip = torch.rand(b, generator=gen) < 0.5
    turns = torch.randint(0, 4, (b,), generator=gen)
    x = torch.stack([torch.rot90(img.flip(-1) if f else img, int(k), dims=(-2, -1)) for img, f, k in zip(x, flip, turns)])
    factors = [torch.empty(b).uniform_(1 - s, 1 + s, generator=gen)[:, None, None, None]
               for s in (cfg.brightness, cfg.contrast, cfg.saturation)]
    x = x * factors[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[1] + mean
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = ((x - grey) * factors[2] + grey).clamp(0, 1)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augment_equals_its_plain_reference_bit_for_bit(seed):
    """The batched, in-place augmentation (turns grouped, colour jitter in place) computes exactly what the plain
    per-image version computes from the same generator."""
    tiles = _tiles(n=16, size=48)
    ours = augment(tiles, AugmentConfig(), torch.Generator().manual_seed(seed))
    assert torch.equal(ours, _reference_view(tiles, AugmentConfig(), torch.Generator().manual_seed(seed)))


def test_roc_and_heatmap_pngs(tmp_path):
    roc = plot_roc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), tmp_path / "roc.png", threshold=0.4)
    with Image.open(roc) as picture:
        assert picture.size == (400, 400)
    thumb = np.full((100, 200, 3), 255, np.uint8)
    mask = np.zeros((10, 20), bool)
    mask[2:6, 2:8] = True
    path = heatmap(thumb, (2000, 1000), np.array([0, 1000]), np.array([0, 0]), 500, np.array([1.0, 0.1]),
                   tmp_path / "h.png", ScoreScale(0.5, 1.0), title="s1 | true label: tumour (1)",
                   tumour_mask=mask, marked=np.array([False, True]))
    with Image.open(path) as picture:
        assert picture.size[0] > 200 and picture.size[1] > 100  # thumbnail, colour bar and title


def test_heatmap_overlay_is_transparent_below_the_runs_tile_threshold_and_scaled_from_it():
    """The demo run's tile scores all lay in 0.32-0.80: a fixed floor of 0.2 tinted the whole tissue. Tiles below the
    run's threshold are transparent; colours run from the threshold (the map's first colour) to the run's top score
    (its last), at one opacity so the colour bar matches the tissue."""
    scale = ScoreScale(threshold=0.62, top=0.80)
    x = np.array([0, 500, 1000, 1500])
    overlay = score_overlay((100, 200), (2000, 1000), x, np.zeros(4), 500, np.array([0.61, 0.62, 0.80, 0.44]), scale)
    assert overlay.shape == (100, 200, 4)
    assert overlay[10, 10, 3] == 0 and overlay[10, 160, 3] == 0  # 0.61 and 0.44: below the threshold
    assert overlay[10, 60, 3] == overlay[10, 110, 3] == OVERLAY_ALPHA
    cmap = score_colours()
    np.testing.assert_allclose(overlay[10, 60, :3], cmap(0.0)[:3])  # at the threshold: the first colour
    np.testing.assert_allclose(overlay[10, 110, :3], cmap(1.0)[:3])  # the run's top score: the last colour
    assert overlay[80, 60, 3] == 0  # no tile there
    assert "0.620" in scale.label() and "0.800" in scale.label()


def test_heatmap_overlay_rasterised_without_a_tile_loop_paints_what_drawing_each_tile_paints():
    """score_overlay painted tile by tile in Python (0.5 s for a 40,000-tile bag, 129 test slides a report): now
    rasterised in numpy. Against a plain per-tile reference: tiles smaller than a pixel cover one, the later of
    overlapping tiles shows, tiles past the edge are clipped."""
    from hnm_ray.report.plots import tile_owners

    rng = np.random.default_rng(3)
    n, dims, shape, extent = 300, (3000, 2000), (37, 61), 90.0
    x, y = rng.integers(0, 3200, n), rng.integers(0, 2200, n)
    expected = np.full(shape, -1)
    sx, sy = shape[1] / dims[0], shape[0] / dims[1]
    for i in range(n):
        x0, y0 = int(x[i] * sx), int(y[i] * sy)
        expected[y0:max(y0 + 1, int((y[i] + extent) * sy)), x0:max(x0 + 1, int((x[i] + extent) * sx))] = i
    np.testing.assert_array_equal(tile_owners(shape, dims, x, y, extent), expected)


def test_heatmap_title_states_the_runs_threshold_and_the_verdict():
    """'predicted P(tumour) = 0.021' said neither the threshold (0.807) nor that the tumour slide was missed."""
    def title(label, probability):
        record = SlideRecord("demo_009", "demo_009.svs", label, "test")
        empty = np.zeros(0)
        return ScoredSlide(record, probability, empty, empty, empty, 1.0, empty, empty, empty).title(0.807)

    assert "0.021 < threshold 0.807" in title(1, 0.021) and "called normal, MISSED" in title(1, 0.021)
    assert "called tumour, hit" in title(1, 0.9) and "called normal, correct" in title(0, 0.2)
    assert "FALSE ALARM" in title(0, 0.807) and "no label" in title(None, 0.5)


def test_progress_line_counts_rate_and_extras():
    progress = Progress("tiles", 10, every_s=1e9)
    progress.update(4, slides=1)
    progress.update(1, slides=1)
    line = progress.line()
    assert line.startswith("tiles: 5/10 (50%)") and "slides 2" in line


def test_entry_point_turns_our_errors_into_exit_code_2(caplog):
    @entry_point
    def main(argv):
        raise ConfigError("neg_ratio", "out of range")

    assert main([]) == 2
    assert entry_point(lambda argv: 0)([]) == 0
    with pytest.raises(ValueError):
        entry_point(lambda argv: (_ for _ in ()).throw(ValueError("not ours")))([])
    assert issubclass(ConfigError, HnmError)


def test_registry_and_plugins():
    registry: Registry = Registry("thing")

    @registry.register("a")
    def make_a():
        return "a"

    assert registry.names() == ["a"] and "a" in registry and registry["a"]() == "a"
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: "b")
    assert load_plugin("json:dumps", "thing")([1]) == "[1]"
    with pytest.raises(ConfigError) as info:
        load_plugin("json:no_such_function", "thing")
    assert info.value.key == "thing"


def test_torch_device_is_explicit():
    assert torch_device(False, "mil.use_gpu") == "cpu"
    if torch.cuda.is_available():
        assert torch_device(True, "mil.use_gpu") == "cuda"
    else:  # a GPU asked for where torch sees none: refused, naming the knob (never a silent CPU run)
        with pytest.raises(ConfigError, match="sees none") as info:
            torch_device(True, "mil.use_gpu")
        assert info.value.key == "mil.use_gpu"


def test_heatmap_slides_take_tumour_and_normal_test_slides_in_turn():
    """The demo drew its first 4 test slides in manifest order: 3 normal, 1 tumour. Heatmaps alternate the classes."""
    records = [SlideRecord(f"s{i}", "", label, "test") for i, label in enumerate([0, 0, 0, 1, 0, 1])]
    assert tumour_and_normal(records, [r.slide_id for r in records], 4) == ["s3", "s0", "s5", "s1"]
    assert tumour_and_normal(records, ["s0", "s1", "s2"], 2) == ["s0", "s1"]  # one class only: what there is
