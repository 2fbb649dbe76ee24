"""data.py: image folders, CIFAR-10, Speech Commands and audio folders, read from files the tests write in
the real on-disk formats."""

import math
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch

import data
import media
from conftest import write_constant, write_float_wav, write_image, write_mnist, write_pcm

LAYOUT = media.image_layout()


def test_image_folder_skips_unreadable_files(image_dir, capsys):
    train_set, test_set, names = data.image_folder_data(str(image_dir), LAYOUT)
    assert names == ["cat", "ship"]
    assert len(train_set) == 12 and len(test_set) == 4  # the corrupt file and the .txt are not in
    assert "skipped 1 unreadable file" in capsys.readouterr().err
    labels = [train_set[i][1] for i in range(len(train_set))]
    assert labels == [0] * 6 + [1] * 6
    # the first cat image, decoded and centre-cropped by load_image, is item 0 (up to the random flip)
    x, _ = train_set[0]
    expected = media.load_image(image_dir / "train" / "cat" / "0.jpg", 32, 32)
    assert torch.equal(x, expected) or torch.equal(x, expected.flip(-1))
    flips = {torch.equal(train_set[0][0], expected) for _ in range(40)}
    assert flips == {True, False}  # training images are flipped at random
    assert all(torch.equal(test_set[0][0], test_set[0][0]) for _ in range(5))  # test images are not
    # a flat DIR/<class>/ folder: no test split
    flat_train, flat_test, flat_names = data.image_folder_data(str(image_dir / "train"), LAYOUT)
    assert len(flat_train) == 12 and flat_test is None and flat_names == ["cat", "ship"]
    # a flat folder with a test/ sub-folder: test/ is the test split, not a class
    for name in ("cat", "ship"):
        os.rename(image_dir / "train" / name, image_dir / name)
    (image_dir / "train").rmdir()
    flat_train, flat_test, flat_names = data.image_folder_data(str(image_dir), LAYOUT)
    assert flat_names == ["cat", "ship"] and len(flat_train) == 12 and len(flat_test) == 4


def test_image_folder_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.image_folder_data(str(tmp_path / "missing"), LAYOUT)
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        data.image_folder_data(str(tmp_path / "empty"), LAYOUT)
    assert e.value.code == 2 and "no readable images" in capsys.readouterr().err


def test_image_folder_drops_a_class_without_readable_images(image_dir, capsys):
    """A class whose training files are all unreadable is dropped, with a warning naming it: the others keep
    their images, renumbered, and its test images are not read."""
    blank = image_dir / "train" / "blank"  # sorts before cat: the labels of cat and ship must move down
    blank.mkdir()
    (blank / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (blank / "1.jpg").write_bytes(b"")
    (image_dir / "test" / "blank").mkdir()
    write_image(image_dir / "test" / "blank" / "0.png", seed=7)
    train_set, test_set, names = data.image_folder_data(str(image_dir), LAYOUT)
    assert names == ["cat", "ship"] and len(train_set) == 12 and len(test_set) == 4
    assert train_set.labels.tolist() == [0] * 6 + [1] * 6 and test_set.labels.tolist() == [0, 0, 1, 1]
    err = capsys.readouterr().err
    assert "skipped 3 unreadable files" in err
    assert f"warning: dropped 1 class without readable images: blank (in {image_dir / 'train'})" in err


def test_image_folder_refuses_a_class_named_train_or_test(tmp_path, capsys):
    """train/ and test/ are the splits, never classes: a flat folder with a class of either name is refused in one
    line that says so (test/ was taken as an empty test split, train/ as a split without classes)."""
    for name in ("test", "train"):
        root = tmp_path / name
        for folder in ("cat", name):
            (root / folder).mkdir(parents=True)
            write_image(root / folder / "0.png", seed=0)
        with pytest.raises(SystemExit) as e:
            data.image_folder_data(str(root), LAYOUT)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        split = {"test": "test", "train": "training"}[name]
        assert f"{root / name} has no class sub-folders, but a folder named {name} is the {split} split" in err
        assert "rename it" in err and "put the images in" not in err


def write_cifar_batches(root, per_batch=4, seed=0):
    """The real cifar-10-batches-py layout (pickled dicts of uint8 rows: 1024 red, 1024 green, 1024 blue
    values), with random contents, so torchvision's md5 checksums do not match."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return folder, names, batches


def test_cifar10_files_without_valid_checksums(tmp_path, capsys):
    import torchvision

    folder, names, batches = write_cifar_batches(tmp_path)
    with pytest.raises(RuntimeError, match="corrupted"):  # torchvision checks the md5 of each file
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    train_set, test_set, class_names = data.cifar10_data(str(tmp_path))
    assert "do not match torchvision's checksums" in capsys.readouterr().err
    assert class_names == names and len(train_set) == 20 and len(test_set) == 4
    first = batches["data_batch_1"]
    x, label = test_set.images[0], test_set.labels[0]  # the test split: test_batch
    assert label == batches["test_batch"]["labels"][0] and x.shape == (3, 32, 32)
    x, label = train_set.images[0], train_set[0][1]
    assert label == first["labels"][0]
    assert (
        x[0, 0, 1] == first["data"][0, 1]
        and x[1, 0, 0] == first["data"][0, 1024]
        and x[2, 31, 31] == first["data"][0, 3071]
    )
    image, _ = test_set[1]
    assert torch.equal(image, torch.from_numpy(batches["test_batch"]["data"][1].reshape(3, 32, 32)).float() / 127.5 - 1)


def test_cifar10_refuses_pickles_that_run_code(tmp_path, capsys):
    folder, _, _ = write_cifar_batches(tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "data_batch_1", "wb") as f:  # a pickle that would call os.system("touch ...")
        f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(SystemExit) as e:
        data.cifar10_data(str(tmp_path))
    assert e.value.code == 2 and "refusing to load" in capsys.readouterr().err and not marker.exists()


def make_speech_commands(root, version="v0.02"):
    """Every digit plus "yes" and _background_noise_, three speakers each: speaker a trains, b is in the
    validation list, c in the testing list. Returns {value: (word, subset)} of the files written."""
    folder = os.path.join(root, "SpeechCommands", f"speech_commands_{version}")
    files, validation, testing = {}, [], []
    for w, word in enumerate(data.SC09 + ["yes"]):
        for s, (speaker, subset) in enumerate(
            [("aaaa0001", "training"), ("bbbb0002", "validation"), ("cccc0003", "testing")]
        ):
            value = 100 * (w + 1) + s
            name = f"{speaker}_nohash_0.wav"
            write_constant(os.path.join(folder, word, name), value, length=8000)  # 0.5 s: padded to 1 s
            files[value] = (word, subset)
            {"validation": validation, "testing": testing}.get(subset, []).append(f"{word}/{name}")
    write_constant(os.path.join(folder, "_background_noise_", "noise.wav"), 7)
    for name, lines in (("validation_list.txt", validation), ("testing_list.txt", testing)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return files


def members(clips, words):
    """{value: word} of each clip in a Clips set (the constant that identifies its file)."""
    found = {}
    for i in range(len(clips)):
        x, label = clips[i]
        assert x.shape == (16000,) and x[8000:].abs().max() == 0
        found[round(x[0].item() * 32768)] = words[label]
    return found


def test_speech_commands_split(tmp_path):
    files = make_speech_commands(tmp_path)
    train_set, test_set, words = data.speech_commands(str(tmp_path))
    assert words == data.SC09
    expected = lambda subset: {v: w for v, (w, s) in files.items() if s == subset and w != "yes"}  # noqa: E731
    assert members(train_set, words) == expected("training")
    assert members(test_set, words) == expected("testing")
    train_set, test_set, words = data.speech_commands(str(tmp_path), ["yes", "two"])
    assert words == ["yes", "two"]
    assert members(train_set, words) == {1100: "yes", 300: "two"}
    assert members(test_set, words) == {1102: "yes", 302: "two"}


def test_one_held_out_clip_per_word_is_the_first_of_the_test_split(tmp_path):
    """sample.py's real clips: the same clip the test split starts each word with, None for a word it lacks, and
    nothing (no download, no error) where the data is not on disk."""
    make_speech_commands(tmp_path)
    source = dict(name="speech-commands", root=str(tmp_path))
    _, test_set, _ = data.speech_commands(str(tmp_path), ["yes", "two"])
    clips = data.held_out_clip_per_word(source, ["yes", "two", "cat"])
    first = [test_set[int((test_set.labels == c).nonzero()[0])][0] for c in (0, 1)]  # as the training scripts pick
    assert all((clip - x).abs().max() <= 1 / 32768 for clip, x in zip(clips, first)) and clips[2] is None
    assert round(clips[0][0].item() * 32768) == 1102  # speaker c, the testing list's
    assert data.held_out_clip_per_word(dict(name="speech-commands", root=str(tmp_path / "gone")), ["yes"]) == []
    assert data.held_out_clip_per_word(dict(name="mnist", root=str(tmp_path)), ["yes"]) == []


def test_speech_commands_v0_01_and_missing_files(tmp_path, capsys):
    """v0.01 has the same layout and list files: it is used where v0.02 is not there. A file named in a list
    but not on disk is reported as missing, not as unreadable."""
    files = make_speech_commands(tmp_path, "v0.01")
    os.remove(tmp_path / "SpeechCommands" / "speech_commands_v0.01" / "seven" / "cccc0003_nohash_0.wav")
    train_set, test_set, words = data.speech_commands(str(tmp_path))
    captured = capsys.readouterr()
    assert "Speech Commands v0.01 in" in captured.out
    assert "1 files named in the testing list are missing" in captured.err and "unreadable" not in captured.err
    assert members(train_set, words) == {v: w for v, (w, s) in files.items() if s == "training" and w != "yes"}
    assert len(test_set) == 9


def test_speech_commands_offline_fails_with_a_hint(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchaudio.datasets.speechcommands.download_url_to_file", offline)
    with pytest.raises(SystemExit) as exit:
        data.speech_commands(str(tmp_path / "data"))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not download") and "--audio-folder" in err and "\n" not in err


def test_audio_folder_resamples_mixes_pads_and_skips(tmp_path, capsys):
    words_dir = tmp_path / "words"
    for i in range(8):
        write_constant(words_dir / "hello" / f"clip_{i}.wav", 1000 + i)
    t = torch.arange(8000) / 8000
    write_pcm(
        words_dir / "hello" / "clip_8_8khz.wav", (16000 * torch.sin(2 * math.pi * 440 * t)).round()[None], rate=8000
    )
    write_pcm(
        words_dir / "hello" / "clip_9_stereo.wav", torch.stack([torch.full((16000,), 3000), torch.full((16000,), 1000)])
    )
    write_constant(words_dir / "world" / "a_short.wav", 500, length=4000)
    write_pcm(words_dir / "world" / "b_loud.wav", torch.full((1, 20000), -20000))
    (words_dir / "world" / "c_corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    write_float_wav(words_dir / "world" / "d_float.wav")
    (words_dir / "world" / "notes.txt").write_text("not a wav")
    write_constant(words_dir / "_background_noise_" / "noise.wav", 7)  # not a word
    train_set, test_set, words, skipped = data.audio_folder(str(words_dir))
    assert words == ["hello", "world"] and skipped == 1
    assert "warning: skipped 1 unreadable file, e.g." in capsys.readouterr().err
    assert len(train_set) == 9 + 3 and len(test_set) == 1  # the 10th file of "hello" is held out
    held_out, label = test_set[0]
    assert label == 0 and torch.allclose(held_out, torch.full((16000,), 2000 / 32768))  # stereo, mixed
    clips = {(round(x[0].item() * 32768), words[y]): x for x, y in (train_set[i] for i in range(len(train_set)))}
    tone = next(x for (v, w), x in clips.items() if w == "hello" and v not in range(1000, 1008))
    assert tone.abs().max() > 0.4 and (torch.fft.rfft(tone).abs().argmax().item()) == 440  # 1 Hz bins
    short = clips[(500, "world")]
    assert short[:4000].eq(500 / 32768).all() and short[4000:].eq(0).all()
    assert clips[(-20000, "world")].eq(-20000 / 32768).all()  # trimmed to 1 s, not normalised
    assert clips[(8192, "world")][:1600].eq(0.25).all()  # the 32-bit float file
    train_set, test_set, words, _ = data.audio_folder(str(words_dir), ["world"])
    assert words == ["world"] and len(train_set) == 3 and test_set is None


def corrupt_copy(source, path, rate=None, cut=0):
    """A copy of a 16-bit WAV file written by write_pcm (a 44-byte header), with the sample rate in its header set to
    `rate`, or its last `cut` bytes missing (its data chunk cut short)."""
    content = bytearray(source.read_bytes())
    if rate is not None:
        content[24:28] = struct.pack("<I", rate)
    path.write_bytes(bytes(content[: len(content) - cut]))


def write_float32(path, values, rate=16000):
    """A mono 32-bit IEEE float WAV of these values."""
    payload = np.asarray(values, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_audio_folder_skips_wavs_with_corrupt_rates_truncated_data_or_nan(tmp_path, capsys):
    """Such files are unreadable, skipped and counted: a rate of 0 aborted the load with a traceback, 0xFFFFFFFF
    Hz tried to allocate terabytes, NaN samples became garbage clips, a file cut short a clip cut short."""
    words_dir = tmp_path / "words"
    for i in range(3):
        write_constant(words_dir / "hello" / f"good_{i}.wav", 1000 + i)
    good = words_dir / "hello" / "good_0.wav"
    corrupt_copy(good, words_dir / "hello" / "a_rate_0.wav", rate=0)
    corrupt_copy(good, words_dir / "hello" / "b_rate_max.wav", rate=0xFFFFFFFF)
    corrupt_copy(good, words_dir / "hello" / "c_cut_short.wav", cut=1000)
    write_float32(words_dir / "hello" / "d_nan.wav", [0.5] * 800 + [math.nan] + [0.5] * 799)
    write_float32(words_dir / "hello" / "e_inf.wav", [-math.inf] + [0.5] * 1599)
    train_set, test_set, words, skipped = data.audio_folder(str(words_dir))
    err = capsys.readouterr().err
    assert words == ["hello"] and skipped == 5 and test_set is None
    assert "warning: skipped 5 unreadable files, e.g." in err and "a sample rate of 0 Hz" in err
    assert sorted(round(x[0].item() * 32768) for x, _ in (train_set[i] for i in range(3))) == [1000, 1001, 1002]
    assert len(train_set) == 3 and train_set.clips.abs().max() == 1002


def test_audio_folder_drops_a_word_without_readable_wavs(tmp_path, capsys):
    words_dir = tmp_path / "words"
    write_constant(words_dir / "hello" / "good.wav", 1000)
    (words_dir / "hush").mkdir(parents=True)  # sorts between the other two: world's label moves down
    for i in range(9):
        (words_dir / "hush" / f"{i}.wav").write_bytes(b"not a wav")
    write_constant(words_dir / "hush" / "9.wav", 7)  # readable, but the 10th file is a test file
    (words_dir / "hush" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    for i in range(10):
        write_constant(words_dir / "world" / f"{i}.wav", 2000 + i)
    train_set, test_set, words, skipped = data.audio_folder(str(words_dir))
    assert words == ["hello", "world"] and skipped == 10
    assert sorted(train_set.labels.tolist()) == [0] + [1] * 9 and test_set.labels.tolist() == [1]
    assert round(test_set[0][0][0].item() * 32768) == 2009  # world's test file; hush's is not read
    assert f"warning: dropped 1 word without a readable WAV file to train on: hush (in {words_dir})" in (
        capsys.readouterr().err)
    (words_dir / "hello" / "good.wav").write_bytes(b"")
    with pytest.raises(SystemExit) as e:  # nothing left to train on
        data.audio_folder(str(words_dir), ["hello", "hush"])
    assert e.value.code == 2 and "no readable WAV files" in capsys.readouterr().err


def test_mnist_files_are_read_as_they_are(tmp_path, monkeypatch, capsys):
    images, labels = write_mnist(tmp_path, per_class_train=3, per_class_test=2)
    train_set, test_set, names = data.mnist_data(str(tmp_path), "mnist")
    assert names == [str(d) for d in range(10)] and len(train_set) == 30 and len(test_set) == 20
    assert torch.equal(train_set.images[:, 0], torch.from_numpy(images))
    assert train_set.labels.tolist() == labels.tolist()
    x, label = train_set[4]
    assert label == labels[4] and x.shape == (1, 28, 28)
    assert all(torch.equal(train_set[4][0], x) for _ in range(20))  # digits are never flipped
    assert torch.equal(x, torch.from_numpy(images[4]).float()[None] / 127.5 - 1)
    write_mnist(tmp_path, per_class_train=3, per_class_test=2, name="FashionMNIST")
    train_set, _, names = data.mnist_data(str(tmp_path), "fashion-mnist")
    assert names[0] == "t-shirt" and train_set.flip

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as exit_info:
        data.mnist_data(str(tmp_path / "empty"), "mnist")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "train-images-idx3-ubyte" in err


def test_word_names_with_commas_or_spaces_are_read_back_as_they_are(tmp_path):
    """The classes travel as a list (train_audio.py -> checkpoint -> evaluate.py), never joined into one string."""
    words = [" padded ", "yes,no"]
    for w in words:
        for i in range(3):
            write_pcm(tmp_path / "words" / w / f"{i}.wav", torch.full((1, 800), 1000 * (i + 1)))
    source = dict(name="audio-folder", root=str(tmp_path / "words"), words=words)
    train_set, _, found = data.load_dataset(source, media.audio_layout(length=1600))
    assert found == words and len(train_set) == 6
