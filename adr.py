"""
ADR: Autoregressive Diffusion with Retention, in one file.

A causal RetNet reads the tokens generated so far and emits a conditioning vector z_i for token i;
a small diffusion head (an MLP denoiser with adaptive LayerNorm, as in MAR) turns Gaussian noise into
token i with the DDPM reverse chain, conditioned on z_i. Training runs retention in its parallel form
over the whole sequence; sampling runs it in its recurrent form, one token at a time with an O(1)
state; the chunkwise form joins the two for long prompts. All three compute the same function, and
`check_equivalence()` asserts it.

Only torch and the standard library are imported, and importing has no side effects, so this file
can be copied alone into another project. `python adr.py` runs the equivalence check.
"""

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
    schedule: str = "cosine"  # "cosine" or "linear"
    diffusion_batch_mul: int = 4  # t draws per token per training step
    clip_x0: bool = True  # tokens lie in [-1, 1]: clamp the predicted x_0 in each sampling step


SIZES = {
    "base": {},  # ADRConfig's defaults
    "tiny": dict(d_model=64, n_layer=2, n_head=2, head_width=256, head_depth=2),  # CPU; head wider than 160 values
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
        size = qc.shape[2]
        j = torch.arange(size, device=q.device, dtype=log_gamma.dtype)[:, None]
        decay = lambda power: (power * log_gamma[:, None, None]).exp().to(q.dtype)  # noqa: E731
        inner = retention_parallel(qc, kc, vc, log_gamma)
        cross = (qc @ state.to(q.dtype)) * decay(j + 1)  # (Q_i R_{i-1}) ⊙ xi
        state = (size * log_gamma).exp()[:, None, None] * state + kc.transpose(-1, -2) @ (vc * decay(size - 1 - j))
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
        if state is None and form != "parallel":  # the state is kept in float32 or better
            state = q.new_zeros(B, self.n_head, self.d_head, self.d_head, dtype=log_gamma.dtype)
        if form == "parallel":
            o = retention_parallel(q, k, v, log_gamma)
        elif form == "chunkwise":
            o, state = retention_chunkwise(q, k, v, log_gamma, state, chunk_size)
        elif form == "recurrent":
            steps = []
            for n in range(L):
                o_n, state = retention_recurrent(*(t[:, :, n : n + 1] for t in (q, k, v)), log_gamma, state)
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
    """The noise schedule (alpha_bar_t, hence beta_t), the forward process q(x_t|x_0) and the reverse
    step p(x_{t-1}|x_t). A respaced schedule keeps K of the T steps (`timesteps` holds their original
    indices, which are what the denoiser is told)."""

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
        """K evenly spaced steps with the same alpha_bar there: beta_i = 1 - alpha_bar[kept_i] / alpha_bar[kept_i-1]."""
        if not 1 <= k <= len(self):
            raise ValueError(f"sampling steps must be between 1 and {len(self)}, got {k}")
        kept = torch.linspace(len(self) - 1, 0, k, dtype=torch.float64).round().long().unique()  # keeps t = T
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
        if clip:  # the posterior mean mu~(x_t, x_0) (DDPM eq. 7) at the clamped x_0 = (x_t - sqrt(1-a) eps) / sqrt(a)
            alpha_bar_prev = self.alpha_bar[i - 1].item() if i > 0 else 1.0
            x0 = ((x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)).clamp(-1, 1)
            mean = (math.sqrt(alpha_bar_prev) * (1 - alpha) * x0 + math.sqrt(alpha) * (1 - alpha_bar_prev) * x_t)
            mean = mean / (1 - alpha_bar)
        else:
            mean = (x_t - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
        return mean + math.sqrt(self.posterior_var[i].item()) * noise if i > 0 else mean


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
    """eps_theta(x_t, t, z): predicts the noise in one token from the noisy token, its time step and the
    backbone's conditioning vector z."""

    def __init__(self, token_dim, cond_dim, width, depth):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x_t, t, z):
        c = self.time_embed(timestep_embedding(t, 256).to(x_t.dtype)) + self.cond_embed(z)
        h = self.input_proj(x_t)
        for block in self.res_blocks:
            h = block(h, c)
        return self.final_layer(h, c)


class DiffusionHead(nn.Module):
    """Draws one token given its condition z (MAR's DiffLoss): `loss` trains eps_theta, `sample` runs the
    reverse chain."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.net = Denoiser(config.token_dim, config.d_model, config.head_width, config.head_depth)
        self.diffusion = Diffusion.make(config.diffusion_steps, config.schedule)
        self.respaced = {}  # steps -> respaced schedule

    def loss(self, x0, z):
        """E ||eps - eps_theta(x_t, t, z)||^2 (DDPM eq. 14) for tokens x0 (N, D) with conditions z (N, d),
        one t per token, diffusion_batch_mul draws of (t, eps) per token to amortise the backbone."""
        m = self.config.diffusion_batch_mul
        x0, z = x0.repeat(m, 1), z.repeat(m, 1)
        t = torch.randint(0, len(self.diffusion), x0.shape[:1], device=x0.device)
        noise = torch.randn_like(x0)
        eps = self.net(self.diffusion.q_sample(x0, t, noise), t, z)
        return F.mse_loss(eps.float(), noise.float())

    def sample(self, z, steps=100, temperature=1.0, cfg_scale=1.0):
        """One token per row of z with a `steps`-step reverse chain. With guidance (cfg_scale != 1), z holds
        the conditional rows, then the unconditional rows: eps = eps_u + w (eps_c - eps_u). Temperature
        scales the noise added at each step."""
        if steps not in self.respaced:
            self.respaced[steps] = self.diffusion.respaced(steps)
        diffusion = self.respaced[steps]
        guided = cfg_scale != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        x = torch.randn(n, self.config.token_dim, device=z.device, dtype=z.dtype)
        for i in reversed(range(len(diffusion))):
            t = torch.full((z.shape[0],), int(diffusion.timesteps[i]), device=z.device)
            if guided:
                eps_c, eps_u = self.net(torch.cat([x, x]), t, z).to(x.dtype).chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)  # classifier-free guidance
            else:
                eps = self.net(x, t, z).to(x.dtype)
            x = diffusion.p_step(x, i, eps, temperature * torch.randn_like(x), clip=self.config.clip_x0)
        return x


# ----------------------------------------------------------------------------------------------
# The ADR model: the RetNet backbone gives z_i from the tokens before i; the head draws token i.


class ADR(nn.Module):
    def __init__(self, config: ADRConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        # a learned start token per class; index num_classes is the "no class" token (the only one when
        # unconditional, and the null condition of classifier-free guidance)
        self.start = nn.Embedding(config.num_classes + 1, d)
        self.token_in = nn.Linear(config.token_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(config.seq_len, d) * 0.02)  # input position 0: the start token
        self.blocks = nn.ModuleList(RetNetBlock(d, config.n_head) for _ in range(config.n_layer))
        self.norm_out = nn.LayerNorm(d)
        self.head = DiffusionHead(config)

    def embed(self, tokens, labels, with_start):
        """Backbone input: [start(label), tok_0, tok_1, ...] (with_start) or just the embedded tokens."""
        h = self.token_in(tokens)
        if with_start:
            null = torch.full(tokens.shape[:1], self.config.num_classes, device=tokens.device, dtype=torch.long)
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
        if labels is None or self.config.class_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
        return labels.masked_fill(drop, self.config.num_classes)

    def forward(self, tokens, labels=None):
        """Training loss: the head's diffusion loss on every token i, conditioned on z_i."""
        labels = self.drop_labels(labels) if self.training else labels
        z = self.condition(tokens, labels)
        return self.head.loss(tokens.flatten(0, 1), z.flatten(0, 1))

    @torch.no_grad()
    def sample(self, n, labels=None, steps=100, temperature=1.0, cfg_scale=1.0, prompt=None, mode="recurrent",
               chunk_size=64):
        """Generate n sequences of seq_len tokens. `prompt` (n, P, token_dim) fixes the first P tokens:
        it is prefilled in chunkwise form, then generation goes on one token at a time. mode="parallel"
        recomputes the whole prefix at every token instead of keeping the recurrent state."""
        if mode not in ("recurrent", "parallel"):
            raise ValueError(f"unknown sampling mode {mode!r}: use recurrent or parallel")
        config, device = self.config, self.pos_emb.device
        guided = cfg_scale != 1.0
        if guided and (labels is None or config.num_classes == 0):
            raise ValueError("classifier-free guidance needs class labels")
        if prompt is not None and (prompt.shape[0] != n or prompt.shape[1] >= config.seq_len
                                   or prompt.shape[2] != config.token_dim):
            raise ValueError(f"prompt must be (n={n}, P < {config.seq_len}, {config.token_dim}), "
                             f"got {tuple(prompt.shape)}")
        labels = None if labels is None else labels.to(device)
        if guided:  # conditional rows, then the same rows with the null class
            labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
        dtype = self.pos_emb.dtype
        tokens = torch.zeros(n, 0, config.token_dim, device=device, dtype=dtype) if prompt is None else prompt.to(
            device, dtype)
        both = lambda t: torch.cat([t, t]) if guided else t  # noqa: E731
        if mode == "recurrent":  # prefill the start token and the prompt, keep only the state
            z, states = self.backbone(self.embed(both(tokens), labels, True), "chunkwise", chunk_size=chunk_size)
        for i in range(tokens.shape[1], config.seq_len):
            if mode == "parallel":
                z = self.backbone(self.embed(both(tokens), labels, True))[0]
            token = self.head.sample(z[:, -1], steps, temperature, cfg_scale)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if mode == "recurrent" and i + 1 < config.seq_len:
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
    (importance-weighted). eps_fn(x_t, t) is the denoiser for these tokens (x_t in float64). Returns a
    tensor shaped like x0[..., 0]."""
    x0 = x0.double()
    alpha_bar_T = diffusion.alpha_bar[-1].item()
    # L_T = KL(q(x_T|x_0) || N(0, I))
    prior = 0.5 * ((1 - alpha_bar_T) + alpha_bar_T * x0**2 - 1 - math.log(1 - alpha_bar_T)).sum(-1)
    # L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    #         = beta_t^2 / (2 sigma_t^2 alpha_t (1-alpha_bar_t)) ||eps - eps_theta||^2
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
def bits_per_dim(model, tokens, labels, lo, hi, t_draws=1):
    """Per-example unbiased estimate of an upper bound on -log2 p(x) / dims: the chain rule over tokens,
    each token's bound from token_nll with z_i from the true earlier tokens. lo and hi (shaped like
    tokens) are the edges of each value's quantisation bin. Returns a (B,) tensor: average it and
    report its standard error."""
    z = model.condition(tokens, labels).float()
    device = tokens.device

    def eps_fn(x_t, t):
        eps = model.head.net(x_t.to(device, z.dtype).flatten(0, 1), t.to(device).flatten(), z.flatten(0, 1))
        return eps.view(x_t.shape).cpu()

    nll = token_nll(tokens.cpu(), lo.cpu(), hi.cpu(), eps_fn, model.head.diffusion, t_draws).sum(-1)
    return nll / (tokens[0].numel() * math.log(2))


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
    runs = {"retention": lambda form, c: layer(x, form, chunk_size=c)[0],
            "backbone": lambda form, c: model.backbone(h, form, chunk_size=c)[0]}
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
    import argparse

    about = "Check that retention's parallel, recurrent and chunkwise forms agree, and print the differences."
    argparse.ArgumentParser(description=about).parse_args()
    for dtype in (torch.float64, torch.float32):
        print(f"parallel vs recurrent vs chunkwise, {dtype}:")
        check_equivalence(dtype, verbose=True)
    print("all forms agree")
