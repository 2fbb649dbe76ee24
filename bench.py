"""
Measure what retention's recurrent form buys, side by side in one run on one device:

- generation (backbone only): time per token and the memory kept between tokens, for the recurrent
  form, the parallel form recomputed over the whole prefix, and a softmax-attention model with a KV cache;
- training: tokens/s and peak memory of a forward+backward step, parallel vs chunkwise vs attention;
- end to end: sampling CIFAR-sized images, split into backbone and diffusion head.

    python bench.py                   # tiny model on CPU, a few minutes on 2 cores
    python bench.py --threads 1       # steadier figures where other work shares the cores
    python bench.py --device cuda     # bf16 autocast
    python bench.py --quick           # the smallest setting, seconds
    python bench.py --compile         # every generation step through torch.compile (a minute of compiling)

Every figure comes from a timer (median of --repeats after a warm-up) or a memory counter.
"""

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from adr import ADR, SAMPLERS, SIZES, ADRConfig
from media import image_layout, layout_shape
from cli import (GUIDANCE, SAMPLING, OneLineErrors, check_writable_file, compile_head, fail, number, pick_device, run,
                 timed_sample)

DEFAULTS = dict(lengths="64,256,1024,4096", repeats=5, train_tokens=4096, e2e_images=64, e2e_steps=SAMPLING["steps"])
PARTS = ("generation", "training", "sampling")  # the tables, in the order they are measured
QUICK = dict(lengths="64,256", repeats=3, train_tokens=256, e2e_images=2, e2e_steps=10)

# ----------------------------------------------------------------------------------------------
# The softmax-attention baseline: ADR's backbone with retention swapped for causal attention.


class AttentionBlock(nn.Module):
    """Pre-norm block: causal softmax attention, then the same SwiGLU FFN as RetNetBlock."""

    def __init__(self, d_model, n_head):
        super().__init__()
        hidden = int(8 * d_model / 3)
        self.n_head = n_head
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.ffn_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.ffn_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x, cache=None, pos=0):
        """x: (B, L, d) at positions pos.. . A cache (2, B, H, capacity, d_head) holds the keys and values
        of positions < pos; this call's are written into it and attention reads all of them."""
        B, L, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if cache is not None:  # keys and values in one copy into the cache's slice (torch.compile keeps it in place)
            cache[:, :, :, pos : pos + L].copy_(qkv[1:])
            k, v = cache[0, :, :, : pos + L], cache[1, :, :, : pos + L]
        assert L == 1 or pos == 0, "several tokens at once only from position 0 (the causal mask is top-left aligned)"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        x = x + self.out_proj(y.transpose(1, 2).reshape(B, L, d))
        gate, value = self.ffn_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.ffn_out(F.silu(gate) * value)


class AttentionModel(nn.Module):
    """Same width, depth, heads, FFN and learned positions as ADR's backbone; input h is already embedded."""

    def __init__(self, d_model, n_layer, n_head, seq_len):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(d_model, n_head) for _ in range(n_layer))
        self.norm_out = nn.LayerNorm(d_model)

    def new_cache(self, batch, capacity, dtype, device):
        d_head = self.pos_emb.shape[1] // self.blocks[0].n_head
        return [torch.zeros(2, batch, b.n_head, capacity, d_head, dtype=dtype, device=device) for b in self.blocks]

    def forward(self, h, caches=None, pos=0):
        h = h + self.pos_emb[pos : pos + h.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, caches[i] if caches else None, pos)
        return self.norm_out(h)


# ----------------------------------------------------------------------------------------------
# Timers and memory counters


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def seconds_per_call(fn, repeats, device, min_block=0.02):
    """Median over `repeats` timed blocks after a warm-up call; a block calls fn enough times to last
    about min_block seconds, so fast calls are not lost in the timer's resolution."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, math.ceil(min_block / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def peak_bytes(fn, device):
    """Most bytes held at once during fn above the level before it: CUDA's allocator counter, or on CPU
    the running total of the allocations and frees that torch's profiler records (profile_memory)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps the profiler's start-up chatter off stderr
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# The three measurements


def compile_steps(backend="inductor"):
    """torch.compile for the generation steps: a graph per prefix length (dynamic=False), so that the time left is
    the arithmetic and memory traffic of each way, not eager mode's cost per operation."""
    torch._dynamo.reset()  # each prefix starts afresh, far from dynamo's limit of recompilations
    return lambda step: torch.compile(step, backend=backend, dynamic=False, fullgraph=True)  # a graph break: an error


@torch.no_grad()
def bench_generation(model, attention, prefix, repeats, device, cache_dtype, compiler=None):
    """One generation step that extends a prefix of `prefix` tokens (batch 1), in three ways; compiler: a function
    that compiles a step (compile_steps()), applied to all three alike."""
    h = torch.randn(1, prefix + 1, model.config.d_model, device=device)  # inputs at positions 0..prefix
    new = h[:, prefix:]
    compiler = compiler or (lambda step: step)
    backbone, attend = compiler(model.backbone), compiler(attention)
    with autocast(device):
        _, states = model.backbone(h[:, :prefix], "chunkwise")  # the state after the prefix
        recurrent = seconds_per_call(lambda: backbone(new, "recurrent", states, pos=prefix), repeats, device)
        state_bytes = tensor_bytes(model.backbone(new, "recurrent", states, pos=prefix)[1])
        recompute = seconds_per_call(lambda: backbone(h, "parallel"), repeats, device)
        caches = attention.new_cache(1, prefix + 1, cache_dtype, device)
        attention(h[:, :prefix], caches)  # fill the cache with the prefix
        kv = seconds_per_call(lambda: attend(new, caches, pos=prefix), repeats, device)
    return dict(
        prefix=prefix,
        recurrent_s=recurrent,
        recurrent_bytes=state_bytes,
        recompute_s=recompute,
        recompute_bytes=tensor_bytes([h]),
        kv_s=kv,
        kv_bytes=tensor_bytes(caches),
    )


def bench_training(model, attention, length, tokens, chunk_size, repeats, device):
    """Forward + backward of the backbone on batch x length = tokens (loss: mean of z^2), three ways."""
    batch = max(1, tokens // length)
    h = torch.randn(batch, length, model.config.d_model, device=device)
    runs = dict(
        parallel=lambda: model.backbone(h, "parallel")[0],
        chunkwise=lambda: model.backbone(h, "chunkwise", chunk_size=chunk_size)[0],
        attention=lambda: attention(h),
    )
    row = dict(length=length, batch=batch)
    for name, forward in runs.items():

        def step():
            model.zero_grad(set_to_none=True), attention.zero_grad(set_to_none=True)
            with autocast(device):
                z = forward()
            z.float().square().mean().backward()

        try:
            row[f"{name}_tokens_per_s"] = batch * length / seconds_per_call(step, repeats, device)
            model.zero_grad(set_to_none=True), attention.zero_grad(set_to_none=True)
            row[f"{name}_peak_bytes"] = peak_bytes(step, device)
        except torch.OutOfMemoryError:
            row[f"{name}_tokens_per_s"] = row[f"{name}_peak_bytes"] = None
            torch.cuda.empty_cache()
    return row


def bench_sampling(size, images, steps, sampler, cfg_scale, repeats, device, compiled=False):
    """model.sample on the CIFAR image layout, timed as sample.py times it: the backbone (model.backbone) and
    the diffusion head (model.head.sample, the whole reverse chain of each token). Guidance as sample.py's default
    (ramped, when GUIDANCE["image"] says so) doubles the head's batch."""
    seq_len, token_dim = layout_shape(image_layout())
    config = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=10, **SIZES[size])
    model = ADR(config).to(device).eval()
    model = compile_head(model) if compiled else model
    labels = torch.arange(images, device=device) % 10
    runs = []
    with autocast(device):
        model.sample(images, labels, steps=2, cfg_scale=cfg_scale)  # warm-up, at the timed batch (compiles it)
        for _ in range(repeats):
            _, seconds = timed_sample(model, images, labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                      cfg_ramp=GUIDANCE["image"]["cfg_ramp"])
            runs.append(dict(total_s=seconds["total"], backbone_s=seconds["backbone"], head_s=seconds["head"]))
    median = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the run with the median total
    other = median["total_s"] - median["backbone_s"] - median["head_s"]
    return dict(images=images, tokens=seq_len, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                cfg_ramp=GUIDANCE["image"]["cfg_ramp"] and cfg_scale != 1, **median, other_s=other)


# ----------------------------------------------------------------------------------------------
# Report


def num(x, digits=3):
    """Three significant digits, without exponent notation."""
    if x is None:
        return "OOM"
    return f"{x:.0f}" if x >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def table(columns, rows):
    """A Markdown table, every column padded to one width."""
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(row) for row in cells[1:]]
    )


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def generation_table(rows):
    columns = [
        "P",
        "recurrent ms",
        "recurrent KiB",
        "recompute ms",
        "recompute KiB",
        "KV ms",
        "KV KiB",
        "KV/rec time",
        "recompute/rec time",
        "KV/rec memory",
        "recompute/rec memory",
    ]
    cells = []
    for r in rows:
        figures = [
            r["recurrent_s"] * 1e3,
            r["recurrent_bytes"] / 1024,
            r["recompute_s"] * 1e3,
            r["recompute_bytes"] / 1024,
            r["kv_s"] * 1e3,
            r["kv_bytes"] / 1024,
        ]
        ratios = [
            r["kv_s"] / r["recurrent_s"],
            r["recompute_s"] / r["recurrent_s"],
            r["kv_bytes"] / r["recurrent_bytes"],
            r["recompute_bytes"] / r["recurrent_bytes"],
        ]
        cells.append([r["prefix"]] + [num(x) for x in figures + ratios])
    return table(columns, cells)


def training_table(rows):
    columns = ["L", "B"] + [
        f"{name} {unit}" for name in ("parallel", "chunkwise", "attention") for unit in ("tok/s", "peak MiB")
    ]
    cells = []
    for r in rows:
        figures = [
            (r[f"{name}_tokens_per_s"], r[f"{name}_peak_bytes"]) for name in ("parallel", "chunkwise", "attention")
        ]
        cells.append(
            [r["length"], r["batch"]] + [num(x) for speed, peak in figures for x in (speed, peak and peak / 2**20)]
        )
    return table(columns, cells)


def sampling_table(e2e):
    parts = dict(
        backbone="backbone",
        head="diffusion head (reverse chains)",
        other="other (embedding, bookkeeping)",
        total="total",
    )
    return table(
        ["part", "seconds", "share"],
        [[name, num(e2e[f"{key}_s"]), f"{100 * e2e[f'{key}_s'] / e2e['total_s']:.0f}%"] for key, name in parts.items()],
    )


def report(result):
    """The tables of the parts that were run, as markdown."""
    h = result["header"]
    lines = [
        f"# adr bench: --size {h['size']} (d_model {h['d_model']}, {h['n_layer']} layers, {h['n_head']} heads; "
        f"diffusion head {h['head_width']} wide, {h['head_depth']} blocks)",
        f"device {h['device']} ({h['device_name']}), dtype {h['dtype']}, threads {h['threads']}, "
        f"torch {h['torch']}; every time is the median of {h['repeats']} repeats after warm-up",
    ]
    if h.get("compiled"):
        what = {"generation": "the generation steps", "sampling": "the head's denoiser"}
        lines.append("torch.compile (inductor, a graph per shape): " + " and ".join(what[p] for p in h["compiled"]))
    if result.get("generation"):
        gen = result["generation"]
        last = max(gen, key=lambda r: r["prefix"])
        ratio = lambda a, b: num(last[a] / last[b])  # noqa: E731
        lines += [
            "",
            "## Generation, backbone only: one step that extends a prefix of P tokens, batch 1",
            "ms = time per generated token; KiB = memory kept between tokens, measured from the tensors, per sequence:",
            "recurrent (rec) = the retention states, the same at every P; recompute = the prefix's embeddings, the",
            "parallel form runs over all P+1 tokens at every step; KV = the attention model's key/value cache.",
            "Ratios > 1: recurrent wins.",
            "",
            generation_table(gen),
            "",
            f"At P = {last['prefix']}: time per token, KV cache / recurrent = {ratio('kv_s', 'recurrent_s')}x, "
            f"recompute / recurrent = {ratio('recompute_s', 'recurrent_s')}x; memory kept, KV cache / recurrent = "
            f"{ratio('kv_bytes', 'recurrent_bytes')}x, "
            f"recompute / recurrent = {ratio('recompute_bytes', 'recurrent_bytes')}x.",
        ]
    if result.get("training"):
        lines += [
            "",
            f"## Training: backbone forward + backward on B x L = {h['train_tokens']} tokens (B = 1 from "
            f"L = {h['train_tokens']} on), loss mean(z^2); chunkwise with chunks of {h['chunk_size']}",
            f"tok/s = tokens per second; peak MiB = {h['peak_memory']}.",
            "",
            training_table(result["training"]),
        ]
    if result.get("sampling"):
        e2e = result["sampling"]
        slower = "diffusion head" if e2e["head_s"] > e2e["backbone_s"] else "backbone"
        share = 100 * max(e2e["head_s"], e2e["backbone_s"]) / e2e["total_s"]
        lines += [
            "",
            f"## End to end: model.sample of {e2e['images']} CIFAR-sized images ({e2e['tokens']} tokens of 4x4 RGB "
            f"patches), {e2e['sampler']} sampler, {e2e['steps']} head steps per token, guidance "
            f"{e2e['cfg_scale']:g}{' ramped' * e2e['cfg_ramp']}, recurrent backbone",
            "",
            sampling_table(e2e),
            "",
            f"The {slower} dominates sampling: {share:.0f}% of the time ({e2e['steps']} head calls per token against "
            f"one backbone step).",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineErrors(
        description="Recurrent vs recompute vs KV-cache attention: generation, training and "
        "sampling, measured side by side."
    )
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size from adr.SIZES")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs under bf16 autocast)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--lengths",
        help=f"prefix lengths for generation and sequence lengths for training (default {DEFAULTS['lengths']})",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"timed repeats per figure, the median is reported (default {DEFAULTS['repeats']})"
    )
    parser.add_argument(
        "--train-tokens",
        type=int,
        help=f"tokens per training step, B = tokens / L (default {DEFAULTS['train_tokens']})",
    )
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk size of the chunkwise form")
    parser.add_argument("--e2e-images", type=int, help=f"images sampled end to end (default {DEFAULTS['e2e_images']})")
    parser.add_argument(
        "--e2e-steps", type=int, help=f"diffusion head steps per token end to end (default {DEFAULTS['e2e_steps']})"
    )
    parser.add_argument("--e2e-sampler", choices=SAMPLERS, default=SAMPLING["sampler"],
                        help=f"the head's reverse chain end to end (default {SAMPLING['sampler']})")
    image = GUIDANCE["image"]
    parser.add_argument("--e2e-cfg", type=number(float, 0), default=image["cfg_scale"],
                        help=f"classifier-free guidance end to end, 1 = none (default {image['cfg_scale']:g}, images'"
                        + (", ramped as sample.py ramps it)" if image["cfg_ramp"] else ")"))
    parser.add_argument(
        "--quick", action="store_true", help="the smallest setting: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the three generation steps alike "
                        "and, end to end, the head's denoiser (CUDA graphs for it on a GPU); training stays eager; "
                        "needs a C++ compiler on a CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help="which tables to measure, comma-separated: "
                        f"{', '.join(PARTS)} (default: all; e.g. generation alone for --size base at long prefixes)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts = args.parts.split(",")
    if not parts or not set(parts) <= set(PARTS):
        fail(f"--parts {args.parts!r}: give some of {', '.join(PARTS)}, comma-separated")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        fail(f"--lengths {args.lengths!r}: give comma-separated whole numbers, e.g. 64,256")
    for flag, value in (
        ("--lengths", min(lengths)),
        ("--repeats", args.repeats),
        ("--train-tokens", args.train_tokens),
        ("--chunk-size", args.chunk_size),
        ("--e2e-images", args.e2e_images),
        ("--e2e-steps", args.e2e_steps),
        ("--threads", 1 if args.threads is None else args.threads),
    ):
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if args.e2e_steps > ADRConfig.diffusion_steps:
        fail(f"--e2e-steps must be at most {ADRConfig.diffusion_steps}, got {args.e2e_steps}")
    device = pick_device(args.device, args.compile)
    if args.json:
        check_writable_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ADRConfig(seq_len=max(lengths) + 1, **SIZES[args.size])  # "base" is ADRConfig's defaults
    model = ADR(config).to(device)
    attention = AttentionModel(config.d_model, config.n_layer, config.n_head, max(lengths) + 1).to(device)
    on_cuda = device.type == "cuda"
    header = dict(
        size=args.size,
        **{key: getattr(config, key) for key in ("d_model", "n_layer", "n_head", "head_width", "head_depth")},
        device=str(device),
        device_name=device_name(device),
        dtype="bf16 autocast" if on_cuda else "float32",
        threads=torch.get_num_threads(),
        compiled=[part for part in ("generation", "sampling") if args.compile and part in parts],
        torch=torch.__version__,
        repeats=args.repeats,
        train_tokens=args.train_tokens,
        chunk_size=args.chunk_size,
        peak_memory="most bytes held at once during the step above the resting model, from "
        + ("torch.cuda.max_memory_allocated" if on_cuda else "torch's profiler allocation records (profile_memory)"),
    )
    progress = lambda what: print(f"bench: {what}", file=sys.stderr, flush=True)  # noqa: E731
    generation, training, sampling = [], [], None
    cache_dtype = torch.bfloat16 if on_cuda else torch.float32
    for length in lengths if "generation" in parts else []:
        progress(f"generation at P = {length}")
        generation.append(bench_generation(model.eval(), attention.eval(), length, args.repeats, device, cache_dtype,
                                           compile_steps() if args.compile else None))
    for length in lengths if "training" in parts else []:
        progress(f"training at L = {length}")
        training.append(
            bench_training(
                model.train(), attention.train(), length, args.train_tokens, args.chunk_size, args.repeats, device
            )
        )
    del model, attention
    if "sampling" in parts:
        progress(f"sampling {args.e2e_images} images")
        sampling = bench_sampling(args.size, args.e2e_images, args.e2e_steps, args.e2e_sampler, args.e2e_cfg,
                                  args.repeats, device, args.compile)
    result = dict(header=header, generation=generation, training=training, sampling=sampling)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    run(main)
