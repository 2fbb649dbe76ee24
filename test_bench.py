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
from conftest import HERE
from cli import GUIDANCE, SAMPLING

GENERATION_COLUMNS = [
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


SAMPLING_COLUMNS = ["part", "seconds", "share"]


SAMPLING_PARTS = ["backbone", "diffusion head (reverse chains)", "other (embedding, bookkeeping)", "total"]


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


def test_quick_run_reports_every_row_and_column(tmp_path):
    json_path = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "bench.py", "--quick", "--threads", "1", "--json", str(json_path)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    generation, training, sampling = markdown_tables(run.stdout)

    assert generation[0] == GENERATION_COLUMNS
    assert [row[0] for row in generation[1:]] == ["64", "256"]
    assert training[0] == TRAINING_COLUMNS
    assert [row[0] for row in training[1:]] == ["64", "256"]
    for row in generation[1:] + training[1:]:
        assert all(positive_finite(cell) for cell in row), row
    assert sampling[0] == SAMPLING_COLUMNS
    assert [row[0] for row in sampling[1:]] == SAMPLING_PARTS
    for part, seconds, share in sampling[1:]:
        assert positive_finite(seconds) and 0 <= float(share.rstrip("%")) <= 100, (part, seconds, share)
    assert sampling[-1][2] == "100%"
    assert "At P = 256:" in run.stdout and "dominates sampling" in run.stdout

    figures = json.loads(json_path.read_text())
    header = figures["header"]
    assert header["device"] == "cpu" and header["threads"] == 1 and header["size"] == "tiny"
    for row in figures["generation"] + figures["training"]:
        assert all(math.isfinite(v) and v > 0 for v in row.values()), row
    small, large = figures["generation"]
    assert small["recurrent_bytes"] == large["recurrent_bytes"]  # the state does not grow with the prefix
    assert large["kv_bytes"] * 65 == small["kv_bytes"] * 257  # the cache holds P + 1 tokens
    assert large["recompute_bytes"] * 65 == small["recompute_bytes"] * 257
    e2e = figures["sampling"]
    assert e2e["backbone_s"] > 0 and e2e["head_s"] > 0 and e2e["other_s"] > 0
    assert e2e["backbone_s"] + e2e["head_s"] < e2e["total_s"]
    assert e2e["sampler"] == SAMPLING["sampler"] and e2e["cfg_scale"] == GUIDANCE["image"]["cfg_scale"]  # the defaults


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
    torch.manual_seed(0)
    model = ADR(ADRConfig(seq_len=33, **SIZES["tiny"])).eval()
    attention = bench.AttentionModel(64, 2, 2, 33).eval()
    graphs = []

    def recording(step):
        name = getattr(step, "__name__", "attention")
        return bench.compile_steps(backend=lambda graph, inputs: graphs.append(name) or graph.forward)(step)

    row = bench.bench_generation(model, attention, 32, 1, torch.device("cpu"), torch.float32, recording)
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
        (["--repeats", "0"], "--repeats"),
        (["--size", "huge"], "--size"),
        (["--device", "tpu"], "--device"),
        (["--e2e-steps", "5000"], "--e2e-steps"),
        (["--e2e-cfg", "nan"], "--e2e-cfg"),
        (["--parts", "generation,speed"], "--parts"),
        (["--json", os.path.join("no", "such", "folder", "b.json")], "--json"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
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
    flags = ["--size", "base", "--lengths", "16", "--repeats", "1", "--parts", "generation", "--threads", "1",
             "--json", str(json_path)]
    bench.main(flags)
    figures = json.loads(json_path.read_text())
    header = figures["header"]
    assert (header["d_model"], header["n_layer"], header["head_width"]) == (512, 8, 1024)
    assert len(figures["generation"]) == 1 and figures["training"] == [] and figures["sampling"] is None
    out = capsys.readouterr().out
    assert "--size base (d_model 512, 8 layers, 4 heads" in out and "## Generation" in out
    assert "## Training" not in out and "## End to end" not in out
