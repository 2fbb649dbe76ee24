"""evaluate.py: the metrics on known cases (the yardstick can fail), the classifier and its cache, the whole
command on image and audio checkpoints, JSON, bad input."""

import errno
import json
import math
import os
from urllib.error import URLError

import numpy as np
import pytest
import torch

import data
import evaluate
import media
import train_audio
import train_image
from conftest import write_mnist, write_pcm
from data import default_image_layout
from cli import GUIDANCE

MNIST = default_image_layout("mnist")
FAST = [
    "--size",
    "tiny",
    "--batch-size",
    "8",
    "--eval-examples",
    "4",
    "--bpd-examples",
    "4",
    "--sample-steps",
    "1",
    "--num-workers",
    "0",
    "--log-every",
    "0",
    "--sample-every",
    "0",
    "--eval-every",
    "0",
    "--device",
    "cpu",
]


def exact_gaussian_features(n, mean, variances, seed):
    """n feature vectors whose sample mean and sample covariance are exactly `mean` and diag(variances)."""
    x = torch.randn(n, len(variances), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    whitened = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T
    return whitened * torch.tensor(variances, dtype=torch.float64).sqrt() + torch.tensor(mean, dtype=torch.float64)


def test_frechet_distance_matches_the_closed_form():
    """For diagonal covariances the distance is |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    a = exact_gaussian_features(400, [0.0, 1.0, -2.0], [1.0, 4.0, 0.25], seed=0)
    b = exact_gaussian_features(400, [1.0, 1.0, 0.0], [9.0, 1.0, 0.25], seed=1)
    expected = (1 + 0 + 4) + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert evaluate.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert evaluate.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_classifier_score_counts_the_classes_used():
    confident = torch.eye(4, dtype=torch.float64).repeat(5, 1)  # 20 examples, each surely one of 4 classes
    assert evaluate.classifier_score(confident) == pytest.approx(4)
    assert evaluate.classifier_score(torch.eye(4, dtype=torch.float64)[[0] * 8]) == pytest.approx(1)
    assert evaluate.classifier_score(torch.full((8, 4), 0.25, dtype=torch.float64)) == pytest.approx(1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Made-up MNIST files, and a classifier trained on them (shared by the tests below)."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, per_class_train=20, per_class_test=30)
    train_set, test_set, names = data.mnist_data(str(root), "mnist")
    classifier, accuracy = evaluate.train_classifier(train_set, test_set, MNIST, 10, 60, 0, torch.device("cpu"))
    return root, train_set, test_set, classifier, accuracy


def test_where_the_sound_is():
    layout = media.mel_layout()
    tokens = torch.full((3, *media.layout_shape(layout)), -0.9)  # quiet: 63 frames of 80 bands
    tokens[0, 20:41] = 0.3  # a word from frame 20 to 40
    tokens[1, 50:] = 0.6  # a word that sounds to the end of the clip
    tokens[1, 10] = -0.3  # a click below halfway to the loudest frame: not the start
    start, end = evaluate.where_the_sound_is(tokens, layout)  # the third clip is silence throughout: no sound
    frame = layout["hop"] / layout["sample_rate"]
    assert start[:2].tolist() == [20 * frame, 50 * frame] and end[:2].tolist() == [40 * frame, 62 * frame]
    assert start[2].isnan() and end[2].isnan()
    waves = torch.zeros(3, 16000)
    waves[:, 4000:8000] = 0.3 * torch.sin(torch.arange(4000) * 0.2)  # real clips: a tone from 0.25 s to 0.5 s
    numbers = evaluate.timing(tokens, waves, layout)
    assert numbers["sounding_at_end"] == 1 / 3 and numbers["real_sounding_at_end"] == 0.0
    assert numbers["start_s"] == 20 * frame  # the median of the clips that sound (torch: the lower middle one)
    assert abs(numbers["real_start_s"] - 0.25) < 0.05 and abs(numbers["real_end_s"] - 0.5) < 0.05


def test_the_yardstick_can_fail(digits):
    """Real held-out digits scored as samples: the classifier's accuracy and a distance near the real-vs-real
    floor. Noise: chance accuracy and a distance far above the floor. Real digits with shuffled labels: chance
    accuracy, but a distance near the floor (the features do not see labels)."""
    _, _, test_set, classifier, accuracy = digits
    assert accuracy > 0.9
    x, y = evaluate.all_examples(test_set)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    samples, real_a, real_b = (order[i * 100 : (i + 1) * 100] for i in range(3))
    cpu = torch.device("cpu")
    split = [(torch.arange(100), torch.arange(100, 200))]  # of x[real_a, real_b]
    reference = torch.cat([x[real_a], x[real_b]])
    real = evaluate.scores(classifier, x[samples], y[samples], reference, split, cpu)
    assert real["accuracy"] > 0.9 and real["fd"] < 2 * real["fd_floor"]
    noise = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scored = evaluate.scores(classifier, noise, y[samples], reference, split, cpu)
    assert scored["accuracy"] < 0.3 and scored["fd"] > 5 * real["fd_floor"]
    shuffled = y[samples][torch.randperm(100, generator=torch.Generator().manual_seed(2))]
    scored = evaluate.scores(classifier, x[samples], shuffled, reference, split, cpu)
    assert scored["accuracy"] < 0.3 and scored["fd"] == pytest.approx(real["fd"])
    assert real["score"] > 2 and scored["score"] == pytest.approx(real["score"])


def test_the_distances_are_averaged_over_the_splits(digits):
    """The first split gives the single-split numbers; the means are those of each split scored alone, up to the
    rounding of a float64 mean of three numbers (a few units in the 16th digit, so rel=1e-12 on any machine)."""
    classifier, cpu = digits[3], torch.device("cpu")
    x, _ = evaluate.all_examples(digits[2])
    generator = torch.Generator().manual_seed(3)
    orders = [torch.randperm(len(x), generator=generator) for _ in range(3)]
    splits = [(order[:100], order[100:200]) for order in orders]
    samples = torch.rand(50, 1, 28, 28, generator=generator) * 2 - 1
    each = [evaluate.scores(classifier, samples, None, x, [split], cpu) for split in splits]
    together = evaluate.scores(classifier, samples, None, x, splits, cpu)
    assert together["fd"] == each[0]["fd"] and together["fd_floor"] == each[0]["fd_floor"] and together["splits"] == 3
    floors = torch.tensor([e["fd_floor"] for e in each], dtype=torch.float64)
    assert together["fd_mean"] == pytest.approx(sum(e["fd"] for e in each) / 3, rel=1e-12)
    assert together["fd_floor_mean"] == pytest.approx(floors.mean().item(), rel=1e-12)
    assert together["fd_floor_sd"] == pytest.approx(floors.std().item(), rel=1e-12) and floors.std() > 0


@pytest.fixture(scope="module")
def mnist_run(digits, tmp_path_factory):
    root = digits[0]
    out = tmp_path_factory.mktemp("run")
    train_image.main(["--dataset", "mnist", "--data", str(root), "--out", str(out / "cond"), "--steps", "2", *FAST])
    train_image.main(
        [
            "--dataset",
            "mnist",
            "--data",
            str(root),
            "--out",
            str(out / "uncond"),
            "--steps",
            "1",
            "--unconditional",
            *FAST,
        ]
    )
    return root, out


def evaluate_main(ckpt, classifier, *flags):
    flags = ["--steps", "2", "--classifier-steps", "30", "--bpd-examples", "4", "--device", "cpu", *flags]
    evaluate.main(["--ckpt", str(ckpt), "--classifier", str(classifier), *flags])


def test_a_checkpoint_is_scored_and_the_classifier_cached(mnist_run, tmp_path, capsys):
    root, out = mnist_run
    evaluate_main(
        out / "cond" / "ckpt.pt",
        root / "classifier.pt",
        "--retrain-classifier",
        "--n",
        "3",
        "--json",
        str(tmp_path / "a.json"),
        "--out",
        str(tmp_path / "samples"),
    )
    printed = capsys.readouterr().out
    assert "training a mnist classifier" in printed and "Fréchet distance / floor" in printed
    assert f"mean Fréchet distance over {evaluate.REFERENCE_SPLITS} random choices" in printed
    numbers = json.loads((tmp_path / "a.json").read_text())
    assert numbers["samples"] == 30 and numbers["per_class"] == 3 and numbers["dataset"] == "mnist"
    assert numbers["data"] == str(root) and numbers["step"] == 2
    measured = ("accuracy", "fd", "fd_floor", "fd_mean", "fd_floor_mean", "score", "bpd", "classifier_accuracy")
    for key in (*measured, "sampling_s"):
        assert math.isfinite(numbers[key]) and numbers[key] >= 0, key
    assert numbers["splits"] == evaluate.REFERENCE_SPLITS and numbers["fd_floor_sd"] > 0
    assert 0 <= numbers["accuracy"] <= 1 and numbers["steps"] == 2
    assert {k: numbers[k] for k in ("cfg_scale", "cfg_ramp", "cfg_level")} == GUIDANCE["image"]  # the checkpoint's
    saved = dict(np.load(tmp_path / "samples" / "samples.npz"))
    assert saved["images"].shape == (30, 28, 28, 1) and saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    assert (tmp_path / "samples" / "samples.png").exists()

    evaluate_main(out / "cond" / "ckpt.pt", root / "classifier.pt", "--n", "3", "--json", str(tmp_path / "b.json"))
    assert "training a" not in capsys.readouterr().out  # the cached classifier is used
    again = json.loads((tmp_path / "b.json").read_text())
    for key in ("accuracy", "fd", "fd_floor", "fd_mean", "fd_floor_mean", "score"):  # same seed, same numbers
        assert again[key] == numbers[key], key


def test_an_unconditional_checkpoint(mnist_run, tmp_path, capsys):
    root, out = mnist_run
    evaluate_main(out / "uncond" / "ckpt.pt", root / "classifier.pt", "--n", "20", "--json", str(tmp_path / "u.json"))
    numbers = json.loads((tmp_path / "u.json").read_text())
    assert numbers["accuracy"] is None and numbers["samples"] == 20 and numbers["cfg_scale"] == 1
    assert " n/a |" in capsys.readouterr().out


def test_an_audio_checkpoint(tmp_path, capsys):
    for w, word in enumerate(("low", "high")):  # 20 clips a word: every 10th is held out, 2 a word
        for i in range(20):
            tone = torch.sin(2 * math.pi * (200 + 1500 * w + 5 * i) * torch.arange(16000) / 16000)
            write_pcm(tmp_path / "words" / word / f"{i:02d}.wav", (8000 * tone).round()[None])
    train_audio.main(["--audio-folder", str(tmp_path / "words"), "--out", str(tmp_path / "run"), "--steps", "1", *FAST])
    evaluate_main(
        tmp_path / "run" / "ckpt.pt", tmp_path / "c.pt", "--classifier-steps", "15", "--json", str(tmp_path / "a.json")
    )
    numbers = json.loads((tmp_path / "a.json").read_text())
    assert numbers["dataset"] == "audio-folder" and numbers["samples"] == 2  # as many as 4 held-out clips allow
    assert numbers["classifier_accuracy"] == 1.0  # two tones far apart
    assert math.isfinite(numbers["fd"]) and numbers["fd_floor"] >= 0
    assert numbers["tokens"] == "mel" and numbers["vocoded_accuracy"] == 1.0  # the vocoder keeps two tones apart
    assert math.isfinite(numbers["vocoded_fd"]) and numbers["vocoded_fd"] >= 0
    out = capsys.readouterr().out
    assert "real through the vocoder" in out and "bits per 8-bit mel value" in out
    assert {"start_s", "end_s", "sounding_at_end", "real_start_s"} <= numbers.keys() and "where it ends" in out


def fails(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_input(mnist_run, tmp_path, capsys, monkeypatch):
    root, out = mnist_run

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    ckpt = str(out / "cond" / "ckpt.pt")
    fails(capsys, ["--ckpt", str(tmp_path / "none.pt")], "no checkpoint at")
    (tmp_path / "notes.txt").write_text("text")
    fails(capsys, ["--ckpt", str(tmp_path / "notes.txt")], "is not an adr checkpoint")
    fails(capsys, ["--ckpt", ckpt, "--n", "20", "--device", "cpu"], "held-out split has 300: lower --n")
    fails(capsys, ["--ckpt", ckpt, "--json", str(tmp_path / "no" / "such" / "x.json")], "--json")
    fails(capsys, ["--ckpt", ckpt, "--data", str(tmp_path / "empty"), "--device", "cpu"], "could not download MNIST")
    fails(capsys, ["--ckpt", str(out / "uncond" / "ckpt.pt"), "--cfg", "2"], "guidance needs a class-conditional")
    fails(capsys, ["--ckpt", ckpt, "--temperature", "nan"], "not a finite number")


def test_a_file_that_is_not_a_classifier_is_never_overwritten(mnist_run, tmp_path, capsys):
    """--classifier pointed at a training checkpoint by mistake: refused before the data is read, the file kept."""
    root, out = mnist_run
    ckpt = out / "cond" / "ckpt.pt"
    before = ckpt.read_bytes()
    fails(capsys, ["--ckpt", str(ckpt), "--classifier", str(ckpt), "--data", str(tmp_path / "nothing")],
          "left as it is")
    assert ckpt.read_bytes() == before
    fails(capsys, ["--ckpt", str(ckpt), "--json", str(tmp_path)], "is a folder")  # before the sampling, not after


def test_a_read_only_data_folder_leaves_the_classifier_uncached(mnist_run, tmp_path, capsys, monkeypatch):
    """A shared dataset that cannot be written to (as root, where permissions do not bite, the write is refused
    as the system would refuse it): a warning, and the scores all the same."""
    root, out = mnist_run

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.abspath(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(evaluate, "open", read_only, raising=False)
    before = sorted(os.listdir(root))
    flags = ["--steps", "2", "--classifier-steps", "30", "--bpd-examples", "0", "--device", "cpu", "--n", "3"]
    evaluate.main(["--ckpt", str(out / "cond" / "ckpt.pt"), "--json", str(tmp_path / "s.json"), *flags])
    err = capsys.readouterr().err
    assert "the classifier is not cached" in err and "Permission denied" in err and "Traceback" not in err
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 30
    assert sorted(os.listdir(root)) == before  # no temporary file left behind
