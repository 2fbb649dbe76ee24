"""bench.py: the measurement table."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
from adr import ADR, SIZES, ADRConfig
from conftest import HERE, randomise_head
from cli import GUIDANCE, SAMPLING

GENERATION_COLUMNS = ["B", "P", "recurrent ms", "KV cache ms", "recompute ms", "recurrent tok/s", "KV cache tok/s",
                      "recompute tok/s", "state MiB", "cache MiB", "inputs MiB", "KV/rec time", "KV/rec memory",
                      "recompute/rec time"]


SCALING_COLUMNS = ["B", "rec longest/shortest P", "rec ms/1000 P", "KV ms/1000 P", "recompute ms/1000 P",
                   "rec exponent", "KV exponent", "recompute exponent"]


TRAINING_COLUMNS = [
    "L",
    "B",
    "parallel tok/s",
    "parallel peak MiB",
    "chunkwise tok/s",
    "chunkwise peak MiB",
    "attention tok/s",
    "attention peak MiB",
]


SAMPLING_COLUMNS = ["part", "recurrent s", "share", "KV cache s", "share"]


SAMPLING_PARTS = ["backbone", "diffusion head (reverse chains)", "other (embedding, bookkeeping)", "total"]

WAYS = ("recurrent", "kv", "recompute")


def markdown_tables(text):
    """Every Markdown table in text, as a list of rows of cells (the separator line dropped)."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def positive_finite(cell):
    value = float(cell)
    return math.isfinite(value) and value > 0


def tiny_bytes(batch, prefix):
    """The tiny model's state and cache in float32, from adr.SIZES, not from bench: per layer a d_head x d_head
    state per sequence and head, and a key and a value per sequence, head and position 0..P."""
    tiny = SIZES["tiny"]
    d_head = tiny["d_model"] // tiny["n_head"]
    state = tiny["n_layer"] * batch * tiny["n_head"] * d_head * d_head * 4
    cache = tiny["n_layer"] * 2 * batch * tiny["n_head"] * (prefix + 1) * d_head * 4
    return state, cache


def test_quick_run_reports_every_row_and_column(tmp_path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "generation.png"
    run = subprocess.run(
        [sys.executable, "bench.py", "--quick", "--threads", "1", "--json", str(json_path), "--plot", str(plot_path)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    generation, scaling, training, sampling = markdown_tables(run.stdout)

    assert generation[0] == GENERATION_COLUMNS
    assert [row[:2] for row in generation[1:]] == [["1", "64"], ["1", "256"], ["4", "64"], ["4", "256"]]
    assert scaling[0] == SCALING_COLUMNS and [row[0] for row in scaling[1:]] == ["1", "4"]
    assert training[0] == TRAINING_COLUMNS
    assert [row[0] for row in training[1:]] == ["64", "256"]
    for row in generation[1:] + training[1:]:
        assert all(positive_finite(cell) for cell in row), row
    for row in scaling[1:]:
        assert all(math.isfinite(float(cell)) for cell in row), row
    assert sampling[0] == SAMPLING_COLUMNS
    assert [row[0] for row in sampling[1:]] == SAMPLING_PARTS
    for part, *cells in sampling[1:]:
        for seconds, share in (cells[:2], cells[2:]):
            assert positive_finite(seconds) and 0 <= float(share.rstrip("%")) <= 100, (part, seconds, share)
    assert sampling[-1][2] == sampling[-1][4] == "100%"
    out = run.stdout
    assert "At the largest batch and prefix measured, B = 4, P = 256:" in out and "Skipped" not in out
    assert "Crossover:" in out or "faster than the KV step in none of the 4 cells" in out
    assert "constant factor" in out and "The diffusion head takes" in out

    figures = json.loads(json_path.read_text())
    header = figures["header"]
    assert header["device"] == "cpu" and header["threads"] == 1 and header["size"] == "tiny"
    assert header["batches"] == [1, 4]
    for row in figures["generation"]:
        assert row.pop("skipped") == {}, row
        assert all(math.isfinite(v) and v > 0 for v in row.values()), row
        assert (row["recurrent_bytes"], row["kv_bytes"]) == tiny_bytes(row["batch"], row["prefix"])
        assert row["recompute_bytes"] == row["batch"] * (row["prefix"] + 1) * SIZES["tiny"]["d_model"] * 4
        for way in WAYS:
            assert row[f"{way}_tokens_per_s"] == pytest.approx(row["batch"] / row[f"{way}_s"])
    summary = figures["generation_summary"]
    assert (summary["largest"]["batch"], summary["largest"]["prefix"], summary["compared"]) == (4, 256, 4)
    state, cache = tiny_bytes(4, 256)
    assert summary["largest"]["kv_over_recurrent_memory"] == pytest.approx(cache / state)
    assert [e["batch"] for e in summary["per_batch"]] == [1, 4]
    assert all(e["recurrent_prefixes"] == [64, 256] and e["recurrent_flatness"] > 0 for e in summary["per_batch"])
    e2e = figures["sampling"]
    assert (e2e["images"], e2e["tokens"], e2e["steps"]) == (2, 16, 10)
    for way in ("recurrent", "kv"):
        assert e2e[way]["backbone_s"] > 0 and e2e[way]["head_s"] > 0 and e2e[way]["other_s"] > 0
        assert e2e[way]["backbone_s"] + e2e[way]["head_s"] < e2e[way]["total_s"]
    assert e2e["sampler"] == SAMPLING["sampler"] and e2e["cfg_scale"] == GUIDANCE["image"]["cfg_scale"]  # the defaults
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def generation_setup(seq_len=33):
    torch.manual_seed(0)
    model = ADR(ADRConfig(seq_len=seq_len, **SIZES["tiny"])).eval()
    attention = bench.AttentionModel(64, 2, 2, seq_len).eval()
    return model, attention, torch.device("cpu")


def test_generation_rows_hold_the_bytes_the_shapes_give():
    """A 2 x 2 grid: every figure finite, and the memory kept equal to the sizes computed from the shapes, which the
    memory check (held_bytes) uses too."""
    model, attention, cpu = generation_setup()
    for prefix_length in (8, 32):
        prefix = bench.read_prefix(model, attention, prefix_length, cpu, torch.float32)
        for batch in (1, 4):
            row = bench.bench_generation(model, attention, prefix, batch, 1, cpu, recompute_max_tokens=10**6)
            assert (row["batch"], row["prefix"], row["skipped"]) == (batch, prefix_length, {})
            assert all(math.isfinite(row[f"{way}_{unit}"]) and row[f"{way}_{unit}"] > 0
                       for way in WAYS for unit in ("s", "bytes", "tokens_per_s")), row
            assert (row["recurrent_bytes"], row["kv_bytes"]) == tiny_bytes(batch, prefix_length)
            assert bench.held_bytes(model.config, batch, prefix_length, torch.float32) == (
                row["recurrent_bytes"], row["kv_bytes"], row["recompute_bytes"])


def test_what_would_not_fit_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """With 8 MiB available (6 MiB may be taken) the states and caches of the quick grid fit, but recomputing 4 x 256
    tokens (its score matrices, about 12 MiB) does not; with 10 kB nothing fits. Skipped, with notes, not a crash."""
    monkeypatch.setattr(bench, "available_bytes", lambda device: 8 << 20)
    json_path, plot_path = tmp_path / "b.json", tmp_path / "b.png"
    flags = ["--quick", "--parts", "generation", "--repeats", "1", "--json", str(json_path), "--plot", str(plot_path)]
    bench.main(flags)
    rows = {(r["batch"], r["prefix"]): r for r in json.loads(json_path.read_text())["generation"]}
    assert all(r["recurrent_s"] > 0 and r["kv_s"] > 0 for r in rows.values())
    big = rows[4, 256]
    assert big["recompute_s"] is big["recompute_bytes"] is big["recompute_tokens_per_s"] is None
    assert "needs" in big["skipped"]["recompute"] and "over 75% of the 8 MiB available" in big["skipped"]["recompute"]
    assert all(r["recompute_s"] > 0 and r["skipped"] == {} for cell, r in rows.items() if cell != (4, 256))
    out = capsys.readouterr().out
    assert "Skipped:\n- B = 4, P = 256, recompute: needs" in out
    recompute_ms = {(int(row[0]), int(row[1])): row[4] for row in markdown_tables(out)[0][1:]}
    assert recompute_ms.pop((4, 256)) == "skipped" and all(positive_finite(ms) for ms in recompute_ms.values())

    monkeypatch.setattr(bench, "available_bytes", lambda device: 10_000)
    bench.main(flags)
    figures = json.loads(json_path.read_text())
    assert all(set(r["skipped"]) == set(WAYS) and r["recurrent_s"] is None for r in figures["generation"])
    assert figures["generation_summary"]["largest"] is None and figures["generation_summary"]["crossover"] is None
    assert "- B = 1, P = 64, recurrent: needs" in capsys.readouterr().out
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_recompute_limit_and_allocation_failures_are_notes(monkeypatch):
    model, attention, cpu = generation_setup()
    prefix = bench.read_prefix(model, attention, 16, cpu, torch.float32)
    row = bench.bench_generation(model, attention, prefix, 4, 1, cpu, recompute_max_tokens=63)
    assert row["recompute_s"] is None
    assert row["skipped"] == {"recompute": "B x P = 64 is over --recompute-max-tokens 63"}
    assert row["recurrent_s"] > 0 and row["kv_s"] > 0

    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: you tried to "
                           "allocate 1099511627776 bytes.")

    monkeypatch.setattr(bench, "seconds_per_call", no_memory)
    row = bench.bench_generation(model, attention, prefix, 4, 1, cpu, recompute_max_tokens=64)
    assert all(row[f"{way}_s"] is None and "ran out of memory" in row["skipped"][way] for way in WAYS), row

    def bug(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(bench, "seconds_per_call", bug)
    with pytest.raises(RuntimeError, match="shapes"):  # not an allocation: shown, not noted
        bench.bench_generation(model, attention, prefix, 4, 1, cpu, recompute_max_tokens=64)


def test_the_kv_sampling_loop_is_adr_sample_with_attention_for_the_backbone():
    """sample_with_kv_cache (a step per token from the cache) draws the tokens that ADR.sample in parallel mode draws
    when its backbone is the attention model run over the whole prefix: the same inputs, the same head calls (the
    same random draws), the same guidance ramp."""
    torch.manual_seed(0)
    model = randomise_head(ADR(ADRConfig(token_dim=6, seq_len=7, num_classes=3, **SIZES["tiny"])).double()).eval()
    attention = bench.AttentionModel(64, 2, 2, 7).double().eval()
    labels = torch.tensor([0, 2])
    options = dict(steps=3, cfg_scale=2.5, cfg_ramp=True)
    torch.manual_seed(1)
    cached = bench.sample_with_kv_cache(model, attention, 2, labels, cache_dtype=torch.float64, **options)
    model.backbone = lambda h, *args, **kwargs: (attention(h), None)  # recomputed over all inputs, no cache
    torch.manual_seed(1)
    full = model.sample(2, labels, mode="parallel", **options)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-10)
    del model.backbone
    torch.manual_seed(1)
    timed, seconds = bench.timed_kv_sample(model, attention, 2, labels, cache_dtype=torch.float64, **options)
    torch.testing.assert_close(timed, cached, rtol=0, atol=0)
    assert 0 < seconds["backbone"] + seconds["head"] < seconds["total"]
    assert "forward" not in vars(attention) and "sample" not in vars(model.head)  # the clocks are gone again


def test_kv_cache_step_matches_full_causal_attention():
    torch.manual_seed(0)
    model = bench.AttentionModel(d_model=16, n_layer=2, n_head=2, seq_len=12).double().eval()
    h = torch.randn(3, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        full = model(h)
        caches = model.new_cache(3, 12, torch.float64, "cpu")
        steps = [model(h[:, :5], caches)]  # prefill, then one token at a time
        steps += [model(h[:, n : n + 1], caches, pos=n) for n in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
    h[:, 7] += torch.randn(3, 16, dtype=torch.float64)  # a later token must not change earlier outputs
    with torch.no_grad():
        changed = model(h)
    torch.testing.assert_close(changed[:, :7], full[:, :7], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 7:], full[:, 7:])


def test_compiled_generation_steps_are_the_ones_timed_and_compute_the_same():
    """--compile: the recurrent step, the recompute and the KV step are each timed through a graph of their own, traced
    whole by dynamo (fullgraph); a backend that records the graphs and runs them (no C++ build) gives the same numbers
    as the plain steps."""
    model, attention, cpu = generation_setup()
    graphs = []

    def recording(step):
        name = getattr(step, "__name__", "attention")
        return bench.compile_steps(backend=lambda graph, inputs: graphs.append(name) or graph.forward)(step)

    prefix = bench.read_prefix(model, attention, 32, cpu, torch.float32)
    row = bench.bench_generation(model, attention, prefix, 2, 1, cpu, 10**6, recording)
    assert sorted(graphs) == ["attention", "backbone", "backbone"]  # the backbone's recurrent and parallel forms
    assert all(row[k] > 0 for k in ("recurrent_s", "recompute_s", "kv_s"))
    h = torch.randn(1, 33, 64)
    with torch.no_grad():
        _, states = model.backbone(h[:, :32], "chunkwise")
        z, new_states = recording(model.backbone)(h[:, 32:], "recurrent", states, pos=32)
        z_plain, plain_states = model.backbone(h[:, 32:], "recurrent", states, pos=32)
        caches, plain_caches = (attention.new_cache(1, 33, torch.float32, "cpu") for _ in range(2))
        for cache in (caches, plain_caches):
            attention(h[:, :32], cache)
        y, y_plain = recording(attention)(h[:, 32:], caches, pos=32), attention(h[:, 32:], plain_caches, pos=32)
    for got, expected in ((z, z_plain), (new_states, plain_states), (y, y_plain), (caches, plain_caches)):
        torch.testing.assert_close(got, expected)
    assert caches[0][:, :, :, 32].abs().sum() > 0  # the step wrote its key and value into the cache


def test_cpu_peak_bytes_follows_allocations_and_frees():
    def allocate():
        a = torch.empty(1 << 18)  # 1 MiB of float32
        b = torch.empty(1 << 17)  # 0.5 MiB, both held: 1.5 MiB
        del a, b
        torch.empty(1 << 18)  # 1 MiB after the frees: the peak stays 1.5 MiB

    assert bench.peak_bytes(allocate, torch.device("cpu")) == 3 << 19


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lengths", "64,abc"], "--lengths"),
        (["--batch", "0"], "--batch"),
        (["--batch", "x"], "--batch"),
        (["--batch", "1,,4"], "--batch"),
        (["--recompute-max-tokens", "-1"], "--recompute-max-tokens"),
        (["--e2e-tokens", "0"], "--e2e-tokens"),
        (["--plot", os.path.join("no", "such", "folder", "g.png")], "--plot"),
        (["--plot", "g.png", "--parts", "training"], "--plot"),
        (["--repeats", "0"], "--repeats"),
        (["--size", "huge"], "--size"),
        (["--device", "tpu"], "--device"),
        (["--e2e-steps", "5000"], "--e2e-steps"),
        (["--e2e-cfg", "nan"], "--e2e-cfg"),
        (["--parts", "generation,speed"], "--parts"),
        (["--json", os.path.join("no", "such", "folder", "b.json")], "--json"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "ADR", lambda config: pytest.fail("a model was built before the flags were checked"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr("cli.cpp_compiler_found", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--compile"])  # bench runs on the CPU unless told otherwise
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no C++ compiler (g++) was found here" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_base_size_runs_and_parts_can_be_left_out(tmp_path, capsys):
    """--size base is ADRConfig's defaults (an empty SIZES entry): the header must still name its dimensions."""
    json_path = tmp_path / "base.json"
    flags = ["--size", "base", "--lengths", "16", "--batch", "1", "--repeats", "1", "--parts", "generation",
             "--threads", "1", "--json", str(json_path)]
    bench.main(flags)
    figures = json.loads(json_path.read_text())
    header = figures["header"]
    assert (header["d_model"], header["n_layer"], header["head_width"]) == (512, 8, 1024)
    assert len(figures["generation"]) == 1 and figures["training"] == [] and figures["sampling"] is None
    out = capsys.readouterr().out
    assert "--size base (d_model 512, 8 layers, 4 heads" in out and "## Generation" in out
    assert "## Training" not in out and "## End to end" not in out
