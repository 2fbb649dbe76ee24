"""Tests for adr: `python -m pytest -q` (CPU only, about 75 s on 2 cores). Tiny models throughout;
the data the loaders read is written by the tests in the real on-disk formats."""

import csv
import json
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import adr
import bench
import sample
import train_audio
import train_image
from adr import ADR, SIZES, ADRConfig, Diffusion, MultiScaleRetention, audio_layout, image_layout, layout_shape, load_checkpoint, save_checkpoint
from train_audio import prepare_clip, read_wav, write_wav

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test's subprocesses use one thread too: threads
    that wait on each other on two busy cores made the suite many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(token_dim=6, seq_len=10, num_classes=3, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=num_classes, **{**SIZES["tiny"], **overrides})
    return ADR(cfg).to(dtype)


def randomise_head(model, std=0.05):
    """The head's modulation and output start at zero; give them random weights so samples depend on z."""
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, std)
    return model


# ----------------------------------------------------------------------------------------------
# Retention: the three forms agree


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_forms_agree(dtype):
    diffs = adr.check_equivalence(dtype)
    assert set(diffs) >= {"retention recurrent", "backbone recurrent", "backbone chunkwise B=5"}
    assert max(diffs.values()) <= {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


def test_equivalence_check_catches_a_broken_chunkwise(monkeypatch):
    """The assertion is not vacuous: a chunkwise form that forgets the earlier chunks is caught."""
    def forgets_earlier_chunks(q, k, v, log_gamma, state, chunk_size):
        chunks = range(0, q.shape[2], chunk_size)
        outputs = [adr.retention_parallel(*(t[:, :, s : s + chunk_size] for t in (q, k, v)), log_gamma) for s in chunks]
        return torch.cat(outputs, dim=2), state

    monkeypatch.setattr(adr, "retention_chunkwise", forgets_earlier_chunks)
    with pytest.raises(AssertionError, match="chunkwise B=1"):
        adr.check_equivalence(torch.float64)


def test_decay_mask_has_no_overflow_at_8192():
    log_gamma = torch.log1p(-torch.tensor([2.0**-5]))
    mask = adr.decay_mask(8192, log_gamma)
    assert torch.isfinite(mask).all()
    assert mask.triu(1).abs().max() == 0  # above the diagonal: exactly zero
    assert mask[0, 100, 90] == pytest.approx((1 - 2.0**-5) ** 10, rel=1e-5)
    assert (mask.diagonal(dim1=1, dim2=2) == 1).all()


def test_bf16_autocast_stays_close_past_position_256():
    """Positions and decays are computed in float32 and the state is summed in float32, so bf16
    autocast (as used on GPUs) stays within bf16 rounding of float32 in all three forms."""
    torch.manual_seed(0)
    layer = MultiScaleRetention(64, 4)
    x = torch.randn(2, 300, 64)
    reference = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for form in ("parallel", "chunkwise", "recurrent"):
            out = layer(x, form, chunk_size=64)[0]
            assert out.dtype == torch.bfloat16
            assert ((out.float() - reference).abs().max() / reference.abs().max()).item() < 0.03, form


def test_one_head_retention_is_not_zero():
    """A norm across heads would subtract the only head's mean from itself; per-head norm must not."""
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, 1)
    out, _ = layer(torch.randn(2, 12, 16))
    assert out.abs().mean() > 1e-3


def test_recurrent_state_is_constant_size():
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, 2)
    _, state = layer(torch.randn(1, 3, 16), "chunkwise", chunk_size=2)
    _, state_long = layer(torch.randn(1, 300, 16), "chunkwise", chunk_size=64)
    assert state.shape == state_long.shape == (1, 2, 8, 8)


# ----------------------------------------------------------------------------------------------
# Causality and token mixing


def causal_influence(model, j=4):
    """Change token j; return (z_i for i <= j unchanged bit for bit, z_i for every i > j changed)."""
    torch.manual_seed(1)
    tokens = torch.randn(2, model.cfg.seq_len, model.cfg.token_dim)
    changed = tokens.clone()
    changed[:, j] += 1.0
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        z, z2 = model.condition(tokens, labels), model.condition(changed, labels)
    before_same = torch.equal(z[:, : j + 1], z2[:, : j + 1])
    after_changed = all((z[:, i] - z2[:, i]).abs().max() > 1e-6 for i in range(j + 1, model.cfg.seq_len))
    return before_same, after_changed


def test_causality_and_token_mixing():
    model = tiny_model().eval()
    assert causal_influence(model) == (True, True)


def test_token_mixing_check_fails_without_retention(monkeypatch):
    """A model whose retention outputs zeros sees only the previous token (through the causal shift),
    so tokens two or more steps later are not influenced: the check above must notice."""
    model = tiny_model().eval()
    monkeypatch.setattr(adr, "retention_parallel", lambda q, k, v, log_gamma: torch.zeros_like(v))
    before_same, after_changed = causal_influence(model)
    assert before_same and not after_changed


# ----------------------------------------------------------------------------------------------
# The DDPM schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_alpha_bar(schedule):
    d = Diffusion.make(1000, schedule)
    alpha_bar = d.alpha_bar
    assert (alpha_bar[1:] < alpha_bar[:-1]).all(), "alpha_bar must strictly decrease"
    assert alpha_bar[0] > 0.999 and alpha_bar[-1] < 1e-4
    assert (d.betas <= 0.999).all() and (d.betas > 0).all()


def test_respaced_schedule_keeps_alpha_bar():
    d = Diffusion.make(1000)
    r = d.respaced(100)
    assert len(r) == 100 and r.timesteps[0] == 0 and r.timesteps[-1] == 999
    torch.testing.assert_close(r.alpha_bar, d.alpha_bar[r.timesteps], rtol=1e-12, atol=0)
    assert len(d.respaced(1000)) == 1000
    torch.testing.assert_close(d.respaced(1000).betas, d.betas)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        d.respaced(0)


def test_q_sample_mean_and_variance():
    d = Diffusion.make(1000)
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for t in (0, 300, 999):
        xt = d.q_sample(x0, torch.full((200_000,), t), torch.randn_like(x0))
        a = d.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - a, abs=5e-3 + 0.02 * (1 - a))


@pytest.mark.parametrize("steps", [1000, 100])
def test_reverse_step_is_the_posterior_mean(steps):
    """Given the true eps, the paper's reverse step (without noise) equals the Gaussian posterior mean
    mu~(x_t, x_0) = sqrt(a_prev) beta_t / (1 - a_t) x_0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t."""
    d = Diffusion.make(1000).respaced(steps)
    torch.manual_seed(0)
    x0, eps = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for i in (1, steps // 2, steps - 1):
        a, a_prev, beta = d.alpha_bar[i], d.alpha_bar[i - 1], d.betas[i]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        posterior_mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * xt
        torch.testing.assert_close(d.p_step(xt, i, eps, torch.zeros_like(xt)), posterior_mean, rtol=1e-9, atol=1e-9)
    # with noise, the step adds sigma_t z with sigma_t^2 = beta~_t
    z = torch.randn(5, 7, dtype=torch.float64)
    diff = d.p_step(xt, i, eps, z) - d.p_step(xt, i, eps, torch.zeros_like(z))
    torch.testing.assert_close(diff, d.posterior_var[i].sqrt() * z)


def test_clipped_step_is_the_posterior_mean_at_the_clamped_x0():
    d = Diffusion.make(1000).respaced(100)
    torch.manual_seed(0)
    x0, eps = 3 * torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    i = 99  # t = T: 1 / sqrt(alpha) ~ 350, where an unclipped step amplifies any error of eps
    a, a_prev, beta = d.alpha_bar[i], d.alpha_bar[i - 1], d.betas[i]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    clamped = x0.clamp(-1, 1)
    posterior_mean = a_prev.sqrt() * beta / (1 - a) * clamped + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * xt
    torch.testing.assert_close(d.p_step(xt, i, eps, torch.zeros_like(xt), clip=True), posterior_mean)
    inside = x0.clamp(-0.9, 0.9)  # nothing to clip: the same step as without clipping
    xt = a.sqrt() * inside + (1 - a).sqrt() * eps
    torch.testing.assert_close(d.p_step(xt, i, eps, 0 * xt, clip=True), d.p_step(xt, i, eps, 0 * xt))


# ----------------------------------------------------------------------------------------------
# Learning and sampling


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny_model(token_dim=12, seq_len=16)
    torch.manual_seed(0)
    tokens, labels = torch.rand(8, 16, 12) * 2 - 1, torch.randint(0, 3, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = model(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, f"loss fell from {first:.3f} to {last:.3f} only"


@pytest.mark.parametrize("layout", [adr.image_layout(), adr.audio_layout(length=1600, chunk=160)])
def test_sampling_shapes(layout):
    seq_len, token_dim = adr.layout_shape(layout)
    model = tiny_model(token_dim=token_dim, seq_len=seq_len, num_classes=10).eval()
    torch.manual_seed(0)
    tokens = model.sample(3, torch.tensor([0, 5, 9]), steps=2)
    assert tokens.shape == (3, seq_len, token_dim)
    x = adr.from_tokens(tokens, layout)
    assert x.shape == ((3, 3, 32, 32) if layout["kind"] == "image" else (3, 1600))
    assert x.abs().max() <= 1


def test_same_seed_same_samples_and_guidance():
    model = randomise_head(tiny_model().eval())
    labels = torch.tensor([0, 2])
    torch.manual_seed(7)
    a = model.sample(2, labels, steps=3, cfg_scale=3.0)
    torch.manual_seed(7)
    b = model.sample(2, labels, steps=3, cfg_scale=3.0)
    torch.manual_seed(8)
    c = model.sample(2, labels, steps=3, cfg_scale=3.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="guidance needs class labels"):
        model.sample(2, None, steps=2, cfg_scale=3.0)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_recurrent_sampling_equals_parallel_recompute(cfg_scale):
    model = randomise_head(tiny_model(dtype=torch.float64).eval())
    labels = torch.tensor([1, 2])
    torch.manual_seed(3)
    recurrent = model.sample(2, labels, steps=4, cfg_scale=cfg_scale)
    torch.manual_seed(3)
    parallel = model.sample(2, labels, steps=4, cfg_scale=cfg_scale, mode="parallel")
    assert ((recurrent - parallel).abs().max() / recurrent.abs().max()).item() < 1e-10
    # and the samples really depend on the earlier tokens: a different prompt changes the rest
    torch.manual_seed(3)
    other = model.sample(2, labels, steps=4, cfg_scale=cfg_scale, prompt=recurrent[:, :1] + 0.5)
    assert not torch.allclose(other[:, 1:], recurrent[:, 1:])


def test_bad_prompts_and_cpu_labels():
    model = tiny_model().eval()
    for shape in ((2, 10, 6), (2, 11, 6), (3, 4, 6), (2, 4, 5)):  # full length, too long, wrong n, wrong width
        with pytest.raises(ValueError, match="prompt must be"):
            model.sample(2, torch.tensor([0, 1]), steps=2, prompt=torch.zeros(shape))
    assert model.sample(1, torch.tensor([2]), steps=1, prompt=torch.zeros(1, 9, 6)).shape == (1, 10, 6)


def test_linear_schedule_stays_valid_for_few_steps():
    for steps in (10, 20, 50):
        alpha_bar = Diffusion.make(steps, "linear").alpha_bar
        assert (alpha_bar > 0).all() and (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert Diffusion.make(1000).respaced(1).timesteps.tolist() == [999]  # one step starts from t = T


def test_prompt_is_kept_and_prefilled_like_recurrent():
    model = randomise_head(tiny_model(dtype=torch.float64).eval())
    torch.manual_seed(0)
    prompt = torch.randn(2, 4, 6, dtype=torch.float64)
    torch.manual_seed(5)
    out = model.sample(2, torch.tensor([0, 1]), steps=3, prompt=prompt, chunk_size=3)
    torch.manual_seed(5)
    reference = model.sample(2, torch.tensor([0, 1]), steps=3, prompt=prompt, mode="parallel")
    assert torch.equal(out[:, :4], prompt)
    assert ((out - reference).abs().max() / out.abs().max()).item() < 1e-10


# ----------------------------------------------------------------------------------------------
# Token layouts


def test_patchify_roundtrip_and_raster_order():
    x = torch.randn(2, 3, 32, 32)
    tokens = adr.patchify(x, 4)
    assert tokens.shape == (2, 64, 48)
    assert torch.equal(adr.unpatchify(tokens, 4, 3, 32, 32), x)
    # token 1 is the patch right of token 0; token 8 is the patch below token 0
    assert torch.equal(tokens[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(tokens[0, 8].view(4, 4, 3), x[0, :, 4:8, 0:4].permute(1, 2, 0))


def test_audio_tokens_roundtrip_and_mu_law():
    layout = adr.audio_layout()
    wave = (torch.randint(-32768, 32768, (2, 16000)) / 32768).float()
    tokens = adr.to_tokens(wave, layout)
    assert tokens.shape == (2, 100, 160)
    torch.testing.assert_close(adr.from_tokens(tokens, layout), wave, atol=2e-6, rtol=0)
    quiet = torch.tensor([0.01])
    assert adr.mu_law(quiet).item() > 0.2  # a sample at 1% of full scale gets over 20% of the range


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_roundtrip_gives_identical_samples(tmp_path):
    model = randomise_head(tiny_model().eval())
    ema = randomise_head(tiny_model(seed=1).eval())
    path = tmp_path / "ckpt.pt"
    adr.save_checkpoint(path, model, adr.image_layout(), ["a", "b", "c"], ema=ema, step=12)
    assert not os.path.exists(f"{path}.tmp")
    for use_ema, source in ((False, model), (True, ema)):
        loaded, ckpt = adr.load_checkpoint(path, use_ema=use_ema)
        assert ckpt["step"] == 12 and ckpt["class_names"] == ["a", "b", "c"] and ckpt["layout"]["kind"] == "image"
        torch.manual_seed(0)
        a = source.sample(2, torch.tensor([0, 1]), steps=3)
        torch.manual_seed(0)
        b = loaded.sample(2, torch.tensor([0, 1]), steps=3)
        assert torch.equal(a, b)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": adr.CHECKPOINT_FORMAT, "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(adr.CheckpointError, match="not an adr checkpoint.*refused"):
        adr.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_wrong_files_give_a_clear_error(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    ckpt = {"format": adr.CHECKPOINT_FORMAT, "config": {"no_such_field": 1}, "model": {}}
    torch.save(ckpt, tmp_path / "future.pt")  # an adr checkpoint this adr.py cannot build
    for name, message in (("random.pt", "could not be read"), ("other.pt", "marker"), ("missing.pt", "no checkpoint at"), ("future.pt", "does not match this adr.py")):
        with pytest.raises(adr.CheckpointError, match=message):
            adr.load_checkpoint(tmp_path / name)


# ----------------------------------------------------------------------------------------------
# Likelihood in bits per dimension


def test_bound_matches_the_analytic_gaussian_case():
    """Data x0 ~ N(mu, s^2) per dimension with the exact denoiser eps(x_t) = E[eps | x_t]. Then each
    term of the bound has a closed form: L_{t-1} = coef_t Var(eps | x_t), Var(eps | x_t) =
    a s^2 / (a s^2 + 1 - a); the decoder's mean misses x0 by u ~ N(0, Var(x0 | x1)), integrated here
    by quadrature. The estimator must agree within its standard error."""
    d = Diffusion.make(1000)
    mu, s, half_bin, dims, n = 0.1, 0.3, 1 / 255, 4, 50_000
    a = d.alpha_bar

    def exact_eps(x_t, t):
        a_t = a[t].unsqueeze(-1)
        return (1 - a_t).sqrt() * (x_t - a_t.sqrt() * mu) / (a_t * s**2 + 1 - a_t)

    prior = 0.5 * ((1 - a[-1]) + a[-1] * (mu**2 + s**2) - 1 - torch.log(1 - a[-1]))
    coef = d.betas**2 / (2 * d.posterior_var * d.alphas * (1 - a))
    kl = (coef[1:] * a[1:] * s**2 / (a[1:] * s**2 + 1 - a[1:])).sum()
    var_u = s**2 * (1 - a[0]) / (a[0] * s**2 + 1 - a[0])
    u = torch.linspace(-12, 12, 200_001, dtype=torch.float64) * var_u.sqrt()
    density = torch.exp(-(u**2) / (2 * var_u))
    log_p = adr.log_prob_interval(torch.tensor(-half_bin), torch.tensor(half_bin), u, d.betas[0].sqrt())
    decoder = -(density * log_p).sum() / density.sum()
    analytic = (prior + kl + decoder).item()  # nats per dimension

    torch.manual_seed(0)
    x0 = mu + s * torch.randn(n, dims, dtype=torch.float64)
    per_token = adr.token_nll(x0, x0 - half_bin, x0 + half_bin, exact_eps, d) / dims
    estimate, stderr = per_token.mean().item(), per_token.std().item() / math.sqrt(n)
    assert stderr < 0.01 * analytic
    assert abs(estimate - analytic) < 4 * stderr, f"estimate {estimate:.4f} ± {stderr:.4f}, analytic {analytic:.4f}"
    # a slightly wrong denoiser pays for it: the bound rises far beyond the noise
    worse = adr.token_nll(x0, x0 - half_bin, x0 + half_bin, lambda x, t: 0.5 * exact_eps(x, t), d) / dims
    assert worse.mean().item() > analytic + 10 * stderr


def bpd_stats(model, tokens, labels, layout, batch_size):
    values = torch.cat([adr.bits_per_dim(model, tokens[i : i + batch_size], labels[i : i + batch_size], layout) for i in range(0, len(tokens), batch_size)])
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def image_batch(n=32, seed=0):
    layout = adr.image_layout(height=8, width=8)
    torch.manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 8, 8)).float() / 127.5 - 1  # 8-bit pixels scaled to [-1, 1]
    return layout, adr.to_tokens(pixels, layout), torch.randint(0, 3, (n,))


def test_bpd_does_not_depend_on_batch_size():
    layout, tokens, labels = image_batch()
    model = randomise_head(tiny_model(token_dim=48, seq_len=4), std=0.02).eval()
    torch.manual_seed(1)
    whole, se_whole = bpd_stats(model, tokens, labels, layout, 32)
    torch.manual_seed(2)
    split, se_split = bpd_stats(model, tokens, labels, layout, 4)
    assert math.isfinite(whole) and se_whole > 0
    assert abs(whole - split) < 4 * math.hypot(se_whole, se_split)


def test_bpd_is_finite_for_silent_audio_and_saturated_images():
    audio = adr.audio_layout(length=1600, chunk=160)
    model = randomise_head(tiny_model(token_dim=160, seq_len=10)).eval()
    silence = adr.to_tokens(torch.zeros(2, 1600), audio)
    full_scale = adr.to_tokens(torch.tensor([[-1.0], [32767 / 32768]]).repeat(1, 1600), audio)
    for tokens in (silence, full_scale):
        assert torch.isfinite(adr.bits_per_dim(model, tokens, torch.tensor([0, 1]), audio)).all()
    image = adr.image_layout(height=8, width=8)
    model = randomise_head(tiny_model(token_dim=48, seq_len=4)).eval()
    for value in (-1.0, 1.0):
        tokens = adr.to_tokens(torch.full((2, 3, 8, 8), value), image)
        assert torch.isfinite(adr.bits_per_dim(model, tokens, torch.tensor([0, 1]), image)).all()


def test_bpd_falls_as_a_tiny_model_trains():
    layout, tokens, labels = image_batch(16)
    tokens = tokens.clamp(-1, 1)
    model = tiny_model(token_dim=48, seq_len=4)
    torch.manual_seed(0)
    before, se_before = bpd_stats(model.eval(), tokens, labels, layout, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        loss = model(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, se_after = bpd_stats(model.eval(), tokens, labels, layout, 16)
    assert after < before - 4 * math.hypot(se_before, se_after), f"bits/dim {before:.3f} -> {after:.3f}"


# ==============================================================================================
# train_image.py: data, the training loop, checkpoints, torchrun


LAYOUT = adr.image_layout()
# a short run: few steps, tiny batches, 2 reverse diffusion steps for the sample grid
FAST = ["--size", "tiny", "--batch-size", "4", "--eval-examples", "4", "--bpd-examples", "4", "--sample-steps", "2", "--num-workers", "0", "--log-every", "0"]




def write_image(path, seed, size=(40, 36)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_dir(tmp_path):
    """DIR/train/{cat,ship}/ with 6 PNG/JPEG images each plus one corrupt file, DIR/test/{cat,ship}/ with 2 each."""
    root = tmp_path / "images"
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(("cat", "ship")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                write_image(folder / f"{i}.{'png' if i % 2 else 'jpg'}", seed=100 * c + i)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def run_script(args, timeout=120, env=None):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Data


def test_load_image_centre_crops_and_scales(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = train_image.load_image(tmp_path / "wide.png", 32, 32)
    expected = torch.from_numpy(pixels[:, 16:48]).permute(2, 0, 1).float() / 127.5 - 1  # the centre square, no resize
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected)
    write_image(tmp_path / "big.jpg", 0, size=(97, 130))
    y = train_image.load_image(tmp_path / "big.jpg", 32, 32)
    assert y.shape == (3, 32, 32) and y.min() >= -1 and y.max() <= 1
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.jpg"):
        train_image.load_image(tmp_path / "bad.jpg", 32, 32)


def test_image_folder_skips_unreadable_files(image_dir, capsys):
    train_set, test_set, names = train_image.image_folder_data(str(image_dir), LAYOUT)
    assert names == ["cat", "ship"]
    assert len(train_set) == 12 and len(test_set) == 4  # the corrupt file and the .txt are not in
    assert "skipped 1 unreadable file" in capsys.readouterr().err
    labels = [train_set[i][1] for i in range(len(train_set))]
    assert labels == [0] * 6 + [1] * 6
    # the first cat image, decoded and centre-cropped by load_image, is item 0 (up to the random flip)
    x, _ = train_set[0]
    expected = train_image.load_image(image_dir / "train" / "cat" / "0.jpg", 32, 32)
    assert torch.equal(x, expected) or torch.equal(x, expected.flip(-1))
    flips = {torch.equal(train_set[0][0], expected) for _ in range(40)}
    assert flips == {True, False}  # training images are flipped at random
    assert all(torch.equal(test_set[0][0], test_set[0][0]) for _ in range(5))  # test images are not
    # a flat DIR/<class>/ folder: no test split
    flat_train, flat_test, flat_names = train_image.image_folder_data(str(image_dir / "train"), LAYOUT)
    assert len(flat_train) == 12 and flat_test is None and flat_names == ["cat", "ship"]
    # a flat folder with a test/ sub-folder: test/ is the test split, not a class
    for name in ("cat", "ship"):
        os.rename(image_dir / "train" / name, image_dir / name)
    (image_dir / "train").rmdir()
    flat_train, flat_test, flat_names = train_image.image_folder_data(str(image_dir), LAYOUT)
    assert flat_names == ["cat", "ship"] and len(flat_train) == 12 and len(flat_test) == 4


def test_held_out_examples_span_the_classes():
    """Test sets are often stored class by class: the held-out subset must not be the first class only."""
    images = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    task = train_image.Task(train_image.ImageDataset(images, [0] * 20, True), train_image.ImageDataset(images, [0] * 10 + [1] * 10 + [2] * 20, False), LAYOUT, ["a", "b", "c"], None)
    labels = torch.cat([y for _, y in train_image.held_out_batches(task, 12, 5, torch.device("cpu"))])
    assert len(labels) == 12 and set(labels.tolist()) == {0, 1, 2}
    again = torch.cat([y for _, y in train_image.held_out_batches(task, 12, 5, torch.device("cpu"))])
    assert torch.equal(labels, again)  # the same examples at every evaluation


def test_image_folder_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_image.image_folder_data(str(tmp_path / "missing"), LAYOUT)
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        train_image.image_folder_data(str(tmp_path / "empty"), LAYOUT)
    assert e.value.code == 2 and "no readable images" in capsys.readouterr().err


def write_cifar_batches(root, per_batch=4, seed=0):
    """The real cifar-10-batches-py layout (pickled dicts of uint8 rows: 1024 red, 1024 green, 1024 blue
    values), with random contents, so torchvision's md5 checksums do not match."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, per_batch).tolist(), "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return folder, names, batches


def test_cifar10_files_without_valid_checksums(tmp_path, capsys):
    import torchvision

    folder, names, batches = write_cifar_batches(tmp_path)
    with pytest.raises(RuntimeError, match="corrupted"):  # torchvision checks the md5 of each file
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    train_set, test_set, class_names = train_image.cifar10_data(str(tmp_path))
    assert "do not match torchvision's checksums" in capsys.readouterr().err
    assert class_names == names and len(train_set) == 20 and len(test_set) == 4
    first = batches["data_batch_1"]
    x, label = test_set.images[0], test_set.labels[0]  # the test split: test_batch
    assert label == batches["test_batch"]["labels"][0] and x.shape == (3, 32, 32)
    x, label = train_set.images[0], train_set[0][1]
    assert label == first["labels"][0]
    assert x[0, 0, 1] == first["data"][0, 1] and x[1, 0, 0] == first["data"][0, 1024] and x[2, 31, 31] == first["data"][0, 3071]
    image, _ = test_set[1]
    assert torch.equal(image, torch.from_numpy(batches["test_batch"]["data"][1].reshape(3, 32, 32)).float() / 127.5 - 1)


def test_cifar10_refuses_pickles_that_run_code(tmp_path, capsys):
    folder, _, _ = write_cifar_batches(tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "data_batch_1", "wb") as f:  # a pickle that would call os.system("touch ...")
        f.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(SystemExit) as e:
        train_image.cifar10_data(str(tmp_path))
    assert e.value.code == 2 and "refusing to load" in capsys.readouterr().err and not marker.exists()


def test_no_data_offline_gives_one_clear_line(tmp_path):
    closed = "http://127.0.0.1:9"  # the download fails at once, as it does offline
    proxies = {name: closed for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    result = run_script(["train_image.py", "--size", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")], env={**proxies, "NO_PROXY": "", "no_proxy": ""})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download CIFAR-10"), result.stderr
    assert "--image-folder" in lines[0] and "cifar-10-python.tar.gz" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------------------------
# The loop


def test_smoke_run_then_resume(image_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--image-folder", str(image_dir), "--out", str(out), *FAST, "--eval-every", "2", "--eval-bpd-every", "0", "--sample-every", "0", "--ckpt-every", "0"]
    train_image.main(["--steps", "4", *common])
    for name in ("ckpt.pt", "loss.png", "log.csv", "samples_000004.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "samples_000004.png") as grid:  # one row of 10 per class, 32 px + 1 px padding, x4
        assert grid.size == ((10 * 33 + 1) * 4, (2 * 33 + 1) * 4)
    model, ckpt = adr.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and ckpt["class_names"] == ["cat", "ship"] and model.cfg.num_classes == 2
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
    _, ckpt = adr.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 6
    assert ckpt["optimizer"]["state"][0]["step"].item() == 6  # the optimizer state went on from step 4
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in ckpt["history"]] == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_run(image_dir, tmp_path):
    weights = []
    for name in ("a", "b"):
        train_image.main(["--image-folder", str(image_dir), "--out", str(tmp_path / name), *FAST, "--steps", "2", "--seed", "3", "--eval-bpd-every", "0", "--bpd-examples", "2", "--sample-steps", "1"])
        weights.append(torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_unconditional(image_dir, tmp_path):
    out = tmp_path / "run"
    train_image.main(["--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "1", "--unconditional", "--sample-steps", "1"])
    model, ckpt = adr.load_checkpoint(str(out / "ckpt.pt"))
    assert model.cfg.num_classes == 0 and ckpt["class_names"] == []
    with Image.open(out / "samples_000001.png") as grid:  # 10 x 10 samples
        assert grid.size == ((10 * 33 + 1) * 4, (10 * 33 + 1) * 4)


def test_bits_per_dim_bound_for_a_conditional_model(image_dir):
    train_set, test_set, names = train_image.image_folder_data(str(image_dir), LAYOUT)
    torch.manual_seed(0)
    model = adr.ADR(adr.ADRConfig(token_dim=48, seq_len=64, num_classes=2, **adr.SIZES["tiny"])).eval()
    task = train_image.Task(train_set, test_set, LAYOUT, names, save_samples=None)
    args = SimpleNamespace(bpd_examples=3, batch_size=2)
    mean, stderr = train_image.held_out_bpd(model, task, args, torch.device("cpu"))
    with torch.random.fork_rng():  # the same draws as held_out_bpd's, computed directly
        torch.manual_seed(0)
        chosen = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:3].tolist()  # held_out_batches' subset
        x, y = zip(*(test_set[i] for i in chosen))
        tokens, labels = adr.to_tokens(torch.stack(x), LAYOUT), torch.tensor(y)
        direct = torch.cat([adr.bits_per_dim(model, tokens[:2], labels[:2], LAYOUT), adr.bits_per_dim(model, tokens[2:], labels[2:], LAYOUT)]).double()
    direct += math.log2(2) / 3072  # + log2(classes) / dims: a bound on the unconditional -log2 p(x) / dims
    assert mean == pytest.approx(direct.mean().item(), rel=1e-9)
    assert stderr == pytest.approx(direct.std().item() / math.sqrt(3), rel=1e-9)


def test_bad_flags_exit_2(capsys):
    for argv in (["--steps", "0"], ["--lr", "-1"], ["--ema", "1"], ["--size", "huge"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as e:
            train_image.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument"), (argv, err)


def test_save_image_grid(tmp_path):
    images = torch.stack([-torch.ones(3, 2, 2), torch.ones(3, 2, 2)])  # black, white
    train_image.save_image_grid(images, str(tmp_path / "sub" / "grid.png"), nrow=2, scale=3)
    grid = np.asarray(Image.open(tmp_path / "sub" / "grid.png"))
    assert grid.shape == ((2 + 2) * 3, (2 * 3 + 1) * 3, 3)  # 1 px padding around the images, x3
    assert (grid[3:9, 3:9] == 0).all() and (grid[3:9, 12:18] == 255).all()


def test_sigint_leaves_a_loadable_checkpoint(image_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train_image.py", "--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "100000", "--eval-every", "0", "--sample-every", "0"]
    proc = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    model, ckpt = adr.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 2 and ckpt["optimizer"]["state"][0]["step"].item() == ckpt["step"]


def test_torchrun_two_processes(image_dir, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_image.py", "--image-folder", str(image_dir), "--out", str(out), *FAST, "--steps", "3", "--bpd-examples", "2", "--sample-steps", "1"]
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch 4 x 2 processes = 8 per step" in result.stdout
    assert result.stdout.count("step 3/3 |") == 1  # only rank 0 logs
    _, ckpt = adr.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 3 and sorted(os.listdir(out)) == ["ckpt.pt", "log.csv", "loss.png", "samples_000003.png"]


# ==============================================================================================
# train_audio.py: WAV files, Speech Commands, audio folders


def write_pcm(path, samples, rate=16000, width=2):
    """samples: int tensor (channels, N) of raw PCM values."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(width)
        f.setframerate(rate)
        dtype = {1: torch.uint8, 2: torch.int16}[width]
        f.writeframes(samples.T.contiguous().to(dtype).numpy().tobytes())


def write_constant(path, value, length=16000, rate=16000):
    """A mono clip whose every sample is `value` (an int16): the value tells which file a clip came from."""
    write_pcm(path, torch.full((1, length), value))


def write_float_wav(path, n=1600):
    """A 32-bit IEEE float WAV (format tag 3): valid audio, but not PCM."""
    data = struct.pack(f"<{n}f", *([0.25] * n))
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


# ----------------------------------------------------------------------------------------------
# WAV files


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


def test_read_wav_refuses_what_is_not_16_bit_pcm(tmp_path):
    write_pcm(tmp_path / "eight.wav", torch.full((1, 100), 128), width=1)
    write_float_wav(tmp_path / "float.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all")
    with pytest.raises(ValueError, match="8-bit"):
        read_wav(tmp_path / "eight.wav")
    for name in ("float.wav", "junk.wav"):
        with pytest.raises(ValueError, match="not a PCM WAV"):
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


# ----------------------------------------------------------------------------------------------
# Speech Commands in its real layout


def make_speech_commands(root):
    """Every digit plus "yes" and _background_noise_, three speakers each: speaker a trains, b is in the
    validation list, c in the testing list. Returns {value: (word, subset)} of the files written."""
    folder = os.path.join(root, "SpeechCommands", "speech_commands_v0.02")
    files, validation, testing = {}, [], []
    for w, word in enumerate(train_audio.SC09 + ["yes"]):
        for s, (speaker, subset) in enumerate([("aaaa0001", "training"), ("bbbb0002", "validation"), ("cccc0003", "testing")]):
            value = 100 * (w + 1) + s
            name = f"{speaker}_nohash_0.wav"
            write_constant(os.path.join(folder, word, name), value, length=8000)  # 0.5 s: padded to 1 s
            files[value] = (word, subset)
            {"validation": validation, "testing": testing}.get(subset, []).append(f"{word}/{name}")
    write_constant(os.path.join(folder, "_background_noise_", "noise.wav"), 7)
    for name, lines in (("validation_list.txt", validation), ("testing_list.txt", testing)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return files


def members(clips, words):
    """{value: word} of each clip in a Clips set (the constant that identifies its file)."""
    found = {}
    for i in range(len(clips)):
        x, label = clips[i]
        assert x.shape == (16000,) and x[8000:].abs().max() == 0
        found[round(x[0].item() * 32768)] = words[label]
    return found


def test_speech_commands_split(tmp_path):
    files = make_speech_commands(tmp_path)
    train_set, test_set, words = train_audio.speech_commands(str(tmp_path))
    assert words == train_audio.SC09
    expected = lambda subset: {v: w for v, (w, s) in files.items() if s == subset and w != "yes"}  # noqa: E731
    assert members(train_set, words) == expected("training")
    assert members(test_set, words) == expected("testing")
    train_set, test_set, words = train_audio.speech_commands(str(tmp_path), "yes,two")
    assert words == ["yes", "two"]
    assert members(train_set, words) == {1100: "yes", 300: "two"}
    assert members(test_set, words) == {1102: "yes", 302: "two"}


def test_speech_commands_offline_fails_with_a_hint(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchaudio.datasets.speechcommands.download_url_to_file", offline)
    with pytest.raises(SystemExit) as exit:
        train_audio.speech_commands(str(tmp_path / "data"))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not download") and "--audio-folder" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------
# A folder of WAVs


def test_audio_folder_resamples_mixes_pads_and_skips(tmp_path, capsys):
    words_dir = tmp_path / "words"
    for i in range(8):
        write_constant(words_dir / "hello" / f"clip_{i}.wav", 1000 + i)
    t = torch.arange(8000) / 8000
    write_pcm(words_dir / "hello" / "clip_8_8khz.wav", (16000 * torch.sin(2 * math.pi * 440 * t)).round()[None], rate=8000)
    write_pcm(words_dir / "hello" / "clip_9_stereo.wav", torch.stack([torch.full((16000,), 3000), torch.full((16000,), 1000)]))
    write_constant(words_dir / "world" / "a_short.wav", 500, length=4000)
    write_pcm(words_dir / "world" / "b_loud.wav", torch.full((1, 20000), -20000))
    (words_dir / "world" / "c_corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    write_float_wav(words_dir / "world" / "d_float.wav")
    (words_dir / "world" / "notes.txt").write_text("not a wav")
    train_set, test_set, words, skipped = train_audio.audio_folder(str(words_dir))
    assert words == ["hello", "world"] and skipped == 2
    assert "warning: skipped 2 unreadable or non-PCM files" in capsys.readouterr().err
    assert len(train_set) == 9 + 2 and len(test_set) == 1  # the 10th file of "hello" is held out
    held_out, label = test_set[0]
    assert label == 0 and torch.allclose(held_out, torch.full((16000,), 2000 / 32768))  # stereo, mixed
    clips = {(round(x[0].item() * 32768), words[y]): x for x, y in (train_set[i] for i in range(len(train_set)))}
    tone = next(x for (v, w), x in clips.items() if w == "hello" and v not in range(1000, 1008))
    assert tone.abs().max() > 0.4 and (torch.fft.rfft(tone).abs().argmax().item()) == 440  # 1 Hz bins
    short = clips[(500, "world")]
    assert short[:4000].eq(500 / 32768).all() and short[4000:].eq(0).all()
    assert clips[(-20000, "world")].eq(-20000 / 32768).all()  # trimmed to 1 s, not normalised
    train_set, test_set, words, _ = train_audio.audio_folder(str(words_dir), "world")
    assert words == ["world"] and len(train_set) == 2 and test_set is None


@pytest.mark.parametrize("argv, message", [
    (["--audio-folder", "missing_dir"], "is not a folder"),
    (["--audio-folder", "{words}", "--words", "hello,nope"], "no nope in"),
    (["--audio-folder", "{empty}"], "no readable 16-bit PCM WAV"),
])
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


def test_every_size_has_a_head_wider_than_an_audio_token():
    """The denoiser first maps a token to head_width values. A narrower head cannot even hand back the noise
    it is given (near t = T, eps = x_t): its loss there stays at 1 - head_width/token_dim or more, and the
    samples come out as clipped noise."""
    from adr import SIZES, audio_layout, layout_shape

    token_dim = layout_shape(audio_layout())[1]
    for name, size in SIZES.items():
        assert size["head_width"] > token_dim, f"{name}: head_width {size['head_width']} <= {token_dim}"


# ----------------------------------------------------------------------------------------------
# Smoke run: the real training loop, a few steps of the tiny model


def make_word_folder(root, words=("go", "stop"), per_word=10):
    gen = torch.Generator().manual_seed(0)
    for w, word in enumerate(words):
        for i in range(per_word):
            tone = torch.sin(2 * math.pi * (300 + 200 * w) * torch.arange(16000) / 16000)
            noise = torch.randn(16000, generator=gen) * 0.05
            write_pcm(os.path.join(root, word, f"{i:03d}.wav"), ((0.3 * tone + noise) * 32767).round()[None])


def test_smoke_run_writes_checkpoint_wavs_and_figures(tmp_path, capsys):
    from adr import load_checkpoint

    make_word_folder(tmp_path / "words")
    out = tmp_path / "out"
    flags = ["--size", "tiny", "--audio-folder", str(tmp_path / "words"), "--out", str(out), "--batch-size", "4", "--sample-steps", "2",
             "--eval-examples", "2", "--bpd-examples", "2", "--num-workers", "0", "--device", "cpu"]
    train_audio.main(flags + ["--steps", "2"])
    model, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["class_names"] == ["go", "stop"]
    assert ckpt["layout"] == dict(kind="audio", sample_rate=16000, length=16000, chunk=160, mu=255.0)
    assert (model.cfg.seq_len, model.cfg.token_dim, model.cfg.num_classes) == (100, 160, 2)
    for word in ("go", "stop"):
        with wave.open(str(out / "samples" / "step_000002" / f"{word}.wav")) as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 16000, 16000)
    for name in ("spectrograms_000002.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test bits/dim" in capsys.readouterr().out  # the held-out 10th files were evaluated
    train_audio.main(flags + ["--steps", "3", "--resume"])
    assert load_checkpoint(str(out / "ckpt.pt"))[1]["step"] == 3
    assert (out / "samples" / "step_000003" / "stop.wav").exists()


def test_unconditional_samples_are_numbered(tmp_path):
    from adr import ADR, SIZES, ADRConfig, audio_layout

    torch.manual_seed(0)
    model = ADR(ADRConfig(token_dim=160, seq_len=100, num_classes=0, **SIZES["tiny"])).eval()
    real = train_audio.Clips(torch.full((3, 16000), 1000, dtype=torch.int16), [0, 1, 1])
    args = type("Args", (), dict(unconditional=True, sample_steps=2, cfg_scale=3.0))
    train_audio.sample_writer(args, audio_layout(), ["a", "b"], real)(model, str(tmp_path), 7)
    assert sorted(os.listdir(tmp_path / "samples" / "step_000007")) == ["sample_0.wav", "sample_1.wav"]
    assert (tmp_path / "spectrograms_000007.png").exists()


# ==============================================================================================
# sample.py: grids, WAVs, prompts, modes, bad input


IMAGE = image_layout(channels=3, height=8, width=8, patch=2)  # 16 tokens of 12 values
AUDIO = audio_layout(sample_rate=800, length=800, chunk=50)  # 1 s: 16 tokens of 50 samples


def make_checkpoint(path, layout, class_names):
    """A tiny random model. The head's modulation and output start at zero, which would make every
    sample independent of the RetNet; random head weights make samples depend on z (and on the mode)."""
    torch.manual_seed(0)
    seq_len, token_dim = layout_shape(layout)
    model = ADR(ADRConfig(token_dim=token_dim, seq_len=seq_len, num_classes=len(class_names), **SIZES["tiny"]))
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
    )




def run_sample(ckpt, out, *flags):
    sample.main(["--ckpt", ckpt, "--out", str(out), "--steps", "3", "--device", "cpu", *flags])


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


# ----------------------------------------------------------------------------------------------
# Outputs


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
    assert "sampled 12 images of 16 tokens" in out and "(recurrent mode, cfg 3)" in out and "s/sample" in out and "tokens/s" in out
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
        return sample.timed_sample(model, 4, labels, prompt, steps=3, cfg_scale=cfg_scale, mode=mode)[0]

    recurrent, parallel = draw("recurrent"), draw("parallel")
    scale = parallel.abs().max()
    assert (recurrent - parallel).abs().max() <= 1e-11 * scale
    if with_prompt:
        assert torch.equal(recurrent[:, :5], prompt) and torch.equal(parallel[:, :5], prompt)
    keeps_state = adr.retention_recurrent
    monkeypatch.setattr(adr, "retention_recurrent", lambda q, k, v, log_gamma, state: keeps_state(q, k, v, log_gamma, 0 * state))
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
    run_sample(ckpts["audio"], tmp_path / "out", "--class", "yes", "--n", "2", "--prompt", str(tmp_path / "prompt.wav"), "--keep", "0.3")
    kept = 200  # 0.3 s = 240 samples, rounded down to whole 50-sample chunks
    prompt, rate, _, _ = read_pcm(tmp_path / "out" / "prompt.wav")
    assert rate == 800 and np.abs(prompt - clip[:kept]).max() <= 1
    for name in ("yes_0.wav", "yes_1.wav"):
        samples, rate, _, _ = read_pcm(tmp_path / "out" / name)
        assert rate == 800 and len(samples) == 800
        assert np.abs(samples[:kept] - clip[:kept]).max() <= 1
        assert np.abs(samples[kept:] - clip[kept:]).max() > 100


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2


def fails_with(capsys, ckpt, out, message, *flags):
    with pytest.raises(SystemExit) as exit_info:
        run_sample(ckpt, out, *flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_checkpoints(ckpts, tmp_path, capsys):
    fails_with(capsys, str(tmp_path / "missing.pt"), tmp_path, "no checkpoint at")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    fails_with(capsys, str(tmp_path / "notes.txt"), tmp_path, "is not an adr checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    fails_with(capsys, str(tmp_path / "other.pt"), tmp_path, "is not an adr checkpoint")


def test_bad_classes_and_guidance(ckpts, tmp_path, capsys):
    fails_with(capsys, ckpts["image"], tmp_path, "unknown class 'horse': this checkpoint knows cat, dog, ship", "--class", "horse")
    fails_with(capsys, ckpts["unconditional"], tmp_path, "unconditional", "--class", "cat")
    fails_with(capsys, ckpts["unconditional"], tmp_path, "guidance needs a class-conditional checkpoint", "--cfg", "3")


def test_bad_prompts(ckpts, tmp_path, capsys):
    write_png(tmp_path / "small.png", np.zeros((8, 8, 3)))
    write_mono_pcm(tmp_path / "clip.wav", np.zeros(800), 800)
    write_mono_pcm(tmp_path / "short.wav", np.zeros(100), 800)
    fails_with(capsys, ckpts["image"], tmp_path, "no such file", "--prompt", str(tmp_path / "missing.png"))
    fails_with(capsys, ckpts["image"], tmp_path, "this is an image model", "--prompt", str(tmp_path / "clip.wav"))
    fails_with(capsys, ckpts["image"], tmp_path, "--keep 1", "--prompt", str(tmp_path / "small.png"), "--keep", "1")
    fails_with(capsys, ckpts["audio"], tmp_path, "this is an audio model", "--prompt", str(tmp_path / "small.png"))
    fails_with(capsys, ckpts["audio"], tmp_path, "shorter than --keep 0.5 s", "--prompt", str(tmp_path / "short.wav"))
    fails_with(capsys, ckpts["audio"], tmp_path, "keep at least one", "--prompt", str(tmp_path / "clip.wav"), "--keep", "0.01")


def test_bad_flag_values(ckpts, tmp_path, capsys):
    fails_with(capsys, ckpts["image"], tmp_path, "--steps: 0 must be at least 1", "--steps", "0")
    fails_with(capsys, ckpts["image"], tmp_path, "--steps 5000: must be between 1 and the model's 1000", "--steps", "5000")
    fails_with(capsys, ckpts["image"], tmp_path, "--mode: invalid choice: 'fast'", "--mode", "fast")
    fails_with(capsys, ckpts["image"], tmp_path, "--n: 'ten' is not an integer", "--n", "ten")
    fails_with(capsys, ckpts["image"], tmp_path, "--device 'tpu' is not a device", "--device", "tpu")
    (tmp_path / "taken").write_text("a file, not a folder")
    fails_with(capsys, ckpts["image"], tmp_path / "taken", "cannot create the folder")


def test_command_line_error_has_no_traceback(ckpts, tmp_path):
    command = [sys.executable, "sample.py", "--ckpt", ckpts["image"], "--class", "horse", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(sample.__file__)), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown class 'horse'") and "Traceback" not in result.stderr


# ==============================================================================================
# bench.py: the measurement table


GENERATION_COLUMNS = ["P", "recurrent ms", "recurrent KiB", "recompute ms", "recompute KiB", "KV ms", "KV KiB", "KV/rec time", "recompute/rec time", "KV/rec memory", "recompute/rec memory"]
TRAINING_COLUMNS = ["L", "B", "parallel tok/s", "parallel peak MiB", "chunkwise tok/s", "chunkwise peak MiB", "attention tok/s", "attention peak MiB"]
SAMPLING_COLUMNS = ["part", "seconds", "share"]
SAMPLING_PARTS = ["backbone", "diffusion head", "other (embedding, DDPM updates)", "total"]


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
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--threads", "1", "--json", str(json_path)], cwd=HERE, capture_output=True, text=True, timeout=300)
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
        (["--json", os.path.join("no", "such", "folder", "b.json")], "--json"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
