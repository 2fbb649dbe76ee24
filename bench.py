"""
Measure what retention's recurrent form buys, side by side in one run on one device:

- generation (backbone only): for each batch size B and prefix length P, the time of one step that extends B
  sequences by a token, and the memory kept between steps, for the recurrent form, the parallel form recomputed
  over the whole prefix, and a softmax-attention model with a KV cache;
- training: tokens/s and peak memory of a forward+backward step, parallel vs chunkwise vs attention;
- end to end: sampling B long sequences (random weights) through ADR.sample with the recurrent backbone, and
  through the same loop over the attention model and its KV cache, the same diffusion head calls in both.

    python bench.py                     # tiny model on CPU: minutes on 2 cores, most of them end to end
    python bench.py --threads 1         # steadier figures where other work shares the cores
    python bench.py --device cuda       # bf16 autocast
    python bench.py --quick             # the smallest setting, seconds
    python bench.py --parts generation --size base --plot generation.png   # one table, and its figure
    python bench.py --compile           # every generation step through torch.compile (minutes of compiling)

Every figure comes from a timer (median of --repeats after a warm-up) or a memory counter. A measurement whose
memory, computed from the shapes, would not fit in what is available is skipped with a note, never started.
"""

import collections
import contextlib
import importlib.util
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
from media import atomic_output, image_layout, layout_shape
from cli import (GUIDANCE, SAMPLING, OneLineErrors, Stopwatch, check_writable_file, compile_head, fail, number,
                 pick_device, run, timed_sample)

DEFAULTS = dict(lengths="64,256,1024,4096", batch="1,16,64,256", repeats=5, train_tokens=4096, e2e_images=16,
                e2e_tokens=1024, e2e_steps=SAMPLING["steps"])
PARTS = ("generation", "training", "sampling")  # the tables, in the order they are measured
QUICK = dict(lengths="64,256", batch="1,4", repeats=3, train_tokens=256, e2e_images=2, e2e_tokens=16, e2e_steps=10)
WAYS = dict(recurrent="recurrent", kv="KV cache", recompute="recompute")  # generation's ways: key -> name
MEMORY_SHARE = 0.75  # of the memory available now, what one measurement may take: the rest is other work's, and slack

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
# Memory: what each way of generating holds, computed from the shapes, against what is free


def available_bytes(device):
    """Bytes that can be allocated now: on CUDA the GPU's free memory plus what torch's allocator holds unused;
    elsewhere the system's MemAvailable (free or reclaimable pages), else its free pages; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # given in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # no such counter here (macOS)
        return None


def held_bytes(config, batch, prefix, cache_dtype):
    """What each way keeps between steps, from the shapes: the retention states (float32, a d_head x d_head matrix per
    head and layer), the KV cache (a key and a value per head, layer and position 0..P), and the embeddings of the
    P + 1 inputs that recomputing reruns."""
    d_head = config.d_model // config.n_head
    state = config.n_layer * batch * config.n_head * d_head * d_head * 4
    cache = config.n_layer * 2 * batch * config.n_head * (prefix + 1) * d_head * cache_dtype.itemsize
    return state, cache, batch * (prefix + 1) * config.d_model * 4


def working_bytes(config, batch, tokens, attended):
    """A generous bound on the temporaries of one layer (they are freed before the next) for `tokens` inputs per
    sequence that each read `attended` positions: projections and FFN activations, and the score matrices, two of
    them at once as the parallel form multiplies its scores by the decay mask (which itself counts as a batch)."""
    hidden = int(8 * config.d_model / 3)
    activations = 2 * batch * tokens * (5 * config.d_model + 3 * hidden) * 4
    return activations + 2 * (batch + 1) * config.n_head * tokens * attended * 4


def allocation_failed(error):
    """Whether an exception is an allocation that did not fit (not a bug, which should show)."""
    text = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(
        s in text for s in ("DefaultCPUAllocator", "out of memory", "not enough memory"))


def measure_if_it_fits(measure, need, device):
    """measure() -> (seconds, bytes), or (None, None, why) when `need` bytes would take more than MEMORY_SHARE of the
    memory available now (then nothing is allocated), or when an allocation fails after all."""
    available = available_bytes(device)
    if available is not None and need > MEMORY_SHARE * available:
        return None, None, f"needs {size(need)}, over {MEMORY_SHARE:.0%} of the {size(available)} available"
    try:
        return *measure(), None
    except (RuntimeError, MemoryError) as error:
        if not allocation_failed(error):
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the failed attempt's blocks, back to the other measurements
    return None, None, f"ran out of memory (estimated need {size(need)})"


# ----------------------------------------------------------------------------------------------
# The three measurements


def compile_steps(backend="inductor"):
    """torch.compile for the generation steps: a graph per batch and prefix length (dynamic=False), so that the time
    left is the arithmetic and memory traffic of each way, not eager mode's cost per operation."""
    torch._dynamo.reset()  # each shape starts afresh, far from dynamo's limit of recompilations
    return lambda step: torch.compile(step, backend=backend, dynamic=False, fullgraph=True)  # a graph break: an error


Prefix = collections.namedtuple("Prefix", "length inputs states caches")


@torch.no_grad()
def read_prefix(model, attention, length, device, cache_dtype):
    """A prefix of `length` random inputs read once, at batch 1: the inputs at positions 0..length (the last one is
    the new token), the retention states after the prefix (chunkwise) and the KV cache that attention filled."""
    inputs = torch.randn(1, length + 1, model.config.d_model, device=device)
    with autocast(device):
        _, states = model.backbone(inputs[:, :length], "chunkwise")
        caches = attention.new_cache(1, length + 1, cache_dtype, device)
        attention(inputs[:, :length], caches)
    return Prefix(length, inputs, states, caches)


@torch.no_grad()
def bench_generation(model, attention, prefix, batch, repeats, device, recompute_max_tokens, compiler=None):
    """One generation step that extends `batch` sequences by a token after `prefix` (a Prefix, copied to every
    sequence: a step's cost does not depend on the values), in three ways. A way whose memory would not fit is
    skipped with a note, and so is recomputing more than recompute_max_tokens tokens of prefix (batch x P), whose
    cost grows as B x P^2. compiler: a function that compiles a step (compile_steps()), applied to all three alike."""
    P, config = prefix.length, model.config
    state_bytes, cache_bytes, inputs_bytes = held_bytes(config, batch, P, prefix.caches[0].dtype)
    compiler = compiler or (lambda step: step)
    backbone, attend = compiler(model.backbone), compiler(attention)
    new = prefix.inputs[:, P:].repeat(batch, 1, 1)

    def recurrent():
        states = [s.repeat(batch, 1, 1, 1) for s in prefix.states]
        seconds = seconds_per_call(lambda: backbone(new, "recurrent", states, pos=P), repeats, device)
        return seconds, tensor_bytes(model.backbone(new, "recurrent", states, pos=P)[1])  # the states handed on

    def kv():
        caches = [c.repeat(1, batch, 1, 1, 1) for c in prefix.caches]  # allocated once; a step writes in place
        return seconds_per_call(lambda: attend(new, caches, pos=P), repeats, device), tensor_bytes(caches)

    def recompute():
        inputs = prefix.inputs.repeat(batch, 1, 1)
        return seconds_per_call(lambda: backbone(inputs, "parallel"), repeats, device), tensor_bytes([inputs])

    ways = dict(  # what each way holds (the recurrent step hands on new states beside the old), and its temporaries
        recurrent=(recurrent, 2 * state_bytes + working_bytes(config, batch, 1, config.d_model // config.n_head)),
        kv=(kv, cache_bytes + working_bytes(config, batch, 1, P + 1)),
        recompute=(recompute, inputs_bytes + working_bytes(config, batch, P + 1, P + 1)),
    )
    row, skipped = dict(batch=batch, prefix=P), {}
    with autocast(device):
        for way, (measure, need) in ways.items():
            if way == "recompute" and batch * P > recompute_max_tokens:
                seconds = nbytes = None
                skipped[way] = f"B x P = {batch * P} is over --recompute-max-tokens {recompute_max_tokens}"
            else:
                seconds, nbytes, why = measure_if_it_fits(measure, need, device)
                if why:
                    skipped[way] = why
            row[f"{way}_s"], row[f"{way}_bytes"] = seconds, nbytes
            row[f"{way}_tokens_per_s"] = None if seconds is None else batch / seconds
    row["skipped"] = skipped
    return row


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


@torch.no_grad()
def sample_with_kv_cache(model, attention, n, labels=None, steps=30, temperature=1.0, cfg_scale=1.0,
                         sampler="dpm++sde", cfg_ramp=False, cache_dtype=torch.float32):
    """ADR.sample's loop (raster order, a token per step, no prompt) with the attention model and its KV cache in
    place of the RetNet: the same inputs (model.embed) and the same head calls, guidance included. (n, L, D)."""
    config, device = model.config, model.pos_emb.device
    L, guided = config.seq_len, cfg_scale != 1.0
    batch = n * (1 + guided)  # with guidance: the conditional rows, then the same rows with the null class
    if labels is not None and guided:
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
    caches = attention.new_cache(batch, L, cache_dtype, device)
    tokens = torch.zeros(n, L, config.token_dim, device=device, dtype=model.pos_emb.dtype)
    for i in range(L):
        previous = tokens[:, max(i - 1, 0) : i]  # the input: the token before i, or the start token for the first
        previous = torch.cat([previous, previous]) if guided else previous
        targets = torch.full((batch, 1), i, device=device)
        z = attention(model.embed(previous, labels, targets, with_start=i == 0), caches, pos=i)
        scale = 1 + (cfg_scale - 1) * (i + 1) / L if cfg_ramp else cfg_scale  # as ADR.sample ramps it
        last = previous[:, -1] if i else previous.new_zeros(batch, config.token_dim)  # as ADR.head_condition reads it
        tokens[:, i] = model.head.sample(model.head_condition(z[:, -1], last), steps, temperature, scale, sampler)
    return tokens


def timed_kv_sample(model, attention, n, labels=None, **options):
    """sample_with_kv_cache with the clocks of cli.timed_sample: the whole call, the backbone (the attention model)
    and the head's reverse chains (model.head.sample). Returns (tokens, seconds: total, backbone, head)."""
    clocks = {name: Stopwatch(model.pos_emb.device) for name in ("total", "backbone", "head")}
    attention.forward = clocks["backbone"].wrap(attention.forward)
    model.head.sample = clocks["head"].wrap(model.head.sample)
    try:
        tokens = clocks["total"].wrap(sample_with_kv_cache)(model, attention, n, labels, **options)
    finally:  # unwrap: the instance attributes go, the methods show through again
        del attention.forward, model.head.sample
    return tokens, {name: clock.seconds for name, clock in clocks.items()}


def bench_sampling(size, images, tokens, steps, sampler, cfg_scale, repeats, device, cache_dtype, compiled=False):
    """`images` sequences of `tokens` tokens of 4x4 RGB patches (random weights) sampled two ways, timed as sample.py
    times them: the backbone, the diffusion head (model.head.sample, the whole reverse chain of each token) and
    the rest. Recurrent: model.sample; KV cache: the same loop over the attention model (sample_with_kv_cache),
    the same head calls. Guidance as sample.py's default for images (ramped, when GUIDANCE["image"] says so)
    doubles the batch of both."""
    config = ADRConfig(token_dim=layout_shape(image_layout())[1], seq_len=tokens, num_classes=10, **SIZES[size])
    model = ADR(config).to(device).eval()
    attention = AttentionModel(config.d_model, config.n_layer, config.n_head, tokens).to(device).eval()
    model = compile_head(model) if compiled else model
    labels = torch.arange(images, device=device) % 10
    cfg_ramp = GUIDANCE["image"]["cfg_ramp"] and cfg_scale != 1
    options = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, cfg_ramp=cfg_ramp)
    ways = dict(
        recurrent=lambda **o: timed_sample(model, images, labels, **o)[1],
        kv=lambda **o: timed_kv_sample(model, attention, images, labels, cache_dtype=cache_dtype, **o)[1],
    )
    runs = {way: [] for way in ways}
    with autocast(device):
        for sample in ways.values():  # warm-up, at the timed batch and length (compiles the head)
            sample(**{**options, "steps": 2})
        for _ in range(repeats):
            for way, sample in ways.items():  # in turn, so that the machine's drift touches both alike
                seconds = sample(**options)
                runs[way].append(dict(total_s=seconds["total"], backbone_s=seconds["backbone"], head_s=seconds["head"]))
    result = dict(images=images, tokens=tokens, token_dim=config.token_dim, steps=steps, sampler=sampler,
                  cfg_scale=cfg_scale, cfg_ramp=cfg_ramp)
    for way, timed in runs.items():
        median = sorted(timed, key=lambda r: r["total_s"])[len(timed) // 2]  # the run with the median total
        result[way] = dict(**median, other_s=median["total_s"] - median["backbone_s"] - median["head_s"])
    return result


# ----------------------------------------------------------------------------------------------
# Report


def num(x, digits=3, missing="OOM"):
    """Three significant digits, without exponent notation; `missing` for None."""
    if x is None:
        return missing
    return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def size(nbytes):
    """Bytes in binary units, three digits."""
    value, units = float(nbytes), ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{num(value)} {units[0]}"


def ratio(a, b):
    return None if a is None or b is None else a / b


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


def slope(points):
    """Least-squares slope of y against x over (x, y) points; None under two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression(*zip(*points)).slope


def generation_summary(rows):
    """The report's figures: the KV / recurrent ratios at the largest batch x prefix where both ran; per batch, the
    recurrent step's time at the longest prefix over the shortest (1 = flat) and each way's growth with P (ms per
    1000 tokens of prefix, a straight-line fit, and the exponent of a log-log fit); the smallest batch x prefix at
    which the recurrent step is faster than the KV step."""
    both = [r for r in rows if r["recurrent_s"] is not None and r["kv_s"] is not None]
    bigness = lambda r: (r["batch"] * r["prefix"], r["batch"])  # noqa: E731
    last = max(both, key=bigness, default=None)
    largest = None if last is None else dict(batch=last["batch"], prefix=last["prefix"],
                                             kv_over_recurrent_time=last["kv_s"] / last["recurrent_s"],
                                             kv_over_recurrent_memory=last["kv_bytes"] / last["recurrent_bytes"])
    per_batch = []
    for batch in sorted({r["batch"] for r in rows}):
        entry = dict(batch=batch)
        for way in WAYS:
            points = sorted((r["prefix"], r[f"{way}_s"]) for r in rows if r["batch"] == batch and r[f"{way}_s"])
            seconds_per_token = slope(points)
            entry[f"{way}_ms_per_1000"] = None if seconds_per_token is None else seconds_per_token * 1e6
            entry[f"{way}_exponent"] = slope([(math.log(p), math.log(t)) for p, t in points])
            if way == "recurrent":
                entry["recurrent_prefixes"] = [points[0][0], points[-1][0]] if len(points) > 1 else None
                entry["recurrent_flatness"] = points[-1][1] / points[0][1] if len(points) > 1 else None
        per_batch.append(entry)
    wins = sorted((r for r in both if r["recurrent_s"] < r["kv_s"]), key=bigness)
    crossover = dict(batch=wins[0]["batch"], prefix=wins[0]["prefix"]) if wins else None
    return dict(largest=largest, per_batch=per_batch, compared=len(both), recurrent_faster=len(wins),
                crossover=crossover)


def generation_table(rows):
    columns = ["B", "P"] + [f"{name} ms" for name in WAYS.values()] + [f"{name} tok/s" for name in WAYS.values()]
    columns += ["state MiB", "cache MiB", "inputs MiB", "KV/rec time", "KV/rec memory", "recompute/rec time"]
    cells = []
    for r in rows:
        figures = [r[f"{way}_s"] and r[f"{way}_s"] * 1e3 for way in WAYS]
        figures += [r[f"{way}_tokens_per_s"] for way in WAYS]
        figures += [r[f"{way}_bytes"] and r[f"{way}_bytes"] / 2**20 for way in WAYS]
        figures += [ratio(r["kv_s"], r["recurrent_s"]), ratio(r["kv_bytes"], r["recurrent_bytes"]),
                    ratio(r["recompute_s"], r["recurrent_s"])]
        cells.append([r["batch"], r["prefix"]] + [num(x, missing="skipped") for x in figures])
    return table(columns, cells)


def scaling_table(summary):
    columns = ["B", "rec longest/shortest P", "rec ms/1000 P", "KV ms/1000 P", "recompute ms/1000 P", "rec exponent",
               "KV exponent", "recompute exponent"]
    cells = [[e["batch"]] + [num(e[key], missing="-") for key in (
        "recurrent_flatness", "recurrent_ms_per_1000", "kv_ms_per_1000", "recompute_ms_per_1000", "recurrent_exponent",
        "kv_exponent", "recompute_exponent")] for e in summary["per_batch"]]
    return table(columns, cells)


def generation_section(rows, summary):
    lines = [
        "",
        "## Generation, backbone only: one step that extends each of B sequences by a token after a prefix of P",
        "ms = time per step (all B tokens); tok/s = B / step time; MiB = memory kept between steps, from the tensors:",
        "the recurrent retention states (the same at every P), the KV cache of P + 1 positions, and for recompute",
        "the embeddings of the P + 1 inputs that the parallel form reruns at every step. The prefix is read once and",
        "copied to every sequence (a step's cost does not depend on the values). Ratios > 1: recurrent wins.",
        "",
        generation_table(rows),
    ]
    notes = [f"- B = {r['batch']}, P = {r['prefix']}, {WAYS[way]}: {why}"
             for r in rows for way, why in r["skipped"].items()]
    if notes:
        lines += ["", "Skipped:"] + notes
    lines += [
        "",
        "Growth with the prefix, per batch: the recurrent step's time at the longest P over the shortest (1 = flat);",
        "the slope of a straight line through each way's times (ms per 1000 tokens of prefix); the exponent of a",
        "log-log fit (0 = flat, 1 = linear in P).",
        "",
        scaling_table(summary),
        "",
    ]
    last = summary["largest"]
    if last:
        row = next(r for r in rows if (r["batch"], r["prefix"]) == (last["batch"], last["prefix"]))
        grid = (max(r["batch"] for r in rows), max(r["prefix"] for r in rows))
        where = f" (B = {grid[0]}, P = {grid[1]}: one was skipped)" if grid != (row["batch"], row["prefix"]) else ""
        lines.append(
            f"At the largest batch and prefix measured, B = {row['batch']}, P = {row['prefix']}{where}: a step takes "
            f"{num(last['kv_over_recurrent_time'])}x as long with the KV cache as with the recurrent state "
            f"({num(row['kv_s'] * 1e3)} ms against {num(row['recurrent_s'] * 1e3)} ms, {num(row['kv_tokens_per_s'])} "
            f"against {num(row['recurrent_tokens_per_s'])} tokens/s), and the cache holds "
            f"{num(last['kv_over_recurrent_memory'])}x the memory ({size(row['kv_bytes'])} against "
            f"{size(row['recurrent_bytes'])} of state).")
        entry = next(e for e in summary["per_batch"] if e["batch"] == row["batch"])
        if entry["recurrent_flatness"] is not None:
            short, long = entry["recurrent_prefixes"]
            growth = ", ".join(f"{name} {num(entry[f'{way}_ms_per_1000'])} ms (exponent "
                               f"{num(entry[f'{way}_exponent'])})"
                               for way, name in WAYS.items() if entry[f"{way}_ms_per_1000"] is not None)
            lines.append(
                f"At B = {row['batch']} the recurrent step at P = {long} takes {num(entry['recurrent_flatness'])}x "
                f"its time at P = {short} (1 = flat); per 1000 tokens of prefix a step grows by: {growth}.")
    crossover = summary["crossover"]
    if crossover:
        b, p = crossover["batch"], crossover["prefix"]
        lines.append(
            f"Crossover: the smallest batch x prefix in the grid at which the recurrent step is faster than the KV step"
            f" is B = {b}, P = {p} (B x P = {b * p}); it is faster in {summary['recurrent_faster']} of the "
            f"{summary['compared']} cells where both ran.")
    elif summary["compared"]:
        lines.append(f"The recurrent step is faster than the KV step in none of the {summary['compared']} cells where "
                     f"both ran.")
    lines.append(
        "The KV baseline is fair (a preallocated cache written in place, scaled_dot_product_attention, the same "
        "widths, depth and FFN) but not the fastest possible: a narrower cache (int8 or fp8; bf16 where this run "
        "keeps float32) and paged or flash-decoding kernels would speed its step up. They cut the bytes read per "
        "step by a constant factor; the cache still grows with batch x prefix, and the recurrent state does not.")
    return lines


def plot_generation(rows, path, title):
    """Time per step against the prefix length, a line per way and batch size, log axes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batches = sorted({r["batch"] for r in rows})
    colours = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5))
    for (way, name), style in zip(WAYS.items(), ("-o", "--s", ":^")):
        for i, batch in enumerate(batches):
            points = [(r["prefix"], r[f"{way}_s"] * 1e3) for r in rows if r["batch"] == batch and r[f"{way}_s"]]
            if points:
                ax.plot(*zip(*points), style, color=colours(0.9 * i / max(1, len(batches) - 1)),
                        label=f"{name}, B = {batch}")
    ax.set(xscale="log", yscale="log", xlabel="prefix P (tokens)", ylabel="time per step (ms)", title=title)
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 0.3 and 2000, not 3x10^-1 and 2x10^3
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))  # labelled where decades are few
    ax.yaxis.set_minor_formatter(plain if high / low < 100 else matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({r["prefix"] for r in rows}), [str(p) for p in sorted({r["prefix"] for r in rows})])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # the measured prefixes are the ticks
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:  # none when every measurement was skipped
        ax.legend(fontsize=7, ncol=len(WAYS))
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


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
    share = lambda way, key: f"{100 * e2e[way][f'{key}_s'] / e2e[way]['total_s']:.0f}%"  # noqa: E731
    return table(
        ["part", "recurrent s", "share", "KV cache s", "share"],
        [[name] + [x for way in ("recurrent", "kv") for x in (num(e2e[way][f"{key}_s"]), share(way, key))]
         for key, name in parts.items()],
    )


def sampling_section(e2e):
    rec, kv = e2e["recurrent"], e2e["kv"]
    side = math.isqrt(e2e["tokens"])
    picture = f", a {4 * side}x{4 * side} image" if side * side == e2e["tokens"] else ""
    pct = lambda way, key: f"{100 * e2e[way][f'{key}_s'] / e2e[way]['total_s']:.0f}%"  # noqa: E731
    speed = lambda way: num(e2e["images"] * e2e["tokens"] / e2e[way]["total_s"])  # noqa: E731
    return [
        "",
        f"## End to end: {e2e['images']} sequences of {e2e['tokens']} tokens (4x4 RGB patches, {e2e['token_dim']} "
        f"values each{picture}), random weights, {e2e['sampler']} sampler, {e2e['steps']} head steps per token, "
        f"guidance {e2e['cfg_scale']:g}{' ramped' * e2e['cfg_ramp']}",
        "recurrent = model.sample with the RetNet's recurrent form; KV cache = the same loop over the attention model,",
        "its cache preallocated for every position; both call the same diffusion head with the same arguments.",
        "",
        sampling_table(e2e),
        "",
        f"The diffusion head takes {pct('recurrent', 'head')} of the time with the recurrent backbone and "
        f"{pct('kv', 'head')} with the KV cache ({e2e['steps']} head calls per token against one backbone step); the "
        f"backbone {pct('recurrent', 'backbone')} and {pct('kv', 'backbone')}. End to end the KV-cache loop takes "
        f"{num(kv['total_s'] / rec['total_s'])}x the recurrent one's time ({speed('kv')} against {speed('recurrent')} "
        f"tokens/s), its backbone {num(kv['backbone_s'] / rec['backbone_s'])}x.",
    ]


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
        lines += generation_section(result["generation"], result["generation_summary"])
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
        lines += sampling_section(result["sampling"])
    return "\n".join(lines)


def whole_numbers(text, flag):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        fail(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 1,16")


def build_parser():
    """bench.py's flags."""
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
    parser.add_argument("--batch", help=f"batch sizes for generation, comma-separated (default {DEFAULTS['batch']})")
    parser.add_argument("--recompute-max-tokens", type=number(int, 0), default=16384,
                        help="time recomputing the prefix only where B x P is at most this, as its cost grows as "
                        "B x P^2; 0: never (default 16384)")
    parser.add_argument(
        "--repeats", type=int, help=f"timed repeats per figure, the median is reported (default {DEFAULTS['repeats']})"
    )
    parser.add_argument(
        "--train-tokens",
        type=int,
        help=f"tokens per training step, B = tokens / L (default {DEFAULTS['train_tokens']})",
    )
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk size of the chunkwise form")
    parser.add_argument("--e2e-images", type=int,
                        help=f"sequences sampled end to end (default {DEFAULTS['e2e_images']})")
    parser.add_argument("--e2e-tokens", type=int, help=f"tokens per sequence end to end, 4x4 RGB patches (default "
                        f"{DEFAULTS['e2e_tokens']}: a 128x128 image)")
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
    parser.add_argument("--plot", help="also draw the generation table to this PNG: time per step against the prefix, "
                        "a line per way and batch size, log axes (needs matplotlib)")
    return parser


def parse_args(argv=None):
    """The flags, checked before any work (one line on stderr, exit code 2, for a bad one); sets --threads.
    Returns (args, parts, lengths, batches, device)."""
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts = args.parts.split(",")
    if not parts or not set(parts) <= set(PARTS):
        fail(f"--parts {args.parts!r}: give some of {', '.join(PARTS)}, comma-separated")
    lengths, batches = whole_numbers(args.lengths, "--lengths"), whole_numbers(args.batch, "--batch")
    for flag, value in (
        ("--lengths", min(lengths)),
        ("--batch", min(batches)),
        ("--repeats", args.repeats),
        ("--train-tokens", args.train_tokens),
        ("--chunk-size", args.chunk_size),
        ("--e2e-images", args.e2e_images),
        ("--e2e-tokens", args.e2e_tokens),
        ("--e2e-steps", args.e2e_steps),
        ("--threads", 1 if args.threads is None else args.threads),
    ):
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if args.e2e_steps > ADRConfig.diffusion_steps:
        fail(f"--e2e-steps must be at most {ADRConfig.diffusion_steps}, got {args.e2e_steps}")
    device = pick_device(args.device, args.compile)
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            check_writable_file(path, flag)
    if args.plot:
        if "generation" not in parts:
            fail(f"--plot draws the generation table: add generation to --parts {args.parts}")
        if importlib.util.find_spec("matplotlib") is None:  # said before the work, imported only to draw
            fail("--plot needs matplotlib: pip install matplotlib, or leave out --plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, parts, lengths, batches, device


def main(argv=None):
    args, parts, lengths, batches, device = parse_args(argv)
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
        batches=sorted(set(batches)),
        recompute_max_tokens=args.recompute_max_tokens,
        memory_share=MEMORY_SHARE,
        train_tokens=args.train_tokens,
        chunk_size=args.chunk_size,
        peak_memory="most bytes held at once during the step above the resting model, from "
        + ("torch.cuda.max_memory_allocated" if on_cuda else "torch's profiler allocation records (profile_memory)"),
    )
    progress = lambda what: print(f"bench: {what}", file=sys.stderr, flush=True)  # noqa: E731
    generation, training, sampling = [], [], None
    cache_dtype = torch.bfloat16 if on_cuda else torch.float32
    for length in sorted(set(lengths)) if "generation" in parts else []:
        prefix = read_prefix(model.eval(), attention.eval(), length, device, cache_dtype)
        for batch in header["batches"]:
            progress(f"generation at B = {batch}, P = {length}")
            generation.append(bench_generation(model, attention, prefix, batch, args.repeats, device,
                                               args.recompute_max_tokens, compile_steps() if args.compile else None))
        del prefix
    generation.sort(key=lambda r: (r["batch"], r["prefix"]))
    for length in lengths if "training" in parts else []:
        progress(f"training at L = {length}")
        training.append(
            bench_training(
                model.train(), attention.train(), length, args.train_tokens, args.chunk_size, args.repeats, device
            )
        )
    del model, attention
    if "sampling" in parts:
        progress(f"sampling {args.e2e_images} sequences of {args.e2e_tokens} tokens, recurrent and KV cache")
        sampling = bench_sampling(args.size, args.e2e_images, args.e2e_tokens, args.e2e_steps, args.e2e_sampler,
                                  args.e2e_cfg, args.repeats, device, cache_dtype, args.compile)
    summary = generation_summary(generation) if generation else None
    result = dict(header=header, generation=generation, generation_summary=summary, training=training,
                  sampling=sampling)
    print(report(result))
    if args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot_generation(generation, args.plot, f"adr bench --size {args.size}: one generation step, {header['device']}")


if __name__ == "__main__":
    run(main)
