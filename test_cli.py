"""cli.py: checkpoints (saved atomically, refused when they would run code or do not fit), the held-out subset,
and what the sampling scripts import."""

import errno
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import cli
import data
import media
from conftest import HERE, randomise_head, tiny_model

LAYOUT = media.image_layout()


def test_checkpoint_roundtrip_gives_identical_samples(tmp_path):
    model = randomise_head(tiny_model().eval())
    ema = randomise_head(tiny_model(seed=1).eval())
    path = tmp_path / "ckpt.pt"
    cli.save_checkpoint(path, model, media.image_layout(), ["a", "b", "c"], ema=ema, step=12)
    assert not os.path.exists(f"{path}.tmp")
    for use_ema, source in ((False, model), (True, ema)):
        loaded, ckpt = cli.load_checkpoint(path, use_ema=use_ema)
        assert ckpt["step"] == 12 and ckpt["class_names"] == ["a", "b", "c"] and ckpt["layout"]["kind"] == "image"
        torch.manual_seed(0)
        a = source.sample(2, torch.tensor([0, 1]), steps=3)
        torch.manual_seed(0)
        b = loaded.sample(2, torch.tensor([0, 1]), steps=3)
        assert torch.equal(a, b)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("container", ["zip", "plain pickle"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, protocol, container):
    """Refused before anything runs, for the right reason, and without torch's warnings about the protocol."""
    monkeypatch.chdir(tmp_path)
    payload = {"format": cli.CHECKPOINT_FORMAT, "payload": RunsCode()}
    if container == "zip":
        torch.save(payload, tmp_path / "evil.pt", pickle_protocol=protocol)
    else:
        (tmp_path / "evil.pt").write_bytes(pickle.dumps(payload, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(cli.CheckpointError, match="would call (os|posix).system, refused for safety"):
            cli.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists() and not caught


def test_wrong_files_give_a_clear_error(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    ckpt = {"format": cli.CHECKPOINT_FORMAT, "config": {"no_such_field": 1}, "model": {}}
    torch.save(ckpt, tmp_path / "future.pt")  # an adr checkpoint this adr.py cannot build
    for name, message in (
        ("random.pt", "could not be read"),
        ("other.pt", "marker"),
        ("missing.pt", "no checkpoint at"),
        ("future.pt", "does not match this adr.py"),
    ):
        with pytest.raises(cli.CheckpointError, match=message):
            cli.load_checkpoint(tmp_path / name)


def test_held_out_examples_span_the_classes():
    """Test sets are often stored class by class: the held-out subset must not be the first class only."""
    images = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    test_set = data.ImageDataset(images, [0] * 10 + [1] * 10 + [2] * 20, False)
    batches = lambda: cli.held_out_batches(test_set, LAYOUT, True, 12, 5, torch.device("cpu"))  # noqa: E731
    labels = torch.cat([y for _, y in batches()])
    assert len(labels) == 12 and set(labels.tolist()) == {0, 1, 2}
    again = torch.cat([y for _, y in batches()])
    assert torch.equal(labels, again)  # the same examples at every evaluation


@pytest.mark.parametrize("old", ["adr-checkpoint-v1", "adr-checkpoint-v2"])
def test_a_checkpoint_of_an_earlier_version_is_named_so(tmp_path, old):
    """v2 models took the class only as the start token: their weights do not fit, and the message says why."""
    torch.save({"format": old, "config": {}, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(cli.CheckpointError, match=f"earlier adr \\({old}\\).*train it again") as caught:
        cli.load_checkpoint(tmp_path / "old.pt")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("script", ["sample", "evaluate", "bench"])
def test_the_sampling_scripts_do_not_import_the_trainer(script):
    code = f"import sys, {script}; print('trainer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_an_output_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "samples.npz"
    path.write_bytes(b"the samples of yesterday")

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def bug(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise ValueError("a bug, not the disk")

    with pytest.raises(media.OutputError, match=r"cannot write .*samples.npz: the disk of .* is full"):
        with media.atomic_output(path) as tmp:
            assert tmp.endswith(".npz")  # np.savez, PIL and matplotlib read the format off the name
            full_disk(tmp)
    with pytest.raises(ValueError, match="a bug"):  # anything else is not dressed up as a disk error
        with media.atomic_output(path) as tmp:
            bug(tmp)
    assert path.read_bytes() == b"the samples of yesterday" and os.listdir(tmp_path) == ["samples.npz"]
    with media.atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"today's")
    assert path.read_bytes() == b"today's" and os.listdir(tmp_path) == ["samples.npz"]
