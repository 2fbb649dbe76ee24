"""
Media <-> tokens, and the files people open: how images and audio become ADR's continuous tokens and
back (token layouts, patches, mu-law, quantisation bins), reading image files, writing PNG grids,
reading and writing WAV files, spectrogram figures.

torchvision, torchaudio and matplotlib are imported inside the functions that need them, so that
sampling an image model never imports torchaudio.
"""

import errno
import functools
import math
import os
import struct
import wave
from collections import namedtuple
from contextlib import contextmanager, suppress
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageOps

# ----------------------------------------------------------------------------------------------
# Token layouts: images as p x p patches in raster order; audio as log-mel frames (a Griffin-Lim vocoder
# makes them sound again) or as mu-law companded waveform chunks.


def image_layout(channels=3, height=32, width=32, patch=4):
    return dict(kind="image", channels=channels, height=height, width=width, patch=patch)


def audio_layout(sample_rate=16000, length=16000, chunk=160, mu=255.0):
    """Waveform tokens: `chunk` mu-law companded samples each."""
    return dict(kind="audio", tokens="wave", sample_rate=sample_rate, length=length, chunk=chunk, mu=mu)


def mel_layout(sample_rate=16000, length=16000, n_fft=1024, hop=256, bands=80, frames=1, low=-12.0, high=11.0):
    """Log-mel tokens: `frames` frames of `bands` log-mel power values each (FFT n_fft, hop samples apart),
    ln(power) mapped from [low, high] onto [-1, 1] (fixed bounds, so every clip is scaled alike). The bounds: 5% of
    the values of Speech Commands keywords lie below -13 (quiet is quiet), the loudest reach 10.8, a full-scale
    sine 11. One frame a token and 80 bands, by measurement (RESULTS.md, "Speech"): two frames a token double a CPU's
    training steps but their words are recognised 9 points less often; 64 bands were no better within the spread of
    one run (recognised a little more often, further from the data)."""
    return dict(kind="audio", tokens="mel", sample_rate=sample_rate, length=length, n_fft=n_fft, hop=hop, bands=bands,
                frames=frames, low=low, high=high)


def mel_frames(layout):
    """Frames of a clip's spectrogram (centred windows: one per hop, and one more)."""
    return layout["length"] // layout["hop"] + 1


def layout_shape(layout):
    """(seq_len, token_dim) of a layout."""
    if layout["kind"] == "image":
        p = layout["patch"]
        return layout["height"] * layout["width"] // p**2, p * p * layout["channels"]
    if layout["tokens"] == "mel":
        return math.ceil(mel_frames(layout) / layout["frames"]), layout["frames"] * layout["bands"]
    return layout["length"] // layout["chunk"], layout["chunk"]


def samples_per_token(layout):
    """How many waveform samples one audio token stands for."""
    return layout["hop"] * layout["frames"] if layout["tokens"] == "mel" else layout["chunk"]


def patchify(images, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches in raster order (left to right, top to bottom)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, channels, height, width):
    """Inverse of patchify."""
    B = tokens.shape[0]
    x = tokens.reshape(B, height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, height, width)


def mu_law(x, mu=255.0):
    """Continuous mu-law companding F(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), on [-1, 1]: quiet
    samples get more of the range, so quiet and loud clips are both learnt well. Invertible."""
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


def mu_law_inverse(y, mu=255.0):
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def mel_filters(layout, device):
    """torchaudio's MelSpectrogram (power) for a mel layout, built once per layout and device."""
    return cached_mel_filters(layout["sample_rate"], layout["n_fft"], layout["hop"], layout["bands"], str(device))


@functools.lru_cache(maxsize=8)
def cached_mel_filters(sample_rate, n_fft, hop, bands, device):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop, n_mels=bands,
                                                power=2.0).to(device)


def log_mel_tokens(waveforms, layout):
    """Waveforms (B, N) -> (B, L, frames * bands): ln of the mel power spectrogram, [low, high] -> [-1, 1],
    the last token padded with silence (-1) to whole tokens."""
    mel = mel_filters(layout, waveforms.device)(waveforms.float())  # (B, bands, T)
    low, high = layout["low"], layout["high"]
    x = ((mel.clamp(min=math.exp(low)).log() - low) / (high - low) * 2 - 1).clamp(-1, 1)
    L, D = layout_shape(layout)
    x = torch.nn.functional.pad(x, (0, L * layout["frames"] - x.shape[-1]), value=-1.0)
    return x.transpose(1, 2).reshape(len(x), L, D)


GRIFFIN_LIM_ITERS = 64  # the vocoder's iterations (sample.py and evaluate.py: --griffin-lim-iters)


def vocode(tokens, layout, iters=GRIFFIN_LIM_ITERS):
    """Log-mel tokens (B, L, D) -> waveforms (B, N): the mel power back to a linear spectrogram (least squares,
    torchaudio's InverseMelScale), then Griffin-Lim finds a phase for it, from zero phase (so: deterministic)."""
    import torchaudio

    low, high = layout["low"], layout["high"]
    x = tokens.float().reshape(len(tokens), -1, layout["bands"])[:, : mel_frames(layout)].transpose(1, 2)
    power = ((x + 1) / 2 * (high - low) + low).exp()  # (B, bands, T); from_tokens clamped x
    n_stft = layout["n_fft"] // 2 + 1
    linear = torchaudio.transforms.InverseMelScale(n_stft, layout["bands"], layout["sample_rate"]).to(x.device)(power)
    griffin_lim = torchaudio.transforms.GriffinLim(layout["n_fft"], n_iter=iters, hop_length=layout["hop"], power=2.0,
                                                   length=layout["length"], rand_init=False).to(x.device)
    return griffin_lim(linear)


def to_tokens(x, layout):
    """Images (B, C, H, W) in [-1, 1] or waveforms (B, N) in [-1, 1] -> tokens (B, L, D)."""
    if layout["kind"] == "image":
        return patchify(x, layout["patch"])
    if layout["tokens"] == "mel":
        return log_mel_tokens(x, layout)
    return mu_law(x, layout["mu"]).view(x.shape[0], -1, layout["chunk"])


def from_tokens(tokens, layout, griffin_lim_iters=GRIFFIN_LIM_ITERS):
    """Inverse of to_tokens (for mel tokens: the vocoder); generated values are clamped to [-1, 1]."""
    tokens = tokens.clamp(-1, 1)
    if layout["kind"] == "image":
        return unpatchify(tokens, layout["patch"], layout["channels"], layout["height"], layout["width"])
    if layout["tokens"] == "mel":
        return vocode(tokens, layout, griffin_lim_iters).clamp(-1, 1)
    return mu_law_inverse(tokens.reshape(tokens.shape[0], -1), layout["mu"])


def mel_levels(tokens, layout):
    """Mel tokens moved to the nearest of 256 levels on [-1, 1], what their bits are counted for; others unchanged."""
    if layout["kind"] == "audio" and layout["tokens"] == "mel":
        return ((tokens.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return tokens


def quantisation_bins(tokens, layout):
    """The bin [lo, hi] in token space of each value's quantisation level: 8-bit pixels scaled to [-1, 1]
    (width 2/255), mel values quantised alike to 256 levels (so their bound is in bits per 8-bit mel value), or
    16-bit samples x = k/32768 mapped through mu-law. The outermost bins reach to -inf and +inf, so the bins
    cover the line and their probabilities sum to one."""
    tokens = mel_levels(tokens.double(), layout)
    if layout["kind"] == "image" or layout["tokens"] == "mel":
        half = torch.full_like(tokens, 1 / 255)
        lo, hi = tokens - half, tokens + half
        return lo.masked_fill(tokens < -1 + 1e-6, -math.inf), hi.masked_fill(tokens > 1 - 1e-6, math.inf)
    k = torch.round(mu_law_inverse(tokens, layout["mu"]) * 32768).clamp(-32768, 32767)
    lo, hi = (mu_law((k + s) / 32768, layout["mu"]) for s in (-0.5, 0.5))
    return lo.masked_fill(k == -32768, -math.inf), hi.masked_fill(k == 32767, math.inf)


MASKS = ("top", "bottom", "left", "right", "center", "random")


def region_to_generate(layout, spec, seed=0):
    """(L,) bool, True for the tokens to generate, the rest being kept: "top", "bottom", "left" or "right" half,
    "center" (the middle half of an image's height and width, or of a clip), "random[:FRACTION]" (a random
    FRACTION of the tokens, 0.5 if not given), or an image file as large as the model's images (white:
    generate). For audio, top and left are the first half of the clip, bottom and right the second."""
    L = layout_shape(layout)[0]
    name, _, fraction = spec.partition(":")
    if name == "random":
        count = round(float(fraction or 0.5) * L)
        chosen = torch.randperm(L, generator=torch.Generator().manual_seed(seed))[:count]
        return torch.zeros(L, dtype=torch.bool).index_fill_(0, chosen, True)
    if name not in MASKS:  # a mask image: a token is generated where most of its pixels are white
        pixels = read_pixels(spec, layout["height"], layout["width"], channels=1).float()
        return patchify(pixels[None], layout["patch"])[0].mean(-1) > 127.5
    if layout["kind"] == "audio":
        row = col = (torch.arange(L) + 0.5) / L  # the clip is one long row and one long column
    else:
        rows, cols = layout["height"] // layout["patch"], layout["width"] // layout["patch"]
        row = ((torch.arange(L) // cols + 0.5) / rows)
        col = ((torch.arange(L) % cols + 0.5) / cols)
    middle = lambda u: (u > 0.25) & (u < 0.75)  # noqa: E731
    return dict(top=row < 0.5, bottom=row > 0.5, left=col < 0.5, right=col > 0.5,
                center=middle(row) & middle(col) if layout["kind"] == "image" else middle(row))[name]


def quantise(x, layout):
    """What the files hold: images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) as in a PNG; waveforms
    (N, L) in [-1, 1] -> int16 (N, L) as in a WAV."""
    x = x.detach().float().cpu().clamp(-1, 1)
    if layout["kind"] == "image":
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return (x * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy()


def dequantise(array, layout):
    """Inverse of quantise, as the datasets scale their files: uint8 (N, H, W, C) -> (N, C, H, W) in [-1, 1];
    int16 (N, L) -> (N, L) in [-1, 1)."""
    x = torch.from_numpy(np.asarray(array)).float()
    if layout["kind"] == "image":
        return x.permute(0, 3, 1, 2) / 127.5 - 1
    return x / 32768


def save_samples_npz(path, x, layout, labels, class_names, tokens=None):
    """Raw samples for external metrics (torch-fidelity, clean-fid, ...): `images` uint8 (N, H, W, C) or
    `waveforms` int16 (N, L), `labels` (N,) (-1 when unconditional) and `class_names`; for a mel-token model also
    `mel_tokens` float32 (N, L, D), what the model drew before the vocoder."""
    key = "images" if layout["kind"] == "image" else "waveforms"
    labels = np.full(len(x), -1) if labels is None else np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    names = np.array(list(class_names), dtype=str)
    mel = tokens is not None and layout.get("tokens") == "mel"
    extra = {"mel_tokens": tokens.float().cpu().numpy()} if mel else {}
    with atomic_output(path) as tmp:
        np.savez(tmp, **{key: quantise(x, layout)}, labels=labels.astype(np.int64), class_names=names, **extra)


# ----------------------------------------------------------------------------------------------
# Image files


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_pixels(path, height, width, channels=3):
    """One image file -> uint8 (channels, H, W), RGB or grayscale: centre-cropped to the aspect ratio,
    then resized."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit grayscale: scale to 8 bits (convert() would clip instead)
                eight_bit = (np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
                image = Image.fromarray(eight_bit)
            image = ImageOps.fit(image.convert("RGB" if channels == 3 else "L"), (width, height),
                                 method=Image.Resampling.BICUBIC)
    except Exception as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    return torch.from_numpy(np.asarray(image).copy()).view(height, width, channels).permute(2, 0, 1)


def load_image(path, height, width, channels=3) -> torch.Tensor:
    """One image file -> (channels, H, W) in [-1, 1], resized/centre-cropped as the image-folder loader does."""
    return read_pixels(path, height, width, channels).float() / 127.5 - 1


def save_image_grid(images, path, nrow, scale=4) -> None:
    """images (N, C, H, W) in [-1, 1] -> a PNG grid with nrow images per row, upscaled by `scale` (nearest
    neighbour)."""
    from torchvision.utils import make_grid

    grid = make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp)


# ----------------------------------------------------------------------------------------------
# WAV files, clips, spectrograms


WAV_FORMATS = "PCM WAV files of 8, 16, 24 or 32-bit integers or 32/64-bit floats (also with extensible headers)"
# Recordings run from 8 kHz (telephone speech) to 384 kHz, a few converters reach 768 kHz: a rate of 0 Hz (which
# cannot be played at all) or above 768 kHz is a corrupt header, and the frames a clip needs grow with the rate
WAV_RATES = (1, 768000)
UNKNOWN_SIZE = 0xFFFFFFFF  # the size ffmpeg writing to a pipe cannot go back to fill in: samples to the end of the file

WavHeader = namedtuple("WavHeader", "tag channels rate width offset frames")


def wav_header(f, path):
    """The header of an open WAV file, found by walking its RIFF chunks without reading the samples: a WavHeader
    (format tag, channels, sample rate, bytes per sample, where the samples start, how many frames there are).
    Raises ValueError for a file adr cannot read."""
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    end = os.fstat(f.fileno()).st_size
    fmt = offset = size = None
    pos = 12
    while pos + 8 <= end and (fmt is None or offset is None):
        f.seek(pos)
        chunk = f.read(8)
        name, chunk_size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if name == b"fmt ":
            fmt = f.read(min(chunk_size, 64))  # 16 to 40 bytes: a corrupt size must not make a huge read
        elif name == b"data":
            offset, size = pos + 8, chunk_size
        pos += 8 + chunk_size + chunk_size % 2  # chunks are padded to an even length
    if fmt is None or len(fmt) < 16 or offset is None:
        raise ValueError(f"{path}: not a WAV file (no fmt or data chunk)")
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real format opens the sub-format GUID
        tag = int.from_bytes(fmt[24:26], "little")
    width = block_align // max(channels, 1)  # bytes per sample in the file (24 valid bits may sit in 4 bytes)
    if channels < 1 or not ((tag == 1 and width in (1, 2, 3, 4)) or (tag == 3 and width in (4, 8))):
        raise ValueError(f"{path}: format {tag:#x} with {bits}-bit samples; adr reads {WAV_FORMATS}")
    if not WAV_RATES[0] <= rate <= WAV_RATES[1]:
        raise ValueError(f"{path}: a sample rate of {rate} Hz; adr reads rates of {WAV_RATES[0]:,} to "
                         f"{WAV_RATES[1]:,} Hz")
    if size == UNKNOWN_SIZE:
        size = end - offset
    elif offset + size > end:  # a copy or a download cut short
        raise ValueError(f"{path}: truncated: its data chunk should hold {size:,} bytes, the file ends after "
                         f"{end - offset:,}")
    return WavHeader(tag, channels, rate, width, offset, size // (width * channels))  # a last part-frame is dropped


def wav_samples(f, header, path, max_frames=None):
    """The samples of an open WAV file with this WavHeader, the first max_frames frames or all of them: float32
    (channels, N) in [-1, 1]. Raises ValueError for NaN or infinite samples (in a float file)."""
    frames = header.frames if max_frames is None else min(header.frames, max_frames)
    channels, width = header.channels, header.width
    f.seek(header.offset)
    raw = np.frombuffer(f.read(frames * width * channels), dtype=np.uint8).reshape(frames * channels, width)
    if header.tag == 3:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes infinite, and is refused
            values = raw.copy().view("<f4" if width == 4 else "<f8")[:, 0].astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: NaN or infinite samples")
    elif width == 1:
        values = (raw[:, 0].astype(np.float32) - 128) / 128  # 8-bit WAV samples are unsigned
    else:  # little-endian signed integers of 2, 3 or 4 bytes: put them in the top bytes of an int32
        padded = np.zeros((len(raw), 4), dtype=np.uint8)
        padded[:, 4 - width :] = raw
        values = padded.view("<i4")[:, 0].astype(np.float32) / 2**31
    return torch.from_numpy(values.reshape(frames, channels).T.copy())


def read_wav(path):
    """A WAV file -> (float32 tensor (channels, N) in [-1, 1], sample rate). Reads the RIFF chunks itself (the
    standard library's `wave` refuses WAVE_FORMAT_EXTENSIBLE headers, which many recorders write): integer
    PCM of 8 (unsigned), 16, 24 or 32 bits and IEEE floats of 32 or 64 bits. Anything else, a sample rate outside
    WAV_RATES, a data chunk cut short or NaN samples raise ValueError."""
    with open(path, "rb") as f:
        header = wav_header(f, path)
        return wav_samples(f, header, path), header.rate


def read_clip(path, target_rate, length):
    """A WAV file -> the clip prepare_clip makes of it, (length,) at target_rate, reading only the frames that
    clip is made of: one second of a 10-minute recording reads about one second. Raises ValueError where read_wav
    does, and for a file without samples."""
    with open(path, "rb") as f:
        header = wav_header(f, path)
        waveform = wav_samples(f, header, path, input_frames(header.rate, target_rate, length))
    if waveform.shape[1] == 0:
        raise ValueError(f"{path}: no samples")
    return prepare_clip(waveform, header.rate, target_rate, length)


def write_wav(path, waveform, sample_rate):
    """A waveform (N,) in [-1, 1] -> mono 16-bit PCM WAV."""
    samples = quantise(waveform[None], dict(kind="audio"))[0].astype("<i2")
    with atomic_output(path) as tmp, wave.open(tmp, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.tobytes())


# torchaudio's resampler convolves with a kernel of about new x old taps for the ratio new/old in lowest terms:
# 16,000 x 16,001 of them for a file at 16,001 Hz (seconds and gigabytes). The ratio is replaced by the nearest
# fraction whose larger term is at most RESAMPLE_TERMS, so the kernel stays under a few MB whatever the rate. Clips
# then play faster or slower, and higher or lower, by that fraction's relative error: under 1 / (RESAMPLE_TERMS - 1),
# about 0.1% (1 ms a second; 1.7 cents, a third of the smallest pitch step a listener tells apart), and 0 for the
# usual rates (8, 11.025, 22.05, 44.1, 48, 96 kHz ...), whose ratios to 16 kHz have terms of at most 441.
RESAMPLE_TERMS = 1000


def resampling_ratio(sample_rate, target_rate):
    """(old, new), at most RESAMPLE_TERMS each: resampling by new / old turns sample_rate into target_rate, or nearly;
    ValueError for rates more than RESAMPLE_TERMS times apart.
    Why it is off by under 1/P relatively (P = RESAMPLE_TERMS): y = low / high, at least 1/P, lies between two
    neighbouring fractions a/b <= y <= c/d of denominators <= P, whose mediant (a + c) / (b + d) has a denominator
    over P. On a/b's side of the mediant, y - a/b < 1/(b (P + 1)) <= y / (P + 1), as b y >= a >= 1; on c/d's side,
    c/d - y < 1/(d (P + 1)) < y / P, as d y > c - 1/(P + 1). The nearest fraction is closer still; its inverse, the
    ratio when upsampling, is off by under 1/(P - 1)."""
    low, high = sorted((sample_rate, target_rate))
    if low * RESAMPLE_TERMS < high:
        raise ValueError(f"a sample rate of {sample_rate:,} Hz is too far from {target_rate:,} Hz to resample")
    ratio = Fraction(low, high).limit_denominator(RESAMPLE_TERMS)
    small, large = ratio.numerator, ratio.denominator
    return (large, small) if sample_rate > target_rate else (small, large)


@functools.lru_cache(maxsize=4)
def resampler(old, new):
    """torchaudio's resampler from old to new samples, built once: a folder's files mostly share one rate."""
    import torchaudio

    return torchaudio.transforms.Resample(old, new, dtype=torch.float32)  # float32, as torchaudio's resample() does


def input_frames(sample_rate, target_rate, length):
    """How many frames at sample_rate the first `length` samples at target_rate are made of: the frames they span,
    and the resampler's reach past them (its kernel's half-width, and one stride of `old` frames: the convolution
    reads whole strides)."""
    old, new = resampling_ratio(sample_rate, target_rate)
    if old == new:
        return length
    return math.ceil(length * old / new) + old + resampler(old, new).width + 1


def prepare_clip(waveform, sample_rate, target_rate, length):
    """(channels, N) at sample_rate -> (length,) mono at target_rate, zero-padded or trimmed at the end. Only the
    frames the clip is made of are resampled, by resampling_ratio's ratio."""
    mono = waveform[:, : input_frames(sample_rate, target_rate, length)].mean(dim=0)
    old, new = resampling_ratio(sample_rate, target_rate)
    if old != new:
        mono = resampler(old, new)(mono)
    if mono.shape[0] < length:
        return torch.nn.functional.pad(mono, (0, length - mono.shape[0]))
    return mono[:length]


def rms(waveform):
    """Root-mean-square level of a waveform in [-1, 1] (1 = full scale)."""
    return waveform.pow(2).mean().sqrt().item()


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
        ax.imshow(d.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
                  extent=(0, seconds, 0, sample_rate / 2000))
        ax.set_title(title, fontsize=8)
    axes[0, 0].axis("on")
    axes[0, 0].set_xlabel("s", fontsize=7)
    axes[0, 0].set_ylabel("kHz", fontsize=7)
    axes[0, 0].tick_params(labelsize=6)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Writing files: whole or not at all


class OutputError(OSError):
    """A file could not be written (a full disk, a read-only folder): the message names the file and why."""


def disk_error(error):
    """The OSError behind an exception, or None: torch.save reports a full disk as a RuntimeError raised while
    handling the OSError of the file object it was writing to."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


@contextmanager
def atomic_output(path):
    """Yields a temporary name beside `path` (this process's own, with path's extension, which some writers read)
    for a writer to fill; once it has, the file is flushed to the disk and renamed to `path`, so a reader, or a
    crash, never meets a half-written file. If the writer fails, the temporary file is removed, and a failed write
    raises OutputError naming `path` and the reason (what was at `path` before stays as it was)."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{extension}")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        cause = disk_error(e)
        if cause is None or isinstance(e, OutputError):
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        why = f"the disk of {folder} is full" if full else (cause.strerror or str(cause))
        raise OutputError(f"cannot write {path}: {why}") from None
