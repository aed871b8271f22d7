"""Tests of the dense CRF: MeanFieldCRF (exact and fast paths) and the pydensecrf2 wrapper dense_crf."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskworks.inference.crf import MeanFieldCRF, _PermutohedralLattice, dense_crf, mean_field_crf

try:
    import pydensecrf.densecrf  # noqa: F401

    HAVE_PYDENSECRF = True
except ImportError:
    HAVE_PYDENSECRF = False

needs_pydensecrf = pytest.mark.skipif(
    not HAVE_PYDENSECRF, reason="pydensecrf2 is not installed (pip install pydensecrf2; it compiles C++ code)"
)

try:
    from maskworks.metrics import BoundaryF1
except ImportError:  # the metric is optional for these tests
    BoundaryF1 = None


# ---------------------------------------------------------------------------------------------------- helpers
def naive_mean_field(
    logits: torch.Tensor,
    image: torch.Tensor,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    compatibility: torch.Tensor,
    normalization: str,
    self_connection: bool,
) -> torch.Tensor:
    """Mean field written out pixel pair by pixel pair (Krähenbühl & Koltun 2011, Algorithm 1), float64."""
    b, k, h, w = logits.shape
    n = h * w
    coords = [(x, y) for y in range(h) for x in range(w)]
    results = []
    for s in range(b):
        colours = image[s].reshape(image.shape[1], n).T.tolist()
        kernels = []
        for sxy, srgb, weight in (
            (gaussian_sxy, None, gaussian_compat),
            (bilateral_sxy, bilateral_srgb, bilateral_compat),
        ):
            rows = []
            for i in range(n):
                row = []
                for j in range(n):
                    dist = ((coords[i][0] - coords[j][0]) ** 2 + (coords[i][1] - coords[j][1]) ** 2) / (2 * sxy**2)
                    if srgb is not None:
                        dist += sum((ci - cj) ** 2 for ci, cj in zip(colours[i], colours[j])) / (2 * srgb**2)
                    row.append(math.exp(-dist))
                rows.append(row)
            kmat = torch.tensor(rows, dtype=torch.float64)
            deg = kmat.sum(1)
            if normalization == "symmetric":
                kmat = kmat / torch.sqrt(deg[:, None] * deg[None, :])
            elif normalization == "row":
                kmat = kmat / deg[:, None]
            if not self_connection:
                kmat = kmat - torch.diag(torch.diag(kmat))
            kernels.append(weight * kmat)
        unary = -logits[s].double().reshape(k, n).T  # (N, K)
        q = torch.softmax(-unary, dim=1)
        for _ in range(iterations):
            message = sum(kmat @ q for kmat in kernels)  # (N, K)
            energy = torch.zeros(n, k, dtype=torch.float64)
            for label in range(k):
                for other in range(k):
                    energy[:, label] += compatibility[label, other] * message[:, other]
            q = torch.softmax(-unary - energy, dim=1)
        results.append(torch.log(q).T.reshape(k, h, w))
    return torch.stack(results)


def two_colour_image(h: int, w: int, seed: int, noise: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A red region left of a slanted edge and a blue one right of it: image (1, 3, H, W) 0-255 and labels."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (xs > w // 2 - 4 + ys // 3).long()
    red, blue = torch.tensor([200.0, 80.0, 60.0]), torch.tensor([60.0, 70.0, 200.0])
    image = torch.where(labels.bool()[None], blue[:, None, None], red[:, None, None])
    image = (image + noise * torch.randn(3, h, w, generator=g)).clamp(0, 255).round()
    return image[None], labels


def quadrant_case(seed: int, k: int = 4, h: int = 24, w: int = 28) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four coloured quadrants with colour noise and noisy one-hot logits (float64): image, logits, labels."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = ((xs > w // 2).long() + 2 * (ys > h // 2).long()) % k
    colours = torch.tensor([[200.0, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]])
    image = colours[labels].permute(2, 0, 1)
    image = (image + 25 * torch.randn(3, h, w, generator=g)).clamp(0, 255).round()[None].double()
    onehot = F.one_hot(labels, k).permute(2, 0, 1)[None].double()
    logits = 2 * onehot + 1.5 * torch.randn(1, k, h, w, generator=g, dtype=torch.float64)
    return image, logits, labels


def label_changes_along_rows(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != labels[..., :-1]).sum())


# --------------------------------------------------------------------------------------------- exact mean field
@pytest.mark.parametrize(
    ("normalization", "self_connection", "custom_compat"),
    [("symmetric", False, False), ("symmetric", True, True), ("row", False, True), ("none", True, False)],
)
def test_exact_path_equals_naive_dense_mean_field(normalization, self_connection, custom_compat):
    g = torch.Generator().manual_seed(0)
    b, k, h, w = 2, 4, 6, 7
    logits = 2 * torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    image = torch.randint(0, 256, (b, 3, h, w), generator=g).double()
    compat = torch.rand(k, k, generator=g, dtype=torch.float64) if custom_compat else 1 - torch.eye(k).double()
    scale = 0.05 if normalization == "none" else 1.0  # raw kernel sums are large: keep the energies moderate
    params = dict(gaussian_sxy=2.0, gaussian_compat=3.0 * scale, bilateral_sxy=5.0, bilateral_srgb=40.0)
    params["bilateral_compat"] = 10.0 * scale
    expected = naive_mean_field(
        logits, image, 5, **params, compatibility=compat, normalization=normalization, self_connection=self_connection
    )
    got = mean_field_crf(
        logits,
        image,
        iterations=5,
        **params,
        compatibility=None if not custom_compat else compat,
        normalization=normalization,
        self_connection=self_connection,
        method="exact",
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # it is a real refinement, not the unary
    assert (got - torch.log_softmax(logits, 1)).abs().max() > 0.05
    # float32 input agrees too
    got32 = mean_field_crf(
        logits.float(),
        image.float(),
        iterations=5,
        **params,
        compatibility=None if not custom_compat else compat,
        normalization=normalization,
        self_connection=self_connection,
        method="exact",
    )
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, atol=1e-4, rtol=0)


def test_zero_weights_and_zero_iterations_are_the_identity():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 9, 10, generator=g)
    image = torch.randint(0, 256, (2, 3, 9, 10), generator=g).float()
    expected = torch.log_softmax(logits, 1)
    crf = MeanFieldCRF(3, gaussian_compat=0.0, bilateral_compat=0.0)
    torch.testing.assert_close(crf(logits), expected)  # no image needed without the bilateral kernel
    for method in ("exact", "fast"):
        torch.testing.assert_close(MeanFieldCRF(3, iterations=0, method=method)(logits, image), expected)


# ------------------------------------------------------------------------------------------------- fast path
def test_fast_gaussian_equals_exact():
    g = torch.Generator().manual_seed(2)
    # 11 x 12 <= 4 sigma + 1: the separable filter is not truncated at all, so both paths are exact
    logits = 2 * torch.randn(2, 3, 11, 12, generator=g, dtype=torch.float64)
    kw = dict(gaussian_sxy=3.0, bilateral_compat=0.0)
    for norm in ("symmetric", "row", "none"):
        scale = 0.05 if norm == "none" else 1.0
        exact = mean_field_crf(logits, None, gaussian_compat=3 * scale, normalization=norm, method="exact", **kw)
        fast = mean_field_crf(logits, None, gaussian_compat=3 * scale, normalization=norm, method="fast", **kw)
        torch.testing.assert_close(fast, exact, atol=1e-10, rtol=0)
    # 40 x 36 with sigma 2: taps cut at 8 px (exp(-8) of the peak); the refined marginals stay within 1e-4
    logits = 2 * torch.randn(1, 3, 40, 36, generator=g, dtype=torch.float64)
    exact = mean_field_crf(logits, None, gaussian_sxy=2.0, bilateral_compat=0.0, method="exact").exp()
    fast = mean_field_crf(logits, None, gaussian_sxy=2.0, bilateral_compat=0.0, method="fast").exp()
    assert (fast - exact).abs().max() < 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_approximates_exact_path(seed):
    # default preset: permutohedral-lattice bilateral kernel vs the dense one
    image, logits, _ = quadrant_case(seed)
    exact = mean_field_crf(logits, image, method="exact").exp()
    fast = mean_field_crf(logits, image, method="fast").exp()
    assert (fast - exact).abs().mean() < 0.01
    assert (fast.argmax(1) == exact.argmax(1)).double().mean() >= 0.98
    # with smooth colours (two-colour image, mild noise) the two paths agree almost everywhere
    image, labels = two_colour_image(24, 24, seed)
    logits = 2 * F.one_hot(labels, 2).permute(2, 0, 1)[None].float() - 1
    logits = logits + 1.5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    exact = mean_field_crf(logits, image, method="exact").exp()
    fast = mean_field_crf(logits, image, method="fast").exp()
    assert (fast - exact).abs().mean() < 2e-3
    assert (fast.argmax(1) == exact.argmax(1)).float().mean() >= 0.995


def test_fast_bilateral_message_close_to_exact():
    from maskworks.inference.crf import _dense_message, _lattice_message, _pixel_grid

    image, logits, _ = quadrant_case(3)
    h, w = image.shape[2:]
    feats = torch.cat([_pixel_grid(h, w, torch.float64, "cpu") / 80, image[0].reshape(3, -1).T / 13], 1)[None]
    q = torch.softmax(logits.permute(0, 2, 3, 1).reshape(1, h * w, -1), -1)
    # strong colour noise (std 25): about 7 % relative error with the self-term, 15 % without (smaller message)
    for self_connection, tol in ((True, 0.1), (False, 0.2)):
        exact = _dense_message(feats, "symmetric", self_connection)(q)
        fast = _lattice_message(feats, "symmetric", self_connection)(q)
        assert (fast - exact).norm() / exact.norm() < tol


def test_auto_switches_from_exact_to_fast():
    image, logits, _ = quadrant_case(4, h=12, w=13)
    exact = mean_field_crf(logits, image, method="exact")
    fast = mean_field_crf(logits, image, method="fast")
    assert not torch.equal(exact, fast)
    torch.testing.assert_close(mean_field_crf(logits, image, exact_max_pixels=156), exact)
    torch.testing.assert_close(mean_field_crf(logits, image, exact_max_pixels=155), fast)


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_batch_equals_images_one_by_one(method):
    image_a, logits_a, _ = quadrant_case(5, h=14, w=15)
    image_b, logits_b, _ = quadrant_case(6, h=14, w=15)
    batch = mean_field_crf(torch.cat([logits_a, logits_b]), torch.cat([image_a, image_b]), method=method)
    torch.testing.assert_close(batch[:1], mean_field_crf(logits_a, image_a, method=method))
    torch.testing.assert_close(batch[1:], mean_field_crf(logits_b, image_b, method=method))


def test_lattice_wide_feature_range_fallback():
    # two points far away from a cluster make the mixed-radix key codes overflow int64: the row-wise fallback must
    # give the cluster exactly the filtering it gets on its own (far points do not interact with it)
    g = torch.Generator().manual_seed(7)
    cluster = 3 * torch.rand(40, 3, generator=g, dtype=torch.float64)
    far = torch.tensor([[1e6, -1e6, 3e5], [-2e6, 5e5, 1e6]], dtype=torch.float64)
    values = torch.rand(42, 2, generator=g, dtype=torch.float64)
    alone = _PermutohedralLattice(cluster, torch.zeros(40, dtype=torch.long)).filter(values[:40])
    wide = _PermutohedralLattice(torch.cat([cluster, far]), torch.zeros(42, dtype=torch.long)).filter(values)
    torch.testing.assert_close(wide[:40], alone, atol=1e-12, rtol=0)
    # and the lattice approximates the Gaussian filter (normalised) of the cluster
    kernel = torch.exp(-0.5 * torch.cdist(cluster, cluster).square())
    exact = kernel @ values[:40] / kernel.sum(1, keepdim=True)
    ones = _PermutohedralLattice(cluster, torch.zeros(40, dtype=torch.long)).filter(torch.ones(40, 1).double())
    assert ((alone / ones - exact).norm() / exact.norm()) < 0.05


def test_any_number_of_image_channels():
    image, labels = two_colour_image(16, 18, 3)
    gray = image[:, :1]  # (1, 1, H, W): the red channel, 200 left of the edge and 60 right of it
    g = torch.Generator().manual_seed(8)
    logits = 2 * F.one_hot(labels, 2).permute(2, 0, 1)[None].float() - 1 + 1.5 * torch.randn(1, 2, 16, 18, generator=g)
    exact = mean_field_crf(logits, gray, method="exact").exp()
    fast = mean_field_crf(logits, gray, method="fast").exp()
    assert (exact - fast).abs().mean() < 0.01 and (exact.argmax(1) == fast.argmax(1)).float().mean() > 0.98
    # one grey channel equals three equal channels with srgb scaled by sqrt(3)
    rgb = gray.expand(1, 3, 16, 18)
    torch.testing.assert_close(
        mean_field_crf(logits, rgb, bilateral_srgb=13 * math.sqrt(3), method="exact").exp(), exact
    )


# ------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("method", ["exact", "fast"])
def test_isolated_noisy_pixel_is_removed(method):
    # class-0 region (p = 0.7) on the left, class-1 on the right; one pixel inside the left region says class 1
    h, w = 20, 24
    probs = torch.tensor([0.7, 0.2, 0.1])[:, None, None].repeat(1, h, w)
    probs[:, :, w // 2 :] = torch.tensor([0.2, 0.7, 0.1])[:, None, None]
    probs[:, 10, 6] = torch.tensor([0.3, 0.6, 0.1])
    logits = probs.log()[None]
    image, _ = two_colour_image(h, w, 0, noise=0.0)
    image[:, :, :, : w // 2], image[:, :, :, w // 2 :] = 200.0, 60.0
    for crf in (MeanFieldCRF(3, bilateral_compat=0.0, method=method), MeanFieldCRF(3, method=method)):
        q = crf(logits, image if crf.bilateral_compat > 0 else None).exp()[0]
        assert q[:, 10, 6].argmax() == 0 and q[0, 10, 6] > 0.5
        # the right sign: agreeing neighbours raise the confidence inside the regions
        assert q[0, 4, 3] > 0.7 and q[1, 4, 20] > 0.7
        assert (q.argmax(0) == probs.argmax(0)).sum() == h * w - 1


def test_refinement_improves_accuracy_and_boundaries():
    h, w = 48, 48
    image, labels = two_colour_image(h, w, 1)
    g = torch.Generator().manual_seed(1)
    onehot = F.one_hot(labels, 2).permute(2, 0, 1)[None].float()
    noisy = 2 * onehot - 1 + 1.5 * torch.randn(1, 2, h, w, generator=g)
    # and a blurred prediction whose boundary lies 4 px right of the colour edge
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    offset = (xs - (w // 2 - 4 + ys // 3) - 4).float() / 2
    shifted = torch.stack([-offset, offset])[None]
    crf = MeanFieldCRF(2)  # 48 x 48 > exact_max_pixels: the fast path
    for logits in (noisy, shifted):
        before, after = logits.argmax(1)[0], crf(logits, image).argmax(1)[0]
        acc_before, acc_after = (before == labels).float().mean(), (after == labels).float().mean()
        assert acc_after > acc_before and acc_after > 0.98
        assert label_changes_along_rows(after) <= label_changes_along_rows(before)
        assert label_changes_along_rows(after) <= h + 4  # about one change per row, as in the truth
        if BoundaryF1 is not None:
            scores = []
            for pred in (before, after):
                metric = BoundaryF1(2, tolerance=1)
                metric.update(pred[None], labels[None])
                scores.append(metric.compute()["mbf1"])
            assert scores[1] > scores[0] and scores[1] > 0.9


@pytest.mark.parametrize("k", [2, 3, 5, 21])
def test_any_number_of_classes(k):
    # four 8 x 8 blocks of different colours and classes; one unsure, wrong pixel in the middle of block 0
    g = torch.Generator().manual_seed(k)
    h = w = 16
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = 2 * (ys // 8) + xs // 8
    labels = (block * (k // 4 + 1)) % k
    logits = 2 * F.one_hot(labels, k).permute(2, 0, 1)[None].float() + 0.5 * torch.randn(1, k, h, w, generator=g)
    logits[0, :, 4, 4] = 0.0
    logits[0, (labels[4, 4] + 1) % k, 4, 4] = 1.0
    colours = torch.tensor([[220.0, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])
    image = colours[block].permute(2, 0, 1)[None]
    for method in ("exact", "fast"):
        out = MeanFieldCRF(k, method=method)(logits, image)
        assert out.shape == (1, k, h, w) and torch.isfinite(out).all()
        torch.testing.assert_close(out.exp().sum(1), torch.ones(1, h, w))
        assert torch.equal(out.argmax(1)[0], labels)


# ------------------------------------------------------------------------------------------------ gradients
def test_gradcheck_exact_and_fast():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.randint(0, 256, (1, 3, 3, 4), generator=g).double()
    gauss = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bilat = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    compat = (1 - torch.eye(3, dtype=torch.float64)).requires_grad_()

    def exact(x, wg, wb, mu):
        return mean_field_crf(
            x,
            image,
            iterations=3,
            gaussian_compat=wg,
            bilateral_compat=wb,
            bilateral_sxy=5.0,
            compatibility=mu,
            method="exact",
        )

    assert torch.autograd.gradcheck(exact, (logits, gauss, bilat, compat), fast_mode=True)

    def fast(x, wg, wb):
        return mean_field_crf(
            x, image, iterations=3, gaussian_compat=wg, bilateral_compat=wb, bilateral_sxy=5.0, method="fast"
        )

    assert torch.autograd.gradcheck(fast, (logits, gauss, bilat), fast_mode=True)


def test_trainable_parameters_receive_gradients():
    image, logits, labels = quadrant_case(10, h=10, w=12)
    names = ["bilateral_compat", "compatibility", "gaussian_compat"]
    fixed = MeanFieldCRF(4)
    assert list(fixed.parameters()) == [] and sorted(fixed.state_dict()) == names
    for method in ("exact", "fast"):
        crf = MeanFieldCRF(4, trainable=True, method=method).double()
        assert sorted(name for name, _ in crf.named_parameters()) == names
        torch.testing.assert_close(crf.compatibility, 1 - torch.eye(4, dtype=torch.float64))  # Potts init
        x = logits.clone().requires_grad_()
        loss = F.nll_loss(crf(x, image), labels[None])
        loss.backward()
        for name, param in crf.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert x.grad.abs().sum() > 0
    # a trainable CRF starts as the fixed one, and one optimiser step changes its output
    crf = MeanFieldCRF(4, trainable=True, method="exact").double()
    torch.testing.assert_close(crf(logits, image), fixed.double()(logits, image))
    opt = torch.optim.SGD(crf.parameters(), lr=0.5)
    loss = F.nll_loss(crf(logits, image), labels[None])
    loss.backward()
    opt.step()
    assert F.nll_loss(crf(logits, image), labels[None]) < loss


# --------------------------------------------------------------------------------------------- bad inputs
def test_constructor_rejects_bad_options():
    cases = [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=3, iterations=-1), "iterations"),
        (dict(num_classes=3, gaussian_sxy=0.0), "gaussian_sxy"),
        (dict(num_classes=3, bilateral_srgb=float("nan")), "bilateral_srgb"),
        (dict(num_classes=3, bilateral_compat=-1.0), "bilateral_compat"),
        (dict(num_classes=3, normalization="l2"), "normalization"),
        (dict(num_classes=3, method="lattice"), "method"),
        (dict(num_classes=3, exact_max_pixels=0), "exact_max_pixels"),
        (dict(num_classes=3, compatibility=torch.ones(2, 2)), "compatibility"),
        (dict(num_classes=3, trainable="yes"), "trainable"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            MeanFieldCRF(**kwargs)


def test_forward_rejects_bad_inputs():
    crf = MeanFieldCRF(3)
    logits, image = torch.randn(2, 3, 8, 9), torch.rand(2, 3, 8, 9) * 255
    with pytest.raises(ValueError, match="num_classes=3"):
        crf(torch.randn(2, 4, 8, 9), image)
    with pytest.raises(ValueError, match="logits"):
        crf(torch.randn(3, 8, 9), image)
    with pytest.raises(ValueError, match="logits"):
        crf(torch.zeros(2, 3, 8, 9, dtype=torch.long), image)
    with pytest.raises(ValueError, match="image"):
        crf(logits, image[:, :, :7])
    with pytest.raises(ValueError, match="image"):
        crf(logits, image[0])
    with pytest.raises(ValueError, match="image is required"):
        crf(logits, None)
    with pytest.raises(ValueError, match="image holds non-finite"):
        crf(logits, torch.full_like(image, float("nan")))
    with pytest.raises(ValueError, match="iterations"):
        mean_field_crf(logits, image, iterations=1.5)


# ------------------------------------------------------------------------------------------------ pydensecrf2
@needs_pydensecrf
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_crf_matches_mean_field(seed):
    image, logits, labels = quadrant_case(seed)
    rgb = image[0].permute(1, 2, 0).to(torch.uint8)  # (H, W, 3) view, not contiguous
    ref = dense_crf(logits[0], rgb, iterations=5, from_logits=True)
    assert isinstance(ref, torch.Tensor) and ref.shape == logits.shape[1:] and ref.dtype == torch.float32
    ref = ref.double()
    # same model with the pixel's own message (pydensecrf's filter includes it): the fast path uses the same
    # lattice and nearly reproduces pydensecrf; the exact path differs by the lattice approximation
    fast = mean_field_crf(logits, image, self_connection=True, method="fast").exp()[0]
    assert (fast - ref).abs().mean() < 2e-3 and (fast.argmax(0) == ref.argmax(0)).double().mean() >= 0.99
    exact = mean_field_crf(logits, image, self_connection=True, method="exact").exp()[0]
    assert (exact - ref).abs().mean() < 0.02 and (exact.argmax(0) == ref.argmax(0)).double().mean() >= 0.97
    # the paper's model (no self message, our default) still agrees on > 95 % of the labels
    default = MeanFieldCRF(4)(logits, image).exp()[0]
    assert (default.argmax(0) == ref.argmax(0)).double().mean() > 0.95
    # and pydensecrf really refines: accuracy goes up
    assert (ref.argmax(0) == labels).double().mean() > (logits[0].argmax(0) == labels).double().mean() + 0.2


@needs_pydensecrf
def test_dense_crf_inputs_and_outputs():
    image, logits, _ = quadrant_case(2, h=10, w=12)
    probs = torch.softmax(logits[0], 0).float()
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    # numpy in, numpy out; probabilities and logits give the same result
    from_probs = dense_crf(probs.numpy(), rgb)
    assert isinstance(from_probs, np.ndarray) and from_probs.dtype == np.float32 and from_probs.shape == (4, 10, 12)
    np.testing.assert_allclose(from_probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(dense_crf(logits[0].numpy(), rgb, from_logits=True), from_probs, atol=1e-5)
    # batches loop over the images
    batch = dense_crf(np.stack([probs.numpy(), probs.numpy()[::-1].copy()]), np.stack([rgb, rgb]))
    np.testing.assert_allclose(batch[0], from_probs, atol=1e-6)
    np.testing.assert_allclose(batch[1], dense_crf(probs.numpy()[::-1].copy(), rgb), atol=1e-6)
    # labels
    labels = dense_crf(probs, torch.from_numpy(rgb), return_labels=True)
    assert labels.dtype == torch.int64 and labels.shape == (10, 12)
    assert torch.equal(labels, torch.from_numpy(from_probs.argmax(0)))
    # without pairwise terms the probabilities come back unchanged
    same = dense_crf(probs, rgb, gaussian_compat=0.0, bilateral_compat=0.0)
    torch.testing.assert_close(same, probs, atol=1e-5, rtol=0)


def test_dense_crf_rejects_bad_inputs():
    probs = torch.softmax(torch.randn(3, 6, 7), 0)
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="image must be uint8"):
        dense_crf(probs, rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"image must have shape \(6, 7, 3\)"):
        dense_crf(probs, np.zeros((3, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="image must have shape"):
        dense_crf(probs[None], rgb)  # a batch needs (B, H, W, 3)
    with pytest.raises(ValueError, match="probs_or_logits"):
        dense_crf(probs[0], rgb)
    with pytest.raises(ValueError, match="from_logits=True"):
        dense_crf(torch.randn(3, 6, 7), rgb)
    with pytest.raises(ValueError, match="non-finite"):
        dense_crf(torch.full((3, 6, 7), float("nan")), rgb)
    with pytest.raises(ValueError, match="iterations"):
        dense_crf(probs, rgb, iterations=-2)
    with pytest.raises(ValueError, match="bilateral_srgb"):
        dense_crf(probs, rgb, bilateral_srgb=0)
    with pytest.raises(TypeError, match="probs_or_logits"):
        dense_crf(probs.tolist(), rgb)


def test_dense_crf_without_pydensecrf_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    probs = torch.softmax(torch.randn(3, 6, 7), 0)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        dense_crf(probs, np.zeros((6, 7, 3), dtype=np.uint8))
