"""Repeat-factor sampling of images with rare classes."""

import math

import numpy as np
import pytest
import torch

from maskworks.data import image_class_presence, repeat_factors
from maskworks.engine import ShardedSampler


def test_presence_and_repeat_factors_by_hand():
    masks = [
        torch.tensor([[0, 0], [0, 1]]),
        torch.tensor([[0, 0], [255, 0]]),
        torch.tensor([[0, 2], [0, 0]]),
        torch.tensor([[0, 0], [0, 0]]),
    ]
    presence = image_class_presence(masks, 3)
    assert presence.tolist() == [[True, True, False], [True, False, False], [True, False, True], [True, False, False]]
    r = repeat_factors(presence, threshold=0.5)
    # f = (1, 0.25, 0.25): r_class = (1, sqrt(2), sqrt(2)); images with class 1 or 2 get sqrt(2)
    assert r.tolist() == pytest.approx([math.sqrt(2), 1.0, math.sqrt(2), 1.0])
    assert repeat_factors(presence, threshold=0.2).tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(presence, threshold=0)
    with pytest.raises(ValueError, match="outside 0..2"):
        image_class_presence([torch.tensor([[5]])], 3)


def test_weighted_sampler_oversamples_and_is_seeded():
    weights = torch.tensor([1.0, 1.0, 1.0, 9.0])
    s = ShardedSampler(4, seed=3, weights=weights)
    draws = []
    for epoch in range(200):
        s.set_epoch(epoch)
        draws += list(s)
    share = np.bincount(draws, minlength=4) / len(draws)
    assert share[3] == pytest.approx(0.75, abs=0.05)
    s.set_epoch(7)
    first = list(s)
    assert list(s) == first  # same epoch, same draw
    with pytest.raises(ValueError, match="non-negative"):
        ShardedSampler(3, weights=torch.tensor([1.0, -1.0, 1.0]))
