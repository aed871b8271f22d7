"""Uncertainty: MC dropout leaves BatchNorm alone, ensembles, entropy / MI identities, temperature scaling."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from maskworks import create_model, save_model
from maskworks.inference.tta import tta
from maskworks.inference.uncertainty import (
    TemperatureScaling,
    ensemble,
    entropy_map,
    mc_dropout,
    mc_dropout_mode,
    mutual_information,
    tta_uncertainty,
)
from maskworks.metrics import Calibration

KEYS = {"mean", "entropy", "expected_entropy", "mutual_information", "variance"}


class _Net(nn.Module):
    """conv -> BN -> ReLU -> Dropout2d -> conv -> Dropout -> 1x1 head; returns a dict like deep supervision."""

    def __init__(self, p: float = 0.5, classes: int = 4, seed: int = 0, dict_out: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(p))
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(p))
        self.head = nn.Conv2d(8, classes, 1)
        self.dict_out = dict_out
        for bn in (self.stem[1], self.mid[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        out = self.head(self.mid(self.stem(x)))
        return {"out": out, "aux": [out]} if self.dict_out else out


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _check_identities(res: dict, batch: int, classes: int, size: tuple[int, int]) -> None:
    assert KEYS <= set(res)
    assert res["mean"].shape == (batch, classes, *size)
    for key in KEYS - {"mean"}:
        assert res[key].shape == (batch, *size), key
    torch.testing.assert_close(res["mean"].sum(1), torch.ones(batch, *size), atol=1e-5, rtol=0)
    mi, ent = res["mutual_information"], res["entropy"]
    assert float(mi.min()) >= 0 and bool((mi <= ent + 1e-6).all())
    assert float(res["variance"].min()) >= 0
    torch.testing.assert_close(ent, entropy_map(res["mean"]))


# --------------------------------------------------------------------------- MC dropout


def test_mc_dropout_leaves_batchnorm_and_modes_untouched():
    model = _Net(p=0.5, dict_out=True)
    model.train()
    model.mid.eval()  # a mixed state must come back exactly as it was
    buffers, modes = _buffers(model), _modes(model)
    x = torch.randn(2, 3, 9, 12)
    res = mc_dropout(model, x, samples=6, seed=0, return_samples=True)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert _modes(model) == modes
    _check_identities(res, 2, 4, (9, 12))
    assert res["samples"].shape == (6, 2, 4, 9, 12)
    assert float(res["mutual_information"].max()) > 1e-3 and float(res["variance"].max()) > 0
    torch.testing.assert_close(res["mutual_information"], mutual_information(res["samples"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res["mean"], res["samples"].mean(0), atol=1e-6, rtol=0)
    var = res["samples"].var(0, correction=0).mean(1)
    torch.testing.assert_close(res["variance"], var, atol=1e-6, rtol=0)
    # BatchNorm ran on its running statistics: the same weights (same seed) with p=0 give the eval-mode output.
    model.eval()
    with torch.no_grad():
        plain = model(x)["out"].softmax(1)
    res0 = mc_dropout(_Net(p=0.0), x, samples=1)
    torch.testing.assert_close(res0["mean"], plain)


def test_mc_dropout_with_p0_gives_equal_samples_and_zero_mi():
    model = _Net(p=0.0).eval()
    res = mc_dropout(model, torch.randn(2, 3, 8, 8), samples=5, return_samples=True)
    s = res["samples"]
    assert all(torch.equal(s[0], s[i]) for i in range(1, 5))
    torch.testing.assert_close(res["mutual_information"], torch.zeros(2, 8, 8), atol=1e-6, rtol=0)
    assert torch.equal(res["variance"], torch.zeros(2, 8, 8))
    torch.testing.assert_close(res["expected_entropy"], res["entropy"], atol=1e-6, rtol=0)


def test_mc_dropout_seed_is_reproducible_and_restores_rng():
    model = _Net(p=0.5).eval()
    x = torch.randn(1, 3, 8, 8)
    state = torch.get_rng_state()
    a = mc_dropout(model, x, samples=3, seed=123)
    assert torch.equal(torch.get_rng_state(), state)
    b = mc_dropout(model, x, samples=3, seed=123)
    c = mc_dropout(model, x, samples=3, seed=124)
    assert torch.equal(a["mean"], b["mean"]) and not torch.equal(a["mean"], c["mean"])
    d = mc_dropout(model, x, samples=3, generator=torch.Generator().manual_seed(5))
    e = mc_dropout(model, x, samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d["mean"], e["mean"])


def test_mc_dropout_restores_modes_when_the_model_raises():
    class Failing(_Net):
        calls = 0

        def forward(self, x):
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("boom")
            return super().forward(x)

    model = Failing(p=0.3).train()
    modes, buffers = _modes(model), _buffers(model)
    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout(model, torch.randn(1, 3, 6, 6), samples=3)
    assert _modes(model) == modes
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_mc_dropout_mode_switches_only_dropout():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Dropout1d(0.1),
        nn.Dropout2d(0.1),
        nn.Dropout3d(0.1),
        nn.AlphaDropout(0.1),
        nn.FeatureAlphaDropout(0.1),
        nn.Dropout(0.1),
    )
    model.train()
    with mc_dropout_mode(model) as dropouts:
        assert len(dropouts) == 6
        assert not model.training and not model[0].training and not model[1].training
        assert all(m.training for m in model[2:])
    assert all(m.training for m in model.modules())


def test_mc_dropout_without_dropout_warns_or_raises():
    model = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match="no dropout module"):
        res = mc_dropout(model, x, samples=2)
    assert torch.equal(res["mutual_information"], torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="no dropout module"):
        mc_dropout(model, x, samples=2, missing_dropout="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc_dropout(model, x, samples=2, missing_dropout="ignore")


def test_mc_dropout_binary_sigmoid():
    model = _Net(p=0.5, classes=1).eval()
    res = mc_dropout(model, torch.randn(2, 3, 7, 5), samples=4, activation="sigmoid", seed=0)
    assert res["mean"].shape == (2, 1, 7, 5)
    ent, mi = res["entropy"], res["mutual_information"]
    assert float(ent.max()) <= math.log(2) + 1e-6 and float(mi.min()) >= 0 and bool((mi <= ent + 1e-6).all())
    p = res["mean"][:, 0]
    torch.testing.assert_close(ent, -(p * p.log() + (1 - p) * (1 - p).log()), atol=1e-5, rtol=1e-5)


def test_mc_dropout_errors_name_the_argument():
    model = _Net()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        mc_dropout(model, x, samples=0)
    with pytest.raises(ValueError, match="activation"):
        mc_dropout(model, x, activation="tanh")
    with pytest.raises(ValueError, match="missing_dropout"):
        mc_dropout(model, x, missing_dropout="maybe")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mc_dropout(lambda t: t, x)
    with pytest.raises(ValueError, match=r"x must have shape"):
        mc_dropout(model, x[0])
    with pytest.raises(ValueError, match="seed or generator"):
        mc_dropout(model, x, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="dropout_types"):
        mc_dropout(model, x, dropout_types=[int])


# --------------------------------------------------------------------------- ensembles and TTA spread


def test_ensemble_of_copies_has_zero_spread_and_different_members_disagree():
    x = torch.randn(2, 3, 8, 10)
    a, b = _Net(p=0.5, seed=0), _Net(p=0.5, seed=1)
    same = ensemble([a, a, a], x, return_samples=True)
    _check_identities(same, 2, 4, (8, 10))
    assert torch.equal(same["variance"], torch.zeros(2, 8, 10))
    torch.testing.assert_close(same["mutual_information"], torch.zeros(2, 8, 10), atol=1e-6, rtol=0)
    assert same["samples"].shape == (3, 2, 4, 8, 10)
    diff = ensemble(nn.ModuleList([a, b]), x)
    _check_identities(diff, 2, 4, (8, 10))
    assert float(diff["variance"].min()) > 0 and float(diff["mutual_information"].max()) > 1e-3
    a.eval()
    with torch.no_grad():
        expected = 0.5 * (a(x).softmax(1) + b.eval()(x).softmax(1))
    torch.testing.assert_close(diff["mean"], expected)


def test_ensemble_restores_modes_and_loads_checkpoints(tmp_path):
    model = create_model("unet_vanilla", num_classes=3, features=(4, 8))
    model.train()
    buffers = _buffers(model)
    path = save_model(model, tmp_path / "member")
    x = torch.randn(1, 3, 12, 20)
    from_files = ensemble([path, str(path)], x)
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    from_modules = ensemble([model, model], x)
    assert model.training
    torch.testing.assert_close(from_files["mean"], from_modules["mean"])
    assert torch.equal(from_files["variance"], torch.zeros(1, 12, 20))


def test_ensemble_errors():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(TypeError, match="single nn.Module"):
        ensemble(_Net(), x)
    with pytest.raises(ValueError, match="at least one"):
        ensemble([], x)
    with pytest.raises(TypeError, match=r"models\[1\]"):
        ensemble([_Net(), 3], x)
    with pytest.raises(TypeError, match="models must be a sequence"):
        ensemble("model.safetensors", x)
    with pytest.raises(ValueError, match=r"models\[0\] returned shape"):
        ensemble([nn.Conv2d(3, 2, 3)], x)
    with pytest.raises(ValueError, match="activation=None means the model returns probabilities"):
        ensemble([nn.Conv2d(3, 2, 1)], x, activation=None)


def test_tta_uncertainty_uses_the_transform_spread():
    model = _Net(p=0.5).train()
    buffers = _buffers(model)
    x = torch.randn(1, 3, 7, 9)
    res = tta_uncertainty(model, x, "d4", return_samples=True)
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    _check_identities(res, 1, 4, (7, 9))
    with torch.no_grad():
        merged, outs = tta(model.eval(), x, "d4", return_all=True)
    torch.testing.assert_close(res["mean"], merged)
    torch.testing.assert_close(res["samples"], outs)
    assert float(res["variance"].max()) > 0
    # a 1x1 conv is equivariant: no spread at all
    conv = nn.Conv2d(3, 4, 1)
    flat = tta_uncertainty(conv, x, "d4")
    torch.testing.assert_close(flat["mutual_information"], torch.zeros(1, 7, 9), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- entropy and mutual information


def test_entropy_map_values():
    uniform = torch.full((2, 5, 3, 4), 0.2)
    torch.testing.assert_close(entropy_map(uniform), torch.full((2, 3, 4), math.log(5)))
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 3, 4)), 5).movedim(-1, 1).float()
    assert torch.equal(entropy_map(one_hot), torch.zeros(2, 3, 4))
    half = torch.full((1, 2, 2, 2), 0.5)
    torch.testing.assert_close(entropy_map(half, multilabel=True), torch.full((1, 2, 2), 2 * math.log(2)))
    with pytest.raises(ValueError, match="sum to 1"):
        entropy_map(torch.full((1, 3, 2, 2), 0.5))
    with pytest.raises(ValueError, match="apply a softmax"):
        entropy_map(torch.randn(1, 3, 2, 2) * 5)
    with pytest.raises(TypeError, match="probs must be a float tensor"):
        entropy_map(torch.ones(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="probs must be a torch.Tensor"):
        entropy_map([0.5, 0.5])


def test_mutual_information_values():
    p = torch.randn(1, 4, 3, 3).softmax(1)
    assert torch.equal(mutual_information(p.expand(5, -1, -1, -1, -1)), torch.zeros(1, 3, 3))
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    opposite = torch.stack([a, a.flip(1)])  # two confident samples that disagree: MI = H(mean) = log 2
    torch.testing.assert_close(mutual_information(opposite), torch.full((1, 1, 1), math.log(2)))
    samples = torch.randn(6, 2, 3, 4, 4).softmax(2)
    expected = entropy_map(samples.mean(0)) - torch.stack([entropy_map(s) for s in samples]).mean(0)
    torch.testing.assert_close(mutual_information(samples), expected.clamp_min(0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\(S, B, K, H, W\)"):
        mutual_information(torch.full((2, 3, 4), 1 / 3))


# --------------------------------------------------------------------------- temperature scaling


def _overconfident(seed: int, n: int = 8, k: int = 5, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits z, labels drawn from softmax(z); the model reports 4 z (too confident, T* = 4)."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, k, size, size, generator=g)
    labels = torch.multinomial(z.movedim(1, -1).reshape(-1, k).softmax(-1), 1, generator=g)
    return z, labels.view(n, size, size)


def _ece(logits: torch.Tensor, targets: torch.Tensor) -> float:
    metric = Calibration(logits.shape[1], from_logits=True)
    metric.update(logits, targets)
    return metric.compute()["ece"]


def test_temperature_scaling_recovers_t_and_lowers_ece():
    z_fit, y_fit = _overconfident(0)
    z_test, y_test = _overconfident(1)
    ts = TemperatureScaling().fit(4 * z_fit, y_fit)
    assert abs(ts.temperature - 4) < 0.4
    with torch.no_grad():
        calibrated = ts(4 * z_test)
    before, after = _ece(4 * z_test, y_test), _ece(calibrated, y_test)
    assert after < before / 3, (before, after)
    assert torch.equal(calibrated.argmax(1), z_test.argmax(1))  # accuracy unchanged
    assert set(ts.state_dict()) == {"log_temperature"}


def test_temperature_scaling_excludes_ignored_pixels():
    z, y = _overconfident(2, n=4)
    logits = 4 * z
    y = y.clone()
    ignored = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    y[ignored] = 255
    # make the ignored pixels confidently wrong: they would drive T far up if counted
    wrong = (logits.argmax(1) + 1) % 5
    logits = logits.clone()
    logits.movedim(1, -1)[ignored] = 30 * torch.nn.functional.one_hot(wrong[ignored], 5).float()
    t_ignored = TemperatureScaling().fit(logits, y).temperature
    keep = ~ignored
    t_valid = TemperatureScaling().fit(logits.movedim(1, -1)[keep], y[keep]).temperature
    assert abs(t_ignored - t_valid) < 1e-4 * t_valid
    assert abs(t_ignored - 4) < 0.4
    y_all = y.clone()
    y_all[ignored] = (wrong[ignored] + 1) % 5  # labelled so the confident logits are wrong
    assert TemperatureScaling().fit(logits, y_all, ignore_index=None).temperature > 5


def test_temperature_scaling_from_model_and_loader():
    z, y = _overconfident(4, n=6)
    model = nn.Conv2d(5, 5, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(4 * torch.eye(5).view(5, 5, 1, 1))  # outputs 4 z from the "image" z
    model.train()
    loader = [{"image": z[i : i + 2], "mask": y[i : i + 2]} for i in range(0, 6, 2)]
    t_loader = TemperatureScaling().fit(model, loader).temperature
    assert model.training
    t_tensors = TemperatureScaling().fit(4 * z, y).temperature
    assert abs(t_loader - t_tensors) < 1e-3 * t_tensors
    tuples = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z, y), batch_size=4)
    t_sub = TemperatureScaling().fit(model, tuples, max_pixels=4000).temperature
    assert abs(t_sub - 4) < 0.6


def test_temperature_scaling_binary_and_errors():
    g = torch.Generator().manual_seed(5)
    z = 2 * torch.randn(4, 1, 32, 32, generator=g)
    y = (torch.rand(4, 32, 32, generator=g) < z[:, 0].sigmoid()).long()
    assert abs(TemperatureScaling().fit(3 * z, y).temperature - 3) < 0.45
    ts = TemperatureScaling(2.0)
    torch.testing.assert_close(ts({"out": torch.ones(1, 2, 1, 1)}), torch.full((1, 2, 1, 1), 0.5))
    logits, targets = torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be"):
        TemperatureScaling(0.0)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        ts.fit(logits, targets.float())
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        ts.fit(targets, targets)
    with pytest.raises(TypeError, match="logits must be a logits tensor or an nn.Module"):
        ts.fit([1.0], targets)
    with pytest.raises(ValueError, match="do not match"):
        ts.fit(logits, targets[:, :2])
    with pytest.raises(ValueError, match="outside 0..2"):
        ts.fit(logits, targets + 3)
    with pytest.raises(ValueError, match="no pixel"):
        ts.fit(logits, targets + 255)
    with pytest.raises(ValueError, match="max_iter"):
        ts.fit(logits, targets, max_iter=0)
    with pytest.raises(ValueError, match="max_pixels"):
        ts.fit(logits, targets, max_pixels=0)
    with pytest.raises(TypeError, match="targets must be a dataloader"):
        ts.fit(nn.Conv2d(3, 3, 1), targets)
    with pytest.raises(TypeError, match="dataloader batch 0"):
        ts.fit(nn.Conv2d(3, 3, 1), [torch.randn(1, 3, 4, 4)])
