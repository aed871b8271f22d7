"""Co-teaching (Han et al. 2018) for segmentation: schedule, selection, cross-update, ignore pixels."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskworks.data import SyntheticShapes, collate_samples
from maskworks.methods import CoTeaching, coteaching_forget_rate, small_loss_selection


class PixelLogits(nn.Module):
    """A 'model' whose logits are free parameters: an update shows exactly which pixels got gradient."""

    def __init__(self, shape, seed):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.logits + 0 * x.sum()


def test_forget_rate_schedule():
    assert coteaching_forget_rate(0, 0.2) == 0.0
    assert coteaching_forget_rate(5, 0.2) == pytest.approx(0.1)
    assert coteaching_forget_rate(10, 0.2) == pytest.approx(0.2)
    assert coteaching_forget_rate(50, 0.2) == pytest.approx(0.2)
    assert coteaching_forget_rate(5, 0.2, exponent=2) == pytest.approx(0.05)
    assert coteaching_forget_rate(0, 0.3, num_gradual=0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="forget_rate"):
        coteaching_forget_rate(0, 1.0)


def test_small_loss_selection_by_hand_never_picks_ignored_pixels():
    loss = torch.tensor([[[0.5, 0.1], [0.9, 0.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])  # the ignored pixel has loss 0
    sel = small_loss_selection(loss, valid, keep=0.5)  # round(1.5) = 2 of 3 valid pixels
    assert sel.tolist() == [[[True, True], [False, False]]]
    assert small_loss_selection(loss, valid, keep=1.0).tolist() == valid.tolist()
    assert not small_loss_selection(loss, valid, keep=0.0).any()
    assert not small_loss_selection(loss, torch.zeros_like(valid), keep=0.7).any()
    per_image = small_loss_selection(
        torch.tensor([[[0.1, 0.2]], [[5.0, 6.0]]]), torch.ones(2, 1, 2, dtype=torch.bool), 0.5, per_image=True
    )
    assert per_image.tolist() == [[[True, False]], [[True, False]]]  # batch-wide ranking would skip image 2


def test_cross_update_uses_the_peers_selection_and_kept_fraction_follows_the_schedule():
    shape = (2, 3, 5, 6)
    m1, m2 = PixelLogits(shape, 0), PixelLogits(shape, 1)
    o1 = torch.optim.SGD(m1.parameters(), lr=1.0)
    o2 = torch.optim.SGD(m2.parameters(), lr=1.0)
    ct = CoTeaching(m1, m2, o1, o2, forget_rate=0.4, num_gradual=10)
    ct.set_epoch(5)  # R = 0.2
    target = torch.randint(0, 3, (2, 5, 6), generator=torch.Generator().manual_seed(2))
    target[0, 0, :] = 255
    ce1 = F.cross_entropy(m1.logits.detach(), target, ignore_index=255, reduction="none")
    ce2 = F.cross_entropy(m2.logits.detach(), target, ignore_index=255, reduction="none")
    valid = target != 255
    chosen_by_1 = small_loss_selection(ce1, valid, 0.8)
    chosen_by_2 = small_loss_selection(ce2, valid, 0.8)
    before1, before2 = m1.logits.detach().clone(), m2.logits.detach().clone()
    row = ct.train_step(torch.zeros(2, 1, 5, 6), target)
    changed1 = (m1.logits.detach() != before1).any(1)
    changed2 = (m2.logits.detach() != before2).any(1)
    assert torch.equal(changed1, chosen_by_2)  # model 1 learns from model 2's small-loss pixels
    assert torch.equal(changed2, chosen_by_1)
    assert not changed1[0, 0].any() and not changed2[0, 0].any()  # ignored pixels: never selected
    n_valid = int(valid.sum())
    assert row["kept_fraction"] == pytest.approx(round(0.8 * n_valid) / n_valid)
    assert row["forget_rate"] == pytest.approx(0.2)
    expected1 = (ce1 * chosen_by_2).sum() / chosen_by_2.sum()
    assert row["loss1"] == pytest.approx(float(expected1), rel=1e-6)


def test_forget_rate_zero_equals_two_independent_ce_trainings():
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    a, b = net(), net()
    a_ref, b_ref = copy.deepcopy(a), copy.deepcopy(b)
    ct = CoTeaching(
        a, b, torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2), forget_rate=0.0
    )
    oa, ob = torch.optim.Adam(a_ref.parameters(), 1e-2), torch.optim.Adam(b_ref.parameters(), 1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (2, 8, 8), generator=g)
        y[:, :2] = 255
        ct.train_step(x, y)
        for model, opt in ((a_ref, oa), (b_ref, ob)):
            opt.zero_grad()
            F.cross_entropy(model(x), y, ignore_index=255).backward()
            opt.step()
    for p, q in zip(list(a.parameters()) + list(b.parameters()), list(a_ref.parameters()) + list(b_ref.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fit_ramps_the_schedule_and_validates_setup():
    torch.manual_seed(0)
    ds = SyntheticShapes(num_samples=4, image_size=32, seed=0)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_samples)

    def net():
        return nn.Conv2d(3, ds.num_classes, 3, padding=1)

    a, b = net(), net()
    oa, ob = torch.optim.SGD(a.parameters(), 0.1), torch.optim.SGD(b.parameters(), 0.1)
    ct = CoTeaching(a, b, oa, ob, forget_rate=0.3, num_gradual=2)
    hist = ct.fit(loader, epochs=3, progress=False)
    assert [round(h["forget_rate"], 6) for h in hist] == [0.0, 0.15, 0.3]
    assert all(h["kept_fraction"] == pytest.approx(1 - h["forget_rate"], abs=1e-3) for h in hist)
    assert ct.epoch == 3
    with pytest.raises(ValueError, match="own optimizer"):
        CoTeaching(a, b, oa, oa)
    with pytest.raises(ValueError, match="different networks"):
        CoTeaching(a, a, oa, ob)
    with pytest.raises(ValueError, match="peer"):
        CoTeaching(a, b, ob, oa)
    with pytest.raises(ValueError, match="select"):
        CoTeaching(a, b, oa, ob, select="pixel")
