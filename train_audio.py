"""
Train ADR on spoken words: Google Speech Commands v0.02 (by default the ten digits zero .. nine, the
SC09 subset), or any folder of WAV files in word sub-folders (--audio-folder DIR/<word>/*.wav).

    python train_audio.py --size tiny --steps 2000                  # SC09 on a CPU, downloaded to ./data
    python train_audio.py --audio-folder my_words --words yes,no    # your own recordings
    torchrun --nproc_per_node=4 train_audio.py                      # one process per GPU

Each example is 1 s of 16 kHz audio. Tokens are 160-sample (10 ms) chunks of the waveform, so a clip is
100 tokens of 160 values. 10 ms is the usual frame of speech analysis (shorter than a phoneme, one to three
pitch periods), and 100 tokens is close to the 64 of a 32x32 image, so the same model sizes fit both:
5 ms chunks would double the sequence and the sampling time, 20 ms chunks would ask the small MLP head
for 320 values at once. Every sample goes through continuous mu-law companding (mu = 255, adr.mu_law),
which is exactly invertible and gives quiet samples more of the [-1, 1] range, so quiet and loud clips
both train well without normalising them (and bits/dim still refer to the real 16-bit samples).
Generated tokens go back through the inverse mu-law straight to a waveform: no vocoder.

Speech Commands is found (and downloaded if missing) with torchaudio.datasets.SPEECHCOMMANDS, which also
gives its official split: "training" trains, "testing" is the held-out set; the "validation" clips are
not used. Recent torchaudio decodes audio through FFmpeg, so the 16-bit PCM files are read here with the
standard library's `wave` module instead. A folder of WAVs is resampled to 16 kHz, mixed to mono, padded
or trimmed to 1 s; every 10th file of each word is held out for the test loss and bits/dim.

Writes to --out (default out/audio): ckpt.pt, log.csv, loss.png, and at every --sample-every steps one
WAV per word (samples/step_NNNNNN/<word>.wav) and spectrograms_NNNNNN.png, generated next to real clips.
"""

import math
import os
import wave

import numpy as np
import torch
import torchaudio
from torch.utils.data import Dataset

from adr import audio_layout, from_tokens
from train_image import Task, check_out, common_parser, fail, log, rank_zero_first, setup, train, warn

SAMPLE_RATE = 16000
CLIP_LENGTH = 16000  # 1 s
SC09 = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# ----------------------------------------------------------------------------------------------
# WAV files and spectrograms


def read_wav(path):
    """A 16-bit PCM WAV -> (float32 tensor (channels, N) in [-1, 1), sample rate). Anything else raises
    ValueError."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples, only 16-bit PCM is supported")
    frames = len(data) // (2 * channels)  # a truncated file may end mid-frame
    samples = np.frombuffer(data[: frames * 2 * channels], dtype="<i2").reshape(frames, channels)
    return torch.from_numpy(samples.T.astype(np.float32) / 32768), rate


def write_wav(path, waveform, sample_rate):
    """A waveform (N,) in [-1, 1] -> mono 16-bit PCM WAV."""
    samples = (waveform.detach().float().cpu() * 32768).round().clamp(-32768, 32767).to(torch.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.numpy().astype("<i2").tobytes())


def prepare_clip(waveform, sample_rate, target_rate, length):
    """(channels, N) at sample_rate -> (length,) mono at target_rate, zero-padded or trimmed at the end."""
    mono = waveform.mean(dim=0)
    if sample_rate != target_rate:
        mono = torchaudio.functional.resample(mono, sample_rate, target_rate)
    if mono.shape[0] < length:
        return torch.nn.functional.pad(mono, (0, length - mono.shape[0]))
    return mono[:length]


def save_spectrograms(waves, sample_rate, path, titles, columns=4):
    """A grid of log-magnitude spectrograms (torch.stft, 32 ms Hann window, 8 ms hop), all on one
    decibel scale so that levels can be compared across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_fft, hop = 512 * sample_rate // 16000, 128 * sample_rate // 16000
    decibels = []
    for w in waves:
        spec = torch.stft(w.float().cpu(), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
        decibels.append(20 * torch.log10(spec.abs() + 1e-5))
    top = max(d.max().item() for d in decibels)
    columns = min(columns, len(waves))
    rows = math.ceil(len(waves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, d, title in zip(axes.flat, decibels, titles):
        seconds = (d.shape[1] - 1) * hop / sample_rate
        ax.imshow(d.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top, extent=(0, seconds, 0, sample_rate / 2000))
        ax.set_title(title, fontsize=8)
    axes[0, 0].axis("on")
    axes[0, 0].set_xlabel("s", fontsize=7)
    axes[0, 0].set_ylabel("kHz", fontsize=7)
    axes[0, 0].tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Data: every clip decoded once, held in memory as int16 (SC09 training: about 31k clips, 1 GB as float32)


class Clips(Dataset):
    """int16 clips (N, CLIP_LENGTH) and their labels; items are (waveform in [-1, 1), label)."""

    def __init__(self, clips, labels):
        self.clips, self.labels = clips, torch.tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.clips[i].float() / 32768, int(self.labels[i])


def load_clips(paths_and_labels):
    """Decode (path, label) pairs into Clips; returns (Clips, [reason for each file skipped as unreadable])."""
    clips, labels, skipped = [], [], []
    for path, label in paths_and_labels:
        try:
            waveform, rate = read_wav(path)
        except (ValueError, OSError) as e:
            skipped.append(str(e))
            continue
        if waveform.shape[1] == 0:
            skipped.append(f"{path}: no samples")
            continue
        clip = prepare_clip(waveform, rate, SAMPLE_RATE, CLIP_LENGTH)
        clips.append(np.clip(np.round(clip.numpy() * 32768), -32768, 32767).astype(np.int16))  # numpy: a torch op per clip is slow on a busy CPU
        labels.append(label)
    return Clips(torch.from_numpy(np.stack(clips)) if clips else torch.zeros(0, CLIP_LENGTH, dtype=torch.int16), labels), skipped


def pick_words(requested, available, default, where):
    """The class names: the comma-separated --words (each one checked), else the default."""
    if requested is None:
        return default
    words = [w.strip() for w in requested.split(",") if w.strip()]
    missing = [w for w in words if w not in available]
    if not words or missing:
        fail(f"--words: no {', '.join(missing) or 'words given'} in {where}; available: {', '.join(sorted(available))}")
    if len(set(words)) != len(words):
        fail("--words: a word is given twice")
    return words


def speech_commands(root, requested_words=None):
    """Speech Commands v0.02 under root/SpeechCommands/ (downloaded if missing). Returns (training Clips,
    testing Clips or None, words)."""
    from torchaudio.datasets import SPEECHCOMMANDS

    folder = os.path.join(root, "SpeechCommands", "speech_commands_v0.02")
    if not os.path.isdir(folder):
        log(f"downloading Speech Commands v0.02 (2.3 GB) to {root} ...")
        try:
            os.makedirs(root, exist_ok=True)
            SPEECHCOMMANDS(root, download=True)
        except Exception as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            fail(f"could not download Speech Commands ({reason}). Without internet, extract speech_commands_v0.02.tar.gz "
                 f"(from http://download.tensorflow.org/data/) into {folder} (see --data), or train on your own WAVs with --audio-folder DIR")
    for name in ("validation_list.txt", "testing_list.txt"):
        if not os.path.isfile(os.path.join(folder, name)):
            fail(f"{folder} has no {name}: it is not a complete Speech Commands v0.02 folder; extract the archive again")
    available = {d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("_")}
    default = SC09 if set(SC09) <= available else None
    if default is None and requested_words is None:
        fail(f"{folder} lacks the digits zero .. nine; choose classes with --words")
    words = pick_words(requested_words, available, default, folder)
    sets = []
    for subset in ("training", "testing"):
        dataset = SPEECHCOMMANDS(root, subset=subset)
        items = []
        for n in range(len(dataset)):
            relative_path, _, label, _, _ = dataset.get_metadata(n)
            if label in words:
                items.append((os.path.join(root, "SpeechCommands", relative_path), words.index(label)))
        clips, skipped = load_clips(items)
        log(f"data: Speech Commands {subset}: {len(clips)} clips of {len(words)} words")
        if skipped:
            warn(f"skipped {len(skipped)} unreadable Speech Commands files, e.g. {skipped[0]}")
        sets.append(clips)
    if len(sets[0]) == 0:
        fail(f"no training clips of {', '.join(words)} in {folder}")
    return sets[0], sets[1] if len(sets[1]) else None, words


def audio_folder(folder, requested_words=None):
    """WAVs in folder/<word>/*.wav: every 10th file of each word (in name order) is held out for testing.
    Returns (training Clips, testing Clips or None, words, number of unreadable or non-PCM files skipped)."""
    if not os.path.isdir(folder):
        fail(f"--audio-folder {folder} is not a folder; give a folder with one sub-folder of WAV files per word")
    available = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not available:
        fail(f"--audio-folder {folder} has no sub-folders; put the WAV files of each word in {folder}/<word>/")
    words = pick_words(requested_words, available, available, folder)
    train_items, test_items = [], []
    for label, word in enumerate(words):
        names = sorted(n for n in os.listdir(os.path.join(folder, word)) if n.lower().endswith(".wav"))
        for i, name in enumerate(names):
            (test_items if i % 10 == 9 else train_items).append((os.path.join(folder, word, name), label))
    train_set, skipped_train = load_clips(train_items)
    test_set, skipped_test = load_clips(test_items)
    skipped = skipped_train + skipped_test
    if len(train_set) == 0:
        example = f" ({skipped[0]})" if skipped else ""
        fail(f"--audio-folder {folder}: no readable 16-bit PCM WAV files in the sub-folders of {', '.join(words)}{example}")
    log(f"data: {folder}: {len(train_set)} training and {len(test_set)} test clips of {len(words)} words")
    if skipped:
        warn(f"skipped {len(skipped)} unreadable or non-PCM file{'s' if len(skipped) > 1 else ''}, e.g. {skipped[0]}")
    return train_set, test_set if len(test_set) else None, words, len(skipped)


# ----------------------------------------------------------------------------------------------
# Samples


def rms(waveform):
    """Root-mean-square level of a waveform in [-1, 1] (1 = full scale)."""
    return waveform.pow(2).mean().sqrt().item()


def first_clip_per_class(dataset, num_classes):
    """One real waveform per class (the first one in the set), or None for a class it lacks."""
    found = []
    for c in range(num_classes):
        index = (dataset.labels == c).nonzero()
        found.append(dataset[index[0].item()][0] if len(index) else None)
    return found


def sample_writer(args, layout, words, real_set):
    """save_samples for a Task: one generated clip per word as a WAV, and a spectrogram figure with each
    generated clip next to a real clip of the same word (unconditional: numbered samples, same count)."""
    conditional = not args.unconditional
    names = words if conditional else [f"sample_{i}" for i in range(len(words))]
    real = first_clip_per_class(real_set, len(words))

    def save_samples(model, out_dir, step):
        device = next(model.parameters()).device
        labels = torch.arange(len(words), device=device) if conditional else None
        tokens = model.sample(len(names), labels, steps=args.sample_steps, cfg_scale=args.cfg_scale if conditional else 1.0)
        waves = from_tokens(tokens.float(), layout).cpu()
        folder = os.path.join(out_dir, "samples", f"step_{step:06d}")
        os.makedirs(folder, exist_ok=True)
        for name, w in zip(names, waves):
            write_wav(os.path.join(folder, f"{name}.wav"), w, layout["sample_rate"])
        panels, titles = [], []
        for name, word, generated, clip in zip(names, words, waves, real):
            panels.append(generated), titles.append(f"{name}: generated")
            if clip is not None:
                panels.append(clip), titles.append(f"{word}: real")
        figure = os.path.join(out_dir, f"spectrograms_{step:06d}.png")
        save_spectrograms(panels, layout["sample_rate"], figure, titles, columns=6)
        generated_rms = ", ".join(f"{name} {rms(w):.3f}" for name, w in zip(names, waves))
        real_rms = sum(rms(c) for c in real if c is not None) / max(1, sum(c is not None for c in real))
        log(f"samples: {folder} (RMS {generated_rms}; real clips {real_rms:.3f}), {figure}")

    return save_samples


def main(argv=None):
    parser = common_parser("Train ADR on spoken words: Speech Commands (downloaded to --data) or a folder of WAVs.", default_out=os.path.join("out", "audio"))
    parser.add_argument("--audio-folder", metavar="DIR", help="train on DIR/<word>/*.wav instead of Speech Commands")
    parser.add_argument("--words", help="comma-separated classes (default: zero..nine for Speech Commands, every sub-folder for --audio-folder)")
    args = parser.parse_args(argv)
    setup(args)
    check_out(args)
    if args.audio_folder is not None:
        train_set, test_set, words, _ = rank_zero_first(args, lambda: audio_folder(args.audio_folder, args.words))
    else:
        train_set, test_set, words = rank_zero_first(args, lambda: speech_commands(args.data, args.words))
    layout = audio_layout(sample_rate=SAMPLE_RATE, length=CLIP_LENGTH, chunk=160, mu=255.0)
    save_samples = sample_writer(args, layout, words, test_set if test_set is not None else train_set)
    train(args, Task(train_set, test_set, layout, [] if args.unconditional else words, save_samples))


if __name__ == "__main__":
    main()
