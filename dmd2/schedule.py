"""Noise parameterisations behind one integer-timestep interface (docs/algorithm.md §2).

Every schedule maps an integer t in [0, T) to a noise level, so the algorithm never
branches on the model family:

- ``DDPMSchedule``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, model predicts eps or v.
- ``EDMSchedule``: t indexes an ascending Karras sigma grid, x_t = x0 + sigma_t eps, the
  model is preconditioned (c_skip, c_out, c_in, c_noise) and returns x0 directly.
- ``FlowSchedule``: rectified flow (SD3, FLUX), x_t = (1 - s_t) x0 + s_t eps, the model predicts
  the velocity v = eps - x0; t indexes the teacher scheduler's own (shifted) sigma table.

Only torch is imported here.
"""

from __future__ import annotations

import math

import torch

T = 1000


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _on(cache: dict, table: torch.Tensor, device) -> torch.Tensor:
    """``table`` on ``device``, copied once: a host-to-device copy on every call would be a sync."""
    key = str(device)
    if key not in cache:
        cache[key] = table.to(device)
    return cache[key]


class DDPMSchedule:
    """Discrete DDPM schedule (SD1.5, SDXL, DDPM class-conditional teachers)."""

    kind = "ddpm"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self._tables: dict = {}
        self.prediction_type = prediction_type
        self.num_timesteps = len(alphas_cumprod)

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, num_timesteps=T, prediction_type="epsilon"):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, 0), prediction_type)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(_on(self._tables, self.alphas_cumprod, t.device)[t.long()], like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._ab(t, x0)
        return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()).to(x0.dtype)

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the UNet is called with: DDPM UNets take x_t and the integer timestep."""
        return x_t, t

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the network output, in float64: at t=999, 1/sqrt(abar) ~ 14.6 amplifies rounding."""
        ab = self._ab(t, x_t)
        x, o = x_t.double(), out.double()
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - ab).sqrt() * o) / ab.sqrt()
        else:  # v = sqrt(ab) eps - sqrt(1-ab) x0  =>  x0 = sqrt(ab) x_t - sqrt(1-ab) v
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * o
        return x0.to(out.dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's regression target for the fake-score loss (§5): eps, or v."""
        if self.prediction_type == "epsilon":
            return eps
        ab = self._ab(t, x0)
        return (ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()).to(x0.dtype)

    def native(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output in the space ``target`` lives in (the raw output for DDPM)."""
        return out

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def initial_noise_scale(self, t: int) -> float:
        """Pure noise labelled t is eps itself (variance-preserving)."""
        return 1.0


class EDMSchedule:
    """EDM (Karras et al.) x0-prediction with preconditioning; t indexes an ascending sigma grid."""

    kind = "edm"

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5, num_timesteps=T):
        ramp = torch.linspace(0, 1, num_timesteps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        self.sigmas = (lo + ramp * (hi - lo)) ** rho  # ascending: index 0 = sigma_min, T-1 = sigma_max
        self._tables: dict = {}
        self.sigma_data = sigma_data
        self.num_timesteps = num_timesteps
        self.prediction_type = "edm"

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(_on(self._tables, self.sigmas, t.device)[t.long()], like)

    def add_noise(self, x0, eps, t):
        return (x0.double() + self.sigma(t, x0) * eps.double()).to(x0.dtype)

    def model_input(self, x_t, t):
        """c_in x and c_noise = ln(sigma)/4 (EDM Table 1)."""
        s = self.sigma(t, x_t)
        c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
        c_noise = _on(self._tables, self.sigmas, t.device)[t.long()].log() / 4
        return (c_in * x_t.double()).to(x_t.dtype), c_noise.to(torch.float32)

    def to_x0(self, x_t, out, t):
        s = self.sigma(t, x_t)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        return (c_skip * x_t.double() + c_out * out.double()).to(out.dtype)

    def target(self, x0, eps, t):
        return x0

    def native(self, out, x_t, t):
        return self.to_x0(x_t, out, t)

    def loss_weight(self, t):
        """lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (§5, EDM eq. 8 weighting)."""
        s = _on(self._tables, self.sigmas, t.device)[t.long()]
        return (1 / s**2 + 1 / self.sigma_data**2).to(torch.float32)

    def initial_noise_scale(self, t: int) -> float:
        """Pure noise at index t has standard deviation sigma_t (e.g. 80 at t = T-1)."""
        return float(self.sigmas[t])


def dynamic_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: mu linear in the number of image tokens, base_shift at
    base_image_seq_len and max_shift at max_image_seq_len (diffusers' ``calculate_shift`` in
    pipelines/flux/pipeline_flux.py; the defaults are its signature's)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * m + base_shift - m * base_image_seq_len


def flow_sigmas(num_timesteps: int = T, *, shift: float = 1.0, mu: float | None = None,
                time_shift_type: str = "exponential") -> torch.Tensor:
    """s(t) for integer t in [0, num_timesteps), float64, ascending, s(T-1) = 1 (pure noise).

    FlowMatchEulerDiscreteScheduler's training table (diffusers, scheduling_flow_match_euler_discrete.py
    ``__init__``): u = (t + 1) / T for t = 0..T-1, then the static shift s = shift u / (1 + (shift - 1) u)
    (SD3: shift 3.0; SD3 paper eq. 23 with alpha = shift), or, with ``mu`` (use_dynamic_shifting, FLUX),
    its ``time_shift``: exponential e^mu / (e^mu + (1/u - 1)), linear mu / (mu + (1/u - 1)).
    """
    u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    if mu is None:
        return shift * u / (1 + (shift - 1) * u)
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    if time_shift_type == "linear":
        return mu / (mu + (1 / u - 1))
    raise ValueError(f"unsupported time_shift_type {time_shift_type!r} (exponential or linear)")


class FlowSchedule:
    """Rectified flow / flow matching (SD3, FLUX): x_t = (1 - s_t) x0 + s_t eps, the network
    predicts the velocity v = eps - x0 (SD3 paper, Esser et al. 2024, §2; diffusers'
    FlowMatchEulerDiscreteScheduler).

    The integer interface of the other schedules: t in [0, T) indexes the teacher scheduler's own
    sigma table (``flow_sigmas``: u = (t + 1) / T, then the teacher's shift), so t = 999 is pure
    noise (s = 1) and the generator's timesteps (999, 749, 499, 249) and the DM/GAN noise levels
    drawn as integers mean the same as for DDPM teachers, in the teacher's own (shifted) sigma space.
    The transformer is told the timestep as ``s * T`` (a float), as the diffusers pipelines do.
    """

    kind = "flow"

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.to(torch.float64)  # ascending: index T-1 = 1.0
        self._tables: dict = {}
        self.prediction_type = "flow_prediction"  # diffusers' name for velocity (UniPC/DPM-Solver flow mode)
        self.num_timesteps = len(sigmas)

    @classmethod
    def from_scheduler_config(cls, cfg: dict, image_seq_len: int | None = None) -> FlowSchedule:
        """From a FlowMatchEulerDiscreteScheduler config. ``use_dynamic_shifting`` (FLUX) makes the
        table depend on the resolution: ``image_seq_len`` (latent tokens, (H/p)(W/p)) gives mu."""
        n = int(cfg.get("num_train_timesteps", T))
        mu = None
        if cfg.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError("use_dynamic_shifting: the sigma table depends on the resolution (image_seq_len)")
            # the fallbacks of the diffusers pipelines' calculate_shift calls (pipeline_flux.py)
            mu = dynamic_shift_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                  cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return cls(flow_sigmas(n, shift=float(cfg.get("shift", 1.0)), mu=mu,
                               time_shift_type=cfg.get("time_shift_type", "exponential")))

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(_on(self._tables, self.sigmas, t.device)[t.long()], like)

    def add_noise(self, x0, eps, t):
        s = self.sigma(t, x0)
        return ((1 - s) * x0.double() + s * eps.double()).to(x0.dtype)

    def model_input(self, x_t, t):
        """x_t and the timestep s * T as float, what SD3/FLUX transformers are called with."""
        return x_t, (_on(self._tables, self.sigmas, t.device)[t.long()] * self.num_timesteps).to(torch.float32)

    def to_x0(self, x_t, out, t):
        """x0 = x_t - s v, in float64 (as the other schedules)."""
        return (x_t.double() - self.sigma(t, x_t) * out.double()).to(out.dtype)

    def target(self, x0, eps, t):
        """The velocity eps - x0: the fake score regresses in the teacher's native target (§5)."""
        return (eps.double() - x0.double()).to(x0.dtype)

    def native(self, out, x_t, t):
        return out

    def loss_weight(self, t):
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def initial_noise_scale(self, t: int) -> float:
        """Pure noise is eps itself (s = 1 at t = T-1)."""
        return 1.0


def sample_timesteps(
    batch: int, lo: int, hi: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t ~ U{lo, ..., hi} inclusive, one per sample."""
    return torch.randint(lo, hi + 1, (batch,), generator=generator, device=device)
