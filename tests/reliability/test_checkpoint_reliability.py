"""Checkpoints and weight files: bad input gets a one-line error naming the file, and a failure loses nothing."""

from __future__ import annotations

import errno
import logging
import os
import pickle

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import maskworks.checkpoint as ckpt
from maskworks import create_model, load_model, load_weights, save_model
from maskworks.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    atomic_torch_save,
    atomic_write_bytes,
    load_training_state,
)
from maskworks.convert import DEFAULT_MIN_FRACTION, read_state_dict


def _tiny(num_classes: int = 3):
    return create_model("unet_vanilla", num_classes=num_classes, features=(8, 16)).eval()


def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- load_weights coverage
def test_load_weights_refuses_a_checkpoint_that_matches_nothing(tmp_path):
    path = tmp_path / "other_model.safetensors"
    save_file(_tiny().state_dict(), str(path))
    model = create_model("resnet18").eval()
    before = _weights(model)
    with pytest.raises(ValueError) as excinfo:
        load_weights(model, path)
    message = _message(excinfo)
    assert str(path) in message and "fills none of the 100 tensors of ResNet" in message
    assert "unused checkpoint keys e.g. ['" in message and "'conv1.weight'" in message  # examples of both sides
    assert "strict=False" in message
    _assert_unchanged(model, before)
    assert path.read_bytes()  # the file is left alone


def test_load_weights_strict_false_still_loads_nothing_on_purpose(tmp_path, caplog):
    path = tmp_path / "other_model.pth"
    torch.save(_tiny().state_dict(), path)
    model = create_model("resnet18").eval()
    before = _weights(model)
    with caplog.at_level(logging.WARNING, logger="maskworks.convert.load"):
        result = load_weights(model, path, strict=False)
    assert len(result.missing_keys) == 100 and result.unexpected_keys  # BatchNorm counters are filled in by torch
    assert "loaded 0 tensors" in caplog.text  # a warning, not a silent INFO line
    _assert_unchanged(model, before)


def test_load_weights_refuses_a_checkpoint_below_min_fraction_and_restores_the_model(tmp_path):
    donor = create_model("resnet18").eval()
    keys = [k for k in donor.state_dict() if not k.endswith("num_batches_tracked")]
    part = {k: v + 1 for k, v in donor.state_dict().items() if k in keys[:30]}  # 30 of 100 tensors
    path = tmp_path / "partial.safetensors"
    save_file(part, str(path))
    model = create_model("resnet18").eval()
    before = _weights(model)
    assert DEFAULT_MIN_FRACTION == 0.5
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(model, path)
    message = _message(excinfo)
    assert "fills only 30 of the 100 tensors" in message and "at least 50%" in message and str(path) in message
    _assert_unchanged(model, before)  # the 30 matching tensors were put back
    # a lower bar, or strict=False, accepts it
    result = load_weights(model, path, min_fraction=0.25)
    assert len(result.missing_keys) == 100 - 30 and not result.unexpected_keys
    assert torch.equal(model.state_dict()[keys[0]], part[keys[0]])
    with pytest.raises(ValueError, match="min_fraction must be a number in"):
        load_weights(model, path, min_fraction=1.5)


def test_backbone_checkpoint_is_measured_against_the_encoder_it_fills(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    model = create_model("unet", encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    # the decoder gets nothing, which is no reason to refuse: every tensor of the encoder, the target, is filled
    result = load_weights(model, path, min_fraction=1.0)
    assert result.missing_keys and all(k.startswith(("decoder.", "segmentation_head.")) for k in result.missing_keys)
    # the same file holds nothing for a model without an encoder of that kind
    vanilla = _tiny()
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(vanilla, path)
    assert "fills none of the" in _message(excinfo) and "UNetVanilla" in str(excinfo.value)


# ----------------------------------------------------------------------------------------- smp DeepLabV3+ rates
def test_smp_deeplabv3plus_checkpoint_needs_smp_rates_and_default_rates_warn(tmp_path, caplog):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from maskworks.testing import randomize_norms

    torch.manual_seed(0)
    ref = randomize_norms(smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3)).eval()
    path = tmp_path / "smp_deeplabv3plus.pth"
    torch.save(ref.state_dict(), path)
    x = torch.randn(1, 3, 160, 160)  # a 10x10 ASPP input: rate 6 taps land inside it, rate 12 and up do not
    with torch.no_grad():
        expected = ref(x)

    same = create_model("deeplabv3plus", encoder="resnet18", num_classes=3, atrous_rates=(12, 24, 36)).eval()
    with caplog.at_level(logging.WARNING, logger="maskworks.convert.load"):
        result = load_weights(same, path, source="smp", strict=True)
    assert result == ([], []) and "atrous" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(same(x), expected, atol=1e-4, rtol=1e-4)

    caplog.clear()
    default = create_model("deeplabv3plus", encoder="resnet18", num_classes=3).eval()  # paper rates 6/12/18
    with caplog.at_level(logging.WARNING, logger="maskworks.convert.load"):
        load_weights(default, path, source="smp", strict=True)  # every tensor loads ...
    with torch.no_grad():
        assert not torch.allclose(default(x), expected, atol=1e-3)  # ... yet it computes another function
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    for fragment in ("(6, 12, 18)", "decoder_atrous_rates=(12, 24, 36)", "atrous_rates=(12, 24, 36)", "assumes"):
        assert fragment in warnings[0]


# ----------------------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_truncated_or_foreign_safetensors_raise_checkpoint_error(tmp_path, damage):
    model = _tiny()
    save_model(model, tmp_path / "best")
    weights = tmp_path / "best.safetensors"
    data = weights.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "text": b"version https://git-lfs.github.com/spec/v1\n",
        "empty": b"",
    }
    weights.write_bytes(broken[damage])
    before = _snapshot(tmp_path)
    for call in (lambda: load_model(weights), lambda: load_weights(_tiny(), weights), lambda: read_state_dict(weights)):
        with pytest.raises(CheckpointError) as excinfo:
            call()
        message = _message(excinfo)
        assert str(weights) in message and "not a valid safetensors file" in message and "expected" in message
        assert not isinstance(excinfo.value, SafetensorError)
    assert _snapshot(tmp_path) == before


def test_malformed_recipe_json_names_the_file(tmp_path):
    save_model(_tiny(), tmp_path / "best")
    recipe = tmp_path / "best.json"
    recipe.write_text('{"model": "unet_vanilla", "kwargs": {"num_classes": 3,')
    with pytest.raises(CheckpointError) as excinfo:
        load_model(tmp_path / "best.safetensors")
    message = _message(excinfo)
    assert str(recipe) in message and "not valid JSON" in message and "line 1" in message
    recipe.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"best\.json holds a JSON list"):
        load_model(tmp_path / "best.safetensors")
    recipe.write_text('{"model": "unet_vanila", "kwargs": {}}')
    with pytest.raises(CheckpointError) as excinfo:
        load_model(tmp_path / "best.safetensors")
    assert str(recipe) in _message(excinfo) and "did you mean: unet_vanilla" in str(excinfo.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _corrupt_torch_files(tmp_path) -> dict[str, object]:
    good = tmp_path / "good.pt"
    torch.save({"model": _tiny().state_dict(), "optimizer": {"state": {}}, "epoch": 1}, good)
    data = good.read_bytes()
    files = {
        "truncated zip": data[: len(data) // 2],
        "empty": b"",
        "text": b"this is not a checkpoint\n" * 4,
        "plain pickle": pickle.dumps({"model": [1, 2, 3]}),
    }
    out = {}
    for name, payload in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        path.write_bytes(payload)
        out[name] = path
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": _Payload(), "epoch": 1}, evil)
    out["arbitrary object"] = evil
    return out


def test_corrupt_torch_files_raise_checkpoint_error_naming_the_file(tmp_path):
    for name, path in _corrupt_torch_files(tmp_path).items():
        before = path.read_bytes()
        for call in (
            lambda p=path: read_state_dict(p),
            lambda p=path: load_weights(_tiny(), p),
            lambda p=path: load_training_state(p),
        ):
            with pytest.raises(CheckpointError) as excinfo:
                call()
            message = _message(excinfo)
            assert str(path) in message and "not a weights-only torch checkpoint" in message, (name, message)
        assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="pickled Python objects other than tensors"):
        read_state_dict(tmp_path / "evil.pt")


def test_load_training_state_reads_the_trainer_state_and_refuses_anything_else(tmp_path):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 16, 16)).mean().backward()
    opt.step()
    last = tmp_path / "checkpoints" / "last.pt"
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 4, "extra": 1}, last)
    state = load_training_state(last, map_location="cpu")
    assert state["epoch"] == 4 and set(state["model"]) == set(model.state_dict())
    opt.load_state_dict(state["optimizer"])

    incomplete = tmp_path / "incomplete.pt"
    torch.save({"model": model.state_dict(), "epoch": 4}, incomplete)
    with pytest.raises(CheckpointError) as excinfo:
        load_training_state(incomplete)
    assert str(incomplete) in _message(excinfo) and "missing ['optimizer']" in str(excinfo.value)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match=r"list\.pt is not a training state: it holds a list"):
        load_training_state(listed)
    save_model(model, tmp_path / "best")
    with pytest.raises(CheckpointError, match=r"best\.safetensors is a model checkpoint .* not a training state"):
        load_training_state(tmp_path / "best.safetensors")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_training_state(tmp_path / "nothere.pt")


# ----------------------------------------------------------------------------------------- load_model paths
def _run_folder(tmp_path):
    run = tmp_path / "run"
    model = _tiny()
    save_model(model, run / "best")
    save_model(model, run / "final")
    atomic_torch_save(
        {"model": model.state_dict(), "optimizer": {"state": {}}, "epoch": 2}, run / "checkpoints/last.pt"
    )
    return run


def test_load_model_on_a_training_state_names_the_model_checkpoints(tmp_path):
    run = _run_folder(tmp_path)
    before = _snapshot(run)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(run / "checkpoints" / "last.pt")
    message = _message(excinfo)
    assert "last.pt is a training state" in message and "not a model checkpoint" in message
    assert str(run / "best.safetensors") in message and str(run / "final.safetensors") in message
    assert "last.safetensors" not in message
    # a plain state dict without a recipe points to load_weights
    torch.save(_tiny().state_dict(), run / "weights.pth")
    with pytest.raises(CheckpointError, match=r"weights\.pth is a plain state dict .*maskworks\.load_weights\("):
        load_model(run / "weights.pth")
    assert {k: v for k, v in _snapshot(run).items() if k != "weights.pth"} == before


def test_load_model_of_a_missing_checkpoint_lists_the_existing_ones(tmp_path):
    run = _run_folder(tmp_path)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_model(run / "last.safetensors")
    message = _message(excinfo)
    assert str(run / "last.safetensors") in message and "best.safetensors, final.safetensors" in message
    with pytest.raises(FileNotFoundError) as excinfo:
        load_model(run / "checkpoints" / "best.safetensors")  # one folder too deep: still finds run/
    assert f"the model checkpoints are: {run / 'best.safetensors'}, {run / 'final.safetensors'}" in _message(excinfo)
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"sub holds no model checkpoint \(a \.safetensors file"):
        load_model(tmp_path / "elsewhere" / "sub" / "best.safetensors")
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist"):
        load_model(tmp_path / "nowhere" / "best.safetensors")
    with pytest.raises(CheckpointError, match=r"is a folder, not a model checkpoint; .*best\.safetensors"):
        load_model(run)


def test_load_model_with_another_class_count_names_both_counts(tmp_path):
    save_model(_tiny(num_classes=18), tmp_path / "best")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(tmp_path / "best.safetensors", num_classes=5)
    message = _message(excinfo)
    assert "num_classes=18 but loaded with num_classes=5" in message and "(18,)" in message and "(5,)" in message
    assert _snapshot(tmp_path) == before


def test_read_state_dict_on_a_folder_or_a_missing_file_names_it(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(CheckpointError) as excinfo:
        read_state_dict(tmp_path)
    assert f"{tmp_path} is a folder" in _message(excinfo) and "encoder.safetensors" in str(excinfo.value)
    with pytest.raises(FileNotFoundError) as excinfo:
        read_state_dict(tmp_path / "encoder.pth")
    assert str(tmp_path / "encoder.pth") in _message(excinfo) and "encoder.safetensors" in str(excinfo.value)


# ----------------------------------------------------------------------------------------- writing
def _disk_full_after_some_bytes(tmp, *args):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_file_disk_full(tensors, tmp, metadata=None):
    _disk_full_after_some_bytes(tmp)


def _safetensors_disk_full(tensors, tmp, metadata=None):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_disk_full(obj, f, *args, **kwargs):
    f.write(b"PK partial")
    try:  # torch's zip writer turns the OSError of the file object into a RuntimeError
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize("writer", [_save_file_disk_full, _safetensors_disk_full])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    save_model(_tiny(), tmp_path / "best", meta={"epoch": 1})
    before = _snapshot(tmp_path)
    monkeypatch.setattr(ckpt, "save_file", writer)
    with pytest.raises(CheckpointWriteError) as excinfo:
        save_model(_tiny(), tmp_path / "best", meta={"epoch": 2})
    message = _message(excinfo)
    assert message.startswith("no space left on device") and str(tmp_path / "best.safetensors") in message
    assert isinstance(excinfo.value, OSError) and excinfo.value.errno == errno.ENOSPC
    assert isinstance(excinfo.value, CheckpointError)  # a ValueError too: the CLI prints it as one line
    assert _snapshot(tmp_path) == before  # old weights and recipe intact, no temporary left
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_writing_the_recipe_replaces_neither_file(tmp_path, monkeypatch):
    save_model(_tiny(), tmp_path / "best", meta={"epoch": 1})
    before = _snapshot(tmp_path)
    monkeypatch.setattr(ckpt, "_write_bytes", _disk_full_after_some_bytes)
    with pytest.raises(CheckpointWriteError) as excinfo:
        save_model(_tiny(), tmp_path / "best", meta={"epoch": 2})
    assert str(tmp_path / "best.json") in _message(excinfo)
    assert _snapshot(tmp_path) == before  # the new weights were not renamed over the old ones either
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device: could not write .*history\.jsonl"):
        atomic_write_bytes(tmp_path / "history.jsonl", b"{}\n")
    assert _snapshot(tmp_path) == before


def test_disk_full_in_torch_save_is_recognised_and_keeps_the_training_state(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, last)
    before = last.read_bytes()
    monkeypatch.setattr(torch, "save", _torch_disk_full)
    with pytest.raises(CheckpointWriteError) as excinfo:
        atomic_torch_save({"epoch": 2}, last)
    assert str(last) in _message(excinfo) and excinfo.value.errno == errno.ENOSPC
    assert last.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unserialisable_meta_writes_nothing(tmp_path):
    save_model(_tiny(), tmp_path / "best", meta={"epoch": 1})
    before = _snapshot(tmp_path)
    with pytest.raises(TypeError, match="cannot store object"):
        save_model(_tiny(), tmp_path / "best", meta={"epoch": object()})
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_model(_tiny(), tmp_path / "best")
        atomic_torch_save({"epoch": 1}, tmp_path / "last.pt")
        atomic_write_bytes(tmp_path / "history.jsonl", b"{}\n")
        (tmp_path / "plain.txt").write_text("reference")  # what any other output gets
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (os.stat(tmp_path / "plain.txt").st_mode & 0o777) == expected
    for name in ("best.safetensors", "best.json", "last.pt", "history.jsonl"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == expected, name


def test_save_removes_temporaries_left_by_an_interrupted_save_of_the_same_target(tmp_path):
    stale = [".best.safetensors.k3j_x9a1.tmp", ".best.json.abc12345.tmp"]
    kept = [".final.safetensors.k3j_x9a1.tmp", ".best.safetensors.bak.abc12345.tmp", "best.safetensors.tmp", "x.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    save_model(_tiny(), tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best.json", "best.safetensors", *kept])


def test_checkpoint_names_with_dots_keep_them(tmp_path):
    model = _tiny()
    path = save_model(model, tmp_path / "epoch.5")
    assert path.name == "epoch.5.safetensors" and (tmp_path / "epoch.5.json").is_file()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(load_model(tmp_path / "epoch.5.safetensors")(x), model(x))


# ----------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", [None, 123, ["unet"]])
def test_create_model_with_a_non_string_name_says_what_a_name_is(name):
    with pytest.raises(ValueError) as excinfo:
        create_model(name)
    message = _message(excinfo)
    assert message.startswith("model name must be a string") and "maskworks models" in message


def test_create_model_with_an_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError) as excinfo:
        create_model("deeplabv3plux")
    assert _message(excinfo).startswith("unknown model 'deeplabv3plux'; did you mean: deeplabv3plus")
    with pytest.raises(ValueError, match="^unknown model 'nope'"):
        create_model("nope")


def test_create_model_with_a_wrong_argument_names_the_model_and_the_argument():
    with pytest.raises(TypeError) as excinfo:
        create_model("deeplabv3plus", encoder="resnet18", decoder_atrous_rates=(12, 24, 36))
    message = _message(excinfo)
    assert "'deeplabv3plus'" in message and "'decoder_atrous_rates'" in message
    assert "did you mean 'atrous_rates'?" in message
    with pytest.raises(TypeError, match=r"'unet_vanilla' got unexpected argument\(s\) 'num_clases' \(did you mean"):
        create_model("unet_vanilla", num_clases=3)
