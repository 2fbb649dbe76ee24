"""
The training loop, written once for images and audio, and what only training needs: the training scripts' flags,
the learning-rate schedule, EMA, the held-out loss, log.csv and loss.png, and the checks before a run starts.

A training script builds a Task (its data and how to draw its samples) and calls train(args, task), which reads in
parts: set-up (build_run, data_loader), one optimizer step (train_step), evaluation (measure; sample files follow
it), and checkpoints (save_run).
"""

import argparse
import copy
import csv
import dataclasses
import fcntl
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from adr import ADR, SAMPLERS, SIZES, ADRConfig
from cli import (DEVICE_HELP, SAMPLING, CheckpointError, OneLineErrors, check_writable, default_device,
                 default_steps, fail, fixed_seed, format_time, guidance, guidance_options, held_out_batches,
                 held_out_bpd, load_checkpoint, log, number, pick_device, save_checkpoint, warn)
from media import OutputError, atomic_output, layout_shape, to_tokens

# ----------------------------------------------------------------------------------------------
# The training scripts' argument types


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


# What a token layout changes in the model on top of --size. Log-mel frames: the backbone reads its inputs with noise
# (ADRConfig.input_noise) in training, so that its own imperfect frames at sampling time do not drift into loud
# noise, and the head reads the frame before in full (head_reads_last), as an 80-band frame does not fit the tiny
# model's z of 64 (RESULTS.md, "Speech"). Other layouts train as measured before.
LAYOUT_FIELDS = {"mel": dict(input_noise=0.1, head_reads_last=True)}


def model_fields(args, layout):
    """The ADRConfig fields of --size and the token layout, with --model's changes."""
    return {**SIZES[args.size], **LAYOUT_FIELDS.get(layout.get("tokens"), {}), **dict(args.model)}


def ema_decay(text):
    value = number(float, 0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


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
# What mel tokens change in a size's defaults: the tiny model's 15 CPU minutes come closer to the data at a higher
# learning rate, sampled with less guidance (cli.GUIDANCE; RESULTS.md, "Speech").
TOKEN_DEFAULTS = {("mel", "tiny"): dict(lr=3e-3)}


class Parser(OneLineErrors):
    """The training scripts' parser: the defaults of SIZE_DEFAULTS filled in for the chosen --size, with those of
    TOKEN_DEFAULTS for its --tokens (with a time budget, --minutes, and no --steps, the run has no step limit)."""

    def parse_args(self, args=None, namespace=None):
        args = super().parse_args(args, namespace)
        defaults = {**SIZE_DEFAULTS[args.size], **TOKEN_DEFAULTS.get((getattr(args, "tokens", None), args.size), {})}
        args.defaulted = [name for name in defaults if getattr(args, name, None) is None]  # not given as flags
        for name in args.defaulted:
            setattr(args, name, None if name == "steps" and args.minutes is not None else defaults[name])
        for name in ("cfg", "cfg_ramp", "cfg_level"):  # not given: the tokens' guidance (sample_file_options)
            setattr(args, name, getattr(args, name, None))
        if args.steps is not None and args.warmup >= args.steps:
            warmup = args.steps // 10
            instead = f"warming up over {warmup} steps (a tenth of the run)" if warmup else "no warm-up"
            warn(f"--warmup {args.warmup} is not shorter than the run's {args.steps} steps, so the learning rate would "
                 f"never reach --lr {args.lr:g}: {instead} instead")
            args.warmup = warmup
        return args


def sample_file_options(args, layout, config):
    """The keyword arguments of model.sample for the sample files of a model of this config: the chain flags, steps
    from --sample-steps and guidance from --cfg, --cfg-ramp and --cfg-level or, where they are not given, the
    defaults of the layout's tokens (cli.default_steps, at most the model's diffusion steps; cli.guidance); no
    guidance without classes."""
    steps = args.sample_steps or min(default_steps(layout), config.diffusion_steps)
    return dict(steps=steps, sampler=args.sampler, **guidance_options(args, guidance(layout), config.num_classes > 0))


def common_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def per_size(name, kind, low, help, low_ok=True):
        base, tiny = SIZE_DEFAULTS["base"][name], SIZE_DEFAULTS["tiny"][name]
        tokens = "".join(f", {d[name]} for {size} with {t} tokens" for (t, size), d in TOKEN_DEFAULTS.items()
                         if name in d)
        p.add_argument(f"--{name.replace('_', '-')}", type=number(kind, low, low_ok), default=argparse.SUPPRESS,
                       help=f"{help} (default: {base} for base, {tiny} for tiny{tokens})")

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
                   "samples and evaluation; the decay is at most (1 + t)/(10 + t) after t steps, so runs under 9,000 "
                   "steps never reach 0.999")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same run (with --minutes, "
                   "nearly: the learning rate follows the clock)")
    p.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps; on a CPU "
                   "it needs a C++ compiler)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="bf16: the forward pass in bfloat16 "
                   "autocast (weights, optimizer and EMA stay float32); fp32: float32 (TF32 matmuls on CUDA). CPUs "
                   "with AVX512-BF16 made 1.5-1.8x the steps a minute in bf16; emulated without it, bf16 ran 2.6x "
                   "slower (default: bf16 on CUDA; on a CPU with native bf16, bf16 for mel tokens at the tiny size; "
                   "else fp32)")
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
    p.add_argument("--sample-steps", type=number(int, 1), default=None, help="reverse diffusion steps per token for "
                   "the sample files (default: as sample.py draws the tokens, at most the model's diffusion steps)")
    p.add_argument("--cfg", type=number(float, 0), default=argparse.SUPPRESS, help="classifier-free guidance scale "
                   "for the sample files, as sample.py's --cfg (1: none; default: the tokens', as sample.py draws "
                   "the checkpoint)")
    p.add_argument("--cfg-ramp", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="let the sample files' guidance grow from 1 to --cfg over the tokens (default: the tokens')")
    p.add_argument("--cfg-level", type=number(float, 0, high=1), default=argparse.SUPPRESS, help="the share of the "
                   "sample files' guidance that each token's level gets, as sample.py's --cfg-level (default: the "
                   "tokens')")
    p.add_argument("--num-workers", type=number(int, 0), default=None, help="data loader processes (default: none "
                   "on a CPU, where the data in memory is read faster than extra processes cost; else up to 4)")
    return p


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


def native_bf16_cpu() -> bool:
    """Whether this CPU computes in bfloat16 itself (x86's AVX512-BF16 or AMX) rather than emulating it."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def default_precision(args, device) -> str:
    """bf16 on CUDA. On a CPU fp32, but bf16 for the tiny model's mel tokens where the CPU has native bf16: there
    bf16's extra steps (about 1.7x in 15 minutes) bring the words nearer the data (RESULTS.md, "Speech"). Images
    gained a bound but hardly better samples in a first look (one MNIST run), x86 CPUs without native bf16 would
    emulate it (2.6x slower), and ARM CPUs were not timed."""
    if device.type == "cuda":
        return "bf16"
    mel_tiny = getattr(args, "tokens", None) == "mel" and args.size == "tiny"
    return "bf16" if device.type == "cpu" and mel_tiny and native_bf16_cpu() else "fp32"


def setup(args):
    """Start the process group under torchrun (NCCL on GPU, gloo on CPU), pick this process's device and resolve
    --precision for it. Returns (rank, world_size, device); calling it again returns the same."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device, args.compile)
    args.precision = args.precision or default_precision(args, device)  # the checkpoint keeps what ran
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


LOG_COLUMNS = ["step", "train_loss", "test_loss", "test_bpd", "test_bpd_stderr", "lr", "elapsed_s"]


def write_log(path, rows, append):
    """log.csv: one row per step where something was measured; blank where it was not."""
    new = not append or not os.path.exists(path)
    try:
        with open(path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


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
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what Slurm, systemd and preemption send to the whole job


def leave_stop_signals_to_the_main_process(worker_id):
    """Data loader processes ignore the stop signals sent to the whole process group: the main process stops at the
    next step boundary and saves a checkpoint, which it could not do with its workers gone."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


RUN_FOLDERS_HELD = {}  # folder -> its open lock file, held (and the lock with it) until the process ends


def hold_run_folder(folder):
    """One training at a time per --out: an exclusive lock on DIR/.lock, released by the system when the process
    ends however it ends. A second run is refused in one line naming the first one's process ID."""
    folder = os.path.abspath(folder)
    if int(os.environ.get("RANK", 0)) != 0 or folder in RUN_FOLDERS_HELD:
        return  # under torchrun only the first process writes the run's files
    path = os.path.join(folder, ".lock")
    try:
        lock_file = open(path, "a+")
    except OSError as e:
        fail(f"--out {folder}: cannot create {path} ({e.strerror})")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        fail(f"--out {folder}: another training (process {holder}) is writing there; wait for it to end, or choose "
             f"another --out")
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    RUN_FOLDERS_HELD[folder] = lock_file


# The flags a resumed run may change (with a warning), and those that make it another run.
HYPERPARAMETERS = ["lr", "batch_size", "warmup", "weight_decay", "grad_clip", "ema", "seed", "precision"]


def check_run(args, source, layout):
    """Before any expensive work: the output folder is writable, a run's checkpoint is not overwritten, and
    a checkpoint to resume is there and belongs to this run (same model size, modality, token layout, conditioning
    and data). On a resume, hyper-parameters not given as flags take the run's values (args changes); those given
    that differ from the run's are named in a warning."""
    kind = layout["kind"]
    path = os.path.join(args.out, "ckpt.pt")
    fields = ADRConfig(**model_fields(args, layout))
    if fields.d_model % fields.n_head or (fields.d_model // fields.n_head) % 2:
        fail(f"--model: d_model {fields.d_model} must split into n_head {fields.n_head} heads of an even width")
    if args.sample_steps and args.sample_steps > fields.diffusion_steps:
        fail(f"--sample-steps {args.sample_steps}: must be at most the model's {fields.diffusion_steps} "
             "diffusion steps")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file: pass a folder")
    if os.path.exists(path) and not os.path.isfile(path):
        fail(f"{path} is not a file: move it out of the way, or choose another --out")
    if args.resume and not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path}; run without --resume to start, or point --out at an earlier run")
    if not args.resume and os.path.exists(path):
        fail(f"{path} exists: pass --resume to continue that run, or choose another --out")
    check_writable(args.out, "--out")
    hold_run_folder(args.out)
    if not args.resume:
        return
    try:
        _, ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(f"--resume: {e}")
    if "optimizer" not in ckpt:
        fail(f"--resume: {path} holds no optimizer state (it is not a training run's checkpoint)")
    config, size = ckpt["config"], asdict(ADRConfig(**model_fields(args, layout)))
    was = ckpt.get("args", {})
    if ckpt["layout"]["kind"] != kind:
        why = f"it holds an {ckpt['layout']['kind']} model, and this run trains an {kind} model"
    elif ckpt["layout"] != layout:
        flags = "--patch" if kind == "image" else "--tokens or --seconds"
        why = f"its tokens are laid out otherwise ({flags} differ: it has {ckpt['layout']}, this run {layout})"
    elif any(config[k] != size[k] for k in size if k not in DATA_FIELDS):
        differ = [k for k in size if k not in DATA_FIELDS and config[k] != size[k]]
        values = lambda fields, sep=", ": sep.join(f"{k}={fields[k]}" for k in differ)  # noqa: E731
        its, asked = "".join(f" {m}" for m in was.get("model", [])), "".join(f" {k}={v}" for k, v in args.model)
        why = (f"its model is --size {was.get('size', '?')}{its} ({values(config)}), and this run asks for "
               f"--size {args.size}{asked} ({values(size)}: --model {values(config, ' ')} goes on with the run)")
    elif config.get("order", "raster") != args.order:
        why = f"it was trained in {config.get('order', 'raster')} order, and this run asks for --order {args.order}"
    elif (config["num_classes"] == 0) != bool(args.unconditional):
        why = f"it was trained {'without' if config['num_classes'] == 0 else 'with'} classes (--unconditional differs)"
    elif ckpt.get("source") and (ckpt["source"]["name"], ckpt["source"]["root"]) != (source["name"], source["root"]):
        why = (f"it was trained on {ckpt['source']['name']} in {ckpt['source']['root']}, and this run reads "
               f"{source['name']} in {source['root']}")
    else:
        for k in set(HYPERPARAMETERS) & set(getattr(args, "defaulted", [])) & set(was):
            setattr(args, k, was[k])  # defaults may have changed since the run began
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run used {was[k]})" for k in HYPERPARAMETERS
                   if k in was and getattr(args, k) != was[k]]
        if changed:
            warn(f"--resume: going on with {', '.join(changed)}")
        return
    fail(f"--resume: {path} belongs to another run: {why}; use that run's flags, or another --out")


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


def build_run(args, task, device, ckpt_path):
    """Set-up: the model, its EMA copy and AdamW (weight decay on the matrices only), fresh or, with --resume, as
    the run's checkpoint left them. Returns (model, ema, optimizer, step, seconds trained before, history)."""
    seq_len, token_dim = layout_shape(task.layout)
    config = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=len(task.class_names), order=args.order,
                       **model_fields(args, task.layout))
    model = ADR(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=matrices, weight_decay=args.weight_decay), dict(params=others, weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    step, elapsed_before, history = 0, 0.0, []
    if args.resume:
        step, elapsed_before, history = resume(ckpt_path, model, ema, optimizer, task)
        if args.steps is not None and step >= args.steps:
            fail(f"--resume: {ckpt_path} is already at step {step}; pass a larger --steps to train further")
        if args.minutes is not None and elapsed_before >= 60 * args.minutes:
            fail(f"--resume: {ckpt_path} has trained for {format_time(elapsed_before)} already; pass a larger "
                 f"--minutes to train further")
        log(f"resuming from {ckpt_path} at step {step}")
    return model, ema, optimizer, step, elapsed_before, history


def tokens_of(dataset, layout, chunk=256):
    """The whole set as tokens (N, L, D) and its labels, computed on the CPU a chunk of examples at a time."""
    parts, labels = [], []
    for start in range(0, len(dataset), chunk):
        x, y = zip(*(dataset[i] for i in range(start, min(start + chunk, len(dataset)))))
        parts.append(to_tokens(torch.stack(x), layout))
        labels.extend(y)
    return torch.cat(parts), torch.tensor(labels, dtype=torch.long)


def data_loader(args, task, rank, world, cuda):
    """Set-up: this process's share of the shuffled training set, in batches of (x, label), x already tokens
    when the set is turned into tokens once here; returns (sampler, loader, whether x is tokens)."""
    train_set, as_tokens = task.train_set, task.layout.get("tokens") == "mel"
    if as_tokens:  # a clip's mel frames never change (no random crops or flips): computed once, not every step
        train_set = TensorDataset(*tokens_of(train_set, task.layout))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    workers = args.num_workers if args.num_workers is not None else (min(4, os.cpu_count() or 1) if cuda else 0)
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=workers, pin_memory=cuda,
                        drop_last=True, worker_init_fn=leave_stop_signals_to_the_main_process,
                        persistent_workers=workers > 0)
    if len(loader) == 0:
        fail(f"the training set has {len(train_set)} examples, fewer than one batch of {args.batch_size} "
             f"per process: lower --batch-size")
    return sampler, loader, as_tokens


def describe_run(args, task, model, world, steps_per_epoch, device):
    """The lines a run opens with: the model, the batch, the run's length."""
    if task.test_set is None:
        log("note: no test split, so the held-out loss and bits/dim are not measured")
    classes = f"class-conditional ({model.config.num_classes} classes)" if model.config.num_classes else "unconditional"
    extras = f", inputs read with noise of std {model.config.input_noise:g}" if model.config.input_noise else ""
    extras += ", the head reads the token before" if model.config.head_reads_last else ""
    log(f"model: {args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {classes}{extras}, "
        f"on {device} in {args.precision}")
    length = " and ".join(([f"{args.steps} steps"] if args.steps else []) +
                          ([f"{args.minutes:g} minutes"] if args.minutes else []))
    log(f"batch {args.batch_size} x {world} process{'es' if world > 1 else ''} = {args.batch_size * world} per step "
        f"(effective), {length} at most, {steps_per_epoch} steps per epoch")


def train_step(train_model, model, ema, optimizer, tokens, labels, lr, step, args, autocast, ckpt_path):
    """One optimizer step at learning rate lr, then the EMA update; returns the loss. A loss that is not finite
    stops the run before the update, so the weights and the checkpoint stay good."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss = train_model(tokens, labels)
    if not torch.isfinite(loss).item():
        kept = f"{ckpt_path} holds the last good one" if os.path.exists(ckpt_path) else "none was saved"
        fail_run(f"the training loss is {loss.item()} at step {step + 1}; stopped without saving ({kept}). "
                 f"Lower --lr, or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))  # a short run averages fewer steps
    return loss


def measure(ema, task, args, device, autocast, step, due, row):
    """Evaluation: the held-out loss and bits/dim of the EMA weights into row, each when `due` says its
    --eval-*every has come."""
    if task.test_set is not None and due(args.eval_every):
        row["test_loss"] = held_out_loss(ema, task, args, device, autocast)
        count = min(args.eval_examples, len(task.test_set))
        log(f"eval step {step} | test loss {row['test_loss']:.4f} (EMA weights, {count} examples)")
    if task.test_set is not None and due(args.eval_bpd_every):
        row["test_bpd"], row["test_bpd_stderr"] = held_out_bpd(
            ema, task.test_set, task.layout, ema.config.num_classes, args.bpd_examples, args.batch_size, device)
        count = min(args.bpd_examples, len(task.test_set))
        log(f"eval step {step} | test bits/dim {row['test_bpd']:.4f} ± {row['test_bpd_stderr']:.4f} "
            f"(EMA weights, {count} examples)")


def save_run(path, model, ema, optimizer, task, args, step, history, elapsed):
    """Checkpoint: weights, EMA, optimizer, history and flags, written atomically; weights that are not finite
    stop the run instead, so a good checkpoint is never replaced by a broken one."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        fail_run(f"the weights are not finite at step {step}; stopped without saving over {path}. "
                 f"Lower --lr, or check the data")
    plain_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    plain_args["model"] = [f"{k}={v}" for k, v in args.model]
    try:
        save_checkpoint(path, model, task.layout, task.class_names, ema=ema, step=step, source=task.source,
                        optimizer=optimizer.state_dict(), history=history, elapsed=elapsed, args=plain_args)
    except OutputError as e:
        kept = "the checkpoint already there is intact" if os.path.exists(path) else "no checkpoint was saved"
        fail_run(f"{e} at step {step}; {kept}")


def train(args, task: Task) -> None:
    """Set up, then train until --steps or --minutes, logging, measuring, sampling and saving as they fall due. A
    Ctrl-C or SIGTERM ends the run at the next step boundary with a checkpoint (exit code 130 or 143)."""
    rank, world, device = setup(args)
    main, cuda = rank == 0, device.type == "cuda"
    if not cuda and args.size != "tiny":
        found = "no CUDA GPU found, so " if not torch.cuda.is_available() else ""
        log(f"note: {found}the {args.size} model trains on the CPU, very slowly; --size tiny finishes in minutes")
    check_run(args, task.source, task.layout)
    ckpt_path, log_path, plot_path = (os.path.join(args.out, name) for name in ("ckpt.pt", "log.csv", "loss.png"))

    torch.manual_seed(args.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    model, ema, optimizer, step, elapsed_before, history = build_run(args, task, device, ckpt_path)
    if main:
        write_log(log_path, history, append=False)
    torch.manual_seed(args.seed + 1000 * rank + step)  # different noise per process, and after a resume
    train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    sampler, loader, loads_tokens = data_loader(args, task, rank, world, cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    conditional = model.config.num_classes > 0
    unit = "img/s" if task.layout["kind"] == "image" else "clips/s"
    describe_run(args, task, model, world, len(loader), device)

    stop = []  # a Ctrl-C or SIGTERM lands here; the loop saves a checkpoint at the next step boundary

    def request_stop(signum, frame):
        stop.append(signum)
        if len(stop) > 1:
            raise KeyboardInterrupt

    previous_handlers = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}

    def elapsed():
        return elapsed_before + time.time() - start_time

    def due(every):
        return finished or (every > 0 and step % every == 0)

    def save():
        save_run(ckpt_path, model, ema, optimizer, task, args, step, history, elapsed())

    start_time = last_time = time.time()
    last_step, loss_sum = step, torch.zeros((), device=device)
    epoch, stopped, finished = step // len(loader), False, False
    of_steps = f"/{args.steps}" if args.steps else ""
    try:
        while not finished and not stopped:
            sampler.set_epoch(epoch)
            epoch += 1
            for x, y in loader:
                stopped = any_process(bool(stop), world, device)  # every process stops at the same step
                if stopped:
                    break
                lr = learning_rate(step, run_progress(step, elapsed(), args), args)
                x = x.to(device, non_blocking=True)
                tokens = x if loads_tokens else to_tokens(x, task.layout)
                labels = y.to(device, non_blocking=True) if conditional else None
                loss = train_step(train_model, model, ema, optimizer, tokens, labels, lr, step, args, autocast,
                                  ckpt_path)
                step += 1
                loss_sum += loss.detach().float()
                finished = run_progress(step, elapsed(), args) >= 1
                if args.minutes:  # the clocks differ: every process ends at the same step
                    finished = any_process(finished, world, device)
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
                measure(ema, task, args, device, autocast, step, due, row)
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
        sys.exit(128 + (stop[-1] if stop else signal.SIGINT))  # the shell's convention: 130 Ctrl-C, 143 SIGTERM
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
        sys.exit(128 + (stop[0] if stop else signal.SIGTERM))  # no signal here: another process of the job had one
    log(f"done: {step} steps in {format_time(elapsed())}; checkpoint {ckpt_path}, samples and loss.png in {args.out}")
    if world > 1:
        dist.destroy_process_group()


def any_process(flag, world, device):
    """Whether flag is true on any process (on one process: flag itself)."""
    if world == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0
