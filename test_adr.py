"""adr.py: the three forms of retention agree, causality, the DDPM schedule, learning, sampling, and the
likelihood bound."""

import math

import pytest
import torch

import adr
import media
from adr import SIZES, Diffusion, MultiScaleRetention
from conftest import layout_bpd, randomise_head, tiny_model


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
    log_gamma = torch.log1p(-torch.tensor([[[2.0**-5]]]))  # one head: (H, 1, 1)
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


def causal_influence(model, j=4):
    """Change token j; return (z_i for i <= j unchanged bit for bit, z_i for every i > j changed)."""
    torch.manual_seed(1)
    tokens = torch.randn(2, model.config.seq_len, model.config.token_dim)
    changed = tokens.clone()
    changed[:, j] += 1.0
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        z, z2 = model.condition(tokens, labels), model.condition(changed, labels)
    before_same = torch.equal(z[:, : j + 1], z2[:, : j + 1])
    after_changed = all((z[:, i] - z2[:, i]).abs().max() > 1e-6 for i in range(j + 1, model.config.seq_len))
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


def test_schedule_alpha_bar():
    d = Diffusion.make(1000)
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


def losses_on_a_fixed_batch(model, steps=150):
    """The training losses of `steps` AdamW steps on one fixed batch of 8 random sequences (16 tokens of 12)."""
    torch.manual_seed(0)
    tokens, labels = torch.rand(8, 16, 12) * 2 - 1, torch.randint(0, 3, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_overfits_a_fixed_batch():
    losses = losses_on_a_fixed_batch(tiny_model(token_dim=12, seq_len=16))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, f"loss fell from {first:.3f} to {last:.3f} only"


@pytest.mark.parametrize("layout", [media.image_layout(), media.audio_layout(length=1600, chunk=160)])
def test_sampling_shapes(layout):
    seq_len, token_dim = media.layout_shape(layout)
    model = tiny_model(token_dim=token_dim, seq_len=seq_len, num_classes=10).eval()
    torch.manual_seed(0)
    tokens = model.sample(3, torch.tensor([0, 5, 9]), steps=2)
    assert tokens.shape == (3, seq_len, token_dim)
    x = media.from_tokens(tokens, layout)
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


class EchoDenoiser(torch.nn.Module):
    """A stand-in for the head's denoiser that predicts eps = z, whatever x_t and t: guidance combines known rows."""

    cond_embed = torch.nn.Identity()

    def forward(self, x_t, t, cond):
        return cond


@pytest.mark.parametrize("cfg_level", [1.0, 0.5, 0.0])
def test_guidance_of_a_tokens_level_takes_its_share(cfg_level):
    """eps = eps_u + w d, d = eps_c - eps_u, but the mean of d over each token's values (its level) is guided by
    1 + (w - 1) cfg_level: at 0 the level is the conditional prediction's, at 1 guidance is as it always was. One
    deterministic step from x_T gives x_0, from which the guided eps is read back."""
    model = tiny_model(dtype=torch.float64, clip_x0=False)
    model.head.net = EchoDenoiser()
    eps_c, eps_u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(0)
    x_T = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(0)
    x_0 = model.head.sample(torch.cat([eps_c, eps_u]), steps=1, cfg_scale=3.0, sampler="dpm++", cfg_level=cfg_level)
    alpha_bar = model.head.diffusion.respaced(1).alpha_bar[0].item()
    eps = (x_T - math.sqrt(alpha_bar) * x_0) / math.sqrt(1 - alpha_bar)
    d = eps_c - eps_u
    level = lambda t: t.mean(-1, keepdim=True)  # noqa: E731
    assert torch.allclose(eps - level(eps), eps_u + 3 * d - level(eps_u + 3 * d), atol=1e-6)  # the shape: w = 3
    assert torch.allclose(level(eps), level(eps_u) + (1 + 2 * cfg_level) * level(d), atol=1e-6)
    if cfg_level == 0:
        assert torch.allclose(level(eps), level(eps_c), atol=1e-6) and not torch.allclose(eps, eps_c, atol=0.1)


def test_the_model_passes_the_level_share_to_its_head():
    model, labels = randomise_head(tiny_model().eval()), torch.tensor([0, 2])

    def draw(**options):
        torch.manual_seed(3)
        return model.sample(2, labels, steps=3, **options)

    assert torch.equal(draw(cfg_scale=3.0), draw(cfg_scale=3.0, cfg_level=1.0))
    assert not torch.allclose(draw(cfg_scale=3.0), draw(cfg_scale=3.0, cfg_level=0.0))
    assert not torch.allclose(draw(cfg_scale=3.0, cfg_ramp=True), draw(cfg_scale=3.0, cfg_ramp=True, cfg_level=0.0))


@pytest.mark.parametrize("sampler, eta", [(name, 0.0) for name in adr.SAMPLERS] + [("ddim", 1.0)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_recurrent_sampling_equals_parallel_recompute(cfg_scale, sampler, eta):
    model = randomise_head(tiny_model(dtype=torch.float64).eval())
    labels = torch.tensor([1, 2])
    options = dict(steps=4, cfg_scale=cfg_scale, sampler=sampler, eta=eta)
    torch.manual_seed(3)
    recurrent = model.sample(2, labels, **options)
    torch.manual_seed(3)
    parallel = model.sample(2, labels, mode="parallel", **options)
    assert ((recurrent - parallel).abs().max() / recurrent.abs().max()).item() < 1e-10
    torch.manual_seed(3)
    assert torch.equal(model.sample(2, labels, **options), recurrent)  # same seed
    if sampler in ("ddpm", "dpm++sde") or eta:  # fresh noise at every step: another seed, other samples
        torch.manual_seed(4)
        assert not torch.allclose(model.sample(2, labels, **options), recurrent)
    # and the samples really depend on the earlier tokens: a different prompt changes the rest
    torch.manual_seed(3)
    other = model.sample(2, labels, steps=4, cfg_scale=cfg_scale, prompt=recurrent[:, :1] + 0.5, sampler=sampler)
    assert not torch.allclose(other[:, 1:], recurrent[:, 1:])


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_eta_1_is_the_ddpm_step(clip):
    d = Diffusion.make(1000).respaced(20)
    torch.manual_seed(0)
    x, eps, z = (torch.randn(6, 5, dtype=torch.float64) for _ in range(3))
    for i in (19, 10, 1, 0):
        torch.testing.assert_close(d.ddim_step(x, i, eps, 1.0, z, clip), d.p_step(x, i, eps, z, clip))
    assert not torch.allclose(d.ddim_step(x, 10, eps, 0.0, z), d.p_step(x, 10, eps, z))
    head = adr.DiffusionHead(adr.ADRConfig(token_dim=5, d_model=8))
    with pytest.raises(ValueError, match="is for the ddim sampler"):
        head.sample(torch.zeros(2, 8), steps=2, sampler="dpm++sde", eta=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        head.sample(torch.zeros(2, 8), steps=2, sampler="ddim", eta=-0.5)


@pytest.mark.parametrize("clip", [False, True])
def test_first_order_dpm_solver_with_eta_1_is_the_ddpm_step(clip):
    d = Diffusion.make(1000).respaced(20)
    torch.manual_seed(0)
    x, eps, z, x0_before = (torch.randn(6, 5, dtype=torch.float64) for _ in range(4))
    for i in (19, 10, 1, 0):  # no step before: first order
        torch.testing.assert_close(d.dpm_solver_step(x, i, eps, None, clip, 1.0, z)[0], d.p_step(x, i, eps, z, clip))
    second_order = d.dpm_solver_step(x, 10, eps, (x0_before, 0.3), False, 1.0, z)[0]
    assert not torch.allclose(second_order, d.p_step(x, 10, eps, z))
    ode = d.dpm_solver_step(x, 10, eps, None)[0]  # eta 0: the first-order ODE step is DDIM's
    torch.testing.assert_close(ode, d.ddim_step(x, 10, eps, 0.0, z))  # eta 0: z plays no part


class ExactGaussianDenoiser(torch.nn.Module):
    """E[eps | x_t] for data whose every value is N(mu, s^2): the best possible denoiser."""

    def __init__(self, alpha_bar, mu, s):
        super().__init__()
        self.alpha_bar, self.mu, self.s = alpha_bar, mu, s
        self.cond_embed = torch.nn.Identity()  # z plays no part

    def forward(self, x_t, t, z):
        a = self.alpha_bar[t.reshape(-1)].unsqueeze(-1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def exact_gaussian_samples(sampler, steps, temperature=1.0, s=0.3, mu=0.2, n=20_000):
    """Samples of a head whose denoiser is the exact one for data N(mu, s^2) in every value."""
    head = adr.DiffusionHead(adr.ADRConfig(token_dim=4, d_model=8, clip_x0=False))
    head.net = ExactGaussianDenoiser(head.diffusion.alpha_bar, mu, s)
    torch.manual_seed(0)
    return head.sample(torch.zeros(n, 8, dtype=torch.float64), steps, temperature=temperature, sampler=sampler)


@pytest.mark.parametrize(
    "sampler, steps, temperature",
    [("ddpm", 1000, 1.0), ("ddim", 200, 1.0), ("dpm++", 50, 1.0), ("dpm++", 50, 0.5), ("ddim", 200, 0.5),
     ("dpm++sde", 20, 1.0), ("dpm++sde", 100, 1.0)],
)
def test_samplers_with_the_exact_denoiser_land_on_the_data(sampler, steps, temperature):
    """Gaussian data and the exact denoiser: each sampler must give N(mu, s^2). For the deterministic ones the
    flow from x_T to x_0 is affine for Gaussian data, so temperature tau (scaling x_T) gives N(mu, (tau s)^2)."""
    x = exact_gaussian_samples(sampler, steps, temperature)
    assert x.mean().item() == pytest.approx(0.2, abs=0.01)
    assert x.std().item() == pytest.approx(temperature * 0.3, rel=0.02)
    wrong = exact_gaussian_samples(sampler, steps, temperature, s=0.6)  # the check is sharp: another model fails
    assert abs(wrong.std().item() - temperature * 0.3) > 0.2 * 0.3


def test_the_second_order_solver_needs_fewer_steps():
    """At 20 steps, DPM-Solver++(2M) lands nearer the data's spread than DDIM (first order) or DDPM."""
    error = {name: abs(exact_gaussian_samples(name, 20).std().item() - 0.3) for name in ("ddpm", "ddim", "dpm++")}
    assert error["dpm++"] < 0.03 * 0.3 and error["dpm++"] < error["ddim"] / 3 and error["dpm++"] < error["ddpm"] / 3


def test_the_second_order_sde_solver_needs_fewer_steps_than_ddpm():
    """At 20 steps, SDE-DPM-Solver++(2M) (dpm++sde, fresh noise at every step) lands nearer the data's spread than the
    DDPM chain it refines (1.5% against 19% off)."""
    sde = abs(exact_gaussian_samples("dpm++sde", 20).std().item() - 0.3)
    ddpm = abs(exact_gaussian_samples("ddpm", 20).std().item() - 0.3)
    assert sde < 0.03 * 0.3 and sde < ddpm / 3, (sde, ddpm)


def test_bad_prompts_and_cpu_labels():
    model = tiny_model().eval()
    for shape in ((2, 10, 6), (2, 11, 6), (3, 4, 6), (2, 4, 5)):  # full length, too long, wrong n, wrong width
        with pytest.raises(ValueError, match="prompt must be"):
            model.sample(2, torch.tensor([0, 1]), steps=2, prompt=torch.zeros(shape))
    assert model.sample(1, torch.tensor([2]), steps=1, prompt=torch.zeros(1, 9, 6)).shape == (1, 10, 6)


def test_one_step_starts_from_t_equal_to_T():
    assert Diffusion.make(1000).respaced(1).timesteps.tolist() == [999]


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
    values = torch.cat(
        [
            layout_bpd(model, tokens[i : i + batch_size], labels[i : i + batch_size], layout)
            for i in range(0, len(tokens), batch_size)
        ]
    )
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def image_batch(n=32, seed=0):
    layout = media.image_layout(height=8, width=8)
    torch.manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 8, 8)).float() / 127.5 - 1  # 8-bit pixels scaled to [-1, 1]
    return layout, media.to_tokens(pixels, layout), torch.randint(0, 3, (n,))


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
    audio = media.audio_layout(length=1600, chunk=160)
    model = randomise_head(tiny_model(token_dim=160, seq_len=10)).eval()
    silence = media.to_tokens(torch.zeros(2, 1600), audio)
    full_scale = media.to_tokens(torch.tensor([[-1.0], [32767 / 32768]]).repeat(1, 1600), audio)
    for tokens in (silence, full_scale):
        assert torch.isfinite(layout_bpd(model, tokens, torch.tensor([0, 1]), audio)).all()
    image = media.image_layout(height=8, width=8)
    model = randomise_head(tiny_model(token_dim=48, seq_len=4)).eval()
    for value in (-1.0, 1.0):
        tokens = media.to_tokens(torch.full((2, 3, 8, 8), value), image)
        assert torch.isfinite(layout_bpd(model, tokens, torch.tensor([0, 1]), image)).all()


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


def test_every_size_has_a_head_wider_than_an_audio_token():
    """The denoiser first maps a token to head_width values. A narrower head cannot even hand back the noise
    it is given (near t = T, eps = x_t): its loss there stays at 1 - head_width/token_dim or more, and the
    samples come out as clipped noise."""
    token_dim = media.layout_shape(media.audio_layout())[1]
    for name, size in SIZES.items():
        head_width = adr.ADRConfig(**size).head_width
        assert head_width > token_dim, f"{name}: head_width {head_width} <= {token_dim}"


# ----------------------------------------------------------------------------------------------
# The class condition


@pytest.mark.parametrize("order", ["raster", "random"])
def test_the_class_reaches_the_last_token_at_full_strength(order):
    """With random weights, changing only the class moves z at the 100th token by about as much as at the first
    (relative change 1.3-1.4 at the tiny size). When the class was only the start token, retention's decay had
    faded it to 0.014-0.021 there (seeds 0-2), against 1.4-1.5 at the first token."""
    model = tiny_model(token_dim=16, seq_len=100, num_classes=10, order=order).eval()
    tokens, order_ = torch.rand(4, 100, 16) * 2 - 1, torch.stack([torch.randperm(100) for _ in range(4)])
    with torch.no_grad():
        z = [model.condition(tokens, torch.tensor(c), order_ if order == "random" else None)
             for c in ([0, 1, 2, 3], [5, 6, 7, 8])]
    change = (z[0] - z[1]).norm(dim=-1) / z[0].norm(dim=-1)
    assert change[:, 0].mean() > 1.0 and change[:, -1].mean() > 0.5 * change[:, 0].mean(), change[:, [0, -1]]


def test_the_null_class_is_what_no_labels_means():
    """Unguided rows and a model asked without labels see the null class at every input, as label dropout taught."""
    model = tiny_model().eval()
    tokens = torch.randn(2, 10, 6)
    with torch.no_grad():
        assert torch.equal(model.condition(tokens), model.condition(tokens, torch.tensor([3, 3])))


def test_input_noise_reaches_the_backbone_in_training_only(monkeypatch):
    """With input_noise the backbone reads tokens plus N(0, sigma^2) noise in training, and the head still learns
    the clean tokens; in eval mode (the held-out loss) and with input_noise 0 it reads the clean tokens."""
    seen = {}
    model = tiny_model(input_noise=0.25)
    condition, loss = model.condition, model.head.loss
    monkeypatch.setattr(model, "condition", lambda t, *a: seen.update(read=t) or condition(t, *a))
    monkeypatch.setattr(model.head, "loss", lambda x0, z: seen.update(learnt=x0) or loss(x0, z))
    tokens = torch.rand(64, 10, 6) * 2 - 1
    model(tokens, torch.zeros(64, dtype=torch.long))
    assert torch.equal(seen["learnt"], tokens.flatten(0, 1))
    assert abs((seen["read"] - tokens).std().item() - 0.25) < 0.01
    model.eval()(tokens, torch.zeros(64, dtype=torch.long))
    assert torch.equal(seen["read"], tokens)
    quiet = tiny_model()
    monkeypatch.setattr(quiet, "condition", lambda t, *a, c=quiet.condition: seen.update(read=t) or c(t, *a))
    quiet(tokens, torch.zeros(64, dtype=torch.long))
    assert torch.equal(seen["read"], tokens)


# ----------------------------------------------------------------------------------------------
# Any order: random-order training, infilling, several tokens per backbone step


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("head_reads_last", [False, True])
@pytest.mark.parametrize("mode, prompted", [("recurrent", 0), ("parallel", 0), ("recurrent", 3)])
def test_sampling_asks_the_head_with_what_training_gives_it(order, head_reads_last, mode, prompted, monkeypatch):
    """The condition the sampler hands the head for each token is the one training computes for that token from the
    tokens before it (z_i; with head_reads_last the token read last beside it), in the order they were drawn, after
    a prompt's tokens."""
    # unclamped, so that no two drawn tokens are alike (their positions are found by matching them)
    model = tiny_model(order=order, head_reads_last=head_reads_last, clip_x0=False, dtype=torch.float64)
    model = randomise_head(model.eval())
    asked, drawn, draw = [], [], model.head.sample

    def spy(z, *args):
        drawn.append(draw(z, *args))
        asked.append(z[: len(drawn[-1])])  # the conditional rows (the unconditional ones follow)
        return drawn[-1]

    monkeypatch.setattr(model.head, "sample", spy)
    labels = torch.tensor([1, 2])
    torch.manual_seed(0)
    prompt = torch.rand(2, prompted, 6, dtype=torch.float64) * 2 - 1 if prompted else None
    tokens = model.sample(2, labels, steps=2, cfg_scale=2.0, mode=mode, prompt=prompt)
    # the generation order, as positions (2, 10): the prompt's, then where each drawn token landed
    drawn_order = torch.stack([(tokens - new[:, None]).abs().sum(-1).argmin(1) for new in drawn], dim=1)
    drawn_order = torch.cat([torch.arange(prompted).expand(2, prompted), drawn_order], dim=1)
    assert sorted(drawn_order[0].tolist()) == list(range(10))
    assert (drawn_order != torch.arange(10)).any() == (order == "random")
    expected = model.condition(tokens, labels, drawn_order if order == "random" else None)[:, prompted:]
    assert expected.shape[-1] == 64 + 6 * head_reads_last
    assert torch.allclose(torch.stack(asked, dim=1), expected, rtol=0, atol=1e-10)


def test_a_raster_model_reads_raster_order_as_before():
    """The raster model has no second position table, and an explicit raster order gives the same numbers."""
    model = tiny_model().eval()
    assert not hasattr(model, "source_emb")
    tokens, labels = torch.randn(2, 10, 6), torch.tensor([0, 1])
    raster = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        assert torch.equal(model.condition(tokens, labels), model.condition(tokens, labels, raster))


def test_any_order_is_causal_in_that_order():
    """Changing the token at the j-th position of an order changes z only for the tokens after it in that order."""
    model = tiny_model(order="random").eval()
    torch.manual_seed(1)
    tokens, labels = torch.randn(2, 10, 6), torch.tensor([0, 2])
    order = torch.stack([torch.randperm(10), torch.randperm(10)])
    for j in (0, 4, 8):
        changed = tokens.clone()
        changed[torch.arange(2), order[:, j]] += 1.0
        with torch.no_grad():
            z, z2 = model.condition(tokens, labels, order), model.condition(changed, labels, order)
        assert torch.equal(z[:, : j + 1], z2[:, : j + 1])  # z_i is for the i-th token of the order
        assert all((z[:, i] - z2[:, i]).abs().max() > 1e-6 for i in range(j + 1, 10))


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++", "dpm++sde"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_infilling_keeps_the_known_tokens_and_k_tokens_per_step_match_recompute(k, sampler):
    model = randomise_head(tiny_model(order="random", dtype=torch.float64).eval())
    labels = torch.tensor([1, 2])
    known = torch.rand(2, 10, 6, dtype=torch.float64) * 2 - 1
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 5, 8]] = True
    draws = {}
    for mode in ("recurrent", "parallel"):
        torch.manual_seed(3)
        draws[mode] = model.sample(
            2, labels, steps=3, cfg_scale=2.0, sampler=sampler, known=known, mask=mask, tokens_per_step=k, mode=mode
        )
    recurrent, parallel = draws["recurrent"], draws["parallel"]
    assert torch.equal(recurrent[:, mask], known[:, mask]) and torch.equal(parallel[:, mask], known[:, mask])
    assert ((recurrent - parallel).abs().max() / recurrent.abs().max()).item() < 1e-10
    assert (recurrent[:, ~mask] - known[:, ~mask]).abs().min() > 0  # the rest is generated
    torch.manual_seed(3)
    raster = model.sample(
        2, labels, steps=3, cfg_scale=2.0, sampler=sampler, known=known, mask=mask, tokens_per_step=k, order="raster"
    )
    assert not torch.allclose(raster, recurrent)  # another order, other samples


def test_a_raster_model_only_continues_a_prefix():
    model = tiny_model().eval()
    labels, known = torch.tensor([0, 1]), torch.zeros(2, 10, 6)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    assert model.sample(2, labels, steps=1, known=known, mask=mask).shape == (2, 10, 6)  # a prefix: fine
    for kwargs in (dict(mask=~mask), dict(mask=mask, tokens_per_step=2), dict(mask=mask, order="random")):
        with pytest.raises(ValueError, match="raster-order model"):
            model.sample(2, labels, steps=1, known=known, **kwargs)
    with pytest.raises(ValueError, match="same number of tokens"):
        model.sample(2, labels, steps=1, known=known, mask=torch.stack([mask, ~mask]))


def test_random_order_bits_per_dim_in_any_order():
    """Each order gives a bound (finite, and the raster one is the same through order=None and order=raster)."""
    layout, tokens, labels = image_batch(8)
    model = randomise_head(tiny_model(token_dim=48, seq_len=4, order="random"), std=0.02).eval()
    lo, hi = media.quantisation_bins(tokens, layout)
    raster = torch.arange(4).expand(8, 4)
    torch.manual_seed(0)
    a = adr.bits_per_dim(model, tokens, labels, lo, hi)
    torch.manual_seed(0)
    b = adr.bits_per_dim(model, tokens, labels, lo, hi, order=raster)
    torch.manual_seed(0)
    shuffled = adr.bits_per_dim(model, tokens, labels, lo, hi, order=torch.rand(8, 4).argsort(1))
    assert torch.equal(a, b) and torch.isfinite(shuffled).all() and not torch.allclose(a, shuffled)


def test_a_random_order_model_learns():
    model = tiny_model(token_dim=12, seq_len=16, order="random", diffusion_batch_mul=4)  # 4 draws: a steadier loss
    losses = losses_on_a_fixed_batch(model)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
