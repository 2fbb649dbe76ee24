"""ADR: Autoregressive Diffusion with Retention, in one file. A causal RetNet reads the tokens so far and emits z_i for
token i; a small diffusion head (an MLP denoiser with adaptive LayerNorm, as in MAR) turns noise into token i by a
reverse diffusion chain conditioned on z_i. Training runs retention in its parallel form, sampling in its recurrent form
(an O(1) state per step); the chunkwise form joins them for long prompts. They compute the same function, which
`check_equivalence()` (`python adr.py`) asserts. Imports torch and the standard library only; no side effects."""

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration: the defaults are the base size (one GPU); SIZES holds what other sizes change.


@dataclass
class ADRConfig:
    token_dim: int = 48  # values per token (a 4x4 RGB patch, or a waveform chunk)
    seq_len: int = 64  # tokens per example
    num_classes: int = 10  # 0 = unconditional
    d_model: int = 512  # RetNet width
    n_layer: int = 8
    n_head: int = 4
    head_width: int = 1024  # diffusion MLP width
    head_depth: int = 6  # residual blocks in the diffusion MLP
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    diffusion_steps: int = 1000  # T
    diffusion_batch_mul: int = 4  # t draws per token per training step
    clip_x0: bool = True  # tokens lie in [-1, 1]: clamp the predicted x_0 in each sampling step
    order: str = "raster"  # the order tokens are read in training: "raster", or "random" per sequence (any-order)
    input_noise: float = 0.0  # std of Gaussian noise on the tokens the backbone reads in training (exposure bias)
    head_reads_last: bool = False  # the head's condition is [z_i, the token read before i] (zeros first), not z_i


SIZES = {
    "base": {},  # ADRConfig's defaults
    "tiny": dict(d_model=64, n_layer=2, n_head=2, head_width=256, head_depth=2, diffusion_batch_mul=1),  # for CPUs
}
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # the reverse chains of DiffusionHead.sample

# ----------------------------------------------------------------------------------------------
# Retention: three forms of one function. q, k, v are (B, H, L, d_head); log_gamma is (H, 1, 1), kept in
# float32 or better (bf16 cannot even count positions past 256), like the state that sums the past.


def decay_mask(length, log_gamma):
    """D[h, n, m] = gamma_h^(n-m) for n >= m, else 0 (RetNet eq. 5). Built in log space so that
    positions above the diagonal become exp(-inf) = 0, never gamma^(negative) = inf."""
    idx = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    distance = idx[:, None] - idx[None, :]
    return (distance * log_gamma).masked_fill(distance < 0, float("-inf")).exp()


def retention_parallel(q, k, v, log_gamma):
    """Parallel form: Retention(X) = (Q K^T ⊙ D) V (RetNet eq. 5)."""
    return (q @ k.transpose(-1, -2) * decay_mask(q.shape[2], log_gamma).to(q.dtype)) @ v


def retention_recurrent(q, k, v, log_gamma, state):
    """Recurrent form, one token: S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n (RetNet eq. 6)."""
    state = (log_gamma.exp() * state).addcmul_(k.transpose(-1, -2), v)  # + k_n^T v_n in place: never stored
    return q @ state.to(q.dtype), state


def retention_chunkwise(q, k, v, log_gamma, state, chunk_size):
    """Chunkwise form (RetNet eq. 7): parallel within chunks of B tokens, recurrent across them. After a chunk the
    state is R = gamma^B R' + K^T (V ⊙ zeta), zeta_j = gamma^(B-1-j); outputs add (Q R') ⊙ xi, xi_j = gamma^(j+1)"""
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        qc, kc, vc = (t[:, :, start : start + chunk_size] for t in (q, k, v))
        size = qc.shape[2]
        j = torch.arange(size, device=q.device, dtype=log_gamma.dtype)[:, None]
        decay = lambda power: (power * log_gamma).exp().to(q.dtype)  # noqa: E731
        inner = retention_parallel(qc, kc, vc, log_gamma)
        cross = (qc @ state.to(q.dtype)) * decay(j + 1)  # (Q_i R_{i-1}) ⊙ xi
        state = (size * log_gamma).exp() * state + kc.transpose(-1, -2) @ (vc * decay(size - 1 - j))
        outputs.append(inner + cross)
    return torch.cat(outputs, dim=2), state


def rotate(x, cos, sin):
    """Relative position as in xPos/RoPE: pair (x_2i, x_2i+1) at position n turns by n theta_i, so q_n k_m^T depends
    on n - m only. cos, sin: (..., L, d_head) for x's positions, each value twice, sin's first of each pair negated."""
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin  # the pairs swapped: (x2, x1)


class MultiScaleRetention(nn.Module):
    """MSR(X) = (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X))) W_O, one decay gamma_h per head (eq. 8-9)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        assert d_model % n_head == 0 and (d_model // n_head) % 2 == 0, "d_model/n_head must be even"
        self.n_head, self.d_head = n_head, d_model // n_head
        self.qkvg_proj = nn.Linear(d_model, 4 * d_model, bias=False)  # W_Q, W_K, W_V and W_G side by side
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # one group per head, normalised on its own (a norm across heads would zero a one-head layer's output)
        self.group_norm = nn.GroupNorm(n_head, d_model)
        self.tables = {}  # (device, dtype) -> (log_gamma, cos, sin), computed once, not saved

    def constants(self, like, length):
        """log gamma_h, gamma_h = 1 - 2^(-5-h) (head h looks back ~2^(5+h) tokens), in float32+, and the cos and sin
        rotating q and k at n = 0 .. length-1 (angle n theta_i, theta_i = 10000^(-2i/d_head); k's scaled by
        1/sqrt(d_head)): (2, 1, 1, n, d_head) tables, computed once per device and dtype."""
        key, exact = (like.device, like.dtype), torch.promote_types(like.dtype, torch.float32)
        if key not in self.tables or self.tables[key][1].shape[-2] < length:
            arange = lambda n: torch.arange(n, device=like.device, dtype=exact)  # noqa: E731
            angle = arange(max(1024, 2 ** math.ceil(math.log2(length))))[:, None] * 10000.0 ** (
                -arange(self.d_head // 2) / (self.d_head // 2))
            scale = torch.tensor([1.0, self.d_head**-0.5], dtype=exact, device=like.device)[:, None, None, None, None]
            pair = lambda f, sign: torch.stack((sign * f(angle), f(angle)), -1).flatten(-2)  # noqa: E731
            cos, sin = ((scale * table).to(like.dtype) for table in (pair(torch.cos, 1.0), pair(torch.sin, -1.0)))
            self.tables[key] = (torch.log1p(-(2.0 ** (-5.0 - arange(self.n_head)[:, None, None]))), cos, sin)
        return self.tables[key]

    def forward(self, x, form="parallel", state=None, pos=0, chunk_size=64):
        """x: (B, L, d_model) at positions pos .. pos+L-1. Returns (output, state), the state summing every token so far
        (the parallel form starts from none and returns None)."""
        B, L, d = x.shape
        log_gamma, cos, sin = self.constants(x, pos + L)
        qkv, gate = self.qkvg_proj(x).split([3 * d, d], dim=-1)
        qkv = qkv.view(B, L, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d_head)
        (q, k), v = rotate(qkv[:2], cos[..., pos : pos + L, :], sin[..., pos : pos + L, :]), qkv[2]  # k / sqrt(d) too
        if state is None and form != "parallel":  # the state is kept in float32 or better
            state = q.new_zeros(B, self.n_head, self.d_head, self.d_head, dtype=log_gamma.dtype)
        if form == "parallel":
            o = retention_parallel(q, k, v, log_gamma)
        elif form == "chunkwise":
            o, state = retention_chunkwise(q, k, v, log_gamma, state, chunk_size)
        elif form == "recurrent":  # a token at a time
            steps = []
            for n in range(L):
                o_n, state = retention_recurrent(*(t[:, :, n : n + 1] for t in (q, k, v)), log_gamma, state)
                steps.append(o_n)
            o = torch.cat(steps, dim=2) if L > 1 else steps[0]
        else:
            raise ValueError(f"unknown retention form {form!r}: use parallel, recurrent or chunkwise")
        o = self.group_norm(o.transpose(1, 2).reshape(B * L, -1)).view(B, L, -1)
        return self.out_proj(F.silu(gate) * o), state


class RetNetBlock(nn.Module):
    """Y = MSR(LN(X)) + X;  X' = FFN(LN(Y)) + Y (RetNet eq. 9), with a gated FFN (SwiGLU) for the paper's GELU MLP."""

    def __init__(self, d_model, n_head):
        super().__init__()
        hidden = int(8 * d_model / 3)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.retention = MultiScaleRetention(d_model, n_head)
        self.ffn_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.ffn_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x, form="parallel", state=None, pos=0, chunk_size=64):
        y, state = self.retention(self.norm1(x), form, state, pos, chunk_size)
        x = x + y
        gate, value = self.ffn_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.ffn_out(F.silu(gate) * value), state


# ----------------------------------------------------------------------------------------------
# DDPM schedule. Time steps are 0-based: index t here is the paper's t+1.


class Diffusion:
    """The noise schedule (alpha_bar_t, hence beta_t), the forward process q(x_t|x_0) and the reverse steps. A respaced
    schedule keeps K of the T steps (`timesteps` holds their original indices: what the denoiser is told)."""

    def __init__(self, alpha_bar, timesteps=None):
        self.alpha_bar = alpha_bar.double()  # alpha_bar_t = prod_{s<=t} alpha_s
        self.timesteps = torch.arange(len(alpha_bar)) if timesteps is None else timesteps
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.alphas, self.betas = self.alpha_bar / alpha_bar_prev, 1 - self.alpha_bar / alpha_bar_prev
        # posterior variance beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (DDPM eq. 7)
        self.posterior_var = self.betas * (1 - alpha_bar_prev) / (1 - self.alpha_bar)

    @classmethod
    def make(cls, steps=1000):
        """The cosine schedule of improved DDPM: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return cls(torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0))  # beta_t <= 0.999

    def __len__(self):
        return len(self.betas)

    def respaced(self, k):
        """K evenly spaced steps with the same alpha_bar there: beta_i = 1 - alpha_bar[kept_i] / alpha_bar[kept_i-1]."""
        if not 1 <= k <= len(self):
            raise ValueError(f"sampling steps must be between 1 and {len(self)}, got {k}")
        kept = torch.linspace(len(self) - 1, 0, k, dtype=torch.float64).round().long().unique()  # keeps t = T
        return Diffusion(self.alpha_bar[kept], self.timesteps[kept])

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4). t: integer tensor like x0[..., 0]."""
        alpha_bar = self.alpha_bar.to(x0.device)[t].unsqueeze(-1).to(x0.dtype)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def predict_x0(self, x_t, i, eps, clip=False):
        """x_0 = (x_t - sqrt(1-alpha_bar_t) eps) / sqrt(alpha_bar_t) (DDPM eq. 4 solved for x_0); clip clamps it to
        [-1, 1], as near t = T 1/sqrt(alpha_bar_t) is huge and would blow up any error of eps_theta."""
        alpha_bar = self.alpha_bar[i].item()
        x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        return x0.clamp(-1, 1) if clip else x0

    def p_step(self, x_t, i, eps, noise, clip=False):
        """x_{t-1} = mu~(x_t, x_0) + sigma_t z (DDPM Alg. 2): the posterior mean (DDPM eq. 7) at the predicted x_0,
        which is (x_t - (1-alpha_t)/sqrt(1-alpha_bar_t) eps_theta) / sqrt(alpha_t) unless x_0 is clamped, and
        sigma_t^2 = beta~_t; no noise on the last step. `i` indexes this (possibly respaced) schedule."""
        alpha, alpha_bar = self.alphas[i].item(), self.alpha_bar[i].item()
        alpha_bar_prev = self.alpha_bar[i - 1].item() if i > 0 else 1.0
        x0 = self.predict_x0(x_t, i, eps, clip)
        mean = (math.sqrt(alpha_bar_prev) * (1 - alpha) * x0 + math.sqrt(alpha) * (1 - alpha_bar_prev) * x_t)
        return mean / (1 - alpha_bar) + (math.sqrt(self.posterior_var[i].item()) * noise if i > 0 else 0)

    def ddim_step(self, x_t, i, eps, eta, noise, clip=False):
        """x_{t-1} = sqrt(alpha_bar_{t-1}) x_0 + sqrt(1 - alpha_bar_{t-1} - sigma^2) eps + sigma z, sigma^2 = eta^2
        beta~_t (DDIM eq. 12, 16): eta = 0 is deterministic, 1 the DDPM step. eps is re-derived from a clamped x_0."""
        alpha_bar, alpha_bar_prev = self.alpha_bar[i].item(), self.alpha_bar[i - 1].item() if i > 0 else 1.0
        x0 = self.predict_x0(x_t, i, eps, clip)
        eps = (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar) if clip else eps
        sigma = eta * math.sqrt(self.posterior_var[i].item())
        return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma**2)) * eps + sigma * noise

    def dpm_solver_step(self, x_t, i, eps, previous, clip=False, eta=0.0, noise=None):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; eta = 1: its SDE form) in lambda = log(alpha/sigma), alpha^2 =
        alpha_bar = 1 - sigma^2, h the step in lambda: x_{t-1} = (sigma_{t-1}/sigma_t) e^{-eta h} x_t - alpha_{t-1}
        (e^{-(1+eta) h} - 1) D + sigma_{t-1} sqrt(1 - e^{-2 eta h}) z, D = x_0 (with eta = 1: the DDPM step), or
        (1 + 1/(2r)) x_0 - x_0' / (2r), x_0' and h' of the step before, r = h'/h, but on the long last update. At t = 0
        the chain ends on x_0. Returns (x_{t-1}, (x_0, h))."""
        x0 = self.predict_x0(x_t, i, eps, clip)
        if i == 0:
            return x0, None
        alpha, alpha_prev = math.sqrt(self.alpha_bar[i].item()), math.sqrt(self.alpha_bar[i - 1].item())
        sigma, sigma_prev = math.sqrt(1 - alpha**2), math.sqrt(1 - alpha_prev**2)
        h = math.log(alpha_prev / sigma_prev) - math.log(alpha / sigma)
        r = previous[1] / h if previous is not None and i > 1 else None
        d = x0 if r is None else (1 + 1 / (2 * r)) * x0 - previous[0] / (2 * r)
        x = sigma_prev / sigma * math.exp(-eta * h) * x_t - alpha_prev * math.expm1(-(1 + eta) * h) * d
        return (x + sigma_prev * math.sqrt(-math.expm1(-2 * eta * h)) * noise if eta else x), (x0, h)


# ----------------------------------------------------------------------------------------------
# The diffusion head: a per-token MLP denoiser with adaptive LayerNorm (MAR's SimpleMLPAdaLN, DiT's
# adaLN-Zero), and DiffusionHead = denoiser + schedule, with the training loss and the reverse chain.


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the (original, 0-based) time step."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), with (shift, scale, gate) from the condition c."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.adaLN_modulation[1].weight), nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, h, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return h + gate * self.mlp(self.in_ln(h) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """LN(h) * (1 + scale) + shift, then a linear map to the token; modulation and output start at zero."""

    def __init__(self, width, token_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, token_dim)
        for layer in (self.adaLN_modulation[1], self.linear):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, h, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """eps_theta(x_t, t, z): the noise in a noisy token, from the token, its time step and z (ADR.head_condition)."""

    def __init__(self, token_dim, cond_dim, width, depth):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x_t, t, cond):
        """t: each row's step (N,) or one for all (0-dim); cond = cond_embed(z), once per token (a chain reuses it)"""
        c = self.time_embed(timestep_embedding(t.reshape(-1), 256).to(x_t.dtype)) + cond
        h = self.input_proj(x_t)
        for block in self.res_blocks:
            h = block(h, c)
        return self.final_layer(h, c)


class DiffusionHead(nn.Module):
    """Draws a token given its condition z (MAR's DiffLoss): `loss` trains eps_theta; `sample`: the reverse chain."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        cond_dim = config.d_model + (config.token_dim if config.head_reads_last else 0)
        self.net = Denoiser(config.token_dim, cond_dim, config.head_width, config.head_depth)
        self.diffusion = Diffusion.make(config.diffusion_steps)
        self.respaced = {}  # steps -> respaced schedule

    def loss(self, x0, z):
        """E ||eps - eps_theta(x_t, t, z)||^2 (DDPM eq. 14) for tokens x0 (N, D) with conditions z (N, cond_dim),
        one t per token, diffusion_batch_mul draws of (t, eps) per token to amortise the backbone."""
        x0, cond = (x.repeat(self.config.diffusion_batch_mul, 1) for x in (x0, self.net.cond_embed(z)))
        t = torch.randint(0, len(self.diffusion), x0.shape[:1], device=x0.device)
        noise = torch.randn_like(x0)
        eps = self.net(self.diffusion.q_sample(x0, t, noise), t, cond)
        return F.mse_loss(eps.float(), noise.float())

    def sample(self, z, steps=30, temperature=1.0, cfg_scale=1.0, sampler="dpm++sde", eta=0.0, cfg_level=1.0):
        """One token per row of z by a reverse chain of `steps` denoiser calls: "ddpm" (ancestral), "ddim" (eta: the
        share of DDPM's noise), "dpm++" (DPM-Solver++(2M)) or "dpm++sde" (its SDE form). With guidance, z holds the
        conditional rows, then the unconditional ones (cfg_level: at the guidance). Temperature scales the noise along
        the chain, or x_T for a deterministic one (ddim at eta = 0, dpm++)."""
        if sampler not in SAMPLERS or (eta and sampler != "ddim") or not 0 <= eta <= 1:
            raise ValueError(f"{sampler!r}, eta {eta}: use {SAMPLERS}; eta is for the ddim sampler, between 0 and 1")
        diffusion = self.respaced.get(steps) or self.respaced.setdefault(steps, self.diffusion.respaced(steps))
        guided, clip, previous, cond = cfg_scale != 1.0, self.config.clip_x0, None, self.net.cond_embed(z)  # z once
        x = torch.randn(z.shape[0] // (1 + guided), self.config.token_dim, device=z.device, dtype=z.dtype)
        x = x if sampler in ("ddpm", "dpm++sde") or eta else temperature * x  # a deterministic chain scales x_T
        for i in reversed(range(len(diffusion))):
            t = torch.tensor(int(diffusion.timesteps[i]), device=z.device)
            eps = self.net(torch.cat([x, x]) if guided else x, t, cond).to(x.dtype)
            if guided:  # classifier-free guidance: eps_u + w d, d = eps_c - eps_u, but d's mean over the token's
                d = eps[: len(x)] - eps[len(x) :]  # values (its level) guided by 1 + (w - 1) cfg_level instead of w
                eps = eps[len(x) :] + cfg_scale * d + (cfg_scale - 1) * (cfg_level - 1) * d.mean(-1, keepdim=True)
            noise = temperature * torch.randn_like(x) if sampler != "dpm++" else None  # ddim draws it at any eta
            if sampler in ("dpm++", "dpm++sde"):
                x, previous = diffusion.dpm_solver_step(x, i, eps, previous, clip, float(sampler == "dpm++sde"), noise)
            else:  # ddpm adds the posterior's noise, ddim eta times it
                x = (diffusion.p_step(x, i, eps, noise, clip) if sampler == "ddpm"
                     else diffusion.ddim_step(x, i, eps, eta, noise, clip))
        return x


# ----------------------------------------------------------------------------------------------
# The ADR model: the RetNet backbone gives z_i from the tokens before i; the head draws token i.


class ADR(nn.Module):
    def __init__(self, config: ADRConfig):
        super().__init__()
        self.config, d = config, config.d_model
        self.class_emb = nn.Embedding(config.num_classes + 1, d)  # on all inputs, null last: a start token would fade
        self.token_in = nn.Linear(config.token_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(config.seq_len, d) * 0.02)  # the position an input asks for next
        if config.order == "random":  # sigma-GPT's double positional encoding: also where each input token sits
            self.source_emb = nn.Parameter(torch.randn(config.seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(RetNetBlock(d, config.n_head) for _ in range(config.n_layer))
        self.norm_out = nn.LayerNorm(d)
        self.head = DiffusionHead(config)

    def embed(self, tokens, labels, targets, sources=None, with_start=True):
        """Backbone inputs [start (no token), tok, ...] (or the tokens alone), each plus the class embedding (no labels:
        the null class's), the position it asks for next (targets) and where its token sits (random order)."""
        h = self.token_in(tokens) if sources is None else self.token_in(tokens) + self.source_emb[sources]
        if with_start:
            h = torch.cat([h.new_zeros(h.shape[0], 1, h.shape[2]), h], dim=1)
        labels = torch.full(h.shape[:1], self.config.num_classes, device=h.device) if labels is None else labels
        return h + self.class_emb(labels)[:, None] + self.pos_emb[targets]

    def backbone(self, h, form="parallel", states=None, pos=0, chunk_size=64):
        """Run the RetNet on inputs at sequence positions pos.. in the given form; returns (z, states)."""
        new_states = []
        for block, state in zip(self.blocks, states or [None] * len(self.blocks)):
            h, state = block(h, form, state, pos, chunk_size)
            new_states.append(state)
        return self.norm_out(h), new_states

    def condition(self, tokens, labels=None, order=None, form="parallel", chunk_size=64):
        """z_i for the i-th token of the order (B, L) of positions (None: raster order), from the start token and
        the tokens before it in that order (the causal shift), as the head reads it (see head_condition)."""
        order = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2]) if order is None else order
        ordered = tokens.gather(1, order[..., None].expand_as(tokens))
        sources = order[:, :-1] if self.config.order == "random" else None
        z = self.backbone(self.embed(ordered[:, :-1], labels, order, sources), form, chunk_size=chunk_size)[0]
        return self.head_condition(z, F.pad(ordered[:, :-1], (0, 0, 1, 0)))

    def head_condition(self, z, last):
        """The head's z_i, or [z_i, the token the backbone read last (zeros first)] where config.head_reads_last."""
        return torch.cat([z, last.to(z.dtype)], dim=-1) if self.config.head_reads_last else z

    def forward(self, tokens, labels=None):
        """Training loss: the head's diffusion loss on each token given its z (random order: one order a sequence)."""
        if self.training and labels is not None:  # label dropout: the null class, for classifier-free guidance
            labels = labels.masked_fill(torch.rand(labels.shape, device=labels.device) < self.config.class_dropout,
                                        self.config.num_classes)
        order = torch.rand(tokens.shape[:2], device=tokens.device).argsort(1) if self.config.order == "random" else None
        noise = self.config.input_noise * self.training  # the backbone reads noisy tokens, as it will read its samples
        z = self.condition(tokens + noise * torch.randn_like(tokens) if noise else tokens, labels, order)
        tokens = tokens if order is None else tokens.gather(1, order[..., None].expand_as(tokens))
        return self.head.loss(tokens.flatten(0, 1), z.flatten(0, 1))

    @torch.no_grad()
    def sample(self, n, labels=None, steps=30, temperature=1.0, cfg_scale=1.0, sampler="dpm++sde", eta=0.0, prompt=None,
               known=None, mask=None, order=None, tokens_per_step=1, mode="recurrent", chunk_size=64, cfg_ramp=False,
               cfg_level=1.0):
        """Generate n sequences of seq_len tokens. Known tokens are read first, chunkwise: a prompt (n, P, D) fixes the
        first P, or known (n, L, D) with mask ((L,) or (n, L), True where known) any. The rest come in `order`
        ("raster", or "random" for a random-order model; default: the model's), tokens_per_step at a time: asked
        for from one state, drawn by one batched head, entered into the state together. mode="parallel" recomputes
        the whole prefix at every step. cfg_ramp: guidance grows as 1 + (w - 1) i / L (MAR); cfg_level: the head's."""
        config, device, L, D = self.config, self.pos_emb.device, self.config.seq_len, self.config.token_dim
        order, guided = order or config.order, cfg_scale != 1.0
        if prompt is not None:
            if prompt.shape[0] != n or prompt.shape[1] >= L or prompt.shape[2] != D:
                raise ValueError(f"prompt must be (n={n}, P < {L}, {D}), got {tuple(prompt.shape)}")
            known, mask = F.pad(prompt, (0, 0, 0, L - prompt.shape[1])), torch.arange(L) < prompt.shape[1]
        tokens = (torch.zeros(n, L, D) if known is None else known).to(device, self.pos_emb.dtype)
        mask = (torch.zeros(L, dtype=torch.bool) if mask is None else mask).to(device).expand(n, L)
        P = int(mask[0].sum())
        if mode not in ("recurrent", "parallel"):
            raise ValueError(f"unknown sampling mode {mode!r}: use recurrent or parallel")
        if guided and (labels is None or config.num_classes == 0):
            raise ValueError("classifier-free guidance needs class labels")
        if (mask.sum(1) != P).any() or P == L:
            raise ValueError("every sequence must know the same number of tokens, and leave some to generate")
        if config.order == "raster" and (order == "random" or tokens_per_step > 1 or mask[:, P:].any()):
            raise ValueError("a raster-order model generates in raster order, one token at a time, after a prefix: "
                             "train with order random to fill in other regions, or to generate several tokens at once")
        if labels is not None:  # with guidance: the conditional rows, then the same rows with the null class
            labels = torch.cat([labels, torch.full_like(labels, config.num_classes)] if guided else [labels]).to(device)
        both = lambda t: None if t is None else torch.cat([t, t]) if guided else t  # noqa: E731
        rank = torch.arange(L, device=device).expand(n, L).double()  # generation order: known positions, then the rest
        positions = torch.where(mask, rank - L, rank if order == "raster" else torch.rand(n, L, device=device))
        positions = positions.argsort(dim=1)
        ordered = tokens.gather(1, positions[..., None].expand_as(tokens))

        def inputs(a, b, queries=None):
            """Inputs a .. b-1: input j holds the start token (j = 0) or the ordered token j-1 and asks for
            position positions[j]; with queries (n, k), the last input asks for each of those k instead."""
            content, targets = ordered[:, max(a - 1, 0) : b - 1], positions[:, a:b]
            sources, row_labels = positions[:, max(a - 1, 0) : b - 1] if config.order == "random" else None, labels
            if queries is not None:
                repeat = lambda t: None if t is None else t.repeat_interleave(queries.shape[1], 0)  # noqa: E731
                content, sources, row_labels = repeat(content), repeat(sources), repeat(labels)
                targets = torch.cat([repeat(targets[:, :-1]), queries.reshape(-1, 1)], dim=1)
            return self.embed(both(content), row_labels, both(targets), both(sources), with_start=a == 0)

        # prefill: the start token and the known tokens but the last (the first step asks with it)
        states = self.backbone(inputs(0, P), "chunkwise", None, 0, chunk_size)[1] if P and mode == "recurrent" else None
        for i in range(P, L, tokens_per_step):
            k = min(tokens_per_step, L - i)
            queries = positions[:, i : i + k]
            if mode == "parallel":
                z = self.backbone(inputs(0, i + 1, queries))[0]
            else:  # ask for the k positions from the same state; keep the state of the first (its true input)
                repeated = states and [s.repeat_interleave(k, 0) for s in states]
                z, states = self.backbone(inputs(i, i + 1, queries), "recurrent", repeated, pos=i)
                states = [s[::k] for s in states]
            scale = 1 + (cfg_scale - 1) * (i + k) / L if cfg_ramp else cfg_scale  # the i + k tokens there will be
            last = F.pad(ordered, (0, 0, 1, 0))[:, i].repeat_interleave(k, 0)  # the token read last, rows as z's
            cond = self.head_condition(z[:, -1], both(last))
            new = self.head.sample(cond, steps, temperature, scale, sampler, eta, cfg_level)
            ordered[:, i : i + k] = new.view(n, k, -1)
            if mode == "recurrent" and 1 < k and i + k < L:  # the other new tokens enter the state
                states = self.backbone(inputs(i + 1, i + k), "chunkwise", states, pos=i + 1, chunk_size=chunk_size)[1]
        return tokens.scatter(1, positions[..., None].expand_as(tokens), ordered)


# ----------------------------------------------------------------------------------------------
# Likelihood: the variational bound in bits per dimension (DDPM eq. 5 and Sec. 3.3)


def log_prob_interval(lo, hi, mean, std):
    """log P(lo < X < hi) for X ~ N(mean, std^2), accurate in the tails (lo may be -inf, hi +inf)."""
    a, b = (lo - mean) / std, (hi - mean) / std
    flip = a > 0  # mirror intervals right of the mean into the left tail, where log_ndtr is accurate
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def token_nll(x0, lo, hi, eps_fn, diffusion, t_draws=1):
    """Negative log-likelihood bound (nats) of each token x0 (..., D) quantised to the bin [lo, hi]: L_T + sum_{t>1}
    L_{t-1} + L_0 (DDPM eq. 5), the middle sum estimated without bias by drawing t (importance-weighted).
    eps_fn(x_t, t) is the denoiser for these tokens (x_t in float64). Returns a tensor shaped like x0[..., 0]."""
    x0 = x0.double()
    alpha_bar_T = diffusion.alpha_bar[-1].item()
    # L_T = KL(q(x_T|x_0) || N(0, I))
    prior = 0.5 * ((1 - alpha_bar_T) + alpha_bar_T * x0**2 - 1 - math.log(1 - alpha_bar_T)).sum(-1)
    # L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    #         = beta_t^2 / (2 sigma_t^2 alpha_t (1-alpha_bar_t)) ||eps - eps_theta||^2
    coef = diffusion.betas**2 / (2 * diffusion.posterior_var * diffusion.alphas * (1 - diffusion.alpha_bar))
    # importance sampling: draw t from p_t, half ∝ coef_t alpha_bar_t (the term's size for unit-variance data), half
    # ∝ coef_t (coef_t / p_t stays bounded for any denoiser), weight by coef_t / p_t: unbiased, with a small variance
    signal = coef[1:] * diffusion.alpha_bar[1:]
    p = 0.5 * signal / signal.sum() + 0.5 * coef[1:] / coef[1:].sum()
    kl_sum = 0.0
    for _ in range(t_draws):
        t = 1 + torch.multinomial(p, x0[..., 0].numel(), replacement=True).view(x0.shape[:-1])
        noise = torch.randn_like(x0)
        eps = eps_fn(diffusion.q_sample(x0, t, noise), t).double()
        kl_sum = kl_sum + (coef[t] / p[t - 1]) * ((noise - eps) ** 2).sum(-1) / t_draws
    # L_0 = -log of the Gaussian decoder N(mu_theta(x_1, 1), beta_1) integrated over the data's bin
    t0 = torch.zeros(x0.shape[:-1], dtype=torch.long)
    x1 = diffusion.q_sample(x0, t0, torch.randn_like(x0))
    mean = diffusion.p_step(x1, 0, eps_fn(x1, t0).double(), None)
    decoder = -log_prob_interval(lo.double(), hi.double(), mean, diffusion.betas[0].sqrt()).sum(-1)
    return prior + kl_sum + decoder


@torch.no_grad()
def bits_per_dim(model, tokens, labels, lo, hi, t_draws=1, order=None):
    """Per-example unbiased estimate of an upper bound on -log2 p(x) / dims, (B,): the chain rule over tokens in raster
    order (or the order (B, L) of positions given), each token's bound from token_nll with z_i from the true earlier
    tokens. lo and hi (shaped like tokens) bound each value's quantisation bin. Report the mean and its error."""
    cond = model.head.net.cond_embed(model.condition(tokens, labels, order).float()).flatten(0, 1)  # once per token
    if order is not None:  # every bound is a valid one: the chain rule holds in any order
        tokens, lo, hi = (x.gather(1, order[..., None].expand_as(x).to(x.device)) for x in (tokens, lo, hi))

    def eps_fn(x_t, t):
        return model.head.net(x_t.to(cond).flatten(0, 1), t.to(cond.device).flatten(), cond).view(x_t.shape).cpu()

    nll = token_nll(tokens.cpu(), lo.cpu(), hi.cpu(), eps_fn, model.head.diffusion, t_draws).sum(-1)
    return nll / (tokens[0].numel() * math.log(2))


# ----------------------------------------------------------------------------------------------
# The equivalence assertion: parallel, recurrent and chunkwise give the same numbers.


@torch.no_grad()
def check_equivalence(dtype=torch.float64, length=24, seed=0):
    """Run a random retention layer and a random model's backbone through all three forms (chunks of 1, 4, L, 5) and
    assert max|diff| / max|output| <= 1e-10 (float64) or 1e-5 (float32). Returns {name: relative difference}."""
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    with torch.random.fork_rng(devices=[]):  # random weights, without touching the caller's random state
        torch.manual_seed(seed)
        layer = MultiScaleRetention(32, 4).to(dtype)
        model = ADR(ADRConfig(token_dim=6, seq_len=length + 1, num_classes=3, **SIZES["tiny"])).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 32, generator=gen, dtype=dtype)
    h = model.embed(torch.randn(2, length - 1, 6, generator=gen, dtype=dtype), None, torch.arange(length))
    diffs = {}
    for name, run in {"retention": lambda *a: layer(x, *a)[0], "backbone": lambda *a: model.backbone(h, *a)[0]}.items():
        reference = run("parallel")
        for form, c in [("recurrent", 1)] + [("chunkwise", c) for c in (1, 4, length, 5)]:  # 4 divides L, 5 not
            key = f"{name} {form}" + (f" B={c}" if form == "chunkwise" else "")
            diffs[key] = ((run(form, None, 0, c) - reference).abs().max() / reference.abs().max()).item()
            assert diffs[key] <= tolerance, f"{key}: forms disagree by {diffs[key]:.2e} > {tolerance:.0e} ({dtype})"
    return diffs


if __name__ == "__main__":
    argparse.ArgumentParser(description="Check that retention's three forms agree; print the differences.").parse_args()
    for dtype in (torch.float64, torch.float32):
        print(f"parallel vs recurrent vs chunkwise, {dtype}:")
        for key, diff in check_equivalence(dtype).items():
            print(f"  {key:<28} max|diff|/max|out| = {diff:.2e}")
    print("all forms agree")
