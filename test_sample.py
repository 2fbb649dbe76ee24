"""sample.py: grids, WAVs, prompts, modes, bad input."""

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

import adr
import cli
import sample
from adr import ADR, SIZES, ADRConfig
from media import audio_layout, image_layout, layout_shape, mel_layout, read_clip, to_tokens
from cli import GUIDANCE, SAMPLING, load_checkpoint, save_checkpoint

IMAGE = image_layout(channels=3, height=8, width=8, patch=2)  # 16 tokens of 12 values


AUDIO = audio_layout(sample_rate=800, length=800, chunk=50)  # 1 s: 16 tokens of 50 samples
MEL = mel_layout(sample_rate=4000, length=4000, n_fft=256, hop=64, bands=16, frames=2)  # 1 s: 32 tokens of 2 frames


def make_checkpoint(path, layout, class_names, order="raster"):
    """A tiny random model. The head's modulation and output start at zero, which would make every
    sample independent of the RetNet; random head weights make samples depend on z (and on the mode)."""
    torch.manual_seed(0)
    seq_len, token_dim = layout_shape(layout)
    config = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=len(class_names), order=order, **SIZES["tiny"])
    model = ADR(config)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(path, model, layout, class_names, ema=model)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return dict(
        image=make_checkpoint(folder / "image.pt", IMAGE, ["cat", "dog", "ship"]),
        audio=make_checkpoint(folder / "audio.pt", AUDIO, ["yes", "no"]),
        unconditional=make_checkpoint(folder / "unconditional.pt", IMAGE, []),
        any_order=make_checkpoint(folder / "any_order.pt", IMAGE, ["cat", "dog", "ship"], order="random"),
        any_order_audio=make_checkpoint(folder / "any_order_audio.pt", AUDIO, ["yes", "no"], order="random"),
        mel=make_checkpoint(folder / "mel.pt", MEL, ["yes", "no"]),
        any_order_mel=make_checkpoint(folder / "any_order_mel.pt", MEL, ["yes", "no"], order="random"),
    )


def run_sample(ckpt, out, *flags):
    sample.main(["--ckpt", ckpt, "--out", str(out), "--steps", "3", "--device", "cpu", *flags])


def test_an_unwritable_out_fails_before_sampling(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "timed_sample", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    (tmp_path / "taken").write_text("a file, not a folder")
    fails_with(capsys, ckpts["audio"], tmp_path / "taken" / "sub", "cannot write there")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def read_pcm(path):
    """(int16 samples, sample rate, channels, sample width) of a WAV file, read with the wave module."""
    with wave.open(str(path)) as f:
        frames = f.readframes(f.getnframes())
        return np.frombuffer(frames, dtype="<i2").astype(int), f.getframerate(), f.getnchannels(), f.getsampwidth()


def write_png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)


def write_mono_pcm(path, samples, rate):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def grid_cell(grid, row, col, size=8, scale=4, pad=1):
    """The image in a grid cell, downscaled back from the nearest-neighbour upscale."""
    step = (size + pad) * scale
    top, left = pad * scale + row * step, pad * scale + col * step
    return grid[top : top + size * scale : scale, left : left + size * scale : scale]


def test_image_grid_has_a_row_per_class_and_timing(ckpts, tmp_path, capsys):
    run_sample(ckpts["image"], tmp_path, "--n", "4")
    grid = pixels(tmp_path / "samples.png")
    # 3 rows (classes) x 4 columns of 8x8 images, 1 pixel of padding between and around, 4x upscaled
    assert grid.shape == ((3 * (8 + 1) + 1) * 4, (4 * (8 + 1) + 1) * 4, 3)
    out = capsys.readouterr().out
    assert (
        "sampled 12 images of 16 tokens" in out
        and f"(recurrent mode, {SAMPLING['sampler']}, 3 steps, cfg {GUIDANCE['image']['cfg_scale']:g}"
        f"{' ramped' * GUIDANCE['image']['cfg_ramp']})" in out
        and "s/sample" in out
        and "tokens/s" in out
    )
    backbone = int(out.split("backbone ")[1].split("%")[0])
    head = int(out.split("diffusion head ")[1].split("%")[0])
    assert 0 < backbone and 0 < head and backbone + head <= 100
    run_sample(ckpts["image"], tmp_path / "one", "--n", "5", "--class", "dog")
    assert pixels(tmp_path / "one" / "samples.png").shape == ((8 + 1 + 1) * 4, (5 * (8 + 1) + 1) * 4, 3)


def test_wavs_read_back_at_the_model_rate_and_length(ckpts, tmp_path):
    run_sample(ckpts["audio"], tmp_path, "--n", "2")
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".wav"))
    assert names == ["no_0.wav", "no_1.wav", "yes_0.wav", "yes_1.wav"]
    for name in names:
        samples, rate, channels, width = read_pcm(tmp_path / name)
        assert (rate, channels, width, len(samples)) == (800, 1, 2, 800)
        assert samples.std() > 0
    assert (tmp_path / "spectrograms.png").stat().st_size > 0


@pytest.mark.parametrize("with_prompt, cfg_scale", [(False, 1.0), (True, 3.0)])
def test_modes_agree_in_float64_and_a_broken_mode_is_caught(ckpts, monkeypatch, with_prompt, cfg_scale):
    """In float64 the recurrent state (after a chunkwise prefill of the prompt) and recomputing the
    prefix give the same tokens to rounding error; a recurrent form that forgets the earlier tokens
    moves them by far more, so the comparison is not vacuous."""
    model = load_checkpoint(ckpts["image"])[0].double()
    labels = torch.tensor([0, 1, 2, 0])
    prompt = torch.rand(4, 5, 12, dtype=torch.float64) * 2 - 1 if with_prompt else None

    def draw(mode):
        torch.manual_seed(3)
        return cli.timed_sample(model, 4, labels, prompt=prompt, steps=3, cfg_scale=cfg_scale, mode=mode)[0]

    recurrent, parallel = draw("recurrent"), draw("parallel")
    scale = parallel.abs().max()
    assert (recurrent - parallel).abs().max() <= 1e-11 * scale
    if with_prompt:
        assert torch.equal(recurrent[:, :5], prompt) and torch.equal(parallel[:, :5], prompt)
    keeps_state = adr.retention_recurrent
    monkeypatch.setattr(
        adr, "retention_recurrent", lambda q, k, v, log_gamma, state: keeps_state(q, k, v, log_gamma, 0 * state)
    )
    assert (draw("recurrent") - parallel).abs().max() > 1e-8 * scale


def test_modes_save_the_same_files(ckpts, tmp_path):
    """The same through the command line in float32: equal images, up to rare 1-LSB rounding. (A random
    tiny model drives most pixels to 0 or 255, so the float64 test above is the sharp one.)"""
    for mode in ("recurrent", "parallel"):
        run_sample(ckpts["image"], tmp_path / mode, "--n", "3", "--mode", mode, "--seed", "7")
    recurrent, parallel = pixels(tmp_path / "recurrent" / "samples.png"), pixels(tmp_path / "parallel" / "samples.png")
    diff = np.abs(recurrent - parallel)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    run_sample(ckpts["image"], tmp_path / "other_seed", "--n", "3", "--seed", "8")
    assert (np.abs(pixels(tmp_path / "other_seed" / "samples.png") - recurrent) > 1).any()


def test_image_prompt_keeps_the_top_rows(ckpts, tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3))
    write_png(tmp_path / "prompt.png", image)
    run_sample(ckpts["image"], tmp_path / "out", "--n", "2", "--prompt", str(tmp_path / "prompt.png"), "--keep", "0.5")
    grid = pixels(tmp_path / "out" / "completions.png")
    assert grid.shape == ((3 * (8 + 1) + 1) * 4, (3 * (8 + 1) + 1) * 4, 3)  # per class: prompt + 2 completions
    for row in range(3):
        shown = grid_cell(grid, row, 0)
        assert np.abs(shown[:4] - image[:4]).max() <= 1  # 8 of 16 tokens: the top two patch rows
        assert np.abs(shown[4:] - 128).max() <= 1  # the part to generate, greyed out
        for col in (1, 2):
            completion = grid_cell(grid, row, col)
            assert np.abs(completion[:4] - image[:4]).max() <= 1
            assert np.abs(completion[4:] - image[4:]).max() > 1  # the rest is generated, not copied


def test_audio_prompt_is_continued(ckpts, tmp_path):
    rng = np.random.default_rng(2)
    clip = (rng.uniform(-0.5, 0.5, 800) * 32768).astype(int)
    write_mono_pcm(tmp_path / "prompt.wav", clip, 800)
    run_sample(
        ckpts["audio"],
        tmp_path / "out",
        "--class",
        "yes",
        "--n",
        "2",
        "--prompt",
        str(tmp_path / "prompt.wav"),
        "--keep",
        "0.3",
    )
    kept = 200  # 0.3 s = 240 samples, rounded down to whole 50-sample chunks
    prompt, rate, _, _ = read_pcm(tmp_path / "out" / "prompt.wav")
    assert rate == 800 and np.abs(prompt - clip[:kept]).max() <= 1
    for name in ("yes_0.wav", "yes_1.wav"):
        samples, rate, _, _ = read_pcm(tmp_path / "out" / name)
        assert rate == 800 and len(samples) == 800
        assert np.abs(samples[:kept] - clip[:kept]).max() <= 1
        assert np.abs(samples[kept:] - clip[kept:]).max() > 100


def fails_with(capsys, ckpt, out, message, *flags):
    with pytest.raises(SystemExit) as exit_info:
        run_sample(ckpt, out, *flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_compile_without_a_cpp_compiler_fails_in_one_line(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cli.cpp_compiler_found", lambda: False)
    fails_with(capsys, ckpts["image"], tmp_path, "no C++ compiler (g++) was found here", "--compile")


def test_bad_checkpoints(ckpts, tmp_path, capsys):
    fails_with(capsys, str(tmp_path / "missing.pt"), tmp_path, "no checkpoint at")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    fails_with(capsys, str(tmp_path / "notes.txt"), tmp_path, "is not an adr checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    fails_with(capsys, str(tmp_path / "other.pt"), tmp_path, "is not an adr checkpoint")


def test_bad_classes_and_guidance(ckpts, tmp_path, capsys):
    fails_with(
        capsys,
        ckpts["image"],
        tmp_path,
        "unknown class 'horse': this checkpoint knows cat, dog, ship",
        "--class",
        "horse",
    )
    fails_with(capsys, ckpts["unconditional"], tmp_path, "unconditional", "--class", "cat")
    fails_with(capsys, ckpts["unconditional"], tmp_path, "guidance needs a class-conditional checkpoint", "--cfg", "3")
    fails_with(capsys, ckpts["unconditional"], tmp_path, "guidance needs a class-conditional", "--cfg-level", "0.5")
    fails_with(capsys, ckpts["mel"], tmp_path, "--cfg-level", "--cfg-level", "1.5")


def test_bad_prompts(ckpts, tmp_path, capsys):
    write_png(tmp_path / "small.png", np.zeros((8, 8, 3)))
    write_mono_pcm(tmp_path / "clip.wav", np.zeros(800), 800)
    write_mono_pcm(tmp_path / "short.wav", np.zeros(100), 800)
    fails_with(capsys, ckpts["image"], tmp_path, "no such file", "--prompt", str(tmp_path / "missing.png"))
    fails_with(capsys, ckpts["image"], tmp_path, "this is an image model", "--prompt", str(tmp_path / "clip.wav"))
    fails_with(capsys, ckpts["image"], tmp_path, "--keep 1", "--prompt", str(tmp_path / "small.png"), "--keep", "1")
    fails_with(capsys, ckpts["audio"], tmp_path, "this is an audio model", "--prompt", str(tmp_path / "small.png"))
    fails_with(capsys, ckpts["audio"], tmp_path, "shorter than --keep 0.5 s", "--prompt", str(tmp_path / "short.wav"))
    fails_with(
        capsys, ckpts["audio"], tmp_path, "keep at least one", "--prompt", str(tmp_path / "clip.wav"), "--keep", "0.01"
    )
    fails_with(capsys, ckpts["any_order_mel"], tmp_path, "not a mask image", "--prompt", str(tmp_path / "clip.wav"),
               "--mask", str(tmp_path / "small.png"))


def test_bad_flag_values(ckpts, tmp_path, capsys):
    fails_with(capsys, ckpts["image"], tmp_path, "--steps: 0 must be at least 1", "--steps", "0")
    fails_with(
        capsys, ckpts["image"], tmp_path, "--steps 5000: must be between 1 and the model's 1000", "--steps", "5000"
    )
    fails_with(capsys, ckpts["image"], tmp_path, "--mode: invalid choice: 'fast'", "--mode", "fast")
    for sampler in ("ddpm", "dpm++", "dpm++sde"):
        fails_with(capsys, ckpts["image"], tmp_path, "--eta 0.5: only --sampler ddim takes it", "--sampler", sampler,
                   "--eta", "0.5")
    fails_with(capsys, ckpts["image"], tmp_path, "--eta: 2 must be at most 1", "--sampler", "ddim", "--eta", "2")
    fails_with(capsys, ckpts["image"], tmp_path, "--n: 'ten' is not an integer", "--n", "ten")
    for kind in ("image", "audio"):  # no vocoder to tune: images, and waveform tokens
        fails_with(capsys, ckpts[kind], tmp_path, "only a model of mel tokens needs a vocoder",
                   "--griffin-lim-iters", "8")
    fails_with(capsys, ckpts["image"], tmp_path, "--device 'tpu': not a device adr runs on", "--device", "tpu")
    fails_with(capsys, ckpts["image"], tmp_path, "--device 'meta': not a device adr runs on", "--device", "meta")
    for flag in ("--cfg", "--temperature"):
        for value in ("nan", "inf"):
            fails_with(capsys, ckpts["image"], tmp_path, f"{flag}: {value} is not a finite number", flag, value)
    (tmp_path / "taken").write_text("a file, not a folder")
    fails_with(capsys, ckpts["image"], tmp_path / "taken", "--out")
    fails_with(capsys, ckpts["image"], tmp_path / "taken" / "sub", "cannot write there")


def test_command_line_error_has_no_traceback(ckpts, tmp_path):
    command = [sys.executable, "sample.py", "--ckpt", ckpts["image"], "--class", "horse", "--out", str(tmp_path)]
    result = subprocess.run(
        command, cwd=os.path.dirname(os.path.abspath(sample.__file__)), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown class 'horse'") and "Traceback" not in result.stderr


def test_raw_samples_are_saved_as_npz(ckpts, tmp_path):
    run_sample(ckpts["image"], tmp_path / "image", "--n", "2")
    saved = np.load(tmp_path / "image" / "samples.npz")
    assert saved["images"].shape == (6, 8, 8, 3) and saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2] and saved["class_names"].tolist() == ["cat", "dog", "ship"]
    grid = pixels(tmp_path / "image" / "samples.png")
    assert np.array_equal(grid_cell(grid, 1, 1), saved["images"][3])  # row: class dog, column: its 2nd sample
    run_sample(ckpts["audio"], tmp_path / "audio", "--n", "1", "--class", "no")
    saved = np.load(tmp_path / "audio" / "samples.npz")
    assert saved["waveforms"].shape == (1, 800) and saved["waveforms"].dtype == np.int16
    assert saved["labels"].tolist() == [1] and saved["class_names"].tolist() == ["yes", "no"]
    assert np.array_equal(saved["waveforms"][0], read_pcm(tmp_path / "audio" / "no_0.wav")[0])
    run_sample(ckpts["unconditional"], tmp_path / "unconditional", "--n", "3")
    saved = np.load(tmp_path / "unconditional" / "samples.npz")
    assert saved["labels"].tolist() == [-1, -1, -1] and saved["class_names"].tolist() == []


def test_masks_keep_the_rest_of_the_prompt(ckpts, tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3))
    write_png(tmp_path / "prompt.png", image)
    for mask, generated in (("center", np.s_[2:6, 2:6]), ("left", np.s_[:, :4]), ("top", np.s_[:4, :])):
        out = tmp_path / mask
        run_sample(
            ckpts["any_order"],
            out,
            "--n",
            "2",
            "--prompt",
            str(tmp_path / "prompt.png"),
            "--mask",
            mask,
            "--tokens-per-step",
            "3",
        )
        grid = pixels(out / "completions.png")
        keep = np.ones((8, 8), dtype=bool)
        keep[generated] = False
        for row in range(3):
            shown = grid_cell(grid, row, 0)
            assert np.abs(shown[keep] - image[keep]).max() <= 1 and np.abs(shown[~keep] - 128).max() <= 1
            for col in (1, 2):
                completion = grid_cell(grid, row, col)
                assert np.abs(completion[keep] - image[keep]).max() <= 1  # kept exactly (up to rounding)
                assert np.abs(completion[~keep] - image[~keep]).max() > 1  # generated
    mask_file = np.zeros((8, 8), dtype=np.uint8)
    mask_file[:, 6:] = 255  # white: generate the two right-most columns (one column of 2x2 patches)
    write_png(tmp_path / "mask.png", np.stack([mask_file] * 3, -1))
    run_sample(
        ckpts["any_order"],
        tmp_path / "file",
        "--n",
        "1",
        "--class",
        "cat",
        "--prompt",
        str(tmp_path / "prompt.png"),
        "--mask",
        str(tmp_path / "mask.png"),
    )
    completion = grid_cell(pixels(tmp_path / "file" / "completions.png"), 0, 1)
    assert np.abs(completion[:, :6] - image[:, :6]).max() <= 1 and np.abs(completion[:, 6:] - image[:, 6:]).max() > 1


def test_an_audio_gap_is_filled(ckpts, tmp_path):
    clip = (np.random.default_rng(2).uniform(-0.5, 0.5, 800) * 32768).astype(int)
    write_mono_pcm(tmp_path / "prompt.wav", clip, 800)
    run_sample(
        ckpts["any_order_audio"],
        tmp_path / "out",
        "--class",
        "no",
        "--prompt",
        str(tmp_path / "prompt.wav"),
        "--mask",
        "center",
    )
    kept, _, _, _ = read_pcm(tmp_path / "out" / "prompt.wav")
    middle = np.s_[200:600]  # 16 chunks of 50 samples: chunks 4 .. 11 are generated
    assert len(kept) == 800 and (kept[middle] == 0).all() and np.abs(kept[:200] - clip[:200]).max() <= 1
    samples, _, _, _ = read_pcm(tmp_path / "out" / "no_0.wav")
    assert np.abs(samples[:200] - clip[:200]).max() <= 1 and np.abs(samples[600:] - clip[600:]).max() <= 1
    assert np.abs(samples[middle] - clip[middle]).max() > 100


def test_what_a_raster_model_cannot_do_is_one_line(ckpts, tmp_path, capsys):
    write_png(tmp_path / "prompt.png", np.zeros((8, 8, 3)))
    prompt = ["--prompt", str(tmp_path / "prompt.png")]
    fails_with(capsys, ckpts["image"], tmp_path, "trained in raster order", *prompt, "--mask", "center")
    fails_with(
        capsys,
        ckpts["image"],
        tmp_path,
        "--tokens-per-step 2: this model was trained in raster order",
        "--tokens-per-step",
        "2",
    )
    fails_with(capsys, ckpts["image"], tmp_path, "--order random: this model", "--order", "random")
    fails_with(capsys, ckpts["image"], tmp_path, "give one of them", *prompt, "--mask", "center", "--keep", "0.5")
    fails_with(capsys, ckpts["image"], tmp_path, "--mask needs --prompt", "--mask", "center")
    fails_with(capsys, ckpts["any_order"], tmp_path, "--mask nowhere: use top", *prompt, "--mask", "nowhere")
    fails_with(capsys, ckpts["any_order"], tmp_path, "it must cover some tokens", *prompt, "--mask", "random:1")
    run_sample(ckpts["image"], tmp_path / "ok", "--n", "1", *prompt, "--mask", "bottom")  # a prefix: fine


def test_a_compiled_head_gives_the_same_samples(ckpts):
    """The wiring of --compile, traced by torch.compile with its eager backend (the CPU test skips code generation)."""
    model = load_checkpoint(ckpts["image"])[0]
    labels = torch.tensor([0, 2])
    torch.manual_seed(0)
    plain = model.sample(2, labels, steps=3, cfg_scale=2.0)
    cli.compile_head(model, backend="eager")
    torch.manual_seed(0)
    compiled = model.sample(2, labels, steps=3, cfg_scale=2.0)
    assert type(model.head.net).__name__ == "OptimizedModule" and torch.allclose(plain, compiled, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Mel-token models: the checkpoint holds the layout, so it decodes itself


def mel_prompt(path):
    """A 1 s clip at the mel model's rate, a glide from 300 to 900 Hz, written as 16-bit PCM."""
    t = np.arange(4000) / 4000
    clip = (0.4 * np.sin(2 * np.pi * (300 * t + 300 * t**2)) * 32768).astype(int)
    write_mono_pcm(path, clip, 4000)
    return clip


def test_a_mel_checkpoint_decodes_itself(ckpts, tmp_path):
    run_sample(ckpts["mel"], tmp_path, "--n", "2", "--griffin-lim-iters", "4")
    saved = np.load(tmp_path / "samples.npz")
    assert saved["waveforms"].shape == (4, 4000) and saved["mel_tokens"].shape == (4, 32, 32)
    assert np.isfinite(saved["mel_tokens"]).all() and np.abs(saved["mel_tokens"]).max() > 0
    for name in ("yes_0.wav", "yes_1.wav", "no_0.wav", "no_1.wav"):
        samples, rate, channels, width = read_pcm(tmp_path / name)
        assert (rate, channels, width, len(samples)) == (4000, 1, 2, 4000)
    assert (tmp_path / "spectrograms.png").exists()


def test_a_mel_prompt_keeps_its_frames(ckpts, tmp_path):
    """--keep 0.3 s keeps whole tokens (2 frames of 64 samples: 9 tokens); the generated frames differ."""
    clip = mel_prompt(tmp_path / "prompt.wav")
    run_sample(ckpts["mel"], tmp_path / "out", "--class", "no", "--n", "2", "--prompt", str(tmp_path / "prompt.wav"),
               "--keep", "0.3", "--griffin-lim-iters", "4")
    known = to_tokens(torch.tensor(clip / 32768, dtype=torch.float32)[None], MEL)[0].numpy()
    drawn = np.load(tmp_path / "out" / "samples.npz")["mel_tokens"]
    assert np.abs(drawn[:, :9] - known[:9]).max() < 1e-5 and np.abs(drawn[:, 9:] - known[9:]).max() > 0.1
    kept, rate, _, _ = read_pcm(tmp_path / "out" / "prompt.wav")
    assert rate == 4000 and len(kept) == 9 * 128


def test_a_mel_gap_is_filled(ckpts, tmp_path):
    clip = mel_prompt(tmp_path / "prompt.wav")
    run_sample(ckpts["any_order_mel"], tmp_path / "out", "--class", "yes", "--prompt", str(tmp_path / "prompt.wav"),
               "--mask", "center", "--griffin-lim-iters", "4")
    known = to_tokens(torch.tensor(clip / 32768, dtype=torch.float32)[None], MEL)[0].numpy()
    drawn = np.load(tmp_path / "out" / "samples.npz")["mel_tokens"][0]
    outside = np.r_[0:8, 24:32]  # "center" generates the middle half of the clip's 32 tokens
    assert np.abs(drawn[outside] - known[outside]).max() < 1e-5 and np.abs(drawn[8:24] - known[8:24]).max() > 0.1


def test_the_checkpoint_says_which_guidance_to_use(ckpts, tmp_path, capsys):
    ckpt = torch.load(ckpts["image"], weights_only=True)
    ckpt["sampling"].update(cfg_scale=2.0, cfg_ramp=False)
    torch.save(ckpt, tmp_path / "flat.pt")
    run_sample(str(tmp_path / "flat.pt"), tmp_path / "out", "--n", "1")
    assert ", 3 steps, cfg 2)" in capsys.readouterr().out
    run_sample(str(tmp_path / "flat.pt"), tmp_path / "out", "--n", "1", "--cfg", "3", "--cfg-ramp")
    assert ", 3 steps, cfg 3 ramped)" in capsys.readouterr().out
    run_sample(str(tmp_path / "flat.pt"), tmp_path / "out", "--n", "1", "--cfg-level", "0.5")
    assert ", 3 steps, cfg 2, level 0.5)" in capsys.readouterr().out
    ckpt = torch.load(ckpts["mel"], weights_only=True)
    assert ckpt["sampling"] == GUIDANCE["mel"] | dict(steps=cli.STEPS["mel"])  # mel tokens: half guidance on the level
    assert ckpt["sampling"]["cfg_level"] == 0.5
    run_sample(ckpts["mel"], tmp_path / "mel", "--n", "1", "--class", "no", "--griffin-lim-iters", "2")
    assert ", level 0.5)" in capsys.readouterr().out
    del ckpt["sampling"]["cfg_level"]  # a checkpoint from before: its level guided as the rest
    torch.save(ckpt, tmp_path / "before.pt")
    run_sample(str(tmp_path / "before.pt"), tmp_path / "old", "--n", "1", "--class", "no", "--griffin-lim-iters", "2")
    assert f"cfg {GUIDANCE['mel']['cfg_scale']:g})" in capsys.readouterr().out


def test_the_checkpoint_says_how_many_steps_its_tokens_take(ckpts, tmp_path):
    """Mel tokens sample with more reverse steps than the others unless --steps says otherwise; a checkpoint saved
    before it kept its steps gets its tokens' number."""
    parser = cli.argparse.ArgumentParser()
    cli.add_sampling_flags(parser)
    assert cli.STEPS["mel"] > SAMPLING["steps"]
    for name, steps in (("mel", cli.STEPS["mel"]), ("audio", SAMPLING["steps"]), ("image", SAMPLING["steps"])):
        ckpt = torch.load(ckpts[name], weights_only=True)
        assert ckpt["sampling"]["steps"] == steps
        del ckpt["sampling"]["steps"]
        torch.save(ckpt, tmp_path / "before.pt")
        for path in (ckpts[name], tmp_path / "before.pt"):
            model, loaded = load_checkpoint(path)
            options = lambda *flags, config=model.config: cli.sampling_options(  # noqa: E731
                parser.parse_args(flags), config, loaded["sampling"])
            assert options()["steps"] == steps and options("--steps", "7")["steps"] == 7
            few = dataclasses.replace(model.config, diffusion_steps=20)  # a model of fewer diffusion steps: all of them
            assert options(config=few)["steps"] == min(steps, 20)


def test_audio_samples_sit_beside_a_real_held_out_clip_of_their_word(ckpts, tmp_path, monkeypatch, capsys):
    """Where the checkpoint's data is on disk, each word's spectrograms are followed by a real held-out clip of it
    (the first of its held-out files: a folder's 10th, as training holds out); where it is not, one line says so."""
    t = np.arange(4000) / 4000
    for word, pitch in (("yes", 300), ("no", 600)):
        (tmp_path / "words" / word).mkdir(parents=True)
        for i in range(12):
            clip = (0.3 * np.sin(2 * np.pi * (pitch + 10 * i) * t) * 32768).astype(int)
            write_mono_pcm(tmp_path / "words" / word / f"{i:02d}.wav", clip, 4000)
    ckpt = torch.load(ckpts["mel"], weights_only=True)
    ckpt["source"] = dict(name="audio-folder", root=str(tmp_path / "words"))
    torch.save(ckpt, tmp_path / "mel.pt")
    shown = []
    monkeypatch.setattr(sample, "save_spectrograms", lambda panels, rate, path, titles: shown.append((panels, titles)))
    run_sample(str(tmp_path / "mel.pt"), tmp_path / "out", "--n", "2", "--griffin-lim-iters", "2")
    panels, titles = shown[-1]
    assert titles == ["yes_0", "yes_1", "yes: real", "no_0", "no_1", "no: real"]
    for index, word in ((2, "yes"), (5, "no")):
        assert torch.equal(panels[index], read_clip(str(tmp_path / "words" / word / "09.wav"), 4000, 4000))
    shutil.rmtree(tmp_path / "words")  # the data gone: the samples alone, and why
    capsys.readouterr()
    run_sample(str(tmp_path / "mel.pt"), tmp_path / "out", "--n", "2", "--griffin-lim-iters", "2")
    assert shown[-1][1] == ["yes_0", "yes_1", "no_0", "no_1"]
    assert "no real clips beside the samples" in capsys.readouterr().out


def test_a_mask_is_what_the_model_can_use_or_one_line(ckpts, tmp_path, capsys):
    write_png(tmp_path / "prompt.png", np.zeros((8, 8, 3)))
    prompt = ["--prompt", str(tmp_path / "prompt.png")]
    for spec in ("random:-0.5", "random:", "random:half", "random:1.5", "center:0.3"):
        fails_with(capsys, ckpts["any_order"], tmp_path, f"--mask {spec}:", *prompt, "--mask", spec)
    write_png(tmp_path / "big.png", np.full((16, 16, 3), 255))  # the model's images are 8x8: not resized unseen
    fails_with(capsys, ckpts["any_order"], tmp_path, "is 16x16 pixels and the model's images are 8x8", *prompt,
               "--mask", str(tmp_path / "big.png"))
    (tmp_path / "fake.png").write_text("not an image")
    fails_with(capsys, ckpts["any_order"], tmp_path, "cannot read it as an image", *prompt, "--mask",
               str(tmp_path / "fake.png"))


def test_a_full_disk_leaves_no_empty_files(ckpts, tmp_path, monkeypatch, capsys):
    """np.savez on a full disk raises OSError(ENOSPC) after writing part of the file."""
    def savez_on_a_full_disk(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: run_sample(ckpts["image"], out, "--n", "1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "samples.npz" in err and "is full" in err
    assert os.listdir(out) == []  # neither a half-written samples.npz nor a temporary file
