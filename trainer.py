"""
What the scripts share: command-line helpers (one-line errors, number types, the device check), the
training scripts' common flags, the training loop (written once for images and audio), EMA, held-out
loss and bits/dim, log.csv and loss.png, checkpoints, and the clocks that time sampling.

A training script builds a Task (its data and how to draw its samples) and calls train(args, task).
"""

import argparse
import copy
import dataclasses
import csv
import math
import os
import pickletools
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from adr import ADR, SAMPLERS, SIZES, ADRConfig, bits_per_dim
from media import layout_shape, quantisation_bins, to_tokens

# ----------------------------------------------------------------------------------------------
# Command-line helpers


def log(*parts):
    """Print on the first process only (all processes run the same code under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*parts, flush=True)


def warn(message):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def run(main):
    """A script's entry point: Ctrl-C before the training loop takes it over (while data loads, say) ends the
    script with one line and exit code 130, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        sys.exit(130)


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


def model_setting(text):
    """An argparse type: FIELD=VALUE for a field of ADRConfig that the data does not set; VALUE of its type."""
    fields = {f.name: f.type for f in dataclasses.fields(ADRConfig) if f.name not in DATA_FIELDS}
    name, _, value = text.partition("=")
    if name not in fields or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: give FIELD=VALUE, FIELD one of {', '.join(fields)}")
    if fields[name] is bool:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{text}: {name} is true or false")
        return name, value.lower() == "true"
    return name, number(int, 1)(value) if fields[name] is int else number(float, 0, high=1)(value)


DATA_FIELDS = ("token_dim", "seq_len", "num_classes", "order")  # set by the data and by --order


def model_fields(args):
    """The ADRConfig fields of --size, with --model's changes."""
    return {**SIZES[args.size], **dict(args.model)}


def ema_decay(text):
    value = number(float, 0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


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
# The training scripts' flags. Those whose default depends on --size: "base" is sized for about 15
# minutes on one H100-class GPU (from a FLOP count, about 65 GFLOP per image for forward and backward),
# "tiny" for minutes on a CPU.

SIZE_DEFAULTS = {
    "base": dict(steps=8000, batch_size=256, lr=4e-4, warmup=500, eval_every=500, sample_every=1000, ckpt_every=1000,
                 eval_bpd_every=2000, eval_examples=1000, bpd_examples=1000),
    "tiny": dict(steps=1000, batch_size=64, lr=2e-3, warmup=100, eval_every=100, sample_every=1000, ckpt_every=500,
                 eval_bpd_every=1000, eval_examples=256, bpd_examples=256),
}


class Parser(OneLineErrors):
    """The training scripts' parser: the defaults of SIZE_DEFAULTS filled in for the chosen --size (with a time
    budget, --minutes, and no --steps, the run has no step limit)."""

    def parse_args(self, args=None, namespace=None):
        args = super().parse_args(args, namespace)
        for name, value in SIZE_DEFAULTS[args.size].items():
            if getattr(args, name, None) is None:
                setattr(args, name, None if name == "steps" and args.minutes is not None else value)
        if args.steps is not None and args.warmup >= args.steps:
            warmup = args.steps // 10
            instead = f"warming up over {warmup} steps (a tenth of the run)" if warmup else "no warm-up"
            warn(f"--warmup {args.warmup} is not shorter than the run's {args.steps} steps, so the learning rate would "
                 f"never reach --lr {args.lr:g}: {instead} instead")
            args.warmup = warmup
        return args


# The sampling settings, in one place for sample.py, evaluate.py and the training scripts' sample files: chosen with
# evaluate.py (README, "Sampling settings" and "The head's reverse chain"): guidance 3.5 ramped from 1 as in
# MAR; 30 steps of SDE-DPM-Solver++(2M): on MNIST as accurate as 100 DDPM steps (9% further from the data), on
# CIFAR-10 and speech 14-16% nearer the data than them.
SAMPLING = dict(sampler="dpm++sde", steps=30, temperature=1.0, cfg_scale=3.5, cfg_ramp=True)


def add_sampling_flags(p):
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLING["sampler"], help="the reverse chain: ddpm "
                   "(ancestral), ddim (deterministic with --eta 0), dpm++ (DPM-Solver++(2M), deterministic) or "
                   f"dpm++sde (its SDE form, fresh noise at every step) (default: {SAMPLING['sampler']})")
    p.add_argument("--eta", type=number(float, 0, high=1), default=0.0,
                   help="with --sampler ddim: the share of DDPM's noise, 0 to 1 (default: 0)")
    p.add_argument("--steps", type=number(int, 1), default=SAMPLING["steps"],
                   help=f"reverse diffusion steps (denoiser calls) per token (default: {SAMPLING['steps']})")
    p.add_argument("--temperature", type=number(float, 0), default=SAMPLING["temperature"],
                   help=f"scale of the noise added at each reverse step (default: {SAMPLING['temperature']:g})")
    p.add_argument("--cfg", type=number(float, 0), default=None, help=f"classifier-free guidance scale, 1 = none "
                   f"(default: {SAMPLING['cfg_scale']:g} for a class-conditional model, 1 otherwise)")
    p.add_argument("--cfg-ramp", action=argparse.BooleanOptionalAction, default=SAMPLING["cfg_ramp"],
                   help="let guidance grow from 1 at the first token to --cfg at the last, as MAR does")
    p.add_argument("--tokens-per-step", type=number(int, 1), default=1, help="tokens generated per backbone step, "
                   "asked for from the same state (needs a model trained with --order random; default: 1)")
    p.add_argument("--order", choices=["raster", "random"], default=None,
                   help="the order of the tokens to generate (default: the order the model was trained in)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default: 0)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default: yes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the diffusion head's denoiser (CUDA graphs "
                   "on a GPU, where its small steps wait on kernel launches; on a CPU it needs a C++ compiler and "
                   "gains little, the head's matrix products being the cost)")


def sampling_options(args, config):
    """The keyword arguments of model.sample from the sampling flags, checked against the model."""
    if not 1 <= args.steps <= config.diffusion_steps:
        fail(f"--steps {args.steps}: must be between 1 and the model's {config.diffusion_steps} diffusion steps")
    if config.num_classes == 0 and args.cfg not in (None, 1.0):
        fail(f"--cfg {args.cfg:g}: guidance needs a class-conditional checkpoint and this one has no classes; "
             f"leave --cfg at 1")
    if args.eta and args.sampler != "ddim":
        fail(f"--eta {args.eta:g}: only --sampler ddim takes it")
    if config.order == "raster" and (args.tokens_per_step > 1 or args.order == "random"):
        flag = f"--tokens-per-step {args.tokens_per_step}" if args.tokens_per_step > 1 else "--order random"
        fail(f"{flag}: this model was trained in raster order and generates one token at a time, in raster order; "
             f"train with --order random for this")
    cfg_scale = args.cfg if args.cfg is not None else (SAMPLING["cfg_scale"] if config.num_classes else 1.0)
    return dict(sampler=args.sampler, eta=args.eta, steps=args.steps, temperature=args.temperature, cfg_scale=cfg_scale,
                cfg_ramp=args.cfg_ramp, tokens_per_step=args.tokens_per_step, order=args.order)


def common_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def per_size(name, kind, low, help, low_ok=True):
        base, tiny = SIZE_DEFAULTS["base"][name], SIZE_DEFAULTS["tiny"][name]
        p.add_argument(f"--{name.replace('_', '-')}", type=number(kind, low, low_ok), default=argparse.SUPPRESS,
                       help=f"{help} (default: {base} for base, {tiny} for tiny)")

    p.add_argument("--size", choices=sorted(SIZES), default="base", help="model size: base for a GPU, tiny for a CPU")
    p.add_argument("--model", nargs="+", type=model_setting, default=[], metavar="FIELD=VALUE",
                   help="change fields of the model's ADRConfig on top of --size, e.g. --model d_model=128 n_layer=4")
    per_size("steps", int, 1, "optimizer steps in all")
    p.add_argument("--minutes", type=number(float, 0, low_ok=False), default=None,
                   help="a time budget: stop after this many minutes of training (with --steps, at the first of the "
                   "two); the learning rate decays over the budget")
    per_size("batch_size", int, 1, "examples per step and process (the effective batch is this times the processes)")
    per_size("lr", float, 0, "peak learning rate, after warm-up; cosine decay to a tenth of it", low_ok=False)
    per_size("warmup", int, 0, "steps of linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.02, help="AdamW weight decay of the matrices")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--ema", type=ema_decay, default=0.999, help="decay of the weights' moving average, used for "
                   "samples and evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same run")
    p.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps; on a CPU "
                   "it needs a C++ compiler)")
    p.add_argument("--out", default=default_out, help="folder for the checkpoint, samples, log.csv and loss.png")
    p.add_argument("--resume", action="store_true", help="continue from ckpt.pt in --out")
    p.add_argument("--data", default="./data", help="folder the dataset is downloaded to")
    p.add_argument("--unconditional", action="store_true", help="ignore the class labels")
    p.add_argument("--order", choices=["raster", "random"], default="raster", help="the order the model reads tokens "
                   "in: raster, or a random order per example (any-order: fills in any region, several tokens a step)")
    p.add_argument("--log-every", type=number(float, 0), default=10.0, help="seconds between progress lines")
    per_size("eval_every", int, 0, "steps between held-out loss measurements (0: at the end only)")
    per_size("sample_every", int, 0, "steps between sample files (0: at the end only)")
    per_size("ckpt_every", int, 0, "steps between checkpoints (0: at the end only)")
    per_size("eval_examples", int, 1, "test examples for the held-out loss")
    per_size("eval_bpd_every", int, 0, "steps between bits/dim measurements on the test split (0: at the end only)")
    per_size("bpd_examples", int, 1, "test examples for bits/dim")
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLING["sampler"],
                   help="the reverse chain of the sample files")
    p.add_argument("--sample-steps", type=number(int, 1, high=ADRConfig.diffusion_steps), default=SAMPLING["steps"],
                   help="reverse diffusion steps per token for the sample files")
    p.add_argument("--cfg", type=number(float, 0), default=SAMPLING["cfg_scale"],
                   help="classifier-free guidance scale for the sample files, as sample.py's --cfg (1: none)")
    p.add_argument("--cfg-ramp", action=argparse.BooleanOptionalAction, default=SAMPLING["cfg_ramp"],
                   help="let the sample files' guidance grow from 1 to --cfg over the tokens")
    p.add_argument("--num-workers", type=number(int, 0), default=None, help="data loader processes (default: none "
                   "on a CPU, where the data in memory is read faster than extra processes cost; else up to 4)")
    return p


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file with the config, weights, EMA weights, layout and class names.

CHECKPOINT_FORMAT = "adr-checkpoint-v2"  # v2: the diffusion head is a DiffusionHead (weights under head.net)


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, model, layout, class_names=None, ema=None, **extra):
    """Write atomically (temporary file, then rename): an interrupted save never leaves a broken file.
    `extra` holds plain values or tensors (optimizer state, step, ...)."""
    state = dict(format=CHECKPOINT_FORMAT, config=asdict(model.config), model=model.state_dict(), layout=layout,
                 class_names=list(class_names or []), **extra)
    if ema is not None:
        state["ema"] = ema.state_dict()
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    if isinstance(ckpt, dict) and ckpt.get("format") == "adr-checkpoint-v1":
        raise CheckpointError(f"{path} was written by an earlier adr (adr-checkpoint-v1), whose diffusion head "
                              f"weights are named differently; train it again with this version")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an adr checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    try:
        model = ADR(ADRConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        first_line = str(e).splitlines()[0]
        raise CheckpointError(f"{path} does not match this adr.py (config or weights differ: {first_line})") from None
    return model.eval(), ckpt


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


# ----------------------------------------------------------------------------------------------
# The training loop, written once for images and audio


@dataclass
class Task:
    """What a training script hands to train(): the data and how to show samples."""

    train_set: torch.utils.data.Dataset  # items (x, label): image (C, H, W) or waveform (N,), values in [-1, 1]
    test_set: torch.utils.data.Dataset | None
    layout: dict  # media.image_layout(...) or media.audio_layout(...)
    class_names: list[str]  # [] when unconditional
    save_samples: Callable[[ADR, str, int], None]  # (model in eval mode, out_dir, step) -> writes sample files
    source: dict  # where the data came from (data.load_dataset reads it again), stored in the checkpoint


def setup(args):
    """Start the process group under torchrun (NCCL on GPU, gloo on CPU) and pick this process's device.
    Returns (rank, world_size, device); calling it again returns the same."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device, args.compile)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # a long timeout: the other processes wait while rank 0 downloads and decodes the dataset
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def rank_zero_first(args, load):
    """Call load() on rank 0 first (it may download), then on the other processes, which find the files."""
    rank, world, _ = setup(args)
    if rank > 0:
        dist.barrier()
    result = load()
    if rank == 0 and world > 1:
        dist.barrier()
    return result


def run_progress(step, seconds, args):
    """How much of the run is done, from 0 to 1: the fraction of --steps after the warm-up, or of --minutes,
    whichever is further (a run ends at the first of the two limits it reaches)."""
    done = 0.0
    if args.steps is not None:
        done = max(done, (step - args.warmup) / max(1, args.steps - args.warmup) if step < args.steps else 1.0)
    if args.minutes is not None:
        done = max(done, seconds / (60 * args.minutes))
    return min(1.0, done)


def learning_rate(step, progress, args):
    """Linear warm-up over --warmup steps to --lr, then cosine decay to a tenth of it at the end of the run."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def eta(step, seconds, seconds_per_step, args):
    """Seconds left: to the last step, or to the end of the time budget, whichever comes first."""
    left = [(args.steps - step) * seconds_per_step] if args.steps is not None else []
    left += [60 * args.minutes - seconds] if args.minutes is not None else []
    return max(0.0, min(left))


def fail_run(message: str) -> NoReturn:
    """A run that cannot go on (not bad input): one line on stderr, exit code 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


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


@torch.no_grad()
def held_out_loss(model, task, args, device, autocast):
    """The training loss of `model` on --eval-examples test examples, with fixed noise."""
    total, n = 0.0, 0
    conditional = bool(task.class_names)
    with fixed_seed(device):
        for tokens, labels in held_out_batches(task.test_set, task.layout, conditional, args.eval_examples,
                                               args.batch_size, device):
            with autocast:
                loss = model(tokens, labels)
            total, n = total + loss.item() * len(tokens), n + len(tokens)
    return total / n


def held_out_bpd(model, test_set, layout, num_classes, count, batch_size, device, order="raster"):
    """Bits per dimension on `count` test examples: (mean, standard error). A class-conditional model is
    scored with the true labels plus log2(classes)/dims: p(x) >= p(c) p(x|c) with p(c) uniform, so the
    result bounds the unconditional -log2 p(x) / dims as well. order: the chain rule in raster order, or in
    a random order per example (each is a bound; their average over orders is the any-order model's)."""
    values = []
    with fixed_seed(device):
        for tokens, labels in held_out_batches(test_set, layout, num_classes > 0, count, batch_size, device):
            permutation = torch.rand(tokens.shape[:2], device=device).argsort(1) if order == "random" else None
            bpd = bits_per_dim(model, tokens, labels, *quantisation_bins(tokens, layout), order=permutation).cpu()
            values.append(bpd + (math.log2(num_classes) / tokens[0].numel() if labels is not None else 0.0))
    values = torch.cat(values).double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), stderr


LOG_COLUMNS = ["step", "train_loss", "test_loss", "test_bpd", "test_bpd_stderr", "lr", "elapsed_s"]


def write_log(path, rows, append):
    """log.csv: one row per step where something was measured; blank where it was not."""
    new = not append or not os.path.exists(path)
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot_losses(history, path):
    """loss.png: train and held-out loss (left), held-out bits/dim with its standard error (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("test_loss", "held-out (EMA)")):
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if points:
            left.plot(*zip(*points), label=label, marker="." if key == "test_loss" else None)
    left.set(xlabel="step", ylabel="diffusion loss (MSE of the noise)", title="loss")
    if left.lines:
        left.legend()
    points = [(r["step"], r["test_bpd"], r["test_bpd_stderr"]) for r in history if r.get("test_bpd") is not None]
    if points:
        steps, bpd, stderr = zip(*points)
        right.errorbar(steps, bpd, yerr=[0 if math.isnan(s) else s for s in stderr], marker="o", capsize=3)
    right.set(xlabel="step", ylabel="bits per dimension", title="held-out bits/dim (EMA, upper bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ignore_sigint(worker_id):
    """Data loader processes leave Ctrl-C to the main process, which saves a checkpoint before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# The flags a resumed run may change (with a warning), and those that make it another run.
HYPERPARAMETERS = ["lr", "batch_size", "warmup", "weight_decay", "grad_clip", "ema", "seed"]


def check_run(args, source, kind):
    """Before any expensive work: the output folder is writable, a run's checkpoint is not overwritten, and
    a checkpoint to resume is there and belongs to this run (same model size, modality, conditioning and
    data); hyper-parameters that differ from the run's are named in a warning."""
    path = os.path.join(args.out, "ckpt.pt")
    fields = ADRConfig(**model_fields(args))
    if fields.d_model % fields.n_head or (fields.d_model // fields.n_head) % 2:
        fail(f"--model: d_model {fields.d_model} must split into n_head {fields.n_head} heads of an even width")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file: pass a folder")
    if args.resume and not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path}; run without --resume to start, or point --out at an earlier run")
    if not args.resume and os.path.exists(path):
        fail(f"{path} exists: pass --resume to continue that run, or choose another --out")
    check_writable(args.out, "--out")
    if not args.resume:
        return
    try:
        _, ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(f"--resume: {e}")
    if "optimizer" not in ckpt:
        fail(f"--resume: {path} holds no optimizer state (it is not a training run's checkpoint)")
    config, size = ckpt["config"], asdict(ADRConfig(**model_fields(args)))
    was = ckpt.get("args", {})
    if ckpt["layout"]["kind"] != kind:
        why = f"it holds an {ckpt['layout']['kind']} model, and this run trains an {kind} model"
    elif any(config[k] != size[k] for k in size if k not in DATA_FIELDS):
        why = (f"its model is --size {was.get('size', '?')} {' '.join(was.get('model', []))}, and this run asks for "
               f"--size {args.size} {' '.join(f'{k}={v}' for k, v in args.model)}")
    elif config.get("order", "raster") != args.order:
        why = f"it was trained in {config.get('order', 'raster')} order, and this run asks for --order {args.order}"
    elif (config["num_classes"] == 0) != bool(args.unconditional):
        why = f"it was trained {'without' if config['num_classes'] == 0 else 'with'} classes (--unconditional differs)"
    elif ckpt.get("source") and (ckpt["source"]["name"], ckpt["source"]["root"]) != (source["name"], source["root"]):
        why = (f"it was trained on {ckpt['source']['name']} in {ckpt['source']['root']}, and this run reads "
               f"{source['name']} in {source['root']}")
    else:
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run used {was[k]})" for k in HYPERPARAMETERS
                   if k in was and getattr(args, k) != was[k]]
        if changed:
            warn(f"--resume: going on with {', '.join(changed)}")
        return
    fail(f"--resume: {path} belongs to another run: {why}; use that run's flags, or another --out")


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
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: its folder does not exist; create it or pick another path")
    check_writable(folder, flag)


def resume(path, model, ema, optimizer, task):
    """Load model, EMA and optimizer state from the checkpoint; returns (step, elapsed seconds, history)."""
    _, ckpt = load_checkpoint(path)  # check_run has read it already
    if ckpt["class_names"] != list(task.class_names) or ckpt["layout"] != task.layout:
        what = (f"its classes are {', '.join(ckpt['class_names'])} and the data's are {', '.join(task.class_names)}"
                if ckpt["class_names"] != list(task.class_names) else "its token layout differs from this run's")
        fail(f"--resume: {path} belongs to another run: {what}; use that run's data, or another --out")
    if ckpt["config"] != asdict(model.config):
        fail(f"--resume: {path} holds another model configuration than this adr.py makes for these flags")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["elapsed"], ckpt["history"]


def train(args, task: Task) -> None:
    rank, world, device = setup(args)
    main = rank == 0
    cuda = device.type == "cuda"
    if not cuda and args.size != "tiny":
        found = "no CUDA GPU found, so " if not torch.cuda.is_available() else ""
        log(f"note: {found}the {args.size} model trains on the CPU, very slowly; --size tiny finishes in minutes")
    check_run(args, task.source, task.layout["kind"])
    ckpt_path, log_path, plot_path = (os.path.join(args.out, name) for name in ("ckpt.pt", "log.csv", "loss.png"))

    torch.manual_seed(args.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    seq_len, token_dim = layout_shape(task.layout)
    config = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=len(task.class_names), order=args.order,
                       **model_fields(args))
    model = ADR(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=matrices, weight_decay=args.weight_decay), dict(params=others, weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=cuda)
    step, elapsed_before, history = 0, 0.0, []
    if args.resume:
        step, elapsed_before, history = resume(ckpt_path, model, ema, optimizer, task)
        if args.steps is not None and step >= args.steps:
            fail(f"--resume: {ckpt_path} is already at step {step}; pass a larger --steps to train further")
        if args.minutes is not None and elapsed_before >= 60 * args.minutes:
            fail(f"--resume: {ckpt_path} has trained for {format_time(elapsed_before)} already; pass a larger "
                 f"--minutes to train further")
        log(f"resuming from {ckpt_path} at step {step}")
    if main:
        write_log(log_path, history, append=False)
    torch.manual_seed(args.seed + 1000 * rank + step)  # different noise per process, and after a resume

    train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    workers = args.num_workers if args.num_workers is not None else (min(4, os.cpu_count() or 1) if cuda else 0)
    loader = DataLoader(task.train_set, args.batch_size, sampler=sampler, num_workers=workers, pin_memory=cuda,
                        drop_last=True, worker_init_fn=ignore_sigint, persistent_workers=workers > 0)
    if len(loader) == 0:
        fail(f"the training set has {len(task.train_set)} examples, fewer than one batch of {args.batch_size} "
             f"per process: lower --batch-size")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    conditional = config.num_classes > 0
    unit = "img/s" if task.layout["kind"] == "image" else "clips/s"
    if task.test_set is None:
        log("note: no test split, so the held-out loss and bits/dim are not measured")
    classes = f"class-conditional ({config.num_classes} classes)" if conditional else "unconditional"
    log(f"model: {args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {classes}, "
        f"on {device}")
    length = " and ".join(([f"{args.steps} steps"] if args.steps else []) +
                          ([f"{args.minutes:g} minutes"] if args.minutes else []))
    log(f"batch {args.batch_size} x {world} process{'es' if world > 1 else ''} = {args.batch_size * world} per step "
        f"(effective), {length} at most, {len(loader)} steps per epoch")

    stop = []  # a Ctrl-C or SIGTERM lands here; the loop saves a checkpoint at the next step boundary

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def elapsed():
        return elapsed_before + time.time() - start_time

    def save():
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never replace a good checkpoint
            fail_run(f"the weights are not finite at step {step}; stopped without saving over {ckpt_path}. "
                     f"Lower --lr, or check the data")
        plain_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        plain_args["model"] = [f"{k}={v}" for k, v in args.model]
        save_checkpoint(ckpt_path, model, task.layout, task.class_names, ema=ema, step=step, source=task.source,
                        optimizer=optimizer.state_dict(), history=history, elapsed=elapsed(), args=plain_args)

    def due(every):
        return finished or (every > 0 and step % every == 0)

    start_time = last_time = time.time()
    last_step, loss_sum = step, torch.zeros((), device=device)
    epoch, stopped, finished = step // len(loader), False, False
    of_steps = f"/{args.steps}" if args.steps else ""
    try:
        while not finished and not stopped:
            sampler.set_epoch(epoch)
            epoch += 1
            for x, y in loader:
                if world > 1:  # every process stops at the same step
                    flag = torch.tensor(float(bool(stop)), device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopped = flag.item() > 0
                else:
                    stopped = bool(stop)
                if stopped:
                    break
                lr = learning_rate(step, run_progress(step, elapsed(), args), args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tokens = to_tokens(x.to(device, non_blocking=True), task.layout)
                labels = y.to(device, non_blocking=True) if conditional else None
                with autocast:
                    loss = train_model(tokens, labels)
                if not torch.isfinite(loss).item():  # before the update: the weights and the checkpoint stay good
                    kept = f"{ckpt_path} holds the last good one" if os.path.exists(ckpt_path) else "none was saved"
                    fail_run(f"the training loss is {loss.item()} at step {step + 1}; stopped without saving ({kept}). "
                             f"Lower --lr, or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))  # a short run averages fewer steps
                step += 1
                loss_sum += loss.detach().float()
                finished = run_progress(step, elapsed(), args) >= 1
                if world > 1 and args.minutes:  # the clocks differ: every process ends at the same step
                    flag = torch.tensor(float(finished), device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    finished = flag.item() > 0
                if not main:
                    if finished:
                        break
                    continue

                row, now = {}, time.time()
                if now - last_time >= args.log_every or finished:
                    row["train_loss"] = (loss_sum / (step - last_step)).item()
                    rate = (step - last_step) * args.batch_size * world / (now - last_time)
                    left = eta(step, elapsed(), (now - last_time) / (step - last_step), args)
                    log(f"step {step}{of_steps} | loss {row['train_loss']:.4f} | lr {lr:.1e} | {rate:.0f} {unit} | "
                        f"eta {format_time(left)}")
                    last_time, last_step, loss_sum = now, step, torch.zeros((), device=device)
                if task.test_set is not None and due(args.eval_every):
                    row["test_loss"] = held_out_loss(ema, task, args, device, autocast)
                    count = min(args.eval_examples, len(task.test_set))
                    log(f"eval step {step} | test loss {row['test_loss']:.4f} (EMA weights, {count} examples)")
                if task.test_set is not None and due(args.eval_bpd_every):
                    row["test_bpd"], row["test_bpd_stderr"] = held_out_bpd(
                        ema, task.test_set, task.layout, config.num_classes, args.bpd_examples, args.batch_size, device)
                    count = min(args.bpd_examples, len(task.test_set))
                    log(f"eval step {step} | test bits/dim {row['test_bpd']:.4f} ± {row['test_bpd_stderr']:.4f} "
                        f"(EMA weights, {count} examples)")
                if row:
                    row.update(step=step, lr=lr, elapsed_s=round(elapsed(), 1))
                    history.append(row)
                    write_log(log_path, [row], append=True)
                    if "test_loss" in row or "test_bpd" in row or finished:
                        plot_losses(history, plot_path)
                if due(args.sample_every):
                    with fixed_seed(device):
                        task.save_samples(ema, args.out, step)
                if due(args.ckpt_every):
                    save()
                last_time += time.time() - now  # time spent evaluating does not count towards the rate
                if finished:
                    break
    except KeyboardInterrupt:
        log(f"\ninterrupted again: quit without saving; {ckpt_path} holds the last periodic checkpoint, if any")
        sys.exit(130)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)

    if stopped and not finished:  # a stop that lands after the last step is just the end
        if main:
            save()
            plot_losses(history, plot_path)
            log(f"\nstopped at step {step}{of_steps}: checkpoint saved to {ckpt_path}; continue with --resume")
        if world > 1:
            dist.destroy_process_group()
        sys.exit(130)
    log(f"done: {step} steps in {format_time(elapsed())}; checkpoint {ckpt_path}, samples and loss.png in {args.out}")
    if world > 1:
        dist.destroy_process_group()
