"""Shared helpers of the tests: tiny models, files written in the real on-disk formats, subprocess runs."""

import csv
import os
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from adr import ADR, SIZES, ADRConfig, bits_per_dim
from media import quantisation_bins

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test's subprocesses use one thread too: threads
    that wait on each other on two busy cores made the suite many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(token_dim=6, seq_len=10, num_classes=3, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=num_classes, **{**SIZES["tiny"], **overrides})
    return ADR(cfg).to(dtype)


def randomise_head(model, std=0.05):
    """The head's modulation and output start at zero; give them random weights so samples depend on z."""
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, std)
    return model


def write_image(path, seed, size=(40, 36)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_dir(tmp_path):
    """DIR/train/{cat,ship}/ with 6 PNG/JPEG images each plus one corrupt file, DIR/test/{cat,ship}/ with 2 each."""
    root = tmp_path / "images"
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(("cat", "ship")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                write_image(folder / f"{i}.{'png' if i % 2 else 'jpg'}", seed=100 * c + i)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def run_script(args, timeout=120, env=None):
    return subprocess.run(
        [sys.executable, *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def write_pcm(path, samples, rate=16000, width=2):
    """samples: int tensor (channels, N) of raw PCM values."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(width)
        f.setframerate(rate)
        dtype = {1: torch.uint8, 2: torch.int16}[width]
        f.writeframes(samples.T.contiguous().to(dtype).numpy().tobytes())


def write_constant(path, value, length=16000, rate=16000):
    """A mono clip whose every sample is `value` (an int16): the value tells which file a clip came from."""
    write_pcm(path, torch.full((1, length), value))


def write_float_wav(path, n=1600):
    """A 32-bit IEEE float WAV (format tag 3): valid audio, but not PCM."""
    data = struct.pack(f"<{n}f", *([0.25] * n))
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def layout_bpd(model, tokens, labels, layout):
    """adr.bits_per_dim with the quantisation bins of a media layout."""
    return bits_per_dim(model, tokens, labels, *quantisation_bins(tokens, layout))


def write_mnist(root, per_class_train=20, per_class_test=10, name="MNIST", seed=0):
    """MNIST's real on-disk format (big-endian idx files in root/<name>/raw/, unpacked), with made-up 28x28
    "digits": class k is a bright 6x6 square at its own place (a 4 x 3 grid of places), over faint noise, so a
    small classifier learns them in a few steps. Returns the training images (N, 28, 28) and labels."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    result = None
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            top, left = 1 + 9 * (k // 4), 1 + 7 * (k % 4)
            images[i, top : top + 6, left : left + 6] = rng.integers(200, 256)
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(np.array([2051, len(labels), 28, 28], ">i4").tobytes() + images.tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(np.array([2049, len(labels)], ">i4").tobytes() + labels.tobytes())
        result = result or (images, labels)
    return result
