"""Test-time augmentation: exact inverses, equivariant models, scale TTA, the module wrapper, errors."""

import pytest
import torch
import torch.nn as nn

from maskworks.inference.tta import (
    TTA_PRESETS,
    Compose,
    HFlip,
    Identity,
    Rot90,
    Scale,
    TTAWrapper,
    VFlip,
    get_tta_transforms,
    iter_tta,
    tta,
)

GEOMETRIC = [Identity(), HFlip(), VFlip(), Rot90(1), Rot90(2), Rot90(3), Compose(Rot90(1), HFlip())]


def _conv1x1(in_ch: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(in_ch, classes, 1).eval()


def _conv3x3(in_ch: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Conv2d(in_ch, classes, 3, padding=1).eval()


class _DictModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict:
        out = self.inner(x)
        return {"out": out, "aux": [out[:, :, ::2, ::2]]}


@pytest.mark.parametrize("t", GEOMETRIC + get_tta_transforms("d4") + get_tta_transforms("mirror"), ids=repr)
def test_inverse_of_forward_is_exact(t):
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(t.inverse(t.forward(x), (5, 7)), x)
    assert torch.equal(t.inverse(t.forward(x)), x)  # size is only needed by transforms that resize


def test_d4_has_eight_distinct_transforms_and_rot90_swaps_sides():
    x = torch.randn(1, 1, 4, 6)
    outs = [t.forward(x) for t in get_tta_transforms("d4")]
    assert len(outs) == 8 and get_tta_transforms("flip4") == get_tta_transforms("d4")
    for i in range(8):
        for j in range(i):
            assert outs[i].shape != outs[j].shape or not torch.equal(outs[i], outs[j])
    assert Rot90(1).forward(x).shape == (1, 1, 6, 4) and Rot90(2).forward(x).shape == (1, 1, 4, 6)
    assert torch.equal(Rot90(1).forward(x), torch.rot90(x, 1, (2, 3)))


@pytest.mark.parametrize("preset", ["flip", "mirror", "rot90", "d4"])
@pytest.mark.parametrize("activation", ["softmax", None])
def test_equivariant_model_gives_the_plain_output(preset, activation):
    model = _conv1x1()
    x = torch.randn(2, 3, 6, 9)
    with torch.no_grad():
        plain = model(x)
        plain = plain.softmax(1) if activation else plain
        torch.testing.assert_close(tta(model, x, preset, activation=activation), plain, atol=1e-6, rtol=1e-5)


def test_flip_tta_by_hand_and_dict_output():
    model = _conv3x3()
    x = torch.randn(1, 3, 8, 11)
    with torch.no_grad():
        expected = 0.5 * (model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1))
        torch.testing.assert_close(tta(model, x, "flip"), expected)
        torch.testing.assert_close(tta(_DictModel(model), x, "flip"), expected)
        # a non-equivariant model does see the difference
        assert not torch.allclose(expected, model(x).softmax(1), atol=1e-4)


def test_return_all_and_merge_max():
    model = _conv3x3()
    x = torch.randn(2, 3, 7, 10)
    with torch.no_grad():
        merged, outs = tta(model, x, "d4", return_all=True)
        assert outs.shape == (8, 2, 4, 7, 10)
        torch.testing.assert_close(merged, outs.mean(0))
        torch.testing.assert_close(merged.sum(1), torch.ones(2, 7, 10))
        expected = [p for _, p in iter_tta(model, x, "d4")]
        torch.testing.assert_close(outs, torch.stack(expected))
        torch.testing.assert_close(tta(model, x, "d4", merge="max"), outs.amax(0))
        logits = tta(model, x, "d4", activation=None)
        torch.testing.assert_close(logits, torch.stack([p for _, p in iter_tta(model, x, "d4", None)]).mean(0))
        sig = tta(model, x, "flip", activation="sigmoid")
        assert 0 <= float(sig.min()) and float(sig.max()) <= 1


@pytest.mark.parametrize("size", [(13, 17), (9, 5), (1, 3)])
def test_scale_tta_keeps_a_constant_image_and_odd_sizes(size):
    x = torch.full((2, 3, *size), 0.7)
    identity = nn.Identity()
    out = tta(identity, x, "flip_scales", activation=None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    for factor in (0.5, 0.75, 1.3):
        t = Scale(factor)
        xt = t.forward(x)
        assert xt.shape[-2:] == t.scaled_size(size)
        assert t.inverse(xt, size).shape == x.shape
    assert Scale(0.75).scaled_size((33, 47)) == (25, 35) and Scale(0.5).scaled_size((11, 1)) == (6, 1)
    assert Scale(1.0).forward(x) is x


def test_scale_tta_on_a_real_model_and_compose_with_scale():
    model = _conv3x3()
    x = torch.randn(1, 3, 15, 22)
    with torch.no_grad():
        out = tta(model, x, [Scale(0.75), "identity", Compose(Scale(1.25), HFlip())])
    assert out.shape == (1, 4, 15, 22)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 15, 22))
    t = Compose(Rot90(1), Scale(0.6))
    xt = t.forward(x)
    assert xt.shape[-2:] == (13, 9)
    assert t.inverse(xt, (15, 22)).shape == x.shape


def test_wrapper_on_non_square_inputs_and_as_logits():
    model = _conv3x3()
    wrapper = TTAWrapper(model, transforms="d4")
    assert isinstance(wrapper, nn.Module) and "model.weight" in wrapper.state_dict()
    with torch.no_grad():
        for size in [(7, 12), (12, 7), (5, 5)]:
            x = torch.randn(2, 3, *size)
            out = wrapper(x)
            assert out.shape == (2, 4, *size)
            torch.testing.assert_close(out, tta(model, x, "d4"))
        as_logits = TTAWrapper(model, transforms="d4", as_logits=True)
        torch.testing.assert_close(as_logits(x).softmax(1), tta(model, x, "d4"))
        binary = TTAWrapper(_conv3x3(classes=1), transforms="flip", activation="sigmoid", as_logits=True)
        probs = tta(_conv3x3(classes=1), x, "flip", activation="sigmoid")
        torch.testing.assert_close(binary(x).sigmoid(), probs)
    wrapper.train()
    assert model.training
    wrapper.eval()
    assert not model.training


def test_presets_all_resolve():
    for name in TTA_PRESETS:
        ts = get_tta_transforms(name)
        assert ts and all(hasattr(t, "forward") and hasattr(t, "inverse") for t in ts)
    assert len(get_tta_transforms("ms_flip")) == 12 and len(get_tta_transforms("scales")) == 3
    assert get_tta_transforms(["hflip", Rot90(3)]) == [HFlip(), Rot90(3)]
    assert get_tta_transforms(HFlip()) == [HFlip()]


def test_errors_name_the_argument():
    model = _conv1x1()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="transforms must be one of the presets"):
        tta(model, x, "flipp")
    with pytest.raises(ValueError, match="transforms must not be empty"):
        tta(model, x, [])
    with pytest.raises(ValueError, match=r"transforms\[1\]"):
        tta(model, x, ["hflip", "spin"])
    with pytest.raises(TypeError, match=r"transforms\[0\]"):
        tta(model, x, [3])
    with pytest.raises(TypeError, match="transforms must be"):
        tta(model, x, 3)
    with pytest.raises(ValueError, match="merge"):
        tta(model, x, merge="median")
    with pytest.raises(ValueError, match="activation"):
        tta(model, x, activation="relu")
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        tta(model, x[0])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tta(model, x.numpy())
    with pytest.raises(TypeError, match="model must be"):
        tta("model", x)
    with pytest.raises(ValueError, match="k must be 1, 2 or 3"):
        Rot90(4)
    with pytest.raises(ValueError, match="scale factor must be"):
        Scale(0)
    with pytest.raises(ValueError, match="mode"):
        Scale(0.5, mode="nearest")
    with pytest.raises(ValueError, match="needs size"):
        Scale(0.5).inverse(torch.zeros(1, 2, 2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        TTAWrapper(lambda t: t)
    with pytest.raises(ValueError, match="at the input resolution"):
        tta(nn.Conv2d(3, 2, 3), torch.randn(1, 3, 6, 8), "flip")  # unpadded conv shrinks the output


def test_tta_inside_each_window_of_a_sliding_window():
    """TTA composes with tiling: a TTAWrapper is a model, so sliding_window runs TTA in every window."""
    import torch.nn as nn

    from maskworks.inference import TTAWrapper, sliding_window

    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()  # pointwise: flip-equivariant, so TTA changes nothing
    x = torch.randn(1, 3, 45, 70)
    wrapped = TTAWrapper(model, transforms="d4", activation="softmax", as_logits=True)
    tiled = sliding_window(wrapped, x, window=32, overlap=0.5, activation="softmax")
    whole = torch.softmax(model(x), 1)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
