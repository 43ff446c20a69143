"""The conditional VAE, top to bottom in one module.

Shapes: B batch, C context days, H horizon days, G = n_m * n_tau grid points,
E embedding size, L latent size, Q quantiles. Everything is in log-IV; inputs are
standardised per grid point with the training panel's mean and std (buffers, so a
checkpoint carries them), and outputs are changes from the last context day.

    context (B, C, G) --GRU--> embedding e (B, E)                      [ContextEncoder]
    p(z | e)        = N(mu_p, sigma_p)                                  [Prior]
    q(z | e, target)= N(mu_q, sigma_q)                                  [Posterior]
    decoder(e, z)   -> (B, H, G, Q) quantile paths, non-crossing        [Decoder]

Loss: pinball over the Q quantiles + beta * KL(q || p). With probability
``prior_mix`` a training step decodes z from the prior instead of the posterior,
so the decoder learns to read prior samples.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Config, ModelConfig, iso_day
from engine.errors import CheckpointError, ConfigError, first_line

CHECKPOINT_VERSION = 1
# Rows per decoder call, on every device: a fixed shape keeps results batch-independent.
# Measured on an H200: 256-row calls decode the engine's 256-node tasks at 52k forecasts/s
# (1024-row calls 32k, 8192-row calls 1k: the padding), and big batches are bound by the copy
# back to numpy (~65k/s) whatever the call size.
MICRO = 256


def mlp(n_in: int, n_hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(n_hidden, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_out))


class ContextEncoder(nn.Module):
    def __init__(self, n_grid: int, cfg: ModelConfig):
        super().__init__()
        self.gru = nn.GRU(n_grid, cfg.hidden, batch_first=True)
        self.head = mlp(cfg.hidden + 2 * n_grid, cfg.hidden, cfg.embed_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, G) standardised
        _, h = self.gru(x)  # h (1, B, hidden)
        summary = torch.cat([h[-1], x[:, -1], x.mean(dim=1)], dim=-1)
        return self.head(summary)  # (B, E)


class Gaussian(nn.Module):
    """An MLP that emits the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, n_in: int, cfg: ModelConfig):
        super().__init__()
        self.net = mlp(n_in, cfg.hidden, 2 * cfg.latent_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)  # (B, L) each
        return mu, logvar.clamp(-12.0, 6.0)


class Decoder(nn.Module):
    def __init__(self, n_grid: int, horizon: int, cfg: ModelConfig):
        super().__init__()
        self.horizon, self.n_grid, self.n_q = horizon, n_grid, len(cfg.quantiles)
        self.median = cfg.quantiles.index(0.5)
        self.net = mlp(cfg.embed_dim + cfg.latent_dim, cfg.hidden, horizon * n_grid * self.n_q,
                       cfg.dropout)

    def _raw(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([e, z], dim=-1)).view(-1, self.horizon, self.n_grid, self.n_q)

    def forward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raw = self._raw(e, z)
        mid = raw[..., self.median : self.median + 1]  # (B, H, G, 1)
        # Non-crossing by construction: quantiles step away from the median by softplus gaps.
        up = mid + _cumsum_last(F.softplus(raw[..., self.median + 1 :]))
        down = mid - _cumsum_last(F.softplus(raw[..., : self.median]).flip(-1)).flip(-1)
        return torch.cat([down, mid, up], dim=-1)  # (B, H, G, Q)

    def p50(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The median quantile alone, (B, H, G): ``forward(e, z)[..., median]`` to the bit,
        without the other quantiles' softplus gaps."""
        return self._raw(e, z)[..., self.median]


def _cumsum_last(t: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over the last axis; a single gap (the default quantiles) is returned as
    it is, the same values without a scan kernel over millions of one-element rows."""
    return t if t.shape[-1] <= 1 else torch.cumsum(t, dim=-1)


class CVAE(nn.Module):
    def __init__(self, cfg: ModelConfig, grid_shape: tuple[int, int], context: int, horizon: int):
        super().__init__()
        self.cfg, self.grid_shape, self.context, self.horizon = cfg, tuple(grid_shape), context, horizon
        n_grid = grid_shape[0] * grid_shape[1]
        self.encoder = ContextEncoder(n_grid, cfg)
        self.prior = Gaussian(cfg.embed_dim, cfg)
        self.posterior = Gaussian(cfg.embed_dim + horizon * n_grid, cfg)
        self.decoder = Decoder(n_grid, horizon, cfg)
        self.register_buffer("loc", torch.zeros(n_grid))
        self.register_buffer("scale", torch.ones(n_grid))
        self.register_buffer("quantile_levels", torch.tensor(cfg.quantiles))
        self.train_end: str | None = None  # last date of any training target (set by training)

    # --- tensors in, tensors out -------------------------------------------------------------
    def _standardise(self, log_ctx: torch.Tensor) -> torch.Tensor:
        return (log_ctx.flatten(2) - self.loc) / self.scale  # (B, C, G)

    def encode(self, log_ctx: torch.Tensor) -> torch.Tensor:  # (B, C, n_m, n_tau) -> (B, E)
        return self.encoder(self._standardise(log_ctx))

    def decode(self, log_ctx: torch.Tensor, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Quantile paths in log-IV, (B, Q, H, n_m, n_tau)."""
        delta = self.decoder(e, z) * self.scale[:, None]  # (B, H, G, Q)
        last = log_ctx[:, -1].flatten(1)[:, None, :, None]  # (B, 1, G, 1)
        out = (last + delta).permute(0, 3, 1, 2)  # (B, Q, H, G)
        return out.reshape(out.shape[0], out.shape[1], self.horizon, *self.grid_shape)

    def loss(self, log_ctx: torch.Tensor, log_tgt: torch.Tensor, use_prior: bool) -> dict:
        e = self.encode(log_ctx)
        mu_p, lv_p = self.prior(e)
        delta = (log_tgt.flatten(2) - log_ctx[:, -1].flatten(1)[:, None]) / self.scale  # (B, H, G)
        mu_q, lv_q = self.posterior(torch.cat([e, delta.flatten(1)], dim=-1))
        mu, lv = (mu_p, lv_p) if use_prior else (mu_q, lv_q)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
        pred = self.decoder(e, z)  # (B, H, G, Q) standardised changes
        pinball = pinball_loss(pred, delta, self.quantile_levels)
        kl = 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p) ** 2) / torch.exp(lv_p) - 1)
        kl = kl.sum(-1).mean()
        return {"loss": pinball + self.cfg.beta * kl, "pinball": pinball, "kl": kl}

    # --- numpy in, numpy out (batched, no grad) ---------------------------------------------
    @torch.no_grad()
    def _batched(self, fn, log_ctx: np.ndarray) -> np.ndarray:
        """Apply ``fn`` in micro-batches of exactly MICRO rows (the last one padded).

        Matrix kernels may round differently for different batch shapes; with one fixed
        shape a context's output never depends on the batch it arrived in, which the
        engine's "same bytes whatever the batch size" promise needs.
        """
        self.eval()
        device = self.loc.device
        outs = []
        for i in range(0, len(log_ctx), MICRO):
            chunk = np.ascontiguousarray(log_ctx[i : i + MICRO])
            n = len(chunk)
            if n < MICRO:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], MICRO - n, axis=0)])
            x = torch.as_tensor(chunk, dtype=torch.float32, device=device)
            outs.append(fn(x)[:n])  # left on the device: the next call queues behind it
        if not outs:
            return np.zeros((0,))
        # one copy back, in float64 (exact from float32, on whichever side): a GPU is not
        # made to wait for the host after every micro-batch
        return torch.cat(outs).to(torch.float64).cpu().numpy()

    def embed(self, log_ctx: np.ndarray) -> np.ndarray:
        """Context embeddings (B, E): the kNN index's space."""
        return self._batched(self.encode, log_ctx)

    def _at_prior_mean(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encode(x)
        mu_p, _ = self.prior(e)
        return self.decode(x, e, mu_p)

    def forecast(self, log_ctx: np.ndarray) -> np.ndarray:
        """Quantile paths (B, Q, H, n_m, n_tau) in log-IV, decoded at the prior's mean z."""
        return self._batched(self._at_prior_mean, log_ctx)

    def p50(self, x: torch.Tensor) -> torch.Tensor:
        """Tensors in and out: the p50 path (B, H, n_m, n_tau) in log-IV of contexts x
        (B, C, n_m, n_tau), the median of ``_at_prior_mean``, to the bit, decoding no other
        quantile."""
        e = self.encode(x)
        mu_p, _ = self.prior(e)
        out = x[:, -1].flatten(1)[:, None, :] + self.decoder.p50(e, mu_p) * self.scale
        return out.reshape(out.shape[0], self.horizon, *self.grid_shape)

    def median(self, log_ctx: np.ndarray) -> np.ndarray:
        """The p50 path (B, H, n_m, n_tau) in log-IV (only it leaves the device): the
        median of ``forecast``, to the bit (``p50`` in fixed-shape micro-batches)."""
        return self._batched(self.p50, log_ctx)

    def decode_prior(self, log_ctx: np.ndarray, eps: np.ndarray, noise_scale: float = 1.0,
                     ) -> np.ndarray:
        """p50 paths (B, S, H, n_m, n_tau) in log-IV for z = mu_p + noise_scale * sigma_p * eps.

        eps (B, S, L) is standard normal noise drawn by the caller (so randomness stays
        with the caller's per-row generators). Contexts are encoded once; the (context,
        draw) rows are then decoded in fixed-shape micro-batches.
        """
        B, S, L = eps.shape
        G = self.grid_shape[0] * self.grid_shape[1]

        def encode(x):
            e = self.encode(x)
            mu_p, lv_p = self.prior(e)
            return torch.cat([e, mu_p, torch.exp(0.5 * lv_p), x[:, -1].flatten(1)], dim=-1)

        enc = self._batched(encode, log_ctx)  # (B, E + 2L + G)
        rows = np.concatenate([np.repeat(enc, S, axis=0), eps.reshape(B * S, L)], axis=1)
        E = self.cfg.embed_dim

        def decode(x):
            e, mu, sd, last, z_eps = torch.split(x, [E, L, L, G, L], dim=-1)
            z = mu + noise_scale * sd * z_eps
            delta = self.decoder.p50(e, z) * self.scale  # (rows, H, G)
            return last[:, None] + delta

        out = self._batched(decode, rows)  # (B*S, H, G)
        return out.reshape(B, S, self.horizon, *self.grid_shape)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss; pred (..., Q), target (...)."""
    diff = target[..., None] - pred
    return torch.maximum(levels * diff, (levels - 1) * diff).mean()


# --- checkpoints: weights + config + fingerprint + grid, loaded with weights_only=True ---------
# torch's weights_only reader could be talked into running code before 2.6 (CVE-2025-32434)
SAFE_TORCH = (2, 6)


def check_torch(version: str | None = None) -> None:
    """Refuse to read files with a torch whose weights_only reader is not safe."""
    text = (version or torch.__version__).split("+")[0]
    parts = tuple(int(p) for p in text.split(".")[:2] if p.isdigit())
    if parts < SAFE_TORCH:
        raise CheckpointError(f"torch {text} reads files with weights_only=True, which before "
                              "2.6 can be made to run code (CVE-2025-32434); install torch "
                              "2.6 or later to load a checkpoint or sampler file")


def safe_load(path: Path, map_location: str = "cpu"):
    """``torch.load`` with ``weights_only=True`` on a torch where that is safe."""
    check_torch()
    with warnings.catch_warnings():  # torch's warnings about a foreign file: the caller says it
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(model: CVAE, path: str | Path, config: Config, fingerprint: str,
                    grid: dict, history: list[dict] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"version": CHECKPOINT_VERSION, "config": config.to_dict(), "fingerprint": fingerprint,
            "grid": grid, "grid_shape": list(model.grid_shape), "context": model.context,
            "horizon": model.horizon, "history": history or [], "train_end": model.train_end}
    torch.save({"state_dict": state, "meta": json.dumps(meta)}, path)
    return path


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[CVAE, dict]:
    """Rebuild a model from the file alone; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        found = "not found" if not path.exists() else "is not a regular file"
        raise CheckpointError(f"model file {path} {found}; train one with `backfill train "
                              "--out model.pt` or leave --model out")
    blob = None
    try:
        blob = safe_load(path, device)
        if not isinstance(blob, dict):  # a bare tensor: indexing it by name warns
            raise TypeError(f"a {type(blob).__name__}")
        meta = json.loads(blob["meta"])
        state = blob["state_dict"]
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means "not our checkpoint"
        from engine.sampler_file import is_sampler_file

        if is_sampler_file(blob):
            raise CheckpointError(f"{path} is a sampler file, not a model checkpoint; pass it "
                                  "to --sampler, or train a model with `backfill train --out "
                                  "model.pt`") from None
        raise CheckpointError(f"{path} is not a backfill checkpoint ({type(err).__name__}); "
                              "train one with `backfill train --out model.pt`") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has checkpoint version {version}, this "
                              f"backfill reads version {CHECKPOINT_VERSION}; retrain the model")
    try:
        config = Config.from_dict(meta["config"])
        model = CVAE(config.model, tuple(meta["grid_shape"]), meta["context"], meta["horizon"])
        model.load_state_dict(state)
        model.train_end = checked_train_end(meta.get("train_end"))
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as err:
        # a field or weight is off, or the stored config is one this version refuses
        raise CheckpointError(f"{path} is a damaged or outdated backfill checkpoint "
                              f"({first_line(err)}); retrain the model") from None
    return model.to(device), meta


def checked_train_end(value) -> str | None:
    """A checkpoint's last training date as YYYY-MM-DD (None: not recorded); TypeError or
    ValueError if it is not a date."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"train_end {value!r} is not a date")
    try:
        return str(iso_day(value))
    except ValueError:  # its fix (how to write a date) is not the reader's: retrain
        raise ValueError(f"train_end {value!r} is not a date") from None


def torch_modules(obj, depth: int = 2) -> list[nn.Module]:
    """Every torch module among ``obj``'s attributes and their lists, ``depth`` levels of
    attributes down (a sampler's CVAE, its fold models, the keys' CVAE), each once (one
    model may be reached along several paths)."""
    seen: set[int] = set()
    found: list[nn.Module] = []

    def walk(values, d: int) -> None:
        for value in values:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, nn.Module):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                walk(value, d)
            elif d > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
                walk(vars(value).values(), d - 1)

    walk(vars(obj).values() if hasattr(obj, "__dict__") else (), depth)
    return found


def move_models(obj, device: str, depth: int = 2) -> int:
    """Move every torch module among ``obj``'s attributes and their lists (``depth`` levels
    down) to ``device`` for good (a decoder actor's copy to its GPU); returns how many moved
    (each once: the keys' CVAE and the fold models may be reached along several paths)."""
    modules = torch_modules(obj, depth)
    for m in modules:
        m.to(device)
    return len(modules)


@contextlib.contextmanager
def models_on(obj, device: str, depth: int = 2):
    """``obj``'s torch modules (``torch_modules``) on ``device`` inside the block, and back
    where each was after it (also on an error): the Ray driver ships a sampler's weights on
    the CPU, and the store's probe draws there, without moving the caller's models off
    their GPU (``move_models`` moves them for good). Yields how many modules there are."""
    modules = torch_modules(obj, depth)
    home = [next((t.device for t in itertools.chain(m.parameters(), m.buffers())), None)
            for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield len(modules)
    finally:
        for m, where in zip(modules, home, strict=True):
            if where is not None:
                m.to(where)


def device_label(device: torch.device | str) -> str:
    """'cpu', or a GPU with its model ('cuda NVIDIA H100 80GB HBM3'): kernels, and so the
    last bits of results, differ between the two and between GPU models."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda {torch.cuda.get_device_name(device)}"


def module_devices(obj) -> set[str]:
    """The devices (``device_label``) that ``obj``'s torch modules compute on ({'cpu'}
    without any)."""
    return {device_label(p.device) for m in torch_modules(obj) for p in m.parameters()} \
        or {"cpu"}
