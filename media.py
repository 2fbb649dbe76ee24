"""
Media <-> tokens, and the files people open: how images and audio become ADR's continuous tokens and
back (token layouts, patches, mu-law, quantisation bins), reading image files, writing PNG grids,
reading and writing WAV files, spectrogram figures.

torchvision, torchaudio and matplotlib are imported inside the functions that need them, so that
sampling an image model never imports torchaudio.
"""

import math
import os
import wave

import numpy as np
import torch
from PIL import Image, ImageOps

# ----------------------------------------------------------------------------------------------
# Token layouts: images as p x p patches in raster order, audio as mu-law companded waveform chunks.


def image_layout(channels=3, height=32, width=32, patch=4):
    return dict(kind="image", channels=channels, height=height, width=width, patch=patch)


def audio_layout(sample_rate=16000, length=16000, chunk=160, mu=255.0):
    return dict(kind="audio", sample_rate=sample_rate, length=length, chunk=chunk, mu=mu)


def layout_shape(layout):
    """(seq_len, token_dim) of a layout."""
    if layout["kind"] == "image":
        p = layout["patch"]
        return layout["height"] * layout["width"] // p**2, p * p * layout["channels"]
    return layout["length"] // layout["chunk"], layout["chunk"]


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


def to_tokens(x, layout):
    """Images (B, C, H, W) in [-1, 1] or waveforms (B, N) in [-1, 1] -> tokens (B, L, D)."""
    if layout["kind"] == "image":
        return patchify(x, layout["patch"])
    return mu_law(x, layout["mu"]).view(x.shape[0], -1, layout["chunk"])


def from_tokens(tokens, layout):
    """Inverse of to_tokens; generated values are clamped to [-1, 1]."""
    tokens = tokens.clamp(-1, 1)
    if layout["kind"] == "image":
        return unpatchify(tokens, layout["patch"], layout["channels"], layout["height"], layout["width"])
    return mu_law_inverse(tokens.reshape(tokens.shape[0], -1), layout["mu"])


def quantisation_bins(tokens, layout):
    """The bin [lo, hi] in token space of each value's quantisation level: 8-bit pixels scaled to [-1, 1]
    (width 2/255), or 16-bit samples x = k/32768 mapped through mu-law. The outermost bins reach to -inf
    and +inf, so the bins cover the line and their probabilities sum to one."""
    tokens = tokens.double()
    if layout["kind"] == "image":
        half = torch.full_like(tokens, 1 / 255)
        lo, hi = tokens - half, tokens + half
        return lo.masked_fill(tokens < -1 + 1e-6, -math.inf), hi.masked_fill(tokens > 1 - 1e-6, math.inf)
    k = torch.round(mu_law_inverse(tokens, layout["mu"]) * 32768).clamp(-32768, 32767)
    lo, hi = (mu_law((k + s) / 32768, layout["mu"]) for s in (-0.5, 0.5))
    return lo.masked_fill(k == -32768, -math.inf), hi.masked_fill(k == 32767, math.inf)


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


def save_samples_npz(path, x, layout, labels, class_names):
    """Raw samples for external metrics (torch-fidelity, clean-fid, ...): `images` uint8 (N, H, W, C) or
    `waveforms` int16 (N, L), `labels` (N,) (-1 when unconditional) and `class_names`."""
    key = "images" if layout["kind"] == "image" else "waveforms"
    labels = np.full(len(x), -1) if labels is None else np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    names = np.array(list(class_names), dtype=str)
    np.savez(path, **{key: quantise(x, layout)}, labels=labels.astype(np.int64), class_names=names)


# ----------------------------------------------------------------------------------------------
# Image files


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_pixels(path, height, width, channels=3):
    """One image file -> uint8 (channels, H, W), RGB or grayscale: centre-cropped to the aspect ratio,
    then resized."""
    try:
        with Image.open(path) as image:
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
    Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------------------------
# WAV files, clips, spectrograms


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
    samples = quantise(waveform[None], dict(kind="audio"))[0].astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.tobytes())


def prepare_clip(waveform, sample_rate, target_rate, length):
    """(channels, N) at sample_rate -> (length,) mono at target_rate, zero-padded or trimmed at the end."""
    mono = waveform.mean(dim=0)
    if sample_rate != target_rate:
        import torchaudio

        mono = torchaudio.functional.resample(mono, sample_rate, target_rate)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
