"""
The datasets, read once into memory: CIFAR-10, MNIST and Fashion-MNIST (downloaded by torchvision) and
folders of images; Speech Commands (downloaded by torchaudio) and folders of WAV files. Items are (x, label)
with x an image (C, H, W) or a waveform (N,) in [-1, 1].

A dataset is named by a small dict, its *source* (e.g. {"name": "mnist", "root": "/data"}), which the
training scripts store in the checkpoint: `load_dataset(source, layout)` reads it again, so evaluate.py
finds the data a checkpoint was trained on by itself.
"""

import hashlib

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from media import IMAGE_EXTENSIONS, read_clip, read_pixels
from cli import fail, log, warn

# ----------------------------------------------------------------------------------------------
# Images


class ImageDataset(Dataset):
    """uint8 images (N, C, H, W) in memory; items are (image in [-1, 1], label), flipped left-right at
    random when flip."""

    def __init__(self, images, labels, flip):
        self.images, self.labels, self.flip = images, torch.as_tensor(labels, dtype=torch.long), flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float() / 127.5 - 1
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


def read_image_folder(folder, class_names, layout):
    """Every image under folder/<class>/ -> (uint8 images, labels, [why each unreadable file was skipped])."""
    files = []  # (path, label)
    for label, name in enumerate(class_names):
        class_dir = os.path.join(folder, name)
        if os.path.isdir(class_dir):
            names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
            files += [(os.path.join(class_dir, f), label) for f in names]

    def read(path):
        try:
            return read_pixels(path, layout["height"], layout["width"], layout["channels"])
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(8) as pool:  # threads overlap the file reads; decoding releases the GIL
        pixels = list(pool.map(read, [path for path, _ in files]))
    images = [p for p in pixels if isinstance(p, torch.Tensor)]
    labels = [label for p, (_, label) in zip(pixels, files) if isinstance(p, torch.Tensor)]
    return images, labels, [p for p in pixels if isinstance(p, str)]


def sub_folders(folder):
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def drop_empty_classes(labels, names):
    """A class with nothing to train on would be one the model is asked for but never saw: (labels (a long tensor)
    renumbered over the classes that have items, their names, the names of the classes dropped)."""
    counts = torch.bincount(labels, minlength=len(names))
    renumber = (counts > 0).long().cumsum(0) - 1
    return renumber[labels], [n for n, c in zip(names, counts) if c], [n for n, c in zip(names, counts) if not c]


def image_folder_data(root, layout):
    """(train set, test set or None, class names) from root/<class>/*, or root/train/<class>/* with an
    optional root/test/<class>/*. A class without readable training images is dropped, with a warning."""
    if not os.path.isdir(root):
        fail(f"--image-folder {root}: no such folder; it should hold one sub-folder of images per class")
    train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    test_dir = os.path.join(root, "test")  # DIR/test/ is the test split, never a class
    for split, folder in (("training", os.path.join(root, "train")), ("test", test_dir)):
        if os.path.isdir(folder) and not sub_folders(folder):  # most likely a class named train or test
            fail(f"--image-folder {root}: {folder} has no class sub-folders, but a folder named "
                 f"{os.path.basename(folder)} is the {split} split ({os.path.join(folder, '<class>', '')}), never a "
                 f"class; rename it to use it as a class")
    class_names = [d for d in sub_folders(train_dir) if os.path.join(train_dir, d) != test_dir]
    if not class_names:
        fail(f"--image-folder {root}: no class sub-folders; put the images in {os.path.join(root, '<class>', '')} "
             f"(png or jpg)")
    log(f"reading images from {root} ...")
    images, labels, skipped = read_image_folder(train_dir, class_names, layout)
    if not images:
        example = f" ({skipped[0]})" if skipped else ""
        fail(f"--image-folder {root}: no readable images in {os.path.join(train_dir, '<class>', '')} (png or "
             f"jpg){example}")
    labels, class_names, dropped = drop_empty_classes(torch.tensor(labels), class_names)
    train_set, test_set = ImageDataset(torch.stack(images), labels, flip=True), None
    if os.path.isdir(test_dir):  # only the classes kept, so the labels match the training set's
        images, labels, unreadable = read_image_folder(test_dir, class_names, layout)
        skipped += unreadable
        test_set = ImageDataset(torch.stack(images), labels, flip=False) if images else None
    if skipped:
        warn(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''}, e.g. {skipped[0]}")
    if dropped:
        warn(f"dropped {len(dropped)} class{'es' if len(dropped) > 1 else ''} without readable images: "
             f"{', '.join(dropped)} (in {train_dir})")
    return train_set, test_set, class_names


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain values only, so files whose checksum was not verified cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batches(folder):
    """Read cifar-10-batches-py without torchvision's checksums: (train images, train labels, test
    images, test labels, class names), images uint8 (N, 3, 32, 32)."""

    def load(name):
        with open(os.path.join(folder, name), "rb") as f:
            return NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()

    def split(names):
        batches = [load(name) for name in names]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        return torch.from_numpy(images), [int(label) for b in batches for label in b["labels"]]

    try:
        class_names = [str(name) for name in load("batches.meta")["label_names"]]
        train_x, train_y = split([f"data_batch_{i}" for i in range(1, 6)])
        test_x, test_y = split(["test_batch"])
    except Exception as e:
        raise ValueError(f"cannot read the CIFAR-10 batches in {folder} ({e}); delete that folder to download "
                         f"CIFAR-10 again") from None
    return train_x, train_y, test_x, test_y, class_names


def cifar10_data(root):
    """(train set, test set, class names) of CIFAR-10 in root, downloaded by torchvision if it is not there.
    Files that are there but fail torchvision's checksums are read anyway, with a warning."""
    import torchvision

    folder = os.path.join(root, "cifar-10-batches-py")
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=not os.path.isdir(folder))
        test = torchvision.datasets.CIFAR10(root, train=False)
        as_chw = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        data = (as_chw(train.data), train.targets, as_chw(test.data), test.targets, train.classes)
    except Exception as e:
        if not os.path.isdir(folder):
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            fail(f"could not download CIFAR-10 into {root} ({reason}). Without internet, put cifar-10-python.tar.gz "
                 f"(from https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted cifar-10-batches-py/ folder "
                 f"in {root} (see --data), or train on your own images with --image-folder DIR")
        warn(f"the CIFAR-10 files in {folder} do not match torchvision's checksums; reading them anyway")
        try:
            data = read_cifar_batches(folder)
        except ValueError as e:
            fail(str(e))
    train_x, train_y, test_x, test_y, class_names = data
    return ImageDataset(train_x, train_y, flip=True), ImageDataset(test_x, test_y, flip=False), class_names


MNIST_LIKE = {  # name: (torchvision class name, class names, home page)
    "mnist": ("MNIST", [str(d) for d in range(10)], "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": ("FashionMNIST", ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                                       "bag", "ankle-boot"], "https://github.com/zalandoresearch/fashion-mnist"),
}


def mnist_data(root, name):
    """(train set, test set, class names) of MNIST or Fashion-MNIST (28x28 grayscale) in root, downloaded by
    torchvision if it is not there. Digits are never flipped; clothes are, like CIFAR-10's images."""
    import torchvision

    class_name, class_names, home = MNIST_LIKE[name]
    dataset = getattr(torchvision.datasets, class_name)
    try:
        train, test = dataset(root, train=True, download=True), dataset(root, train=False, download=True)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raw = os.path.join(root, class_name, "raw", "")
        fail(f"could not download {class_name} into {root} ({reason}). Without internet, put its four files "
             f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
             f"(.gz as downloaded from {home}, or unpacked) in {raw} (see --data)")
    flip = name == "fashion-mnist"
    return (ImageDataset(train.data[:, None].contiguous(), train.targets, flip=flip),
            ImageDataset(test.data[:, None].contiguous(), test.targets, flip=False), class_names)


# ----------------------------------------------------------------------------------------------
# Audio: every clip decoded once, held in memory as int16 (SC09 training: about 31k clips, 1 GB as float32)

SAMPLE_RATE = 16000
CLIP_LENGTH = 16000  # 1 s, the default (train_audio.py --seconds)
SC09 = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Clips(Dataset):
    """int16 clips (N, samples) and their labels; items are (waveform in [-1, 1), label)."""

    def __init__(self, clips, labels):
        self.clips, self.labels = clips, torch.tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.clips[i].float() / 32768, int(self.labels[i])


def load_clips(paths_and_labels, length=CLIP_LENGTH):
    """Decode (path, label) pairs into Clips of `length` samples; returns (Clips, [reason for each file skipped as
    unreadable], [each path that is not there])."""
    clips, labels, skipped, missing = [], [], [], []
    for path, label in paths_and_labels:
        if not os.path.exists(path):
            missing.append(path)
            continue
        try:
            clip = read_clip(path, SAMPLE_RATE, length)
        except (ValueError, OSError) as e:
            skipped.append(str(e))
            continue
        # numpy: a torch op per clip is slow on a busy CPU
        clips.append(np.clip(np.round(clip.numpy() * 32768), -32768, 32767).astype(np.int16))
        labels.append(label)
    stacked = torch.from_numpy(np.stack(clips)) if clips else torch.zeros(0, length, dtype=torch.int16)
    return Clips(stacked, labels), skipped, missing


def pick_words(requested, available, default, where):
    """The class names: the list of words asked for (each one checked), else the default. A list, never a joined
    string: a folder's name may hold a comma or spaces."""
    if requested is None:
        return default
    words = list(requested)
    missing = [w for w in words if w not in available]
    if not words or missing:
        fail(f"--words: no {', '.join(missing) or 'words given'} in {where}; "
             f"available: {', '.join(sorted(available))}")
    if len(set(words)) != len(words):
        fail("--words: a word is given twice")
    return words


def speech_commands_folder(root):
    """Where Speech Commands is under root: v0.02, or v0.01 where only that is there (v0.02's place if neither is)."""
    base = os.path.join(root, "SpeechCommands")
    found = [v for v in ("speech_commands_v0.02", "speech_commands_v0.01") if os.path.isdir(os.path.join(base, v))]
    return os.path.join(base, found[0] if found else "speech_commands_v0.02")


def word_files(folder):
    """A word folder's WAV files in name order, and whether each is held out for testing (every 10th)."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".wav")) if os.path.isdir(folder) else []
    return [(os.path.join(folder, name), i % 10 == 9) for i, name in enumerate(names)]


def speech_commands(root, requested_words=None, length=CLIP_LENGTH):
    """Speech Commands under root/SpeechCommands/: v0.02, or v0.01 where only that is there (downloaded, v0.02, if
    neither is). Returns (training Clips, testing Clips or None, words)."""
    from torchaudio.datasets import SPEECHCOMMANDS

    folder = speech_commands_folder(root)
    version = os.path.basename(folder)
    if not os.path.isdir(folder):
        log(f"downloading Speech Commands v0.02 (2.3 GB) to {root} ...")
        try:
            os.makedirs(root, exist_ok=True)
            SPEECHCOMMANDS(root, download=True)
        except Exception as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            fail(f"could not download Speech Commands ({reason}). Without internet, extract "
                 f"speech_commands_v0.02.tar.gz (or v0.01, from http://download.tensorflow.org/data/) into {folder} "
                 f"(see --data), or train on your own WAVs with --audio-folder DIR")
    for name in ("validation_list.txt", "testing_list.txt"):
        if not os.path.isfile(os.path.join(folder, name)):
            fail(f"{folder} has no {name}: it is not a complete Speech Commands folder; extract the archive again")
    available = {d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("_")}
    default = SC09 if set(SC09) <= available else None
    if default is None and requested_words is None:
        fail(f"{folder} lacks the digits zero .. nine; choose classes with --words")
    words = pick_words(requested_words, available, default, folder)
    log(f"data: Speech Commands {version[-5:]} in {folder}")
    sets = []
    for subset in ("training", "testing"):
        dataset = SPEECHCOMMANDS(root, url=version, subset=subset)
        items = []
        for n in range(len(dataset)):
            relative_path, _, label, _, _ = dataset.get_metadata(n)
            if label in words:
                items.append((os.path.join(os.path.dirname(folder), relative_path), words.index(label)))
        clips, skipped, missing = load_clips(items, length)
        log(f"data: Speech Commands {subset}: {len(clips)} clips of {len(words)} words")
        if skipped:
            warn(f"skipped {len(skipped)} unreadable Speech Commands files, e.g. {skipped[0]}")
        if missing:
            warn(f"{len(missing)} files named in the {subset} list are missing, e.g. {missing[0]}")
        sets.append(clips)
    if len(sets[0]) == 0:
        fail(f"no training clips of {', '.join(words)} in {folder}")
    return sets[0], sets[1] if len(sets[1]) else None, words


def audio_folder(folder, requested_words=None, length=CLIP_LENGTH):
    """WAVs in folder/<word>/*.wav: every 10th file of each word (in name order) is held out for testing.
    Sub-folders whose names start with _ or . are not words (Speech Commands' _background_noise_).
    A word without a readable WAV file to train on is dropped, with a warning.
    Returns (training Clips, testing Clips or None, words, number of unreadable files skipped)."""
    if not os.path.isdir(folder):
        fail(f"--audio-folder {folder} is not a folder; give a folder with one sub-folder of WAV files per word")
    available = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d[0] not in "_.")
    if not available:
        fail(f"--audio-folder {folder} has no sub-folders; put the WAV files of each word in {folder}/<word>/")
    words = pick_words(requested_words, available, available, folder)
    files = {w: word_files(os.path.join(folder, w)) for w in words}

    def items(words, test):  # (path, label) of each word's files; every 10th file of a word is a test file
        return [(path, label) for label, w in enumerate(words) for path, held_out in files[w] if held_out == test]

    train_set, skipped, _ = load_clips(items(words, test=False), length)
    if len(train_set) == 0:
        example = f" ({skipped[0]})" if skipped else ""
        fail(f"--audio-folder {folder}: no readable WAV files in the sub-folders of {', '.join(words)}{example}")
    train_set.labels, words, dropped = drop_empty_classes(train_set.labels, words)
    test_set, skipped_test, _ = load_clips(items(words, test=True), length)  # of the words kept
    skipped += skipped_test
    log(f"data: {folder}: {len(train_set)} training and {len(test_set)} test clips of {len(words)} words")
    if skipped:
        warn(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''}, e.g. {skipped[0]}")
    if dropped:
        warn(f"dropped {len(dropped)} word{'s' if len(dropped) > 1 else ''} without a readable WAV file to train on: "
             f"{', '.join(dropped)} (in {folder})")
    return train_set, test_set if len(test_set) else None, words, len(skipped)


def held_out_clip_per_word(source, words, rate=SAMPLE_RATE, length=CLIP_LENGTH):
    """The first readable held-out clip of each word (the one the training scripts' sample files show), None for a
    word without one; [] where the source's folder is not on this machine. Reads a file a word: never downloads,
    never fails (sample.py shows real clips beside its samples where it can)."""
    root = source.get("root") or ""
    if source.get("name") == "audio-folder" and os.path.isdir(root):
        def held_out(word):  # as audio_folder holds out
            return [path for path, held_out in word_files(os.path.join(root, word)) if held_out]
    elif source.get("name") == "speech-commands":
        folder = speech_commands_folder(root)
        if not os.path.isfile(os.path.join(folder, "testing_list.txt")):
            return []
        with open(os.path.join(folder, "testing_list.txt")) as f:
            listed = [line.strip() for line in f if line.strip()]

        def held_out(word):  # the official testing list, in its order
            return [os.path.join(folder, p) for p in listed if p.split("/")[0] == word]
    else:
        return []
    clips = []
    for word in words:
        clip = None
        for path in held_out(word):
            try:
                clip = read_clip(path, rate, length)
                break
            except (ValueError, OSError):
                continue
        clips.append(clip)
    return clips


# ----------------------------------------------------------------------------------------------
# Sources: what the checkpoint records of its data


IMAGE_DATASETS = ["cifar10", "mnist", "fashion-mnist"]


def default_image_layout(name, patch=4):
    """The token layout of a dataset's native images (28x28 grayscale, or 32x32 RGB) cut into patch x patch tokens."""
    from media import image_layout

    size = 28 if name in MNIST_LIKE else 32
    return image_layout(channels=1 if name in MNIST_LIKE else 3, height=size, width=size, patch=patch)


def load_dataset(source, layout):
    """(train set, test set or None, class names) of a source dict: name (cifar10, mnist, fashion-mnist,
    image-folder, speech-commands, audio-folder), root (a folder), and words for audio."""
    name, root = source["name"], source["root"]
    if name == "cifar10":
        return cifar10_data(root)
    if name in MNIST_LIKE:
        return mnist_data(root, name)
    if name == "image-folder":
        return image_folder_data(root, layout)
    if name == "speech-commands":
        return speech_commands(root, source.get("words"), layout["length"])
    if name == "audio-folder":
        return audio_folder(root, source.get("words"), layout["length"])[:3]
    raise ValueError(f"unknown dataset {name!r}")


def fingerprint(dataset):
    """A short hash of a dataset's contents and labels: tells whether a cached classifier saw this data."""
    digest = hashlib.sha256()
    values = dataset.images if isinstance(dataset, ImageDataset) else dataset.clips
    digest.update(values.contiguous().numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    return digest.hexdigest()[:16]
