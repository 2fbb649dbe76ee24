"""
ADR: Autoregressive Diffusion with Retention, in one file.

A causal RetNet reads the tokens generated so far and emits a conditioning vector z_i for token i;
a small MLP denoiser turns Gaussian noise into token i with the DDPM reverse chain, conditioned on
z_i. Training runs retention in its parallel form over the whole sequence; sampling runs it in its
recurrent form, one token at a time with an O(1) state; the chunkwise form joins the two for long
prompts. All three compute the same function, and `check_equivalence()` asserts it.

Only torch and the standard library are imported, and importing has no side effects, so this file
can be copied alone into another project. `python adr.py` runs the equivalence check.
"""

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration


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
    schedule: str = "cosine"  # "cosine" or "linear"
    diffusion_batch_mul: int = 4  # t draws per token per training step
    clip_x0: bool = True  # tokens lie in [-1, 1]: clamp the predicted x_0 in each sampling step


# Model sizes: "tiny" for CPU tests and quick runs, "base" for one GPU.
SIZES = {
    "tiny": dict(d_model=64, n_layer=2, n_head=2, head_width=256, head_depth=2),  # head wider than a 160-value audio token
    "base": dict(d_model=512, n_layer=8, n_head=4, head_width=1024, head_depth=6),
}

# ----------------------------------------------------------------------------------------------
# Retention: three forms of one function. q, k, v are (B, H, L, d_head); log_gamma is (H,), kept in
# float32 or better (bf16 cannot even count positions past 256), like the state that sums the past.


def decay_mask(length, log_gamma):
    """D[h, n, m] = gamma_h^(n-m) for n >= m, else 0 (RetNet eq. 5). Built in log space so that
    positions above the diagonal become exp(-inf) = 0, never gamma^(negative) = inf."""
    idx = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    distance = idx[:, None] - idx[None, :]
    exponent = (distance * log_gamma[:, None, None]).masked_fill(distance < 0, float("-inf"))
    return exponent.exp()


def retention_parallel(q, k, v, log_gamma):
    """Parallel form: Retention(X) = (Q K^T ⊙ D) V (RetNet eq. 5)."""
    return (q @ k.transpose(-1, -2) * decay_mask(q.shape[2], log_gamma).to(q.dtype)) @ v


def retention_recurrent(q, k, v, log_gamma, state):
    """Recurrent form, one token: S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n (RetNet eq. 6)."""
    state = log_gamma.exp()[:, None, None] * state + k.transpose(-1, -2) @ v
    return q @ state.to(q.dtype), state


def retention_chunkwise(q, k, v, log_gamma, state, chunk_size):
    """Chunkwise form (RetNet eq. 7): parallel inside each chunk of B tokens, recurrent across chunks.
    The state R after a chunk is gamma^B R + K^T (V ⊙ zeta), zeta_j = gamma^(B-1-j); the chunk reads the
    earlier chunks as (Q R_prev) ⊙ xi, xi_j = gamma^(j+1)."""
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        qc, kc, vc = (t[:, :, start : start + chunk_size] for t in (q, k, v))
        j = torch.arange(qc.shape[2], device=q.device, dtype=log_gamma.dtype)[:, None]
        decay = lambda power: (power * log_gamma[:, None, None]).exp().to(q.dtype)  # noqa: E731
        inner = retention_parallel(qc, kc, vc, log_gamma)
        cross = (qc @ state.to(q.dtype)) * decay(j + 1)  # (Q_i R_{i-1}) ⊙ xi
        state = (qc.shape[2] * log_gamma).exp()[:, None, None] * state + kc.transpose(-1, -2) @ (vc * decay(qc.shape[2] - 1 - j))
        outputs.append(inner + cross)
    return torch.cat(outputs, dim=2), state


class MultiScaleRetention(nn.Module):
    """MSR(X) = (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X))) W_O, one decay gamma_h per head (eq. 8-9)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        assert d_model % n_head == 0 and (d_model // n_head) % 2 == 0, "d_model/n_head must be even"
        self.n_head, self.d_head = n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.gate_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # one group per head: each head is normalised on its own channels (a norm across heads would
        # make a one-head layer's output identically zero after the mean is taken out)
        self.group_norm = nn.GroupNorm(n_head, d_model)

    def log_gamma(self, like):
        """gamma_h = 1 - 2^(-5-h): head h looks back about 2^(5+h) tokens."""
        h = torch.arange(self.n_head, device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        return torch.log1p(-(2.0 ** (-5.0 - h)))

    def rotate(self, x, pos):
        """Relative position as in xPos/RoPE: channel pair i of the token at position n is rotated by
        n * theta_i, so q_n k_m^T depends on n - m only."""
        half = self.d_head // 2
        dtype = torch.promote_types(x.dtype, torch.float32)
        theta = 10000.0 ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
        angle = torch.arange(pos, pos + x.shape[2], device=x.device, dtype=dtype)[:, None] * theta
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, x, form="parallel", state=None, pos=0, chunk_size=64):
        """x: (B, L, d_model), the tokens at positions pos .. pos+L-1. Returns (output, state): the
        state summarises every token seen so far (the parallel form starts from none and returns None)."""
        B, L, _ = x.shape
        heads = lambda t: t.view(B, L, self.n_head, self.d_head).transpose(1, 2)  # noqa: E731
        q = self.rotate(heads(self.q_proj(x)), pos)
        k = self.rotate(heads(self.k_proj(x)), pos) * self.d_head**-0.5  # scale k by 1/sqrt(d)
        v = heads(self.v_proj(x))
        log_gamma = self.log_gamma(q)
        if state is None and form != "parallel":
            state = q.new_zeros(B, self.n_head, self.d_head, self.d_head, dtype=log_gamma.dtype)  # kept in float32+
        if form == "parallel":
            o = retention_parallel(q, k, v, log_gamma)
        elif form == "chunkwise":
            o, state = retention_chunkwise(q, k, v, log_gamma, state, chunk_size)
        elif form == "recurrent":
            steps = []
            for n in range(L):
                o_n, state = retention_recurrent(q[:, :, n : n + 1], k[:, :, n : n + 1], v[:, :, n : n + 1], log_gamma, state)
                steps.append(o_n)
            o = torch.cat(steps, dim=2)
        else:
            raise ValueError(f"unknown retention form {form!r}: use parallel, recurrent or chunkwise")
        o = self.group_norm(o.transpose(1, 2).reshape(B * L, -1)).view(B, L, -1)
        return self.out_proj(F.silu(self.gate_proj(x)) * o), state


class RetNetBlock(nn.Module):
    """Y = MSR(LN(X)) + X;  X' = FFN(LN(Y)) + Y (RetNet eq. 9). The FFN is gated (SwiGLU) here, where the
    paper uses a GELU MLP."""

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
    """The noise schedule (alpha_bar_t, hence beta_t), with the forward process q(x_t|x_0) and the reverse step p(x_{t-1}|x_t).
    A respaced schedule keeps K of the T steps (`timesteps` holds their original indices, which are
    what the denoiser is told)."""

    def __init__(self, alpha_bar, timesteps=None):
        self.alpha_bar = alpha_bar.double()  # alpha_bar_t = prod_{s<=t} alpha_s
        self.timesteps = torch.arange(len(alpha_bar)) if timesteps is None else timesteps
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.alphas = self.alpha_bar / alpha_bar_prev
        self.betas = 1 - self.alphas
        # posterior variance beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (DDPM eq. 7)
        self.posterior_var = self.betas * (1 - alpha_bar_prev) / (1 - self.alpha_bar)

    @classmethod
    def make(cls, steps=1000, schedule="cosine"):
        if schedule == "linear":  # DDPM: beta from 1e-4 to 0.02 (scaled for T != 1000)
            betas = torch.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=torch.float64)
            return cls(torch.cumprod(1 - betas.clamp(max=0.999), 0))
        if schedule == "cosine":  # improved DDPM: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2)
            f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
            return cls(torch.cumprod(1 - betas, 0))
        raise ValueError(f"unknown schedule {schedule!r}: use cosine or linear")

    def __len__(self):
        return len(self.betas)

    def respaced(self, k):
        """K evenly spaced steps with the same alpha_bar there, so beta_i = 1 - alpha_bar[kept_i] / alpha_bar[kept_{i-1}]."""
        if not 1 <= k <= len(self):
            raise ValueError(f"sampling steps must be between 1 and {len(self)}, got {k}")
        kept = torch.linspace(len(self) - 1, 0, k, dtype=torch.float64).round().long().unique()  # always keeps t = T
        return Diffusion(self.alpha_bar[kept], self.timesteps[kept])

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4). t: integer tensor like x0[..., 0]."""
        alpha_bar = self.alpha_bar.to(x0.device)[t].unsqueeze(-1).to(x0.dtype)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def p_step(self, x_t, i, eps, noise, clip=False):
        """x_{t-1} = (x_t - (1-alpha_t)/sqrt(1-alpha_bar_t) eps_theta) / sqrt(alpha_t) + sigma_t z (DDPM Alg. 2),
        with sigma_t^2 = beta~_t; no noise on the last step. `i` indexes this (possibly respaced) schedule.
        With clip, the same mean is taken through the predicted x_0 clamped to [-1, 1]: near t = T,
        1/sqrt(alpha_t) is 32 (316 with 100 respaced steps) and would blow up any error of eps_theta."""
        alpha, alpha_bar = self.alphas[i].item(), self.alpha_bar[i].item()
        if clip:  # the posterior mean mu~(x_t, x_0) (DDPM eq. 7) at x_0 = (x_t - sqrt(1-alpha_bar) eps) / sqrt(alpha_bar), clamped
            alpha_bar_prev = self.alpha_bar[i - 1].item() if i > 0 else 1.0
            x0 = ((x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)).clamp(-1, 1)
            mean = (math.sqrt(alpha_bar_prev) * (1 - alpha) * x0 + math.sqrt(alpha) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar)
        else:
            mean = (x_t - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
        return mean + math.sqrt(self.posterior_var[i].item()) * noise if i > 0 else mean


# ----------------------------------------------------------------------------------------------
# Denoiser: a per-token MLP with adaptive LayerNorm, as in MAR's diffusion head.


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the (original, 0-based) time step."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class AdaLNBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), with (shift, scale, gate) from the condition c."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight), nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h, c):
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """eps_theta(x_t, t, z): predicts the noise in one token from the noisy token, its own time step
    and the backbone's conditioning vector z. Modulation and output start at zero (adaLN-Zero)."""

    def __init__(self, token_dim, cond_dim, width, depth):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output_proj = nn.Linear(width, token_dim)
        for layer in (self.final_modulation[1], self.output_proj):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, z):
        c = self.time_embed(timestep_embedding(t, 256).to(x_t.dtype)) + self.cond_embed(z)
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output_proj(self.final_norm(h) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------
# The ADR model


class ADR(nn.Module):
    def __init__(self, cfg: ADRConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # a learned start token per class; index num_classes is the "no class" token (the only one when
        # unconditional, and the null condition of classifier-free guidance)
        self.start = nn.Embedding(cfg.num_classes + 1, d)
        self.token_in = nn.Linear(cfg.token_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(cfg.seq_len, d) * 0.02)  # input position 0 is the start token
        self.blocks = nn.ModuleList(RetNetBlock(d, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(d)
        self.head = Denoiser(cfg.token_dim, d, cfg.head_width, cfg.head_depth)
        self.diffusion = Diffusion.make(cfg.diffusion_steps, cfg.schedule)

    def embed(self, tokens, labels, with_start):
        """Backbone input: [start(label), tok_0, tok_1, ...] (with_start) or just the embedded tokens."""
        h = self.token_in(tokens)
        if with_start:
            null = torch.full(tokens.shape[:1], self.cfg.num_classes, device=tokens.device, dtype=torch.long)
            start = self.start(null if labels is None else labels)[:, None]
            h = torch.cat([start, h], dim=1)
        return h

    def backbone(self, h, form="parallel", states=None, pos=0, chunk_size=64):
        """Run the RetNet on inputs at positions pos.. (plus their absolute position embedding) in the
        given form; returns (z, states)."""
        h = h + self.pos_emb[pos : pos + h.shape[1]]
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states):
            h, state = block(h, form, state, pos, chunk_size)
            new_states.append(state)
        return self.norm_out(h), new_states

    def condition(self, tokens, labels=None, form="parallel", chunk_size=64):
        """z_i for every token i, computed from the start token and tokens < i (the causal shift)."""
        h = self.embed(tokens[:, :-1], labels, with_start=True)
        return self.backbone(h, form, chunk_size=chunk_size)[0]

    def drop_labels(self, labels):
        """Replace each label by the null class with probability class_dropout (classifier-free guidance)."""
        if labels is None or self.cfg.class_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return labels.masked_fill(drop, self.cfg.num_classes)

    def forward(self, tokens, labels=None):
        """Training loss E ||eps - eps_theta(x_t, t, z)||^2 over all tokens (DDPM eq. 14, per token),
        with diffusion_batch_mul independent (t, eps) draws per token to amortise the backbone."""
        labels = self.drop_labels(labels) if self.training else labels
        z = self.condition(tokens, labels)
        m = self.cfg.diffusion_batch_mul
        x0, z = tokens.repeat(m, 1, 1), z.repeat(m, 1, 1)
        t = torch.randint(0, len(self.diffusion), x0.shape[:2], device=x0.device)  # one t per token
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        eps = self.head(x_t.flatten(0, 1), t.flatten(), z.flatten(0, 1))
        return F.mse_loss(eps.float(), noise.flatten(0, 1).float())

    def denoise(self, z, diffusion, temperature=1.0, cfg_scale=1.0):
        """Run the K-step reverse chain for one token per row of z. With guidance, z holds the
        conditional rows then the unconditional rows: eps = eps_u + w (eps_c - eps_u)."""
        n = z.shape[0] // 2 if cfg_scale != 1.0 else z.shape[0]
        x = torch.randn(n, self.cfg.token_dim, device=z.device, dtype=z.dtype)
        for i in reversed(range(len(diffusion))):
            t = torch.full((z.shape[0],), int(diffusion.timesteps[i]), device=z.device)
            if cfg_scale != 1.0:
                eps_c, eps_u = self.head(torch.cat([x, x]), t, z).to(x.dtype).chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            else:
                eps = self.head(x, t, z).to(x.dtype)
            x = diffusion.p_step(x, i, eps, temperature * torch.randn_like(x), clip=self.cfg.clip_x0)
        return x

    @torch.no_grad()
    def sample(self, n, labels=None, steps=100, temperature=1.0, cfg_scale=1.0, prompt=None, mode="recurrent", chunk_size=64):
        """Generate n sequences of seq_len tokens. `prompt` (n, P, token_dim) fixes the first P tokens:
        it is prefilled in chunkwise form, then generation goes on one token at a time. mode="parallel"
        recomputes the whole prefix at every token instead of keeping the recurrent state."""
        if mode not in ("recurrent", "parallel"):
            raise ValueError(f"unknown sampling mode {mode!r}: use recurrent or parallel")
        cfg, device = self.cfg, self.pos_emb.device
        guided = cfg_scale != 1.0
        if guided and (labels is None or cfg.num_classes == 0):
            raise ValueError("classifier-free guidance needs class labels")
        if prompt is not None and (prompt.shape[0] != n or prompt.shape[1] >= cfg.seq_len or prompt.shape[2] != cfg.token_dim):
            raise ValueError(f"prompt must be (n={n}, P < {cfg.seq_len}, {cfg.token_dim}), got {tuple(prompt.shape)}")
        labels = None if labels is None else labels.to(device)
        if guided:  # conditional rows, then the same rows with the null class
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        dtype = self.pos_emb.dtype
        tokens = torch.zeros(n, 0, cfg.token_dim, device=device, dtype=dtype) if prompt is None else prompt.to(device, dtype)
        diffusion = self.diffusion.respaced(steps)
        both = lambda t: torch.cat([t, t]) if guided else t  # noqa: E731
        if mode == "recurrent":  # prefill the start token and the prompt, keep only the state
            z, states = self.backbone(self.embed(both(tokens), labels, True), "chunkwise", chunk_size=chunk_size)
        for i in range(tokens.shape[1], cfg.seq_len):
            if mode == "parallel":
                z = self.backbone(self.embed(both(tokens), labels, True))[0]
            token = self.denoise(z[:, -1], diffusion, temperature, cfg_scale)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if mode == "recurrent" and i + 1 < cfg.seq_len:
                z, states = self.backbone(self.embed(both(token[:, None]), None, False), "recurrent", states, pos=i + 1)
        return tokens


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
    """Negative log-likelihood bound (nats) of each token x0 (..., D) quantised to the bin [lo, hi]:
    L_T + sum_{t>1} L_{t-1} + L_0 (DDPM eq. 5), the middle sum estimated without bias by drawing t
    (importance-weighted). eps_fn(x_t, t) is the denoiser for these tokens (x_t in float64). Returns a tensor of shape x0[..., 0]."""
    x0 = x0.double()
    alpha_bar_T = diffusion.alpha_bar[-1].item()
    # L_T = KL(q(x_T|x_0) || N(0, I))
    prior = 0.5 * ((1 - alpha_bar_T) + alpha_bar_T * x0**2 - 1 - math.log(1 - alpha_bar_T)).sum(-1)
    # L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) = beta_t^2 / (2 sigma_t^2 alpha_t (1-alpha_bar_t)) ||eps - eps_theta||^2
    coef = diffusion.betas**2 / (2 * diffusion.posterior_var * diffusion.alphas * (1 - diffusion.alpha_bar))
    # importance sampling: draw t from p_t, half ∝ coef_t * alpha_bar_t (the term's size for data of unit
    # variance) and half ∝ coef_t (so that coef_t / p_t stays bounded for any denoiser), and weight the
    # draw by coef_t / p_t: the estimate stays unbiased and its variance small
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
    noise = torch.randn_like(x0)
    x1 = diffusion.q_sample(x0, t0, noise)
    mean = diffusion.p_step(x1, 0, eps_fn(x1, t0).double(), None)
    decoder = -log_prob_interval(lo.double(), hi.double(), mean, diffusion.betas[0].sqrt()).sum(-1)
    return prior + kl_sum + decoder


@torch.no_grad()
def bits_per_dim(model, tokens, labels, layout, t_draws=1):
    """Per-example estimate (unbiased) of an upper bound on -log2 p(x) / dims: the chain rule over tokens, each token's bound from
    token_nll with z_i from the true earlier tokens. Returns a (B,) tensor; average it and report its
    standard error."""
    z = model.condition(tokens, labels).float()
    device = tokens.device
    diffusion = model.diffusion

    def eps_fn(x_t, t):
        return model.head(x_t.to(device, z.dtype).flatten(0, 1), t.to(device).flatten(), z.flatten(0, 1)).view(x_t.shape).cpu()

    lo, hi = quantisation_bins(tokens.cpu(), layout)
    nll = token_nll(tokens.cpu(), lo, hi, eps_fn, diffusion, t_draws).sum(-1)
    return nll / (tokens[0].numel() * math.log(2))


# ----------------------------------------------------------------------------------------------
# Token layouts: images as p x p patches in raster order, audio as mu-law companded waveform chunks.


def patchify(images, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches in raster order (left to right, top to bottom)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, channels, height, width):
    """Inverse of patchify."""
    B = tokens.shape[0]
    x = tokens.reshape(B, height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, height, width)


def mu_law(x, mu=255.0):
    """Continuous mu-law companding F(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), on [-1, 1]: quiet
    samples get more of the range, so quiet and loud clips are both learnt well. Invertible."""
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


def mu_law_inverse(y, mu=255.0):
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def image_layout(channels=3, height=32, width=32, patch=4):
    return dict(kind="image", channels=channels, height=height, width=width, patch=patch)


def audio_layout(sample_rate=16000, length=16000, chunk=160, mu=255.0):
    return dict(kind="audio", sample_rate=sample_rate, length=length, chunk=chunk, mu=mu)


def layout_shape(layout):
    """(seq_len, token_dim) of a layout."""
    if layout["kind"] == "image":
        p = layout["patch"]
        return layout["height"] * layout["width"] // p**2, p * p * layout["channels"]
    return layout["length"] // layout["chunk"], layout["chunk"]


def to_tokens(x, layout):
    """Images (B, C, H, W) in [-1, 1] or waveforms (B, N) in [-1, 1] -> tokens (B, L, D)."""
    if layout["kind"] == "image":
        return patchify(x, layout["patch"])
    return mu_law(x, layout["mu"]).view(x.shape[0], -1, layout["chunk"])


def from_tokens(tokens, layout):
    """Inverse of to_tokens; generated values are clamped to [-1, 1]."""
    tokens = tokens.clamp(-1, 1)
    if layout["kind"] == "image":
        return unpatchify(tokens, layout["patch"], layout["channels"], layout["height"], layout["width"])
    return mu_law_inverse(tokens.reshape(tokens.shape[0], -1), layout["mu"])


def quantisation_bins(tokens, layout):
    """The bin [lo, hi] in token space of each value's quantisation level: 8-bit pixels scaled to [-1, 1]
    (width 2/255), or 16-bit samples x = k/32768 mapped through mu-law. The outermost bins reach to -inf
    and +inf, so the bins cover the line and their probabilities sum to one."""
    tokens = tokens.double()
    if layout["kind"] == "image":
        half = torch.full_like(tokens, 1 / 255)
        lo, hi = tokens - half, tokens + half
        return lo.masked_fill(tokens < -1 + 1e-6, -math.inf), hi.masked_fill(tokens > 1 - 1e-6, math.inf)
    k = torch.round(mu_law_inverse(tokens, layout["mu"]) * 32768).clamp(-32768, 32767)
    lo, hi = (mu_law((k + s) / 32768, layout["mu"]) for s in (-0.5, 0.5))
    return lo.masked_fill(k == -32768, -math.inf), hi.masked_fill(k == 32767, math.inf)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file with the config, weights, EMA weights, layout and class names.

CHECKPOINT_FORMAT = "adr-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, model, layout, class_names=None, ema=None, **extra):
    """Write atomically (temporary file, then rename): an interrupted save never leaves a broken file.
    `extra` holds plain values or tensors (optimizer state, step, ...)."""
    state = dict(format=CHECKPOINT_FORMAT, config=asdict(model.cfg), model=model.state_dict(), layout=layout, class_names=list(class_names or []), **extra)
    if ema is not None:
        state["ema"] = ema.state_dict()
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu", use_ema=True):
    """Returns (model in eval mode, checkpoint dict). Loads with weights_only=True, so a file that would
    run code when unpickled is refused; anything that is not an adr checkpoint raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass the ckpt.pt written by train_image.py or train_audio.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:
        code = "GLOBAL" in str(e)  # the pickle names a function or class: loading it could run code
        why = "it holds objects other than tensors and plain values, refused for safety" if code else "it could not be read as a torch file"
        raise CheckpointError(f"{path} is not an adr checkpoint: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an adr checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    try:
        model = ADR(ADRConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["ema"] if use_ema and "ema" in ckpt else ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this adr.py (config or weights differ: {str(e).splitlines()[0]})") from None
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# The equivalence assertion: parallel, recurrent and chunkwise give the same numbers.


@torch.no_grad()
def check_equivalence(dtype=torch.float64, length=24, seed=0, verbose=False):
    """Run a random retention layer and a random model's backbone through all three forms, for chunk
    sizes 1, a divisor of L, L and a non-divisor; assert max|diff| / max|output| is within 1e-10
    (float64) or 1e-5 (float32). Returns {name: relative difference}."""
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    with torch.random.fork_rng(devices=[]):  # random weights, without touching the caller's random state
        torch.manual_seed(seed)
        layer = MultiScaleRetention(32, 4).to(dtype)
        model = ADR(ADRConfig(token_dim=6, seq_len=length + 1, num_classes=3, **SIZES["tiny"])).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 32, generator=gen, dtype=dtype)
    h = model.embed(torch.randn(2, length - 1, 6, generator=gen, dtype=dtype), torch.tensor([0, 2]), True)
    runs = {"retention": lambda form, c: layer(x, form, chunk_size=c)[0], "backbone": lambda form, c: model.backbone(h, form, chunk_size=c)[0]}
    diffs = {}
    for name, run in runs.items():
        reference = run("parallel", length)
        scale = reference.abs().max()
        diffs[f"{name} recurrent"] = ((run("recurrent", length) - reference).abs().max() / scale).item()
        for c in (1, 4, length, 5):  # 1, a divisor of L, L, a non-divisor
            diffs[f"{name} chunkwise B={c}"] = ((run("chunkwise", c) - reference).abs().max() / scale).item()
    for key, diff in diffs.items():
        if verbose:
            print(f"  {key:<28} max|diff|/max|out| = {diff:.2e}")
        assert diff <= tolerance, f"{key}: forms disagree by {diff:.2e} > {tolerance:.0e} ({dtype})"
    return diffs


if __name__ == "__main__":
    for dtype in (torch.float64, torch.float32):
        print(f"parallel vs recurrent vs chunkwise, {dtype}:")
        check_equivalence(dtype, verbose=True)
    print("all forms agree")
