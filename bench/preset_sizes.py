"""Each preset with a published size, built on the meta device: its parameter count against the published figure.

Prints one markdown table (the one in docs/info.md): preset, transformers model_type, parameters counted on the meta
device, the published total, their ratio, and for a mixture of experts the parameters active per token (routed
experts at k / E) against the published active figure.  Tied embeddings count once, as published totals count them.
Nothing is allocated and nothing is downloaded; a few seconds per preset.
Usage: python bench/preset_sizes.py [--presets qwen3.5-0.8b,lfm2-350m]
"""

from __future__ import annotations

import argparse

from ssmdiag.presets import all_presets, meta_parameter_counts


def _b(n: float | None) -> str:
    """A count in billions, 3 decimals (or 4 under 1 B)."""
    if n is None:
        return ""
    return f"{n / 1e9:.4f} B" if n < 1e9 else f"{n / 1e9:.3f} B"


def size_rows(names: list[str] | None = None) -> list[list[str]]:
    """One row per preset that records a published size (all of them unless `names`)."""
    rows = []
    for name, preset in all_presets().items():
        if preset.published_params is None or (names and name not in names):
            continue
        total, active = meta_parameter_counts(preset)
        pub_active = preset.published_active_params
        tied = bool(preset.config.get("tie_word_embeddings", False))
        rows.append([name, preset.model_type, _b(total), _b(preset.published_params),
                     f"{total / preset.published_params:.3f}", _b(active), _b(pub_active),
                     f"{active / pub_active:.2f}" if active and pub_active else "", "yes" if tied else "no"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="", help="comma-separated preset names (default: every one with a "
                                                      "published size)")
    args = parser.parse_args()
    names = [n for n in args.presets.split(",") if n] or None
    head = ["preset", "model_type", "meta count", "published", "ratio", "meta active", "published active",
            "active ratio", "tied embeddings"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for row in size_rows(names):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
