"""
What the scripts share that is not training: one-line errors and exit codes, argument types, the device check,
the sampling flags and defaults, checkpoints (saving, and loading without running code), writable outputs,
held-out bits/dim, and the clocks that time sampling. sample.py, evaluate.py and bench.py need only this file
(besides adr.py, media.py and data.py); trainer.py builds the training loop on it.
"""

import argparse
import math
import os
import pickletools
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from typing import NoReturn

import torch

from adr import ADR, SAMPLERS, ADRConfig, bits_per_dim
from media import GRIFFIN_LIM_ITERS, OutputError, atomic_output, mel_levels, quantisation_bins, to_tokens

# ----------------------------------------------------------------------------------------------
# Command-line helpers: messages, one-line errors, number types, the device


def log(*parts):
    """Print on the first process only (all processes run the same code under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*parts, flush=True)


def warn(message):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def run(main):
    """A script's entry point: Ctrl-C before the training loop takes it over (while data loads, say) ends the
    script with one line and exit code 130, and a file that cannot be written with one line and exit code 1, not a
    traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except OutputError as e:  # a full disk, say: what was written before is intact, nothing half-written is left
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr that says what to do, exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2."""

    def error(self, message):
        fail(f"{message} (see --help)")


def number(kind, low, low_ok=True, high=None):
    """An argparse type: a number of `kind` that is >= low (or > low when not low_ok), and <= high if given."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text} must be {'at least' if low_ok else 'more than'} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high}")
        return value

    return parse


def pick_device(name, compiling=False):
    """--device as a torch.device that this PyTorch can run on (cpu, cuda, cuda:N, mps where there is one), or
    one line that names the device as the problem; compiling: --compile, which on a CPU needs a C++ compiler."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name!r}: not a device adr runs on; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: PyTorch finds no CUDA GPU here; use --device cpu (and --size tiny to train)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: this PyTorch has no Apple-silicon (MPS) GPU to use here; use --device cpu")
    if compiling and device.type == "cpu" and not cpp_compiler_found():
        fail("--compile on a CPU builds C++ code, and no C++ compiler (g++) was found here: install one, or leave "
             "out --compile")
    return device


def cpp_compiler_found():
    """Whether torch.compile's CPU backend finds its C++ compiler (asked through its own search where this PyTorch
    has it, else g++ on the PATH), so that --compile fails in one line before the work, not deep inside torch."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return shutil.which("g++") is not None
    try:
        return bool(get_cpp_compiler())
    except Exception:  # torch's InvalidCxxCompiler, raised when its search finds none
        return False


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_HELP = "cuda, cuda:N, mps or cpu"


def format_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# Sampling flags

# The head's reverse chain, one for every model: 30 steps of SDE-DPM-Solver++(2M), chosen with evaluate.py (RESULTS.md,
# "The head's reverse chain"): on MNIST as accurate as 100 DDPM steps, on CIFAR-10 and speech nearer the data.
SAMPLING = dict(sampler="dpm++sde", steps=30, temperature=1.0)
# Log-mel words take 50 steps: nearer the data than 30 (RESULTS.md, "Speech"), for twice the sampling time.
STEPS = {"mel": 50}
# Classifier-free guidance by token type, chosen with evaluate.py: images 3.5 ramped from 1 as in MAR (RESULTS.md,
# "Guidance and temperature", on MNIST); log-mel words flat (3 flat is recognised 12 points more often than 3.5
# ramped), 2.5 for the tiny model's 15 minutes at its learning rate (3 and 2.25 lie further from the data), each
# frame's level (the mean over its bands) pushed half as far (cfg_level 0.5: 1 + (2.5 - 1) / 2), as full guidance
# of the level makes the frames louder than real speech (RESULTS.md, "Speech"); waveform tokens 3 flat, as mel
# tokens were before. A checkpoint keeps the guidance and steps of its tokens (its "sampling" entry), so
# sample.py and evaluate.py use them without flags.
GUIDANCE = {"image": dict(cfg_scale=3.5, cfg_ramp=True, cfg_level=1.0),
            "mel": dict(cfg_scale=2.5, cfg_ramp=False, cfg_level=0.5),
            "wave": dict(cfg_scale=3.0, cfg_ramp=False, cfg_level=1.0)}


def guidance(layout):
    """The default guidance of a token layout ("image" layouts name no tokens)."""
    return dict(GUIDANCE[layout.get("tokens", layout["kind"])])


def default_steps(layout):
    """The default reverse steps per token of a token layout."""
    return STEPS.get(layout.get("tokens", layout["kind"]), SAMPLING["steps"])


def guidance_text(options):
    """The guidance of sampling options in words: "cfg 3.5 ramped", "cfg 2.5, level 0.5"."""
    level = options["cfg_level"] if options["cfg_scale"] != 1 else 1.0
    text = f"cfg {options['cfg_scale']:g}{' ramped' * options['cfg_ramp']}"
    return text + (f", level {level:g}" if level != 1 else "")


def add_sampling_flags(p):
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLING["sampler"], help="the reverse chain: ddpm "
                   "(ancestral), ddim (deterministic with --eta 0), dpm++ (DPM-Solver++(2M), deterministic) or "
                   f"dpm++sde (its SDE form, fresh noise at every step) (default: {SAMPLING['sampler']})")
    p.add_argument("--eta", type=number(float, 0, high=1), default=0.0,
                   help="with --sampler ddim: the share of DDPM's noise, 0 to 1 (default: 0)")
    steps = "".join(f"{n} for {kind} tokens, " for kind, n in STEPS.items())
    p.add_argument("--steps", type=number(int, 1), default=None, help="reverse diffusion steps (denoiser calls) per "
                   f"token (default: the checkpoint's: {steps}{SAMPLING['steps']} for the others)")
    p.add_argument("--temperature", type=number(float, 0), default=SAMPLING["temperature"],
                   help=f"scale of the noise added at each reverse step (default: {SAMPLING['temperature']:g})")
    scales = ", ".join(f"{w['cfg_scale']:g}{' ramped' * w['cfg_ramp']} for {kind}" for kind, w in GUIDANCE.items())
    p.add_argument("--cfg", type=number(float, 0), default=None, help="classifier-free guidance scale, 1 = none "
                   f"(default: the checkpoint's, {scales} tokens; 1 for an unconditional model)")
    p.add_argument("--cfg-ramp", action=argparse.BooleanOptionalAction, default=None,
                   help="let guidance grow from 1 at the first token to --cfg at the last, as MAR does (default: the "
                   "checkpoint's)")
    shares = ", ".join(f"{w['cfg_level']:g} for {kind}" for kind, w in GUIDANCE.items())
    p.add_argument("--cfg-level", type=number(float, 0, high=1), default=None, help="the share of the guidance that "
                   "each token's level (the mean of its values: a mel frame's loudness) gets, 0 to 1; 1: as the rest "
                   f"(default: the checkpoint's, {shares} tokens)")
    p.add_argument("--tokens-per-step", type=number(int, 1), default=1, help="tokens generated per backbone step, "
                   "asked for from the same state (needs a model trained with --order random; default: 1)")
    p.add_argument("--order", choices=["raster", "random"], default=None,
                   help="the order of the tokens to generate (default: the order the model was trained in)")
    p.add_argument("--griffin-lim-iters", type=number(int, 1), default=None, help="iterations of the Griffin-Lim "
                   f"vocoder that makes a mel-token model's samples audible (default: {GRIFFIN_LIM_ITERS})")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default: 0)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default: yes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the diffusion head's denoiser (CUDA graphs "
                   "on a GPU, where its small steps wait on kernel launches; on a CPU it needs a C++ compiler and "
                   "gains little, the head's matrix products being the cost)")


def vocoder_iterations(args, layout):
    """--griffin-lim-iters, for a model of mel tokens (the only ones that need a vocoder)."""
    if args.griffin_lim_iters is not None and layout.get("tokens") != "mel":
        fail(f"--griffin-lim-iters {args.griffin_lim_iters}: only a model of mel tokens needs a vocoder, and this one "
             f"makes {'images' if layout['kind'] == 'image' else 'waveform tokens'}")
    return args.griffin_lim_iters or GRIFFIN_LIM_ITERS


def sampling_options(args, config, defaults):
    """The keyword arguments of model.sample from the sampling flags, checked against the model; guidance not given
    and steps not given by a flag come from `defaults` (the checkpoint's "sampling" entry; steps at most the model's
    diffusion steps)."""
    if args.steps is not None and not 1 <= args.steps <= config.diffusion_steps:
        fail(f"--steps {args.steps}: must be between 1 and the model's {config.diffusion_steps} diffusion steps")
    if config.num_classes == 0 and args.cfg not in (None, 1.0):
        fail(f"--cfg {args.cfg:g}: guidance needs a class-conditional checkpoint and this one has no classes; "
             f"leave --cfg at 1")
    if config.num_classes == 0 and args.cfg_level is not None:
        fail(f"--cfg-level {args.cfg_level:g}: guidance needs a class-conditional checkpoint and this one has no "
             f"classes; leave it out")
    if args.eta and args.sampler != "ddim":
        fail(f"--eta {args.eta:g}: only --sampler ddim takes it")
    if config.order == "raster" and (args.tokens_per_step > 1 or args.order == "random"):
        flag = f"--tokens-per-step {args.tokens_per_step}" if args.tokens_per_step > 1 else "--order random"
        fail(f"{flag}: this model was trained in raster order and generates one token at a time, in raster order; "
             f"train with --order random for this")
    steps = min(defaults["steps"], config.diffusion_steps) if args.steps is None else args.steps
    return dict(sampler=args.sampler, eta=args.eta, steps=steps, temperature=args.temperature,
                **guidance_options(args, defaults, config.num_classes > 0), tokens_per_step=args.tokens_per_step,
                order=args.order)


def guidance_options(args, defaults, conditional):
    """cfg_scale, cfg_ramp and cfg_level from --cfg, --cfg-ramp and --cfg-level, those not given from `defaults`;
    no guidance without classes."""
    given = dict(cfg_scale=args.cfg, cfg_ramp=args.cfg_ramp, cfg_level=args.cfg_level)
    options = {name: defaults[name] if value is None else value for name, value in given.items()}
    return options if conditional else options | dict(cfg_scale=1.0)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file with the config, weights, EMA weights, layout and class names.

CHECKPOINT_FORMAT = "adr-checkpoint-v3"  # v3: the class joins every backbone input (ADR.class_emb)
EARLIER_FORMATS = {  # what changed since each, in a few words
    "adr-checkpoint-v1": "whose diffusion head weights are named differently",
    "adr-checkpoint-v2": "whose model took the class only as its start token",
}


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, model, layout, class_names=None, ema=None, **extra):
    """Write atomically (media.atomic_output): an interrupted or failed save never leaves a broken file.
    `extra` holds plain values or tensors (optimizer state, step, ...)."""
    state = dict(format=CHECKPOINT_FORMAT, config=asdict(model.config), model=model.state_dict(), layout=layout,
                 class_names=list(class_names or []),
                 sampling=guidance(layout) | dict(steps=default_steps(layout)), **extra)
    if ema is not None:
        state["ema"] = ema.state_dict()
    with atomic_output(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises the OSError itself
        torch.save(state, f)


def foreign_global(path):
    """The first function or class outside torch that the pickle in a torch file (zip or legacy) names, as
    "module.name", or None: naming one is how a pickle runs code when it is loaded. Read, never run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read()
        strings = []
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and opcode.name.endswith("UNICODE"):
                strings.append(arg)
            name = arg.replace(" ", ".") if opcode.name in ("GLOBAL", "INST") else None
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = ".".join(strings[-2:])  # the module and the name, the last two strings pushed
            if name and name.split(".")[0] not in ("torch", "collections", "_codecs"):
                return name
    except Exception:
        return None
    return None


def load_checkpoint(path, device="cpu", use_ema=True):
    """Returns (model in eval mode, checkpoint dict). Loads with weights_only=True, so a file that would
    run code when unpickled is refused; anything that is not an adr checkpoint raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass the ckpt.pt written by train_image.py or train_audio.py")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it did not write
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except Exception:
        culprit = foreign_global(path)
        why = (f"unpickling it would call {culprit}, refused for safety" if culprit
               else "it could not be read as a torch file")
        raise CheckpointError(f"{path} is not an adr checkpoint: {why}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") in EARLIER_FORMATS:
        raise CheckpointError(f"{path} was written by an earlier adr ({ckpt['format']}), "
                              f"{EARLIER_FORMATS[ckpt['format']]}; train it again with this version")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an adr checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    try:
        model = ADR(ADRConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        first_line = str(e).splitlines()[0]
        raise CheckpointError(f"{path} does not match this adr.py (config or weights differ: {first_line})") from None
    ckpt["config"] = asdict(model.config)  # fields added since it was written: their defaults, as the model has them
    # sampling options it predates: guidance from before cfg_level as it was then, steps today's default for its tokens
    ckpt["sampling"] = dict(cfg_level=1.0, steps=default_steps(ckpt["layout"])) | ckpt["sampling"]
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# Output files and folders


def check_writable(folder, flag):
    """Create the folder if needed and write a file there, or say in one line why that cannot be done."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        fail(f"{flag} {folder}: cannot write there ({e.strerror or e})")


def check_writable_file(path, flag):
    """The folder of a file to write exists and takes files, or one line says why not."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: its folder does not exist; create it or pick another path")
    check_writable(folder, flag)


# ----------------------------------------------------------------------------------------------
# Held-out bits/dim: the same random subset of the test set at every use, with fixed noise


@contextmanager
def fixed_seed(device, seed=0):
    """The same random draws inside the block at every use (so evaluations and sample grids compare
    across steps), without disturbing the training run's random stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def held_out_batches(test_set, layout, conditional, count, batch_size, device):
    """(tokens, labels or None) for `count` test examples, in batches: the same random subset every time
    (test sets are often stored class by class, so the first `count` could all be one class)."""
    chosen = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:count].tolist()
    for start in range(0, len(chosen), batch_size):
        x, y = zip(*(test_set[i] for i in chosen[start : start + batch_size]))
        labels = torch.tensor(y, device=device) if conditional else None
        yield to_tokens(torch.stack(x).to(device), layout), labels


def held_out_bpd(model, test_set, layout, num_classes, count, batch_size, device, order="raster"):
    """Bits per dimension on `count` test examples: (mean, standard error). A class-conditional model is
    scored with the true labels plus log2(classes)/dims: p(x) >= p(c) p(x|c) with p(c) uniform, so the
    result bounds the unconditional -log2 p(x) / dims as well. order: the chain rule in raster order, or in
    a random order per example (each is a bound; their average over orders is the any-order model's)."""
    values = []
    with fixed_seed(device):
        for tokens, labels in held_out_batches(test_set, layout, num_classes > 0, count, batch_size, device):
            permutation = torch.rand(tokens.shape[:2], device=device).argsort(1) if order == "random" else None
            tokens = mel_levels(tokens, layout)  # mel values: counted at 256 levels, as their bins are
            bpd = bits_per_dim(model, tokens, labels, *quantisation_bins(tokens, layout), order=permutation).cpu()
            values.append(bpd + (math.log2(num_classes) / tokens[0].numel() if labels is not None else 0.0))
    values = torch.cat(values).double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), stderr


# ----------------------------------------------------------------------------------------------
# Timing sampling: the backbone (model.backbone) and the diffusion head (model.head.sample, the whole
# reverse chain of a token), the same way in sample.py and bench.py


class Stopwatch:
    """Adds up the time spent inside the functions it wraps. On a GPU it waits for the queued work at
    both ends of each call, so the time is the GPU's, not only the time to queue the kernels."""

    def __init__(self, device):
        self.device, self.seconds = device, 0.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            return result

        return timed


def compile_head(model, backend="inductor"):
    """torch.compile the denoiser, the network every step of the reverse chain calls with the same shapes. On a
    GPU with mode "reduce-overhead" its calls replay as CUDA graphs: at these sizes a step is launch-bound."""
    mode = "reduce-overhead" if model.pos_emb.device.type == "cuda" and backend == "inductor" else None
    model.head.net = torch.compile(model.head.net, backend=backend, mode=mode, dynamic=False)
    return model


def timed_sample(model, n, labels=None, **options):
    """model.sample(n, labels, **options) with clocks on the whole call, on the RetNet (model.backbone)
    and on the diffusion head's reverse chains (model.head.sample). Returns (tokens, seconds: total,
    backbone, head)."""
    clocks = {name: Stopwatch(model.pos_emb.device) for name in ("total", "backbone", "head")}
    model.backbone = clocks["backbone"].wrap(model.backbone)
    model.head.sample = clocks["head"].wrap(model.head.sample)
    try:
        tokens = clocks["total"].wrap(model.sample)(n, labels, **options)
    finally:  # unwrap: the instance attributes go, the methods show through again
        del model.backbone, model.head.sample
    return tokens, {name: clock.seconds for name, clock in clocks.items()}
