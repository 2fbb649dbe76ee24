"""trainer.py and the training scripts: checkpoints, the loop, resume, Ctrl-C, torchrun, bad input."""

import contextlib
import errno
import inspect
import math
import os
import signal
import subprocess
import sys
import time
import wave
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import adr
import cli
import data
import media
import train_audio
import train_image
import trainer
from conftest import (
    HERE,
    layout_bpd,
    read_log,
    run_script,
    write_constant,
    write_mnist,
    write_pcm,
)

LAYOUT = media.image_layout()


# a short run: few steps, tiny batches, no warm-up, 2 reverse diffusion steps for the sample grid
FAST = [
    "--size",
    "tiny",
    "--batch-size",
    "4",
    "--eval-examples",
    "4",
    "--bpd-examples",
    "4",
    "--sample-steps",
    "2",
    "--num-workers",
    "0",
    "--log-every",
    "0",
    "--warmup",
    "0",
]


def test_no_data_offline_gives_one_clear_line(tmp_path):
    closed = "http://127.0.0.1:9"  # the download fails at once, as it does offline
    proxies = {name: closed for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    result = run_script(
        ["train_image.py", "--size", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
        env={**proxies, "NO_PROXY": "", "no_proxy": ""},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download CIFAR-10"), result.stderr
    assert "--image-folder" in lines[0] and "cifar-10-python.tar.gz" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_smoke_run_then_resume(image_dir, tmp_path):
    out = tmp_path / "run"
    common = [
        "--image-folder",
        str(image_dir),
        "--out",
        str(out),
        *FAST,
        "--eval-every",
        "2",
        "--eval-bpd-every",
        "0",
        "--sample-every",
        "0",
        "--ckpt-every",
        "0",
    ]
    train_image.main(["--steps", "4", *common])
    for name in ("ckpt.pt", "loss.png", "log.csv", "samples_000004.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "samples_000004.png") as grid:  # one row of 10 per class, 32 px + 1 px padding, x4
        assert grid.size == ((10 * 33 + 1) * 4, (2 * 33 + 1) * 4)
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and ckpt["class_names"] == ["cat", "ship"] and model.config.num_classes == 2
    assert ckpt["optimizer"]["state"][0]["step"].item() == 4
    rows = read_log(out / "log.csv")
    assert list(rows[0]) == ["step", "train_loss", "test_loss", "test_bpd", "test_bpd_stderr", "lr", "elapsed_s"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["test_loss"] != "" for r in rows] == [False, True, False, True]
    assert rows[-1]["test_bpd"] != "" and 0 < float(rows[-1]["test_bpd"]) and rows[1]["test_bpd"] == ""

    with pytest.raises(SystemExit) as e:  # the run is there: no overwriting without --resume
        train_image.main(["--steps", "6", *common])
    assert e.value.code == 2
    train_image.main(["--steps", "6", "--resume", *common])
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 6
    assert ckpt["optimizer"]["state"][0]["step"].item() == 6  # the optimizer state went on from step 4
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in ckpt["history"]] == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_run(image_dir, tmp_path):
    weights = []
    for name in ("a", "b"):
        train_image.main(
            [
                "--image-folder",
                str(image_dir),
                "--out",
                str(tmp_path / name),
                *FAST,
                "--steps",
                "2",
                "--seed",
                "3",
                "--eval-bpd-every",
                "0",
                "--bpd-examples",
                "2",
                "--sample-steps",
                "1",
            ]
        )
        weights.append(torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bf16_precision_on_the_cpu(image_dir, tmp_path, capsys):
    weights = {}
    for precision in ("fp32", "bf16"):
        train_image.main(["--image-folder", str(image_dir), "--out", str(tmp_path / precision), *FAST, "--steps", "2",
                          "--eval-bpd-every", "0", "--bpd-examples", "2", "--sample-steps", "1",
                          "--precision", precision, "--device", "cpu"])
        assert f"on cpu in {precision}" in capsys.readouterr().out
        weights[precision] = torch.load(tmp_path / precision / "ckpt.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights["bf16"].values())  # autocast only
    assert not all(torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])  # bf16 did compute


def test_random_order_training(image_dir, tmp_path):
    out = tmp_path / "run"
    train_image.main(["--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "2", "--order", "random",
                      "--sample-steps", "1"])
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert model.config.order == "random" and hasattr(model, "source_emb") and (out / "samples_000002.png").exists()


def test_unconditional(image_dir, tmp_path):
    out = tmp_path / "run"
    train_image.main(["--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "1", "--unconditional",
                      "--sample-steps", "1"])
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert model.config.num_classes == 0 and ckpt["class_names"] == []
    with Image.open(out / "samples_000001.png") as grid:  # 10 x 10 samples
        assert grid.size == ((10 * 33 + 1) * 4, (10 * 33 + 1) * 4)


def test_bits_per_dim_bound_for_a_conditional_model(image_dir):
    train_set, test_set, names = data.image_folder_data(str(image_dir), LAYOUT)
    torch.manual_seed(0)
    model = adr.ADR(adr.ADRConfig(token_dim=48, seq_len=64, num_classes=2, **adr.SIZES["tiny"])).eval()
    mean, stderr = cli.held_out_bpd(model, test_set, LAYOUT, len(names), 3, 2, torch.device("cpu"))
    with torch.random.fork_rng():  # the same draws as held_out_bpd's, computed directly
        torch.manual_seed(0)
        chosen = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:3].tolist()  # the subset
        x, y = zip(*(test_set[i] for i in chosen))
        tokens, labels = media.to_tokens(torch.stack(x), LAYOUT), torch.tensor(y)
        direct = torch.cat(
            [layout_bpd(model, tokens[:2], labels[:2], LAYOUT), layout_bpd(model, tokens[2:], labels[2:], LAYOUT)]
        ).double()
    direct += math.log2(2) / 3072  # + log2(classes) / dims: a bound on the unconditional -log2 p(x) / dims
    assert mean == pytest.approx(direct.mean().item(), rel=1e-9)
    assert stderr == pytest.approx(direct.std().item() / math.sqrt(3), rel=1e-9)


def test_bad_flags_exit_2(capsys):
    for argv in (
        ["--steps", "0"],
        ["--lr", "-1"],
        ["--ema", "1"],
        ["--size", "huge"],
        ["--batch-size", "x"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--weight-decay", "nan"],
        ["--ema", "nan"],
        ["--minutes", "inf"],
    ):
        with pytest.raises(SystemExit) as e:
            train_image.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument"), (argv, err)
        if "nan" in argv or "inf" in argv:
            assert "is not a finite number" in err[0]


def one_line_exit(capsys, main, argv, message, code=2):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    return err


def test_bad_devices_and_unwritable_outputs_fail_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    nowhere = str(tmp_path / "missing_data")  # reading it would fail too, later: the early checks must come first
    common = ["--dataset", "mnist", "--data", nowhere, "--size", "tiny"]
    one_line_exit(capsys, train_image.main, [*common, "--out", str(tmp_path / "a_file" / "run")], "cannot write there")
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--out", str(tmp_path / "r"), "--device", "meta"],
        "--device 'meta': not a device adr runs on",
    )
    if not torch.backends.mps.is_available():
        one_line_exit(
            capsys,
            train_image.main,
            [*common, "--out", str(tmp_path / "r"), "--device", "mps"],
            "no Apple-silicon (MPS) GPU",
        )


def test_compile_without_a_cpp_compiler_fails_in_one_line_before_the_data(tmp_path, capsys, monkeypatch):
    def no_compiler():
        raise OSError("no g++ on the PATH")  # what torch's search reports, in its own exception type

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    assert not cli.cpp_compiler_found()
    common = ["--dataset", "mnist", "--data", str(tmp_path / "missing_data"), "--size", "tiny", "--device", "cpu"]
    one_line_exit(capsys, train_image.main, [*common, "--out", str(tmp_path / "r"), "--compile"],
                  "--compile on a CPU builds C++ code, and no C++ compiler (g++) was found here")


def test_a_short_run_warms_up_over_a_tenth_of_it(capsys):
    args = trainer.common_parser("test", "out").parse_args(["--size", "tiny", "--steps", "40"])
    assert args.warmup == 4 and "warming up over 4 steps" in capsys.readouterr().err
    args = trainer.common_parser("test", "out").parse_args(["--size", "tiny", "--steps", "400"])
    assert args.warmup == 100 and capsys.readouterr().err == ""


def test_mel_tokens_train_the_tiny_model_at_their_own_learning_rate():
    parser = trainer.common_parser("test", "out")
    parser.add_argument("--tokens", choices=["mel", "wave"], default="mel")  # as train_audio.py's
    assert parser.parse_args(["--size", "tiny"]).lr == trainer.TOKEN_DEFAULTS[("mel", "tiny")]["lr"] == 3e-3
    assert parser.parse_args(["--size", "tiny", "--tokens", "wave"]).lr == trainer.SIZE_DEFAULTS["tiny"]["lr"]
    assert parser.parse_args(["--size", "tiny", "--lr", "1e-3"]).lr == 1e-3  # a flag given wins
    assert parser.parse_args(["--size", "base"]).lr == trainer.SIZE_DEFAULTS["base"]["lr"]
    assert trainer.common_parser("test", "out").parse_args(["--size", "tiny"]).lr == 2e-3  # images: no --tokens
    assert "0.003 for tiny with mel tokens)" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("native", [True, False])
def test_mel_tokens_train_in_bf16_by_default_where_the_cpu_has_it(native, monkeypatch):
    monkeypatch.setattr(trainer, "native_bf16_cpu", lambda: native)
    parser = trainer.common_parser("test", "out")
    parser.add_argument("--tokens", choices=["mel", "wave"], default="mel")  # as train_audio.py's

    def precision(*argv):  # as setup() resolves it on the CPU
        args = parser.parse_args([*argv, "--device", "cpu"])
        trainer.setup(args)
        return args.precision

    assert precision("--size", "tiny") == ("bf16" if native else "fp32")
    assert precision("--size", "tiny", "--tokens", "wave") == precision("--size", "base") == "fp32"
    assert precision("--size", "tiny", "--precision", "fp32") == "fp32"  # a flag given wins
    assert precision("--size", "tiny", "--tokens", "wave", "--precision", "bf16") == "bf16"
    on_cuda = parser.parse_args(["--size", "tiny", "--tokens", "wave"])
    assert trainer.default_precision(on_cuda, torch.device("cuda")) == "bf16"
    images = trainer.common_parser("test", "out").parse_args(["--size", "tiny"])  # no --tokens
    assert trainer.default_precision(images, torch.device("cpu")) == "fp32"


def test_training_and_sampling_name_guidance_alike():
    """--cfg is the guidance of the sample files, the same flag as sample.py's and evaluate.py's; without it the
    sample files are drawn with their modality's guidance, as sample.py draws the checkpoint."""
    parser = trainer.common_parser("test", "out")
    assert parser.parse_args(["--cfg", "2"]).cfg == 2.0 and parser.parse_args([]).cfg is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--cfg-scale", "2"])
    conditional, unconditional = adr.ADRConfig(num_classes=10), adr.ADRConfig(num_classes=0)
    few_steps = adr.ADRConfig(num_classes=10, diffusion_steps=20)  # a model of fewer diffusion steps
    for kind, layout in (("image", media.image_layout()), ("mel", media.mel_layout()), ("wave", media.audio_layout())):
        options = trainer.sample_file_options(parser.parse_args([]), layout, conditional)
        assert {k: options[k] for k in ("cfg_scale", "cfg_ramp", "cfg_level")} == cli.GUIDANCE[kind]
        flags = ["--cfg", "2", "--no-cfg-ramp", "--cfg-level", "0.25"]
        options = trainer.sample_file_options(parser.parse_args(flags), layout, conditional)
        assert (options["cfg_scale"], options["cfg_ramp"], options["cfg_level"]) == (2.0, False, 0.25)
        assert trainer.sample_file_options(parser.parse_args([]), layout, unconditional)["cfg_scale"] == 1.0
        steps = cli.STEPS.get(kind, cli.SAMPLING["steps"])  # the steps sample.py takes for these tokens
        assert options["steps"] == steps and trainer.sample_file_options(
            parser.parse_args(["--sample-steps", "3"]), layout, conditional)["steps"] == 3
        assert trainer.sample_file_options(parser.parse_args([]), layout, few_steps)[
            "steps"] == min(steps, 20)
    assert cli.GUIDANCE["mel"]["cfg_level"] < 1 and cli.GUIDANCE["wave"]["cfg_level"] == 1  # waveform tokens as before


def test_adr_py_samples_with_the_scripts_chain_by_default():
    """Someone who copies adr.py alone gets the chain the scripts use."""
    for sample in (adr.ADR.sample, adr.DiffusionHead.sample):
        defaults = {k: p.default for k, p in inspect.signature(sample).parameters.items()}
        assert {k: defaults[k] for k in ("sampler", "steps", "temperature")} == {
            k: cli.SAMPLING[k] for k in ("sampler", "steps", "temperature")}


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real_loss = adr.DiffusionHead.loss

    def loss_that_turns_nan(self, x0, z):
        calls.append(1)
        value = real_loss(self, x0, z)
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr(adr.DiffusionHead, "loss", loss_that_turns_nan)
    os.remove(image_dir / "train" / "cat" / "broken.png")  # its warning would be a second line
    out = tmp_path / "run"
    argv = [
        "--image-folder",
        str(image_dir),
        "--out",
        str(out),
        *FAST,
        "--steps",
        "8",
        "--ckpt-every",
        "2",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--eval-bpd-every",
        "0",
    ]
    err = one_line_exit(capsys, train_image.main, argv, "the training loss is nan at step 5", code=1)
    assert "holds the last good one" in err
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_resume_names_what_differs_and_checks_before_reading_data(image_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = ["--image-folder", str(image_dir), "--out", str(out), *FAST, "--eval-bpd-every", "0"]
    train_image.main([*common, "--steps", "2", "--sample-every", "0"])
    capsys.readouterr()
    moved = ["--image-folder", str(tmp_path / "elsewhere"), "--out", str(out), *FAST]  # no data there: never read
    one_line_exit(capsys, train_image.main, [*moved, "--steps", "4", "--resume"], "it was trained on image-folder in")
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--steps", "4", "--resume", "--unconditional"],
        "it was trained with classes (--unconditional differs)",
    )
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--steps", "4", "--resume", "--order", "random"],
        "it was trained in raster order, and this run asks for --order random",
    )
    one_line_exit(
        capsys,
        train_audio.main,
        ["--audio-folder", str(image_dir), "--out", str(out), "--steps", "4", "--resume", *FAST],
        "it holds an image model, and this run trains an audio model",
    )
    train_image.main([*common, "--steps", "3", "--resume", "--lr", "0.5", "--batch-size", "3"])
    err = capsys.readouterr().err
    assert "going on with --lr 0.5 (the run used 0.002), --batch-size 3 (the run used 4)" in err
    # a default that changed since the run began (as mel tokens' learning rate did) goes on as the run had it
    monkeypatch.setitem(trainer.SIZE_DEFAULTS, "tiny", {**trainer.SIZE_DEFAULTS["tiny"], "lr": 7e-3})
    train_image.main([*common, "--steps", "4", "--resume", "--batch-size", "3"])
    assert "going on" not in capsys.readouterr().err
    assert cli.load_checkpoint(str(out / "ckpt.pt"))[1]["args"]["lr"] == 0.5


def start_training(image_dir, out, *flags):
    """train_image.py on image_dir as a child process on one thread, its output read as text. Ctrl-C reaches it as
    in a terminal even when the tests run in the background (whose shell has them ignore SIGINT, and Python then
    leaves it ignored)."""
    command = [sys.executable, "train_image.py", "--image-folder", str(image_dir), "--out", str(out), *FAST, *flags]
    return subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_while_the_data_loads_is_one_line(image_dir, tmp_path):
    """The loader blocks on a named pipe that looks like an image (as on a slow disk), Ctrl-C arrives."""
    fifo = image_dir / "train" / "cat" / "slow.png"
    os.mkfifo(fifo)
    proc = start_training(image_dir, tmp_path / "run", "--steps", "2")
    try:
        for line in proc.stdout:
            if line.startswith("reading images"):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        with open(fifo, "wb"):  # let the blocked reader go: it finds an empty file
            pass
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr


def test_sigint_leaves_a_loadable_checkpoint(image_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_training(image_dir, out, "--steps", "100000", "--eval-every", "0", "--sample-every", "0")
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stdout and "--resume" in stdout and "Traceback" not in stderr
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 2 and ckpt["optimizer"]["state"][0]["step"].item() == ckpt["step"]


def test_torchrun_two_processes(image_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_image.py",
        "--image-folder",
        str(image_dir),
        "--out",
        str(out),
        *FAST,
        "--steps",
        "3",
        "--bpd-examples",
        "2",
        "--sample-steps",
        "1",
    ]
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch 4 x 2 processes = 8 per step" in result.stdout
    assert result.stdout.count("step 3/3 |") == 1  # only rank 0 logs
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    written = [".lock", "ckpt.pt", "log.csv", "loss.png", "samples_000003.png"]
    assert ckpt["step"] == 3 and sorted(os.listdir(out)) == written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--audio-folder", "missing_dir"], "is not a folder"),
        (["--audio-folder", "{words}", "--words", "hello,nope"], "no nope in"),
        (["--audio-folder", "{empty}"], "no readable WAV files"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    write_constant(tmp_path / "words" / "hello" / "a.wav", 1)
    (tmp_path / "empty" / "hello").mkdir(parents=True)
    (tmp_path / "empty" / "hello" / "a.wav").write_bytes(b"junk")
    argv = [a.format(words=tmp_path / "words", empty=tmp_path / "empty") for a in argv]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_audio.py", "--out", str(tmp_path / "out")] + argv)
    with pytest.raises(SystemExit) as exit:
        train_audio.main()
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def make_word_folder(root, words=("go", "stop"), per_word=10):
    gen = torch.Generator().manual_seed(0)
    for w, word in enumerate(words):
        for i in range(per_word):
            tone = torch.sin(2 * math.pi * (300 + 200 * w) * torch.arange(16000) / 16000)
            noise = torch.randn(16000, generator=gen) * 0.05
            write_pcm(os.path.join(root, word, f"{i:03d}.wav"), ((0.3 * tone + noise) * 32767).round()[None])


def test_smoke_run_writes_checkpoint_wavs_and_figures(tmp_path, capsys):
    make_word_folder(tmp_path / "words")
    out = tmp_path / "out"
    flags = [
        "--size",
        "tiny",
        "--audio-folder",
        str(tmp_path / "words"),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--sample-steps",
        "2",
        "--eval-examples",
        "2",
        "--bpd-examples",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    train_audio.main(flags + ["--steps", "2"])
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["class_names"] == ["go", "stop"]
    assert ckpt["layout"] == media.mel_layout()  # the default tokens: log-mel frames, the layout in the checkpoint
    assert (model.config.seq_len, model.config.token_dim, model.config.num_classes) == (63, 80, 2)
    for word in ("go", "stop"):
        with wave.open(str(out / "samples" / "step_000002" / f"{word}.wav")) as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 16000, 16000)
    for name in ("spectrograms_000002.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test bits/dim" in capsys.readouterr().out  # the held-out 10th files were evaluated
    train_audio.main(flags + ["--steps", "3", "--resume"])
    assert cli.load_checkpoint(str(out / "ckpt.pt"))[1]["step"] == 3
    assert (out / "samples" / "step_000003" / "stop.wav").exists()


def test_wave_tokens_and_the_clip_length(tmp_path, capsys):
    """--tokens wave keeps the waveform chunks (the layout and shapes of before); --seconds sets the clip length."""
    make_word_folder(tmp_path / "words")
    flags = ["--size", "tiny", "--audio-folder", str(tmp_path / "words"), "--batch-size", "4", "--sample-steps", "1",
             "--eval-examples", "2", "--bpd-examples", "2", "--num-workers", "0", "--device", "cpu", "--steps", "1",
             "--warmup", "0"]
    train_audio.main(flags + ["--out", str(tmp_path / "wave"), "--tokens", "wave"])
    wave_model, ckpt = cli.load_checkpoint(str(tmp_path / "wave" / "ckpt.pt"))
    assert ckpt["layout"] == dict(kind="audio", tokens="wave", sample_rate=16000, length=16000, chunk=160, mu=255.0)
    assert (wave_model.config.seq_len, wave_model.config.token_dim) == (100, 160)
    train_audio.main(flags + ["--out", str(tmp_path / "half"), "--seconds", "0.5"])
    model, ckpt = cli.load_checkpoint(str(tmp_path / "half" / "ckpt.pt"))
    assert ckpt["layout"]["length"] == 8000 and (model.config.seq_len, model.config.token_dim) == (32, 80)
    assert (model.config.input_noise, wave_model.config.input_noise) == (trainer.LAYOUT_FIELDS["mel"]["input_noise"], 0)
    assert (model.config.head_reads_last, wave_model.config.head_reads_last) == (True, False)
    with wave.open(str(tmp_path / "half" / "samples" / "step_000001" / "go.wav")) as f:
        assert f.getnframes() == 8000
    capsys.readouterr()
    for extra, message in ((["--tokens", "wave", "--seconds", "0.505"], "multiple of 0.01 s"),
                           (["--seconds", "0.05"], "at least 0.1 s"),
                           (["--out", str(tmp_path / "wave"), "--resume", "--steps", "2"], "--tokens or --seconds")):
        with pytest.raises(SystemExit) as exit_info:
            train_audio.main(flags + ["--out", str(tmp_path / "odd"), *extra])
        out, err = capsys.readouterr()
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert "data:" not in out  # before any data was read
    # a mel run from before input_noise (no such field in its checkpoint) goes on with the model it was
    path = tmp_path / "half" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["input_noise"]
    torch.save(ckpt, path)
    with pytest.raises(SystemExit):
        train_audio.main(flags + ["--out", str(tmp_path / "half"), "--seconds", "0.5", "--resume", "--steps", "2"])
    assert "(input_noise=0.0)" in capsys.readouterr().err
    train_audio.main(flags + ["--out", str(tmp_path / "half"), "--seconds", "0.5", "--resume", "--steps", "2",
                              "--model", "input_noise=0"])
    assert cli.load_checkpoint(str(path))[1]["step"] == 2


def test_mel_tokens_are_computed_once_and_batched_as_the_clips_would_be():
    """The trainer turns a mel run's clips into tokens once; its batches hold the tokens of the clips that the
    waveform loader would have batched, in the same order. Waveform tokens stay computed step by step."""
    gen = torch.Generator().manual_seed(0)
    clips = data.Clips((torch.randn(11, 4000, generator=gen) * 3000).short(), [i % 3 for i in range(11)])
    args = SimpleNamespace(seed=5, num_workers=0, batch_size=4)
    for layout, loads_tokens in ((media.mel_layout(length=4000), True), (media.audio_layout(length=4000), False)):
        task = trainer.Task(clips, None, layout, ["a", "b", "c"], None, {})
        sampler, loader, as_tokens = trainer.data_loader(args, task, rank=0, world=1, cuda=False)
        assert as_tokens == loads_tokens and len(loader) == 2  # whole batches only
        order = list(sampler)
        for b, (x, y) in enumerate(loader):
            chosen = order[4 * b : 4 * b + 4]
            waves = torch.stack([clips[i][0] for i in chosen])
            assert torch.equal(y, clips.labels[chosen])
            if as_tokens:
                assert x.shape == (4, 16, 80) and torch.allclose(x, media.to_tokens(waves, layout), atol=1e-5)
            else:
                assert torch.equal(x, waves)


def test_unconditional_samples_are_numbered(tmp_path):
    torch.manual_seed(0)
    model = adr.ADR(adr.ADRConfig(token_dim=160, seq_len=100, num_classes=0, **adr.SIZES["tiny"])).eval()
    real = data.Clips(torch.full((3, 16000), 1000, dtype=torch.int16), [0, 1, 1])
    flags = dict(unconditional=True, sample_steps=2, cfg=3.0, sampler="ddpm", cfg_ramp=False, cfg_level=None)
    args = type("Args", (), flags)
    train_audio.sample_writer(args, media.audio_layout(), ["a", "b"], real)(model, str(tmp_path), 7)
    assert sorted(os.listdir(tmp_path / "samples" / "step_000007")) == ["sample_0.wav", "sample_1.wav"]
    assert (tmp_path / "spectrograms_000007.png").exists()


def test_a_time_budget_ends_the_run_and_schedules_the_learning_rate(image_dir, tmp_path, capsys):
    args = SimpleNamespace(steps=None, minutes=2.0, warmup=10, lr=1.0)
    assert trainer.run_progress(500, 60.0, args) == 0.5  # no step limit: the clock decides
    assert trainer.learning_rate(5, 0.0, args) == 0.6  # warm-up by steps
    assert trainer.learning_rate(50, 0.5, args) == pytest.approx(0.55)  # half-way down the cosine to 0.1
    args.steps = 110
    assert trainer.run_progress(60, 30.0, args) == 0.5 and trainer.run_progress(110, 0.0, args) == 1.0
    out = tmp_path / "run"
    train_image.main(["--image-folder", str(image_dir), "--out", str(out), *FAST, "--minutes", "0.03"])
    printed = capsys.readouterr().out
    assert "0.03 minutes at most" in printed and "done:" in printed
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 1 and ckpt["elapsed"] >= 1.8 and ckpt["source"]["name"] == "image-folder"


def test_model_fields_can_be_changed_from_the_command_line(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--image-folder", str(image_dir), *FAST, "--steps", "1", "--sample-steps", "1"]
    train_image.main([*common, "--out", str(out), "--model", "d_model=32", "diffusion_batch_mul=1", "clip_x0=false"])
    model, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert (model.config.d_model, model.config.diffusion_batch_mul, model.config.clip_x0) == (32, 1, False)
    assert ckpt["args"]["model"] == ["d_model=32", "diffusion_batch_mul=1", "clip_x0=False"]
    capsys.readouterr()
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--out", str(tmp_path / "a"), "--model", "seq_len=3"],
        "give FIELD=VALUE, FIELD one of d_model",
    )
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--out", str(tmp_path / "b"), "--model", "d_model=30"],
        "must split into n_head 2 heads of an even width",
    )
    one_line_exit(
        capsys,
        train_image.main,
        [*common[:-1], "9", "--out", str(tmp_path / "c"), "--model", "diffusion_steps=8"],
        "--sample-steps 9: must be at most the model's 8 diffusion steps",
    )
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--out", str(out), "--resume", "--steps", "2"],
        "its model is --size tiny d_model=32 diffusion_batch_mul=1 clip_x0=False (d_model=32, clip_x0=False), "
        "and this run asks for --size tiny (d_model=64, clip_x0=True: --model d_model=32 clip_x0=False goes on with",
    )


def test_patch_size_sets_the_tokens(tmp_path, capsys):
    write_mnist(tmp_path / "data", per_class_train=2, per_class_test=1)
    common = ["--dataset", "mnist", "--data", str(tmp_path / "data"), *FAST, "--steps", "1", "--sample-steps", "1"]
    train_image.main([*common, "--out", str(tmp_path / "run"), "--patch", "7"])
    model, ckpt = cli.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["layout"]["patch"] == 7 and (model.config.seq_len, model.config.token_dim) == (16, 49)
    one_line_exit(
        capsys,
        train_image.main,
        [*common, "--out", str(tmp_path / "bad"), "--patch", "5"],
        "--patch 5 does not divide the 28x28 images",
    )


# ----------------------------------------------------------------------------------------------
# What clusters and shared disks do to long runs


def test_sigterm_to_the_whole_job_with_loader_workers_saves_a_checkpoint(image_dir, tmp_path):
    """Slurm, systemd and preemption signal the whole process group: the loader's workers as well as the loop."""
    out = tmp_path / "run"
    command = [sys.executable, "train_image.py", "--image-folder", str(image_dir), "--out", str(out), *FAST,
               "--num-workers", "2", "--steps", "100000", "--eval-every", "0", "--sample-every", "0"]
    proc = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint saved" in stdout and "Traceback" not in stderr, stderr
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 3


def test_a_second_training_into_the_same_folder_is_refused_naming_the_first(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_training(image_dir, out, "--steps", "100000", "--eval-every", "0", "--sample-every", "0")
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        err = one_line_exit(capsys, train_image.main, ["--image-folder", str(image_dir), "--out", str(out), *FAST],
                            "another training")
        assert f"process {first.pid}" in err
    finally:
        first.kill()
        first.communicate()
    trainer.RUN_FOLDERS_HELD.clear()


def test_a_checkpoint_path_that_is_a_folder_gets_one_message(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "ckpt.pt").mkdir(parents=True)
    for resume in ([], ["--resume"]):
        argv = ["--image-folder", str(image_dir), "--out", str(out), *FAST, *resume]
        err = one_line_exit(capsys, train_image.main, argv, "is not a file")
        assert "--resume" not in err


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(image_dir, tmp_path, monkeypatch, capsys):
    """The disk fills up while the second checkpoint is written (torch.save raises a RuntimeError over the file
    object's OSError, as it does on a full disk): one line, the first checkpoint intact, no temporary file left."""
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    os.remove(image_dir / "train" / "cat" / "broken.png")  # its warning would be a second line
    out = tmp_path / "run"
    argv = ["--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "4", "--ckpt-every", "2",
            "--eval-every", "0", "--sample-every", "0", "--eval-bpd-every", "0"]
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: train_image.main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "disk" in err and "full" in err and "intact" in err and "Traceback" not in err
    monkeypatch.undo()
    _, ckpt = cli.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2
    assert not [name for name in os.listdir(out) if "tmp" in name]
