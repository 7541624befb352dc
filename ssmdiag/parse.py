"""Flag parsers: the text of one CLI flag -> values, or an SsmdiagError naming the flag and a valid example.

Every command reads these flags through this module, so a flag is spelled and understood the same everywhere.
"""

from __future__ import annotations

import re

from .data.mqar import MQARSegment
from .errors import SsmdiagError
from .metrics.influence_fit import auto_fit_range


def parse_layers(text: str | None, num_layers: int, every: list[int] | None = None) -> list[int]:
    """'all' / None -> `every` (default: every layer); '0-3,7' -> [0, 1, 2, 3, 7]; refuses indices out of range."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return list(range(num_layers)) if every is None else list(every)
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                lo_i, hi_i = int(lo), int(hi)
                if lo_i > hi_i:
                    raise ValueError
                idx = range(lo_i, hi_i + 1)
            else:
                idx = [int(part)]
        except ValueError:
            raise SsmdiagError(f"cannot read --layers '{text}'", hint="use e.g. all, 0-11 or 0,3,5") from None
        for i in idx:
            if not 0 <= i < num_layers:
                raise SsmdiagError(f"layer {i} is out of range: the model has {num_layers} layers (0-{num_layers - 1})",
                                   hint=f"use --layers within 0-{num_layers - 1}")
            out.add(i)
    return sorted(out)


def parse_fit_range(spec: str | None, max_distance: int) -> tuple[int, int]:
    """'auto' / None -> skip the conv-local first few distances and the last ~5%; 'A:B' -> inclusive distances.

    Raises SsmdiagError when the window is malformed or leaves fewer than 3 points.
    """
    if spec in (None, "", "auto"):
        lo, hi = auto_fit_range(max_distance)
    else:
        parts = str(spec).split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            lo = int(parts[0]) if parts[0].strip() else 0
            hi = int(parts[1]) if parts[1].strip() else max_distance
        except ValueError:
            raise SsmdiagError(f"--fit-range '{spec}' is not of the form LO:HI",
                               hint="give distances in tokens, e.g. --fit-range 4:400 (or auto)") from None
        if hi < 0:
            hi = max_distance + hi
        lo, hi = max(lo, 0), min(hi, max_distance)
    if hi - lo + 1 < 3:
        raise SsmdiagError(f"fit range {lo}:{hi} leaves {max(hi - lo + 1, 0)} point(s); the fit needs at least 3",
                           hint=f"distances run from 0 to {max_distance}; widen --fit-range or raise --seq-len")
    return lo, hi


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024), sorted, unique."""
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", item)
        if not m:
            raise SsmdiagError(f"--lengths: '{item}' is not a token count", hint="e.g. --lengths 1k,2k,4096")
        n = float(m.group(1)) * (1024 if m.group(2) else 1)
        if n != int(n) or n < 1:
            raise SsmdiagError(f"--lengths: '{item}' is not a whole positive number of tokens")
        out.append(int(n))
    if not out:
        raise SsmdiagError("--lengths is empty", hint="e.g. --lengths 1k,2k,4k")
    return sorted(set(out))


def parse_train_len(text: str | None) -> int | None:
    """`length --train-len`: '2k' / '2048' -> 2048 tokens (k = 1024); None / '' / 'auto' -> None (from the config)."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    m = re.fullmatch(r"(\d+)(k?)", str(text).strip().lower())
    if not m or int(m.group(1)) * (1024 if m.group(2) else 1) < 2:
        raise SsmdiagError(f"--train-len '{text}' is not a token count of at least 2",
                           hint="give the training context in tokens, e.g. --train-len 2048 or 2k")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_depths(text: str) -> list[float]:
    """Needle depths in percent of the haystack: '50' or '50%' -> [50.0]; '0,25,50' -> those percents;
    '11x' -> a count: 11 depths evenly spaced over 0-100 (0, 10, …, 100; '1x' -> [50.0]).

    A bare number is always a percent, never a count, so `--depths 50` is one cell at 50%, not fifty depths.
    """
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if len(items) == 1 and items[0].endswith("x"):
        try:
            n = int(items[0][:-1])
        except ValueError:
            raise SsmdiagError(f"--depths: '{items[0]}' is not a count of depths",
                               hint="write a count as Nx (--depths 11x) or give percents (--depths 0,50,100)") from None
        if n < 1:
            raise SsmdiagError(f"--depths {items[0]}: need at least 1 depth", hint="e.g. --depths 11x")
        return [50.0] if n == 1 else [round(100.0 * i / (n - 1), 4) for i in range(n)]
    out = []
    for item in items:
        try:
            d = float(item.rstrip("%"))
        except ValueError:
            raise SsmdiagError(f"--depths: '{item}' is not a percent",
                               hint="give percents (--depths 50 or 0,25,50) or a count of evenly spaced depths "
                                    "(--depths 11x)") from None
        if not 0.0 <= d <= 100.0:
            count = f"; for {item} evenly spaced depths write {item}x" if item.isdigit() else ""
            raise SsmdiagError(f"--depths: {item} is outside 0-100",
                               hint=f"depths are percents of the haystack{count}")
        out.append(d)
    if not out:
        raise SsmdiagError("--depths is empty", hint="e.g. --depths 11x (a count) or --depths 0,50,100 (percents)")
    return sorted(set(out))


def parse_targets(spec: str, seq_len: int) -> list[int]:
    """'last' | 'middle' | comma list of positions (negative counts from the end), e.g. 'last,middle,100'."""
    targets: list[int] = []
    for item in str(spec).split(","):
        item = item.strip().lower()
        if item == "last":
            pos = seq_len - 1
        elif item == "middle":
            pos = seq_len // 2
        else:
            try:
                pos = int(item)
            except ValueError:
                raise SsmdiagError(f"--targets item '{item}' is not last, middle or an integer position",
                                   hint="e.g. --targets last  or  --targets last,middle,100") from None
            if pos < 0:
                pos += seq_len
        if not 0 <= pos < seq_len:
            raise SsmdiagError(f"target position {item} is outside the sequence (0..{seq_len - 1})",
                               hint=f"use positions below --seq-len {seq_len}, or last / middle")
        if pos not in targets:
            targets.append(pos)
    return sorted(targets)


def parse_segments(text: str) -> list[MQARSegment]:
    """'64:4:1000,128:8:500' (length:pairs:examples, comma-separated) -> segments."""
    out = []
    for part in text.split(","):
        try:
            length, pairs, *rest = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise SsmdiagError(f"cannot read MQAR segment '{part}'", hint="use LENGTH:PAIRS[:EXAMPLES], e.g. 64:4:1000") from None
        out.append(MQARSegment(length, pairs, rest[0] if rest else 1000))
    return out


def parse_counts(text: str | None, flag: str, example: str = "2,4") -> tuple[int, ...] | None:
    """'2,4' -> (2, 4): a list of positive counts given to `flag`; None / '' -> None (the default)."""
    if not text:
        return None
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SsmdiagError(f"cannot read {flag} '{text}' as counts", hint=f"give positive integers, e.g. {flag} {example}") from None
    if any(c < 1 for c in counts):
        raise SsmdiagError(f"{flag} '{text}': every count must be at least 1", hint=f"e.g. {flag} {example}")
    return counts


def parse_layer_counts(text: str | None) -> tuple[int, ...] | None:
    """'2,4' -> (2, 4): the grid's model depths (--n-layers: layer counts, not indices); None -> the preset's."""
    return parse_counts(text, "--n-layers")


def parse_region_lengths(text: str | None, seq_len: int) -> list[int]:
    """`robust --lengths`: 'auto' / None -> the paper's 32 and 96 tokens of 1024, scaled to seq_len; else a list as
    parse_lengths reads it ('16,48', '1k'). Every length must be below seq_len / 2 (leading and trailing disjoint).
    """
    if text is None or str(text).strip().lower() in ("", "auto"):
        lengths = sorted({max(1, round(k * seq_len / 1024)) for k in (32, 96)})
    else:
        lengths = parse_lengths(str(text))
    for k in lengths:
        if 2 * k >= seq_len:
            raise SsmdiagError(f"--lengths: a region of {k} tokens is not below half of --seq-len {seq_len}",
                               hint=f"use lengths below {(seq_len + 1) // 2}, e.g. --lengths {max(1, seq_len // 32)}")
    return lengths


def parse_regions(text: str | None, seq_len: int) -> list[tuple[int, int]]:
    """`robust --regions`: 'A:B,...' -> [(A, B), ...] half-open token ranges (negative counts from the end)."""
    if text is None or not str(text).strip():
        return []
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            a, b = (int(x) + (seq_len if int(x) < 0 else 0) for x in bounds)
        except ValueError:
            raise SsmdiagError(f"--regions item '{part}' is not of the form A:B",
                               hint="give token ranges, e.g. --regions 256:288,480:512") from None
        if not 0 <= a < b <= seq_len:
            raise SsmdiagError(f"--regions item '{part}' is not a non-empty range inside 0:{seq_len}",
                               hint=f"use 0 <= A < B <= --seq-len {seq_len}")
        out.append((a, b))
    return out
