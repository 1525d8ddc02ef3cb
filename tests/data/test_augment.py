import json

import pytest
import torch

from equiseg.data.augment import (
    RGB_FROM_HED,
    Augment,
    AugmentConfig,
    BrightnessContrast,
    Dihedral,
    Elastic,
    Noise,
    Rotation,
    StainJitter,
    elastic_displacement,
    elastic_lattice,
    jitter_stains,
    rgb_to_hed,
    sampling_grid,
    warp,
)
from equiseg.data.targets import IGNORE_INDEX
from equiseg.groups import D4

OD_UNIT = 13.815510557964274  # -ln(1e-6): skimage's optical-density unit


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labelled_batch(batch: int = 4, size: int = 32, seed: int = 0):
    """A random image with a long cell mask {0, 1, 2} and a uint8 tissue mask {1, 2, 255}."""
    g = generator(seed)
    image = torch.rand(batch, 3, size, size, generator=g)
    cells = torch.randint(0, 3, (batch, size, size), generator=g)
    tissue = torch.randint(1, 3, (batch, size, size), generator=g, dtype=torch.uint8)  # as targets.py makes it
    tissue[:, :5, :7] = IGNORE_INDEX
    return image, {"cells": cells, "tissue": tissue}


def geometric(max_degrees: float = 180.0, alpha: float = 2.0, sigma: float = 6.0) -> AugmentConfig:
    return AugmentConfig(rotation=Rotation(p=1.0, max_degrees=max_degrees), elastic=Elastic(p=1.0, alpha=alpha, sigma=sigma))


def rotate(image, masks, degrees: float):
    """Rotate every sample by exactly ``degrees`` through the same path that Augment takes."""
    batch, _, height, width = image.shape
    grid, inside = sampling_grid(torch.full((batch,), float(degrees)), None, height, width)
    return warp(image, masks, grid, inside)


# --- identity -----------------------------------------------------------------------------------


ALL_ON_WITH_ZERO_STRENGTH = AugmentConfig(
    rotation=Rotation(p=1.0), elastic=Elastic(p=1.0), stain=StainJitter(p=1.0),
    brightness_contrast=BrightnessContrast(p=1.0), noise=Noise(p=1.0),
)


@pytest.mark.parametrize("config", [AugmentConfig.none(), ALL_ON_WITH_ZERO_STRENGTH], ids=["none", "zero-strength"])
def test_off_is_the_exact_identity(config):
    image, masks = labelled_batch()
    out, out_masks = Augment(config)(image, masks, generator=generator())
    assert torch.equal(out, image)
    assert out_masks.keys() == masks.keys()
    for name in masks:
        assert torch.equal(out_masks[name], masks[name]), name
    assert Augment(config)(image)[1] == {}


# --- D4 -----------------------------------------------------------------------------------------


def matching_element(before: torch.Tensor, after: torch.Tensor, elements):
    """The elements g with T_g before == after (exact)."""
    return [g for g in elements if torch.equal(D4.act_on_image(g, before), after)]


def test_dihedral_moves_image_and_all_masks_together():
    g = generator()
    cells = torch.randint(0, 3, (16, 8, 8), generator=g)
    tissue = torch.randint(0, 256, (16, 8, 8), generator=g)
    image = (cells.float() / 2)[:, None].expand(-1, 3, -1, -1)  # every channel is the mask / 2
    out, masks = Augment(AugmentConfig(dihedral=Dihedral(p=1.0)))(image, {"cells": cells, "tissue": tissue}, generator=g)
    assert torch.equal(out, (masks["cells"].float() / 2)[:, None].expand(-1, 3, -1, -1))
    used = set()
    for i in range(16):
        candidates = matching_element(cells[i], masks["cells"][i], D4.elements)
        assert candidates, f"sample {i} is not a D4 image of its input"
        # the random tissue mask has no symmetry, so it pins the element down
        (element,) = matching_element(tissue[i], masks["tissue"][i], D4.elements)
        assert element in candidates, f"sample {i}: the masks moved differently"
        used.add(element)
    assert len(used) >= 5  # 16 uniform draws from 8 elements


def test_dihedral_keeps_the_shape_of_non_square_images():
    image, masks = labelled_batch(batch=16, size=10)
    image, masks = image[..., :6, :], {name: m[..., :6, :] for name, m in masks.items()}
    out, out_masks = Augment(AugmentConfig(dihedral=Dihedral(p=1.0)))(image, masks, generator=generator())
    assert out.shape == image.shape
    half_turns = [g for g in D4.elements if g.rotation % 2 == 0]
    used = set()
    for i in range(16):
        (element,) = matching_element(image[i], out[i], half_turns)
        assert torch.equal(out_masks["cells"][i], D4.act_on_image(element, masks["cells"][i]))
        used.add(element)
    assert len(used) >= 3


# --- rotation and elastic warp ------------------------------------------------------------------


@pytest.mark.parametrize("degrees, quarter_turns", [(90, 1), (-90, -1), (180, 2)])
def test_rotation_turns_the_way_rot90_does(degrees, quarter_turns):
    image, masks = labelled_batch(batch=2, size=9)
    out, out_masks = rotate(image, masks, degrees)
    torch.testing.assert_close(out, torch.rot90(image, quarter_turns, dims=(-2, -1)), atol=1e-5, rtol=0)
    for name in masks:
        assert torch.equal(out_masks[name], torch.rot90(masks[name], quarter_turns, dims=(-2, -1))), name


def test_45_degrees_ignores_the_corners_only():
    size = 65
    image = torch.rand(1, 3, size, size, generator=generator())
    masks = {"cells": torch.ones(1, size, size, dtype=torch.long)}
    out, out_masks = rotate(image, masks, 45)
    cells = out_masks["cells"][0]
    assert set(cells.unique().tolist()) == {1, IGNORE_INDEX}
    assert all(cells[r, c] == IGNORE_INDEX for r in (0, -1) for c in (0, -1))
    assert cells[size // 2, size // 2] == 1 and cells[0, size // 2] == 1  # the middle of each edge stays inside
    # A square and its 45-degree turn overlap in a regular octagon of area 2 (sqrt 2 - 1) = 0.83.
    ignored = (cells == IGNORE_INDEX).float().mean().item()
    assert 0.14 < ignored < 0.20
    assert out.min() >= 0 and out.max() <= 1  # reflected, not zero-filled or NaN


def test_warped_masks_take_no_new_values():
    image, masks = labelled_batch(batch=4, size=48)
    masks["sparse"] = torch.tensor([0, 3, 7, 1000, IGNORE_INDEX])[torch.randint(0, 5, (4, 48, 48))]
    config = AugmentConfig.heavy()
    _, out_masks = Augment(config)(image, masks, generator=generator())
    for name, m in masks.items():
        allowed = set(m.unique().tolist()) | {IGNORE_INDEX}
        assert set(out_masks[name].unique().tolist()) <= allowed, name
        assert out_masks[name].dtype == m.dtype
    assert (out_masks["cells"] == IGNORE_INDEX).any()  # heavy turns by up to 180 degrees


def test_labels_stay_on_the_content_they_label():
    size = 64
    cells = torch.zeros(4, size, size, dtype=torch.long)
    cells[:, 8:26, 10:28] = 1
    cells[:, 34:56, 30:50] = 2
    # channel k is bright where the label is k + 1: the image shows the labels
    image = torch.stack([(cells == 1).float(), (cells == 2).float(), torch.full_like(cells, 0.5, dtype=torch.float)], 1)
    out, masks = Augment(geometric())(image, {"cells": cells}, generator=generator())
    seen = torch.where(out[:, 0] > 0.5, 1, torch.where(out[:, 1] > 0.5, 2, 0))  # bilinear, thresholded
    valid = masks["cells"] != IGNORE_INDEX
    # bilinear-then-threshold and nearest may disagree on a one-pixel rim along label edges only
    mismatch = (seen != masks["cells"])[valid].float().mean().item()
    assert mismatch < 0.02
    moved = (masks["cells"] != cells)[valid].float().mean().item()
    assert moved > 0.1  # the labels did move, so the agreement above is not trivial


def test_ignore_inside_a_mask_survives():
    size = 64
    tissue = torch.ones(1, size, size, dtype=torch.long)
    tissue[:, 24:40, 24:40] = IGNORE_INDEX  # 256 px around the centre of rotation
    image = torch.rand(1, 3, size, size, generator=generator())
    _, masks = rotate(image, {"tissue": tissue}, 30)
    window = masks["tissue"][0, 12:52, 12:52]  # the turned square stays inside this window
    assert masks["tissue"][0, 32, 32] == IGNORE_INDEX
    assert 0.85 * 256 < (window == IGNORE_INDEX).sum() < 1.15 * 256
    _, masks = Augment(AugmentConfig(dihedral=Dihedral(p=1.0)))(image, {"tissue": tissue}, generator=generator())
    assert (masks["tissue"] == IGNORE_INDEX).sum() == 256


@pytest.mark.parametrize("sigma", [4.0, 10.0])
def test_elastic_field_has_rms_alpha(sigma):
    height, width = 160, 192
    noise = torch.randn(4, 2, *elastic_lattice(height, width, sigma), generator=generator())
    field = elastic_displacement(noise, alpha=3.0, sigma=sigma, size=(height, width))
    assert field.shape == (4, 2, height, width)
    rms = field[..., 30:-30, 30:-30].square().mean().sqrt().item()
    assert 2.6 < rms < 3.4
    step = (field[..., 1:] - field[..., :-1]).square().mean().sqrt().item()
    assert step < 3.0 / sigma  # smooth: neighbours move almost alike


# --- photometric --------------------------------------------------------------------------------


def test_noise_has_the_configured_std():
    image = torch.full((4, 3, 64, 64), 0.5)
    out, _ = Augment(AugmentConfig(noise=Noise(p=1.0, std=0.03)))(image, generator=generator())
    delta = out - image
    assert abs(delta.std().item() - 0.03) < 0.0015
    assert abs(delta.mean().item()) < 0.001


@pytest.mark.parametrize("config", [
    AugmentConfig(noise=Noise(p=0.5, std=0.03)),
    AugmentConfig(stain=StainJitter(p=0.5, sigma=0.05, bias=0.02)),
    AugmentConfig(rotation=Rotation(p=0.5, max_degrees=30.0)),
    AugmentConfig(dihedral=Dihedral(p=0.5)),  # the identity is one of the 8 elements: 7/16 change
], ids=["noise", "stain", "rotation", "dihedral"])
def test_probability_applies_per_sample(config):
    image = torch.full((32, 3, 16, 16), 0.5) + 0.3 * torch.rand(32, 3, 16, 16, generator=generator(1))
    out, _ = Augment(config)(image, generator=generator())
    changed = (out != image).flatten(1).any(dim=1).sum().item()
    assert 6 <= changed <= 26  # about half of 32


def test_rgb_to_hed_finds_a_mixture_of_pure_stains():
    hed = torch.tensor([0.3, 0.1, 0.05])
    rgb = torch.exp(-(hed @ RGB_FROM_HED) * OD_UNIT).reshape(1, 3, 1, 1)
    torch.testing.assert_close(rgb_to_hed(rgb).flatten(), hed, atol=1e-5, rtol=0)


def test_stain_round_trip_without_jitter_is_the_identity():
    image = 0.05 + 0.95 * torch.rand(2, 3, 16, 16, generator=generator())
    out = jitter_stains(image, scale=torch.ones(2, 3), shift=torch.zeros(2, 3))
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)


def test_stain_jitter_scales_one_stain():
    hed = 0.1 * torch.rand(1, 3, 8, 8, generator=generator())  # faint enough that nothing clamps
    image = torch.exp(-torch.einsum("bshw,sc->bchw", hed, RGB_FROM_HED) * OD_UNIT)
    out = jitter_stains(image, scale=torch.tensor([[1.5, 1.0, 1.0]]), shift=torch.tensor([[0.0, 0.02, 0.0]]))
    expected = hed * torch.tensor([1.5, 1.0, 1.0])[:, None, None] + torch.tensor([0.0, 0.02, 0.0])[:, None, None]
    torch.testing.assert_close(rgb_to_hed(out), expected, atol=1e-4, rtol=0)


def test_stain_jitter_changes_the_image_within_range():
    image, _ = labelled_batch()
    out, _ = Augment(AugmentConfig(stain=StainJitter(p=1.0, sigma=0.05, bias=0.02)))(image, generator=generator())
    assert (out - image).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every sample changed
    assert out.min() >= 0 and out.max() <= 1


def test_brightness_contrast_is_affine_per_sample():
    image, _ = labelled_batch(batch=3)
    config = AugmentConfig(brightness_contrast=BrightnessContrast(p=1.0, brightness=0.1, contrast=0.2))
    out, _ = Augment(config)(image * 0.5 + 0.25, generator=generator())  # mid-range: no clamping
    for before, after in zip(image * 0.5 + 0.25, out):
        x, y = before.flatten(), after.flatten()
        factor = torch.cov(torch.stack([x, y]))[0, 1] / x.var()
        assert 0.8 - 1e-4 <= factor <= 1.2 + 1e-4
        torch.testing.assert_close(y, (x - x.mean()) * factor + x.mean() + (y.mean() - x.mean()), atol=1e-5, rtol=0)
        assert abs(y.mean() - x.mean()) <= 0.1 + 1e-5


# --- randomness ---------------------------------------------------------------------------------


def test_same_seed_same_batch_other_seed_other_batch():
    image, masks = labelled_batch()
    augment = Augment(AugmentConfig.heavy())
    a, a_masks = augment(image, masks, generator=generator(7))
    b, b_masks = augment(image, masks, generator=generator(7))
    c, c_masks = augment(image, masks, generator=generator(8))
    assert torch.equal(a, b) and all(torch.equal(a_masks[k], b_masks[k]) for k in masks)
    assert not torch.equal(a, c) and not torch.equal(a_masks["cells"], c_masks["cells"])


@pytest.mark.parametrize("config, distinct", [
    (AugmentConfig(dihedral=Dihedral(p=1.0)), 3),
    (AugmentConfig(rotation=Rotation(p=1.0, max_degrees=180.0)), 8),
    (AugmentConfig(elastic=Elastic(p=1.0, alpha=2.0, sigma=6.0)), 8),
    (AugmentConfig(stain=StainJitter(p=1.0, sigma=0.05)), 8),
    (AugmentConfig(stain=StainJitter(p=1.0, bias=0.02)), 8),
    (AugmentConfig(brightness_contrast=BrightnessContrast(p=1.0, brightness=0.1)), 8),
    (AugmentConfig(brightness_contrast=BrightnessContrast(p=1.0, contrast=0.2)), 8),
    (AugmentConfig(noise=Noise(p=1.0, std=0.03)), 8),
    (AugmentConfig.heavy(), 8),
], ids=["dihedral", "rotation", "elastic", "stain-scale", "stain-bias", "brightness", "contrast", "noise", "heavy"])
def test_samples_of_a_batch_draw_their_own_parameters(config, distinct):
    image, _ = labelled_batch(batch=1)
    out, _ = Augment(config)(image.expand(8, -1, -1, -1), generator=generator())
    assert len({tuple(sample.flatten().tolist()) for sample in out}) >= distinct  # of 8 copies of one image


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, message", [
    (lambda: Dihedral(p=1.5), ValueError, "Dihedral.p"),
    (lambda: Rotation(p=-0.1), ValueError, "Rotation.p"),
    (lambda: Rotation(p=1.0, max_degrees=270.0), ValueError, "Rotation.max_degrees"),
    (lambda: Elastic(p=0.5, alpha=-1.0), ValueError, "Elastic.alpha"),
    (lambda: Elastic(p=0.5, alpha=2.0, sigma=0.0), ValueError, "Elastic.sigma"),
    (lambda: Noise(p=1.0, std=-0.03), ValueError, "Noise.std"),
    (lambda: Noise(p=1.0, std=float("nan")), ValueError, "Noise.std"),
    (lambda: BrightnessContrast(p=1.0, contrast=1.5), ValueError, "BrightnessContrast.contrast"),
    (lambda: StainJitter(p=1.0, bias=-0.02), ValueError, "StainJitter.bias"),
    (lambda: AugmentConfig.from_dict({"blur": {"p": 1.0}}), ValueError, "blur"),
    (lambda: AugmentConfig.from_dict({"noise": {"p": 1.0, "sd": 0.1}}), ValueError, "sd"),
    (lambda: AugmentConfig.preset("medium"), ValueError, "medium"),
    (lambda: Noise(p="1", std=0.1), TypeError, "Noise.p"),
    (lambda: Dihedral(p=True), TypeError, "Dihedral.p"),
    (lambda: AugmentConfig(rotation={"p": 1.0}), TypeError, "AugmentConfig.rotation"),
    (lambda: AugmentConfig.from_dict({"noise": 0.1}), TypeError, "noise"),
])
def test_bad_configs_are_refused_clearly(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("name", ["none", "heavy", "non_symmetry"])
def test_presets_survive_a_dict_round_trip(name):
    config = AugmentConfig.preset(name)
    as_dict = config.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # plain builtin types only
    assert AugmentConfig.from_dict(as_dict) == config


def test_presets_switch_the_right_transforms():
    def on(config):
        return {name: getattr(config, name).enabled for name in config.to_dict()}

    assert not any(on(AugmentConfig.none()).values())
    assert all(on(AugmentConfig.heavy()).values())
    expected = {**on(AugmentConfig.heavy()), "dihedral": False, "rotation": False}
    assert on(AugmentConfig.non_symmetry()) == expected
    partial = AugmentConfig.from_dict({"noise": {"p": 1.0, "std": 0.1}})
    assert partial == AugmentConfig(noise=Noise(p=1.0, std=0.1))


def test_masks_must_match_the_image():
    image, masks = labelled_batch()
    with pytest.raises(ValueError, match="cells"):
        Augment(AugmentConfig.heavy())(image, {"cells": masks["cells"][:, :-1]})
    with pytest.raises(ValueError, match="float image"):
        Augment(AugmentConfig.heavy())((image * 255).long(), masks)


def test_heavy_runs_on_a_realistic_batch():
    image, masks = labelled_batch(batch=4, size=256)
    out, out_masks = Augment(AugmentConfig.heavy())(image, masks, generator=generator())
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.min() >= 0 and out.max() <= 1
    for name, m in masks.items():
        assert out_masks[name].shape == m.shape and out_masks[name].dtype == m.dtype
        assert set(out_masks[name].unique().tolist()) <= set(m.unique().tolist()) | {IGNORE_INDEX}


def test_a_config_knows_which_preset_it_is():
    from equiseg.data.augment import AugmentPreset

    for preset in AugmentPreset:
        assert AugmentConfig.preset(preset).preset_name == preset.value == AugmentConfig.preset(preset.value).preset_name
    assert AugmentConfig.from_dict({"noise": {"p": 1.0, "std": 0.1}}).preset_name == "custom"
