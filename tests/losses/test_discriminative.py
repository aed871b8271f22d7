"""The discriminative embedding loss (De Brabandere et al. 2017): zero for separated embeddings, positive otherwise,
background / ignored pixels never count, equal to a per-instance loop, differentiable."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskworks.losses import DiscriminativeLoss, discriminative_loss


def _loop_reference(emb, inst, dv=0.5, dd=1.5, a=1.0, b=1.0, g=0.001, ignore=255):
    """The paper's formulas, one instance and one pair at a time."""
    totals = []
    for e, ids in zip(emb, inst):
        labels = [int(i) for i in torch.unique(ids) if int(i) not in (0, ignore)]
        if not labels:
            totals.append(e.sum() * 0)
            continue
        mus = [e[:, ids == c].mean(1) for c in labels]
        var = sum(
            ((torch.linalg.vector_norm(e[:, ids == c] - mu[:, None], dim=0) - dv).clamp(min=0) ** 2).mean()
            for c, mu in zip(labels, mus)
        ) / len(labels)
        pairs = list(itertools.permutations(range(len(labels)), 2))
        dist = (
            sum((2 * dd - torch.linalg.vector_norm(mus[p] - mus[q])).clamp(min=0) ** 2 for p, q in pairs) / len(pairs)
            if pairs
            else 0.0
        )
        reg = sum(torch.linalg.vector_norm(mu) for mu in mus) / len(labels)
        totals.append(a * var + b * dist + g * reg)
    return torch.stack([torch.as_tensor(t) for t in totals]).mean()


def _scene():
    inst = torch.zeros(2, 6, 7, dtype=torch.int64)
    inst[0, :3, :3], inst[0, 3:, 4:] = 3, 7  # non-consecutive ids
    inst[0, 0, 6] = 255  # ignored
    inst[1, 1:5, 1:3] = 1
    return inst


def test_zero_for_constant_separated_embeddings_positive_when_shared():
    inst = _scene()
    emb = torch.zeros(2, 2, 6, 7)
    emb[0, 0][inst[0] == 3] = 2.0
    emb[0, 1][inst[0] == 7] = 2.0  # centres (2, 0) and (0, 2): 2.83 apart >= 2 * 1.5 is false -> push
    emb[0, :, 0, 6] = 50.0  # the ignored pixel is far away: it must not count
    emb[1] = 0.0  # one instance with a constant embedding: nothing to pull or push
    terms = discriminative_loss(emb, inst, gamma=0.0)
    assert terms["loss_var"] == 0 and terms["loss_dist"] > 0
    emb[0, 1][inst[0] == 7] = 3.5  # now 4.03 apart: separated
    terms = discriminative_loss(emb, inst, gamma=0.0)
    assert float(terms["loss"]) == 0.0
    emb[0, :, :3, :3] = emb[0, :, 3, 4][:, None, None]  # both instances share one embedding
    assert float(discriminative_loss(emb, inst, gamma=0.0)["loss_dist"]) == pytest.approx(
        0.5 * 9.0
    )  # (3-0)^2 / 2 images


def test_equals_the_loop_reference_and_is_invariant_to_relabelling():
    torch.manual_seed(0)
    inst = _scene()
    emb = torch.randn(2, 4, 6, 7)
    got = DiscriminativeLoss()(emb, inst)
    torch.testing.assert_close(got, _loop_reference(emb, inst), atol=1e-6, rtol=1e-6)
    relabelled = inst.clone()
    relabelled[inst == 3], relabelled[inst == 7] = 9, 2
    torch.testing.assert_close(DiscriminativeLoss()(emb, relabelled), got)


def test_background_and_ignored_pixels_never_contribute():
    torch.manual_seed(0)
    inst = _scene()
    emb = torch.randn(2, 4, 6, 7, requires_grad=True)
    DiscriminativeLoss()(emb, inst).backward()
    outside = (inst == 0) | (inst == 255)
    assert (emb.grad.permute(1, 0, 2, 3)[:, outside] == 0).all()
    assert (emb.grad.permute(1, 0, 2, 3)[:, ~outside] != 0).any()


def test_no_instances_gives_a_zero_tensor_with_a_graph():
    emb = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = DiscriminativeLoss()(emb, torch.zeros(1, 4, 4, dtype=torch.int64))
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    assert (emb.grad == 0).all()


def test_gradcheck():
    torch.manual_seed(0)
    inst = torch.tensor([[[1, 1, 2], [1, 2, 2], [0, 3, 3]]])
    emb = (torch.randn(1, 2, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: discriminative_loss(e, inst)["loss"], (emb,))


def test_terms_are_kept_and_bad_arguments_raise():
    loss = DiscriminativeLoss(delta_v=0.3, delta_d=1.0, gamma=0.01)
    loss(torch.randn(1, 2, 4, 4), torch.ones(1, 4, 4, dtype=torch.int64))
    assert set(loss.last_terms) == {"loss_var", "loss_dist", "loss_reg"}
    with pytest.raises(ValueError, match="delta_d must exceed delta_v"):
        DiscriminativeLoss(delta_v=1.0, delta_d=0.5)
    with pytest.raises(ValueError, match=r"instances must be \(B, H, W\)"):
        discriminative_loss(torch.randn(1, 2, 4, 4), torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer instance ids"):
        discriminative_loss(torch.randn(1, 2, 4, 4), torch.ones(1, 4, 4))
