"""`backfill diagnose`: why the raw CVAE is over-confident, measured on held-out windows.

The seed's experiments, on the calibration split's windows by default (after the model's
training data, so out of sample); every spread is in iv units:

    decoder_sensitivity  std over prior draws of the decoded p50 path as the z noise grows
                         (z = mu_p + s * sigma_p * eps, s in NOISE_SCALES)
    context_vs_z         change of the decoded path when the context embedding e is zeroed
                         vs when z is zeroed (against the decode at one prior draw)
    posterior_vs_prior   mean sigma^2 of q(z | e, target) and of p(z | e); KL(q || p)
    neighbour_variance   per horizon: variance of the realised values among each window's
                         K nearest contexts in embedding space / the unconditional variance
    regime_separation    low / high context level (split at the median) in embedding space:
                         silhouette, centroid distance ratio, and embedding.png (2-D PCA)
    variance_budget      per horizon: Var X, Var E[X|C] (variance of the p50 over windows),
                         E[Var(X|C)] of the raw prior decode, and their shares of Var X

Randomness: window w draws its noise from ``node_rng(seed, 1, anchor_w, EVALUATION)``
(level 1, so it never shares a stream with `evaluate`'s level-0 draws).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import Config
from engine.errors import ConfigError, DataError
from engine.evaluate import check_horizons, json_safe, set_threads
from engine.knn import brute_knn
from engine.model import CVAE
from engine.pipeline import get_model, prepare
from engine.rng import EVALUATION, node_rng
from engine.samplers.bank import KeySpace

NOISE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
N_DRAWS = 32  # prior draws per window
K_NEIGHBOURS = 30
MAX_WINDOWS = 1000  # neighbour search and silhouette are O(W^2)
CHUNK = 64  # windows per decode call
DIAGNOSE_LEVEL = 1


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


# ----------------------------------------------------------------------------- latent space


@torch.no_grad()
def latent_stats(model: CVAE, log_ctx: np.ndarray, log_tgt: np.ndarray, eps0: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Prior and posterior of z, and the decode at one prior draw with e or z zeroed.

    log_ctx (W, C, n_m, n_tau), log_tgt (W, H, n_m, n_tau), eps0 (W, L) ->
    mu_p, var_p, mu_q, var_q (W, L); kl (W,); base, zero_e, zero_z (W, H, n_m, n_tau) iv.
    """
    model.eval()
    device = model.loc.device
    med = model.cfg.quantiles.index(0.5)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(log_ctx), CHUNK):
        x = torch.as_tensor(log_ctx[i : i + CHUNK], dtype=torch.float32, device=device)
        y = torch.as_tensor(log_tgt[i : i + CHUNK], dtype=torch.float32, device=device)
        e = model.encode(x)  # (b, E)
        mu_p, lv_p = model.prior(e)  # (b, L)
        # The posterior's input, as in CVAE.loss: standardised changes from the last day.
        delta = (y.flatten(2) - x[:, -1].flatten(1)[:, None]) / model.scale  # (b, H, G)
        mu_q, lv_q = model.posterior(torch.cat([e, delta.flatten(1)], dim=-1))
        kl = 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p) ** 2) / torch.exp(lv_p) - 1)
        z = mu_p + torch.exp(0.5 * lv_p) * torch.as_tensor(eps0[i : i + CHUNK],
                                                           dtype=torch.float32, device=device)
        out = {
            "mu_p": mu_p, "var_p": torch.exp(lv_p), "mu_q": mu_q, "var_q": torch.exp(lv_q),
            "kl": kl.sum(-1),
            "base": torch.exp(model.decode(x, e, z)[:, med]),
            "zero_e": torch.exp(model.decode(x, torch.zeros_like(e), z)[:, med]),
            "zero_z": torch.exp(model.decode(x, e, torch.zeros_like(z))[:, med]),
        }
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu().numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in parts.items()}


def prior_spread(model: CVAE, log_ctx: np.ndarray, eps: np.ndarray, noise_scales=NOISE_SCALES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Spread of prior decodes per noise scale.

    -> std (n_scales, H): std over draws of the iv p50 path, mean over windows and grid;
       within (H, G): mean over windows of the variance over draws at noise scale 1.
    """
    W, H = len(log_ctx), model.horizon
    G = model.grid_shape[0] * model.grid_shape[1]
    std = np.zeros((len(noise_scales), H))
    within = np.zeros((H, G))
    for i in range(0, W, CHUNK):
        ctx, e = log_ctx[i : i + CHUNK], eps[i : i + CHUNK]
        for j, s in enumerate(noise_scales):
            paths = np.exp(model.decode_prior(ctx, e, s)).reshape(len(ctx), e.shape[1], H, G)
            std[j] += paths.std(axis=1).sum(axis=(0, 2)) / (W * G)
            if s == 1.0:
                within += paths.var(axis=1).sum(axis=0) / W
    return std, within


# ----------------------------------------------------------------------------- neighbours


def usable_neighbours(anchors: np.ndarray, k: int, gap: int) -> int:
    """The neighbours every window can have (at most ``k``) among windows more than ``gap``
    days from it; DataError below 2."""
    allowed = (np.abs(anchors[:, None] - anchors[None, :]) > gap).sum(axis=1)
    k = int(min(k, allowed.min()))
    if k < 2:
        raise DataError(f"diagnose needs at least 2 neighbours per window more than {gap} days "
                        f"apart, but {len(anchors)} windows leave {k}; use a longer split, more "
                        "data or a shorter data.horizon")
    return k


def neighbour_share(keys: np.ndarray, anchors: np.ndarray, realised: np.ndarray,
                    horizons: list[int], k: int, gap: int) -> tuple[dict[str, float], int]:
    """Mean over windows of Var(realised of the k nearest) / Var(realised), per horizon.

    keys (W, D), anchors (W,), realised (W, H, G). Windows within ``gap`` days of the query
    are not neighbours (their targets overlap). Shares are averaged over grid points.
    """
    k = usable_neighbours(anchors, k, gap)

    def exclude(cand):
        return np.abs(anchors[cand] - anchors[np.arange(len(cand))][:, None]) <= gap

    _, ids = brute_knn(keys, keys, k, exclude_fn=exclude)  # (W, k)
    out = {}
    for h in horizons:
        y = realised[:, h - 1]  # (W, G)
        # unbiased on both sides, so k random neighbours give 1 on average whatever k
        var_x = y.var(axis=0, ddof=1)
        local = y[ids].var(axis=1, ddof=1).mean(axis=0)  # (G,)
        ok = var_x > 0
        out[str(h)] = float((local[ok] / var_x[ok]).mean()) if ok.any() else None
    return out, k


def regime_separation(keys: np.ndarray, level: np.ndarray) -> tuple[dict, np.ndarray]:
    """Low / high context level (split at the median) in the standardised embedding space."""
    high = level > np.median(level)
    diff = keys[:, None, :] - keys[None, :, :]
    dist = np.sqrt(np.einsum("ijd,ijd->ij", diff, diff))  # (W, W)
    same = high[:, None] == high[None, :]
    np.fill_diagonal(same, False)
    other = high[:, None] != high[None, :]
    a = (dist * same).sum(1) / np.maximum(same.sum(1), 1)
    b = (dist * other).sum(1) / np.maximum(other.sum(1), 1)
    silhouette = np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(a, b), 0.0)
    c_lo, c_hi = keys[~high].mean(axis=0), keys[high].mean(axis=0)
    within = np.where(high, np.linalg.norm(keys - c_hi, axis=1),
                      np.linalg.norm(keys - c_lo, axis=1)).mean()
    centred = keys - keys.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(keys))]
    # a principal axis has no sign of its own: PC 1 points to higher context levels
    if np.corrcoef(coords[:, 0], level)[0, 1] < 0:
        coords[:, 0] = -coords[:, 0]
    # How much of the context level a linear read-out of the embedding recovers (in sample;
    # adjusted for the D + 1 coefficients, which fit noise on few windows)
    n, d = keys.shape
    design = np.c_[np.ones(n), keys]
    fit = design @ np.linalg.lstsq(design, level, rcond=None)[0]
    r2 = 1.0 - ((level - fit) ** 2).sum() / max(((level - level.mean()) ** 2).sum(), 1e-300)
    r2_adj = 1.0 - (1.0 - r2) * (n - 1) / (n - d - 1) if n > d + 1 else None
    return {
        "silhouette": float(silhouette.mean()),
        "centroid_distance_ratio": float(np.linalg.norm(c_hi - c_lo) / max(within, 1e-300)),
        "level_r2_linear": float(r2),
        "level_r2_adjusted": None if r2_adj is None else float(r2_adj),
        "pc1_level_corr": float(np.corrcoef(coords[:, 0], level)[0, 1]),
        "pc_variance_share": [float(x) for x in (sv[:2] ** 2 / (sv ** 2).sum())],
        "median_level": float(np.median(level)),
    }, coords


def _share_of(part: np.ndarray, var_x: np.ndarray) -> float | None:
    """part / Var X per grid point, averaged over the points where Var X > 0."""
    ok = var_x > 0
    return float((part[ok] / var_x[ok]).mean()) if ok.any() else None


# ----------------------------------------------------------------------------- the command


def run_diagnose(cfg: Config, out: Path, model_path: Path | None = None, console=None,
                 split: str = "calibration") -> dict:
    """Run the diagnostics on ``split``'s windows; write diagnose.json, diagnose.md,
    diagnose.png (sensitivity to z, variance budget) and embedding.png."""
    if split not in ("train", "calibration", "test"):
        raise ConfigError(f"diagnose split must be train, calibration or test, got {split!r}")
    t_start = time.perf_counter()
    out = Path(out)
    set_threads(cfg)
    horizons, notes = check_horizons(cfg)
    prep = prepare(cfg, console=console)
    panel = prep.panel
    C, H = cfg.data.context, cfg.data.horizon
    anchors = prep.splits.anchors(split)
    anchors = anchors[:: int(np.ceil(len(anchors) / MAX_WINDOWS))]
    usable_neighbours(anchors, K_NEIGHBOURS, H)  # before the CVAE trains, not after
    model = get_model(prep, model_path, console)
    W = len(anchors)
    _say(console, f"diagnosing the CVAE on {W} {split} windows")
    log_ctx = panel.contexts_at(anchors, C)
    log_tgt = panel.targets_at(anchors, H)
    realised = np.exp(log_tgt).reshape(W, H, -1)  # (W, H, G) iv
    L = model.cfg.latent_dim
    rngs = [node_rng(cfg.seed, DIAGNOSE_LEVEL, int(a), EVALUATION) for a in anchors]
    eps = np.stack([r.standard_normal((N_DRAWS, L)) for r in rngs])  # (W, S, L)

    std, within = prior_spread(model, log_ctx, eps)
    p50 = np.exp(model.median(log_ctx)).reshape(W, H, -1)
    resid_std = float((realised - p50).std())
    sens = {"noise_scales": list(NOISE_SCALES), "n_draws": N_DRAWS,
            "std_by_noise_scale": {f"{s:g}": float(v.mean()) for s, v in zip(NOISE_SCALES, std,
                                                                             strict=True)},
            "std_by_noise_scale_and_horizon": {
                f"{s:g}": {str(h): float(v[h - 1]) for h in horizons}
                for s, v in zip(NOISE_SCALES, std, strict=True)},
            "residual_std": resid_std}

    lat = latent_stats(model, log_ctx, log_tgt, eps[:, 0])
    base = lat["base"]
    zero_e = float(np.abs(lat["zero_e"] - base).mean())
    zero_z = float(np.abs(lat["zero_z"] - base).mean())
    ctx_vs_z = {"zero_context_change": zero_e, "zero_z_change": zero_z,
                "ratio_context_to_z": zero_e / zero_z if zero_z > 0 else None,
                "output_spread_over_windows": float(base.std(axis=0).mean())}
    post = {"prior_var": float(lat["var_p"].mean()), "posterior_var": float(lat["var_q"].mean()),
            "posterior_to_prior_var": float(lat["var_q"].mean() / lat["var_p"].mean()),
            "prior_mean_spread": float(lat["mu_p"].std(axis=0).mean()),
            "posterior_mean_spread": float(lat["mu_q"].std(axis=0).mean()),
            "kl_per_latent_dim": [float(x) for x in
                                  (0.5 * (np.log(lat["var_p"] / lat["var_q"]) - 1
                                          + (lat["var_q"] + (lat["mu_q"] - lat["mu_p"]) ** 2)
                                          / lat["var_p"])).mean(axis=0)]}

    keys = KeySpace("cvae", model).fit(log_ctx)
    nb_share, k = neighbour_share(keys, anchors, realised, horizons, K_NEIGHBOURS, H)
    level = np.exp(log_ctx).mean(axis=(1, 2, 3))
    regimes, coords = regime_separation(keys, level)

    budget = {}
    for h in horizons:
        var_x = realised[:, h - 1].var(axis=0)
        between = p50[:, h - 1].var(axis=0)
        residual = ((realised[:, h - 1] - p50[:, h - 1]) ** 2).mean(axis=0)
        budget[str(h)] = {
            "var_x": float(var_x.mean()), "between_var": float(between.mean()),
            "within_var": float(within[h - 1].mean()), "residual_var": float(residual.mean()),
            "between_share": _share_of(between, var_x),
            "within_share": _share_of(within[h - 1], var_x),
            "residual_share": _share_of(residual, var_x)}

    result = json_safe({
        "data": {"source": panel.source, "fingerprint": panel.fingerprint,
                 "grid": panel.grid_dict()},
        "split": prep.splits.to_dict(), "split_name": split, "n_windows": W,
        "horizons": horizons, "notes": notes,
        "decoder_sensitivity": sens, "context_vs_z": ctx_vs_z, "posterior_vs_prior": post,
        "kl": float(lat["kl"].mean()),
        "neighbour_variance": {"k": k, "exclusion_days": H, "share": nb_share},
        "regime_separation": regimes, "variance_budget": budget,
        "timings": {"total_seconds": time.perf_counter() - t_start},
    })
    from engine.report import diagnose_markdown, plot_diagnose, plot_embedding, staged

    with staged(out) as stage:
        (stage / "diagnose.json").write_text(json.dumps(result, indent=2))
        (stage / "diagnose.md").write_text(diagnose_markdown(result))
        plot_embedding(coords, level, stage / "embedding.png",
                       f"context embeddings ({split} split), 2-D PCA\nsilhouette of low / "
                       f"high level {regimes['silhouette']:.2f}")
        plot_diagnose(result, stage / "diagnose.png")
    _say(console, f"wrote {out / 'diagnose.json'}, diagnose.md, diagnose.png, embedding.png in "
                  f"{result['timings']['total_seconds']:.1f}s")
    return result
