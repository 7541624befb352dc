"""Figures of `ssmdiag smooth`: layerwise sharpness (paper Fig. 5) and the Ā spectrum (Fig. 6)."""

from __future__ import annotations

from pathlib import Path

from . import color, new_figure, save_figure

METRIC_LABEL = {"mean": "mean pairwise distance", "max": "max pairwise distance",
                "scale_free": "mean pairwise distance / mean norm"}


def _depth_axis(results) -> tuple[bool, str]:
    """Normalise depth to [0, 1] when the models' depths differ."""
    depths = {len(r.layers) for _, r in results}
    return (len(depths) > 1, "depth (layer / (layers − 1))" if len(depths) > 1 else "layer")


def _xs(n: int, normalise: bool) -> list[float]:
    return [i / max(n - 1, 1) for i in range(n)] if normalise else list(range(n))


def _log_if_wide(ax, values: list[float]) -> None:
    pos = [v for v in values if v and v > 0]
    if pos and max(pos) / min(pos) > 30:
        ax.set_yscale("log")


def plot_sharpness(results: list[tuple[str, object]], path: Path) -> Path:
    """Four panels: (a) state / mixer-input sharpness ratio per layer, (b) mixer output, (c) block output in the
    --metric, (d) the norm-free headline: block-output scale-free sharpness, its slope and interval in the legend.

    Args:
        results: (model name, SmoothingResult) pairs; depths may differ (then depth is normalised).
    """
    normalise, xlabel = _depth_axis(results)
    fig, (ax_r, ax_m, ax_b, ax_h) = new_figure(4, width=4.1, height=3.7)
    metric = results[0][1].metric
    all_m, all_b = [], []
    for k, (name, res) in enumerate(results):
        xs = _xs(len(res.layers), normalise)
        c = color(k)
        ratios = [la.ratio[metric] if la.ratio else None for la in res.layers]
        if any(r is not None for r in ratios):
            ax_r.plot([x for x, r in zip(xs, ratios) if r is not None], [r for r in ratios if r is not None],
                      "o-", ms=3, color=c, label=name)
        else:
            ax_r.plot([], [], color=c, label=f"{name} (no memory states)")
        mixer = [la.mixer_output.get(metric) if la.mixer_output is not None else None for la in res.layers]
        block = [la.block_output.get(metric) for la in res.layers]
        all_m += [v for v in mixer if v is not None]
        all_b += block
        mx = [(x, v) for x, v in zip(xs, mixer) if v is not None]  # blocks without a token mixer: no point
        ax_m.plot([x for x, _ in mx], [v for _, v in mx], "o-", ms=3, color=c, label=name)
        for x, la in zip(xs, res.layers):  # attention-like blocks of a hybrid: marked on the block-output panel
            if la.kind in ("A", "S", "P"):
                ax_b.axvline(x, color=c, lw=0.6, alpha=0.25)
        ax_b.plot(xs, block, "o-", ms=3, color=c, label=name)
        ax_h.plot(xs, [la.block_output.get("scale_free") for la in res.layers], "o-", ms=3, color=c,
                  label=_headline_label(name, res))
    ax_r.axhline(1.0, color="grey", lw=1, ls="--")
    _log_if_wide(ax_r, [r for _, res in results for la in res.layers if la.ratio for r in [la.ratio[metric]]] + [1.0])
    ax_r.set_title("(a) states / mixer input")
    ax_r.set_ylabel(f"ratio of {METRIC_LABEL[metric]}", fontsize=8)
    ax_m.set_title("(b) mixer output")
    ax_b.set_title("(c) block output")
    for ax, vals in ((ax_m, all_m), (ax_b, all_b)):
        ax.set_ylabel(METRIC_LABEL[metric], fontsize=8)
        _log_if_wide(ax, vals)
    ax_h.set_title("(d) block output, norm-free (headline)")
    ax_h.set_ylabel(METRIC_LABEL["scale_free"], fontsize=8)
    for ax in (ax_r, ax_m, ax_b, ax_h):
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _headline_label(name: str, res) -> str:
    """'name: −1.23 %/layer [−2.0, −0.4]' from the result's norm-free slope and its interval."""
    slope, ci = res.norm_free_slope, res.norm_free_slope_ci95
    if slope is None:
        return name
    text = f"{name}: {100 * slope:+.2f} %/layer"
    return text + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")


def plot_spectrum(results: list[tuple[str, object]], path: Path) -> Path:
    """Two panels: share of channels whose max (solid) / min (dashed) Ā is below a threshold, and a
    histogram of memory horizons 1 / (1 − max Ā). Models without a spectrum are left out."""
    fig, (ax_c, ax_h) = new_figure(2, width=5.2, height=3.8)
    for k, (name, res) in enumerate(results):
        spec = res.spectrum
        if spec is None:
            continue
        c = color(k)
        ax_c.plot(spec.thresholds, spec.curve_max, color=c, label=f"{name}: max_t Ā")
        ax_c.plot(spec.thresholds, spec.curve_min, color=c, ls="--", label=f"{name}: min_t Ā")
        total = sum(spec.horizon_counts) or 1
        edges = spec.horizon_edges + [spec.horizon_edges[-1] * 10 ** 0.25]
        ax_h.stairs([n / total for n in spec.horizon_counts], edges, color=c, label=name)
    ax_c.set_xlabel("threshold τ")
    ax_c.set_ylabel("share of channels with Ā < τ")
    ax_c.set_title("Ā spectrum (per channel, over tokens)")
    ax_h.set_xscale("log")
    ax_h.set_xlabel("memory horizon 1 / (1 − max_t Ā)  [tokens]")
    ax_h.set_ylabel("share of channels")
    ax_h.set_title("memory horizons")
    for ax in (ax_c, ax_h):
        ax.legend(fontsize=7)
    return save_figure(fig, path)
