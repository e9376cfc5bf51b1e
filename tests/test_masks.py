import numpy as np
import pytest
import torch

from ambient_med.physics.masks import (
    LineMaskFunc,
    acs_lines,
    derive_seed,
    further_kspace_mask,
    further_line_count,
    further_pixel_mask,
    pixel_mask,
)


def test_derive_seed_is_stable_and_distinguishes_parts():
    # sha256("1234/sub-a/3")[:4] little-endian: fixed across processes and machines.
    assert derive_seed(1234, "sub-a", 3) == derive_seed(1234, "sub-a", 3)
    assert derive_seed(1234, "sub-a", 3) != derive_seed(1234, "sub-a", 4)
    assert derive_seed(1234, "sub-a", 3) != derive_seed(1235, "sub-a", 3)
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"1234/sub-a/3").digest()[:4], "little")
    assert derive_seed(1234, "sub-a", 3) == expected


@pytest.mark.parametrize("mask_type", ["random", "equispaced"])
def test_line_mask_is_deterministic(mask_type):
    func = LineMaskFunc([0.08], [4], mask_type)
    a, b = func(320, seed=7), func(320, seed=7)
    assert a.dtype == bool and a.shape == (320,)
    np.testing.assert_array_equal(a, b)
    # A fresh object gives the same mask: no hidden state carries over between calls.
    np.testing.assert_array_equal(LineMaskFunc([0.08], [4], mask_type)(320, seed=7), a)


def test_random_line_masks_differ_between_seeds():
    func = LineMaskFunc([0.08], [4], "random")
    assert not np.array_equal(func(320, seed=1), func(320, seed=2))


@pytest.mark.parametrize("acceleration", [2, 4, 6, 8])
def test_random_mask_reaches_the_nominal_acceleration(acceleration):
    func = LineMaskFunc([0.08], [acceleration], "random")
    kept = np.mean([func(320, seed=s).sum() for s in range(200)])
    assert kept == pytest.approx(320 / acceleration, rel=0.05)


@pytest.mark.parametrize("acceleration", [4, 8])
def test_equispaced_mask_reaches_the_nominal_acceleration(acceleration):
    mask = LineMaskFunc([0.08], [acceleration], "equispaced")(320, seed=3)
    assert 320 / mask.sum() == pytest.approx(acceleration, rel=0.1)


@pytest.mark.parametrize("mask_type", ["random", "equispaced"])
def test_centre_lines_are_always_acquired(mask_type):
    func = LineMaskFunc([0.08], [8], mask_type)
    centre = round(320 * 0.08)
    pad = (320 - centre + 1) // 2
    for seed in range(20):
        mask = func(320, seed)
        assert mask[pad : pad + centre].all()
        assert mask[160]  # DC of the centred spectrum


def test_pixel_mask_keeps_one_minus_p():
    mask = pixel_mask((256, 256), p=0.8, seed=5)
    assert mask.mean() == pytest.approx(0.2, abs=0.01)
    np.testing.assert_array_equal(mask, pixel_mask((256, 256), p=0.8, seed=5))
    with pytest.raises(ValueError):
        pixel_mask((4, 4), p=1.0, seed=0)


def test_acs_lines_is_the_contiguous_centre_run():
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [1, 6, 7, 8, 9, 12]] = True
    expected = torch.zeros(1, 16, dtype=torch.bool)
    expected[0, [6, 7, 8, 9]] = True
    assert torch.equal(acs_lines(mask), expected)


@pytest.mark.parametrize(("acceleration", "kept"), [(2, 106), (4, 64), (6, 45), (8, 35)])
def test_further_corruption_reproduces_the_published_line_counts(acceleration, kept):
    # docs/method.md: 320 columns, floor(320 / R) lines observed by A.
    observed = torch.tensor([320 // acceleration])
    assert int(further_line_count(320, observed)) == kept


@pytest.mark.parametrize("acceleration", [2, 4, 6, 8])
def test_further_kspace_mask_drops_only_non_acs_lines(acceleration):
    func = LineMaskFunc([20 / 320], [acceleration], "equispaced")
    line_mask = torch.from_numpy(np.stack([func(320, seed=s) for s in range(8)]))
    generator = torch.Generator().manual_seed(0)
    tilde = further_kspace_mask(line_mask, generator)
    assert not (tilde & ~line_mask).any()  # a subset of A
    assert torch.equal(tilde & acs_lines(line_mask), acs_lines(line_mask))  # ACS kept
    expected = further_line_count(320, line_mask.sum(-1))
    assert torch.equal(tilde.sum(-1), expected)


def test_further_acceleration_range_thins_each_row_between_its_bounds():
    # 320 columns, R = 4 (80 lines): R + 1 keeps 64, R + 3 keeps floor(320·80 / 560) = 45.
    func = LineMaskFunc([20 / 320], [4], "equispaced")
    line_mask = torch.from_numpy(np.stack([func(320, seed=s) for s in range(64)]))
    published = further_kspace_mask(line_mask, torch.Generator().manual_seed(0))
    # (1, 1) draws no k: the same B, bit for bit, as the published rule.
    same = further_kspace_mask(line_mask, torch.Generator().manual_seed(0), (1.0, 1.0))
    assert torch.equal(same, published)
    fixed = further_kspace_mask(line_mask, torch.Generator().manual_seed(0), (3.0, 3.0))
    assert (fixed.sum(-1) == 45).all()
    ranged = further_kspace_mask(line_mask, torch.Generator().manual_seed(0), (1.0, 3.0))
    kept = ranged.sum(-1)
    assert ((kept >= 45) & (kept <= 64)).all()
    assert len(torch.unique(kept)) > 5  # k differs from row to row
    assert not (ranged & ~line_mask).any()
    assert torch.equal(ranged & acs_lines(line_mask), acs_lines(line_mask))


def test_further_masks_depend_on_the_generator_only():
    line_mask = torch.from_numpy(LineMaskFunc([0.08], [4], "random")(64, seed=1))[None]
    a = further_kspace_mask(line_mask, torch.Generator().manual_seed(3))
    b = further_kspace_mask(line_mask, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    keep = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    p1 = further_pixel_mask(keep, 0.1, torch.Generator().manual_seed(9))
    p2 = further_pixel_mask(keep, 0.1, torch.Generator().manual_seed(9))
    assert torch.equal(p1, p2)
    assert not (p1 & ~keep).any()
    assert (p1.sum() / keep.sum()).item() == pytest.approx(0.9, abs=0.02)
