"""The page as report.html (self-contained: inline CSS, images as data: URIs, no script, no font, no request)
and as report.md (images linked relative to the report folder)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from .page import Page, Part, doc_link

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1rem;max-width:72rem;
line-height:1.45;color:#1b1b1b;background:#fff;overflow-wrap:anywhere}
h1{font-size:1.5rem;margin:.2rem 0 .6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ccc}
.meta,.note,.prov{color:#555;font-size:.9rem}
.glance{display:flex;flex-direction:column;gap:.6rem}
.diag{border:1px solid #ddd;border-radius:6px;padding:.5rem .7rem}
.diag h3{margin:0 0 .3rem;font-size:1rem}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,18rem),1fr));gap:.5rem}
.cell{background:#f6f7f9;border-radius:4px;padding:.4rem .5rem}
.cell .m{font-weight:600}.cell .v{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
.gap{background:#fff4e5}.cmp{margin:.4rem 0 0;padding:.3rem .5rem;border-left:3px solid #4a7bd0}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,24rem),1fr));gap:.6rem}
.plots img{width:100%;height:auto;border:1px solid #eee}
.tw{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.82rem;margin:.4rem 0}
th,td{border:1px solid #ddd;padding:.15rem .4rem;text-align:left;vertical-align:top;overflow-wrap:normal}
th{background:#f0f0f0}caption{text-align:left;font-weight:600;padding:.2rem 0;overflow-wrap:anywhere}
code{font-size:.82rem;overflow-wrap:anywhere}
summary{cursor:pointer;font-weight:600;font-size:.85rem;margin:.4rem 0}
"""


def _e(value: Any) -> str:
    """HTML-escaped text ("—" for None)."""
    return html.escape("—" if value is None else str(value))


def _data_uri(path: str) -> str | None:
    """A PNG as a data: URI (None when it cannot be read)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


def _cell(part: Part, model: str) -> str:
    """One model's headline in the at-a-glance block."""
    h = part.headline(model)
    cls = "cell gap" if h.gap else "cell"
    return (f'<div class="{cls}"><div class="m">{_e(model)}</div><div class="v">{_e(h.verdict)}</div>'
            f"<div>{_e(h.reading)}</div></div>")


def _glance(page: Page) -> str:
    """The top of the page: one line per diagnostic per model, with the comparison and a link to the section."""
    out = ['<h2 id="glance">At a glance</h2><div class="glance">']
    for part in page.parts:
        d = part.diagnostic
        if not d.headline:
            continue
        cells = "".join(_cell(part, m) for m in page.models)
        cmp = f'<p class="cmp">{_e(part.section.comparison)}</p>' if part.section.comparison else ""
        out.append(f'<div class="diag"><h3><a href="#{d.key}">{_e(d.title)}</a></h3>'
                   f'<div class="cols">{cells}</div>{cmp}</div>')
    out.append("</div>")
    return "".join(out)


def _table(title: str, cols: list[str], rows: list[list[Any]]) -> str:
    """A table inside a horizontally scrolling wrapper (a wide table never widens the page)."""
    if not rows:
        return f'<p class="note">{_e(title)}: no rows</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    table = (f'<div class="tw"><table><caption>{_e(title)}</caption><thead><tr>{head}</tr></thead>'
             f"<tbody>{body}</tbody></table></div>")
    if len(rows) > 12:  # a long table (per layer) folds away; its title stays in view
        return f"<details><summary>{_e(title)} ({len(rows)} rows)</summary>{table}</details>"
    return table


def _provenance(part: Part) -> str:
    """The runs behind a section: exact command, folder, date, sizes, versions, wall time."""
    items = []
    for p in part.provenance:
        versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
        secs = f"{p['seconds']:.1f} s" if isinstance(p.get("seconds"), (int, float)) else "—"
        items.append(f"<li><code>{_e(p['command'])}</code><br>run folder <code>{_e(p['run_dir'])}</code>; made "
                     f"{_e(p['created_utc'])}; git {_e((p.get('git_hash') or 'none')[:12])}; {_e(versions)}; "
                     f"sizes {_e(p['sizes'] or '—')}; wall {secs}</li>")
    return f'<div class="prov"><b>Provenance</b><ul>{"".join(items) or "<li>no run</li>"}</ul></div>'


def _section(part: Part, models: list[str]) -> str:
    """One diagnostic's section: meaning, headlines side by side, comparison, plots, tables, notes, provenance."""
    d, s = part.diagnostic, part.section
    out = [f'<section><h2 id="{d.key}">{_e(d.title)}</h2>',
           f'<p>{_e(d.meaning)} <a href="{_e(doc_link(d))}">docs/{_e(d.doc)}</a></p>']
    out.append('<div class="cols">' + "".join(_cell(part, m) for m in models) + "</div>")
    if s.comparison:
        out.append(f'<p class="cmp"><b>Comparison</b>: {_e(s.comparison)}</p>')
    for gap in part.gaps:
        out.append(f'<p class="cell gap">Gap: {_e(gap)}</p>')
    imgs = []
    for p in s.plots:
        uri = _data_uri(p)
        imgs.append(f'<img src="{uri}" alt="{_e(Path(p).name)}">' if uri else
                    f'<p class="gap">plot {_e(Path(p).name)} could not be read</p>')
    if imgs:
        out.append('<div class="plots">' + "".join(imgs) + "</div>")
    out.extend(_table(*t) for t in s.tables)
    if s.notes:
        out.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in dict.fromkeys(s.notes)) + "</ul>")
    out.append(_provenance(part) + "</section>")
    return "".join(out)


def render_html(page: Page) -> str:
    """The whole page as one self-contained HTML document."""
    meta = page.meta
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            f"style-src 'unsafe-inline'\"><title>{_e(page.title)}</title><style>{CSS}</style></head><body>")
    lines = [head, f"<h1>{_e(page.title)}</h1>",
             f'<p class="meta">budget {_e(meta.get("budget") or "mixed / existing runs")}; made '
             f'{_e(meta.get("created_utc"))}; ssmdiag {_e(meta.get("version"))}; '
             f'{len([p for p in page.parts if p.provenance])} diagnostics with runs</p>']
    lines.extend(f'<p class="note">Note: {_e(n)}</p>' for n in page.notes)
    lines.append(_glance(page))
    lines.extend(_section(p, page.models) for p in page.parts)
    lines.append("</body></html>\n")
    return "".join(lines)


def _md_cell(v: Any) -> str:
    return ("—" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")


def render_markdown(page: Page, folder: Path) -> str:
    """The page as markdown; plots are linked relative to `folder` (the report folder)."""
    out = [f"# {page.title}", "", f"budget {page.meta.get('budget') or 'mixed / existing runs'}; made "
           f"{page.meta.get('created_utc')}; ssmdiag {page.meta.get('version')}", ""]
    out.extend(f"> Note: {n}" for n in page.notes)
    two = len(page.models) == 2
    out += ["", "## At a glance", "", "| diagnostic | " + " | ".join(page.models) + (" | comparison |" if two else " |"),
            "| --- | " + " | ".join("---" for _ in page.models) + (" | --- |" if two else " |")]
    for part in page.parts:
        if part.diagnostic.headline:
            cells = [f"{_md_cell(part.headline(m).verdict)} — {_md_cell(part.headline(m).reading)}"
                     for m in page.models]
            out.append(f"| [{part.diagnostic.title}](#{part.diagnostic.key}) | " + " | ".join(cells) +
                       (f" | {_md_cell(part.section.comparison or '')} |" if two else " |"))
    for part in page.parts:
        d, s = part.diagnostic, part.section
        out += ["", f'<a id="{d.key}"></a>', f"## {d.title}", "", f"{d.meaning} ([docs/{d.doc}]({doc_link(d)}))", ""]
        out += [f"- **{m}**: {part.headline(m).verdict} — {part.headline(m).reading}" for m in page.models]
        if s.comparison:
            out.append(f"- **comparison**: {s.comparison}")
        out += [f"- Gap: {g}" for g in part.gaps]
        out += [f"\n![{Path(p).name}]({Path(os.path.relpath(p, folder)).as_posix()})" for p in s.plots]
        for title, cols, rows in s.tables:
            if rows:
                out += ["", f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                out += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows]
        out += [""] + [f"- note: {n}" for n in dict.fromkeys(s.notes)]
        out += [f"- run: `{p['command']}` → `{p['run_dir']}` ({p['created_utc']})" for p in part.provenance]
    return "\n".join(out) + "\n"
