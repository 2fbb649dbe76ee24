"""media.py: token layouts, image files and grids, WAV files and clips."""

import io
import math
import struct
import time
import wave

import numpy as np
import pytest
import torch
from PIL import Image

import media
from conftest import write_image, write_pcm
from media import prepare_clip, read_wav, write_wav


def test_patchify_roundtrip_and_raster_order():
    x = torch.randn(2, 3, 32, 32)
    tokens = media.patchify(x, 4)
    assert tokens.shape == (2, 64, 48)
    assert torch.equal(media.unpatchify(tokens, 4, 3, 32, 32), x)
    # token 1 is the patch right of token 0; token 8 is the patch below token 0
    assert torch.equal(tokens[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(tokens[0, 8].view(4, 4, 3), x[0, :, 4:8, 0:4].permute(1, 2, 0))


def test_audio_tokens_roundtrip_and_mu_law():
    layout = media.audio_layout()
    wave = (torch.randint(-32768, 32768, (2, 16000)) / 32768).float()
    tokens = media.to_tokens(wave, layout)
    assert tokens.shape == (2, 100, 160)
    torch.testing.assert_close(media.from_tokens(tokens, layout), wave, atol=2e-6, rtol=0)
    quiet = torch.tensor([0.01])
    assert media.mu_law(quiet).item() > 0.2  # a sample at 1% of full scale gets over 20% of the range


def test_mel_tokens_and_the_vocoder_keep_a_chirps_pitch_and_level():
    """A glide from 300 to 1500 Hz through log-mel tokens and Griffin-Lim: in every frame the loudest frequency
    stays within what the tokens can tell apart, the spacing of the 80 mel bands there ((700 + f) / 1127 x 35 mel,
    31 Hz at 300 Hz, 68 Hz at 1500 Hz), plus one FFT bin (15.6 Hz) of peak picking; the level stays within 5%."""
    layout = media.mel_layout()
    assert media.layout_shape(layout) == (63, 80) and media.samples_per_token(layout) == 256
    t = torch.arange(16000) / 16000
    chirp = 0.5 * torch.sin(2 * math.pi * (300 * t + 600 * t**2))
    tokens = media.to_tokens(chirp[None], layout)
    assert tokens.shape == (1, 63, 80) and tokens.min() >= -1 and tokens.max() <= 1
    back = media.from_tokens(tokens, layout, griffin_lim_iters=32)[0]
    assert back.shape == (16000,)

    def loudest(w):
        spectrum = torch.stft(w, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs()
        return spectrum.argmax(0).double()[4:-4] * 16000 / 1024  # frames clear of the clip's ends

    truth, heard = loudest(chirp), loudest(back)
    band = (2595 * math.log10(1 + 8000 / 700) / 81) * (700 + truth) / 1127
    assert ((heard - truth).abs() <= band + 16000 / 1024).all(), (heard - truth).abs().max()
    assert abs(back.pow(2).mean().sqrt() / chirp.pow(2).mean().sqrt() - 1) < 0.05


def test_mel_tokens_pad_whole_tokens_with_silence_and_count_bits_at_256_levels():
    layout = media.mel_layout(frames=2)  # 63 frames: 32 tokens, the second frame of the last one silence
    tone = 0.3 * torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    tokens = media.to_tokens(tone[None], layout)
    assert tokens.shape == (1, 32, 160) and (tokens[0, -1, 80:] == -1).all()
    assert (tokens[0, :, :80].max(-1).values > 0).all()  # every real frame hears the tone
    assert (media.to_tokens(torch.zeros(1, 16000), layout) == -1).all()  # digital silence: the floor
    x = torch.rand(1, 32, 160) * 2 - 1
    lo, hi = media.quantisation_bins(x, layout)
    levels = media.mel_levels(x.double(), layout)
    assert ((levels + 1) * 127.5 - ((levels + 1) * 127.5).round()).abs().max() < 1e-9
    inside = torch.isfinite(lo) & torch.isfinite(hi)
    assert torch.allclose((hi - lo)[inside], torch.full_like(lo[inside], 2 / 255))
    assert (lo <= x).all() and (x <= hi).all()


def test_load_image_centre_crops_and_scales(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = media.load_image(tmp_path / "wide.png", 32, 32)
    expected = torch.from_numpy(pixels[:, 16:48]).permute(2, 0, 1).float() / 127.5 - 1  # the centre square, no resize
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected)
    write_image(tmp_path / "big.jpg", 0, size=(97, 130))
    y = media.load_image(tmp_path / "big.jpg", 32, 32)
    assert y.shape == (3, 32, 32) and y.min() >= -1 and y.max() <= 1
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.jpg"):
        media.load_image(tmp_path / "bad.jpg", 32, 32)


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # PIL writes mode I;16
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = media.read_pixels(tmp_path / "deep.png", 4, 4, channels=1)
    assert pixels[0, 0].tolist() == [0, 64, 128, 255]


def test_save_image_grid(tmp_path):
    images = torch.stack([-torch.ones(3, 2, 2), torch.ones(3, 2, 2)])  # black, white
    media.save_image_grid(images, str(tmp_path / "sub" / "grid.png"), nrow=2, scale=3)
    grid = np.asarray(Image.open(tmp_path / "sub" / "grid.png"))
    assert grid.shape == ((2 + 2) * 3, (2 * 3 + 1) * 3, 3)  # 1 px padding around the images, x3
    assert (grid[3:9, 3:9] == 0).all() and (grid[3:9, 12:18] == 255).all()


def test_wav_round_trip_is_exact(tmp_path):
    samples = torch.tensor([[-32768, -1, 0, 1, 12345, 32767]])
    write_pcm(tmp_path / "a.wav", samples)
    waveform, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and waveform.shape == (1, 6) and waveform.dtype == torch.float32
    assert waveform.min() == -1 and waveform.max() < 1
    write_wav(tmp_path / "b.wav", waveform[0], 16000)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    write_wav(tmp_path / "c.wav", torch.tensor([-3.0, 3.0]), 8000)  # out of range: clipped
    with wave.open(str(tmp_path / "c.wav")) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 8000)
        assert struct.unpack("<2h", f.readframes(2)) == (-32768, 32767)


def write_riff(path, tag, channels, bits, payload, rate=16000, extensible=False, before_data=b""):
    """A WAV file written byte by byte: a fmt chunk (plain, or WAVE_FORMAT_EXTENSIBLE with `tag` as the
    sub-format), any chunks in `before_data`, and a data chunk holding `payload`."""
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (its first two bytes: the format tag)
        guid = struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
        fmt += struct.pack("<HHI", 22, bits, 0) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    body += b"data" + struct.pack("<I", len(payload)) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_read_wav_reads_pcm_and_float_of_every_width(tmp_path):
    values = np.array([-1.0, -0.5, 0.0, 0.25, 0.5 - 2**-7])  # exact in 8 bits and wider
    payloads = {
        (1, 8): (values * 128 + 128).astype(np.uint8).tobytes(),  # 8-bit WAV is unsigned
        (1, 16): (values * 2**15).astype("<i2").tobytes(),
        (1, 24): b"".join(int(v * 2**23).to_bytes(3, "little", signed=True) for v in values),
        (1, 32): (values * 2**31).astype("<i4").tobytes(),
        (3, 32): values.astype("<f4").tobytes(),
        (3, 64): values.astype("<f8").tobytes(),
    }
    for (tag, bits), payload in payloads.items():
        for extensible in (False, True):
            path = tmp_path / f"{tag}_{bits}_{extensible}.wav"
            write_riff(path, tag, 1, bits, payload, rate=8000, extensible=extensible)
            waveform, rate = read_wav(path)
            assert rate == 8000 and waveform.shape == (1, 5), path.name
            assert torch.equal(waveform[0], torch.tensor(values, dtype=torch.float32)), path.name
    stereo = np.array([[1000, -1000], [2000, -2000], [3000, -3000]], dtype="<i2")  # frames of (left, right)
    odd_chunk = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\0"  # an odd-sized chunk and its pad byte
    write_riff(tmp_path / "stereo.wav", 1, 2, 16, stereo.tobytes() + b"\x01", before_data=odd_chunk)  # + half a frame
    waveform, _ = read_wav(tmp_path / "stereo.wav")
    assert torch.equal(waveform * 32768, torch.tensor(stereo.T, dtype=torch.float32))


def test_read_wav_refuses_what_it_cannot_read(tmp_path):
    write_riff(tmp_path / "adpcm.wav", 2, 1, 4, b"\0" * 100)  # Microsoft ADPCM: compressed
    write_riff(tmp_path / "mulaw.wav", 7, 1, 8, b"\0" * 100)  # G.711 mu-law: not linear PCM
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all")
    (tmp_path / "no_data.wav").write_bytes(b"RIFF" + struct.pack("<I", 4) + b"WAVE")
    for name, message in (
        ("adpcm.wav", "format 0x2 with 4-bit"),
        ("mulaw.wav", "format 0x7 with 8-bit"),
        ("junk.wav", "no RIFF/WAVE header"),
        ("no_data.wav", "no fmt or data chunk"),
    ):
        with pytest.raises(ValueError, match=message):
            read_wav(tmp_path / name)


def test_prepare_clip_mixes_resamples_pads_and_trims():
    stereo = torch.stack([torch.full((20000,), 0.5), torch.full((20000,), -0.1)])
    assert torch.allclose(prepare_clip(stereo, 16000, 16000, 16000), torch.full((16000,), 0.2))
    t = torch.arange(4000) / 8000
    tone = torch.sin(2 * math.pi * 440 * t)[None]  # 0.5 s of 440 Hz at 8 kHz
    clip = prepare_clip(tone, 8000, 16000, 16000)
    assert clip.shape == (16000,)
    assert clip[8100:].abs().max() == 0  # 0.5 s of sound, then zeros
    spectrum = torch.fft.rfft(clip[:8000]).abs()  # 0.5 s at 16 kHz: bin k is 2k Hz
    assert spectrum.argmax().item() * 2 == 440


def test_read_wav_refuses_corrupt_rates_truncated_data_and_nan(tmp_path):
    pcm = (np.sin(np.arange(1600) / 10) * 10000).astype("<i2").tobytes()
    write_riff(tmp_path / "whole.wav", 1, 1, 16, pcm)
    for rate in (0, 768001, 0xFFFFFFFF):  # 0 Hz, or above 768 kHz: a corrupt header
        header = bytearray((tmp_path / "whole.wav").read_bytes())
        header[24:28] = struct.pack("<I", rate)
        (tmp_path / "rate.wav").write_bytes(bytes(header))
        with pytest.raises(ValueError, match=f"a sample rate of {rate} Hz"):
            read_wav(tmp_path / "rate.wav")
    (tmp_path / "cut.wav").write_bytes((tmp_path / "whole.wav").read_bytes()[:-1000])  # a copy cut short
    with pytest.raises(ValueError, match="truncated: its data chunk should hold 3,200 bytes, the file ends after"):
        read_wav(tmp_path / "cut.wav")
    for bad, bits in ((math.nan, 32), (math.inf, 32), (1e300, 64)):  # 1e300 is infinite as a float32
        values = np.array([0.0, 0.5, bad, -0.5], "<f4" if bits == 32 else "<f8")
        write_riff(tmp_path / "float.wav", 3, 1, bits, values.tobytes())
        with pytest.raises(ValueError, match="NaN or infinite samples"):
            read_wav(tmp_path / "float.wav")
    # a writer streaming to a pipe cannot go back to write the sizes: 0xFFFFFFFF means "up to the end of the file"
    streamed = bytearray((tmp_path / "whole.wav").read_bytes())
    streamed[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    assert torch.equal(read_wav(tmp_path / "streamed.wav")[0], read_wav(tmp_path / "whole.wav")[0])


def test_resampling_ratio_is_bounded_and_nearly_exact():
    """Every rate is resampled by a ratio of terms <= RESAMPLE_TERMS (a kernel of at most a few MB), off by under
    1 / (RESAMPLE_TERMS - 1) relatively (the speed and pitch error), and exactly for the usual rates."""
    terms = media.RESAMPLE_TERMS
    high = media.WAV_RATES[1]
    rates = [*range(1000, high + 1, 97), 16001, 47999, 44056, 767999, 15999, high]  # 1 kHz: 1/22 of 22,050 Hz
    for target in (16000, 8000, 22050):
        for rate in rates:
            old, new = media.resampling_ratio(rate, target)
            assert 1 <= old <= terms and 1 <= new <= terms, (rate, target)
            assert abs(new * rate / (old * target) - 1) < 1 / (terms - 1), (rate, target)
    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000, 384000):
        old, new = media.resampling_ratio(rate, 16000)
        assert new * rate == old * 16000, rate
    with pytest.raises(ValueError, match="a sample rate of 15 Hz is too far from 16,000 Hz"):  # a ratio below 1/P
        media.resampling_ratio(15, 16000)


def write_tone(path, rate, seconds=1.0, hz=440):
    t = torch.arange(round(rate * seconds)) / rate
    write_pcm(path, (16000 * torch.sin(2 * math.pi * hz * t)).round()[None], rate=rate)


def test_odd_sample_rates_resample_fast_and_keep_the_pitch(tmp_path):
    """torchaudio's exact ratio took 13 s and 4.6 GB for 1 s at 16,001 Hz, 53 s and 13 GB at 47,999 Hz."""
    for rate in (16001, 47999):
        write_tone(tmp_path / f"{rate}.wav", rate)
        start = time.perf_counter()
        waveform, r = read_wav(tmp_path / f"{rate}.wav")
        clip = prepare_clip(waveform, r, 16000, 16000)
        assert time.perf_counter() - start < 2, rate
        assert clip.shape == (16000,) and clip.abs().max() > 0.4
        spectrum = torch.fft.rfft(clip).abs()  # 1 s at 16 kHz: bin k is k Hz
        assert abs(spectrum.argmax().item() - 440) <= 1, rate
        assert torch.equal(media.read_clip(tmp_path / f"{rate}.wav", 16000, 16000), clip)


def test_prepare_clip_resamples_only_the_frames_the_clip_needs():
    """Trimming a long waveform before resampling leaves the clip as resampling all of it would make it."""
    import torchaudio

    noise = torch.rand(2, 3 * 47999, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for rate in (47999, 11111, 44100):
        old, new = media.resampling_ratio(rate, 16000)
        assert media.input_frames(rate, 16000, 16000) < 1.1 * rate
        whole = torchaudio.functional.resample(noise[:, : 3 * rate].mean(0), old, new)[:16000]
        torch.testing.assert_close(prepare_clip(noise[:, : 3 * rate], rate, 16000, 16000), whole, atol=1e-6, rtol=0)


def test_read_clip_reads_only_the_frames_the_clip_needs(tmp_path, monkeypatch):
    """10 minutes of 32-bit float at 8 kHz (19 MB), NaN after the first 2 s: the first second of a clip reads
    about 1 s of it, so the NaNs are never met (read whole, the file is refused)."""
    rate, minutes = 8000, 10
    values = np.full(rate * 60 * minutes, np.nan, dtype="<f4")
    values[: 2 * rate] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)
    write_riff(tmp_path / "long.wav", 3, 1, 32, values.tobytes(), rate=rate)
    with pytest.raises(ValueError, match="NaN"):
        read_wav(tmp_path / "long.wav")
    read_bytes = []

    class CountingFile(io.FileIO):  # counts the bytes read from the file, through any buffering
        def readinto(self, buffer):
            read_bytes.append(super().readinto(buffer))
            return read_bytes[-1]

        def readall(self):
            read_bytes.append(len(data := super().readall()))
            return data

    monkeypatch.setattr(media, "open", lambda path, mode: io.BufferedReader(CountingFile(path)), raising=False)
    clip = media.read_clip(tmp_path / "long.wav", 16000, 16000)
    assert sum(read_bytes) < 1.1 * rate * 4  # 1 s of 4-byte samples, and the resampler's few more
    expected = prepare_clip(torch.from_numpy(values[None, : 2 * rate]), rate, 16000, 16000)
    assert torch.equal(clip, expected) and clip.abs().max() > 0.4
