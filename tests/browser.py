"""Open a page in headless Chromium (Debian's `chromium`) and report what a reader would see: no network, stdlib only.

Two runs of the browser per check: `--screenshot` of the page as it is, and `--dump-dom` of a copy with one
checker script appended (the copy's Content-Security-Policy gains `script-src 'unsafe-inline'` for it, nothing else)
that writes, after the load event, the images' decoded sizes, errors, CSP violations (any attempted request the
page's own policy blocked), loaded resources and the page's scroll width into the DOM as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

CHECK_JS = """<script>
(function () {
  var errors = [], violations = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || 'error'));
  }, true);
  document.addEventListener('securitypolicyviolation', function (e) {
    violations.push(e.blockedURI + ' ' + e.violatedDirective);
  });
  var original = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
  window.addEventListener('load', function () {
    var narrow = /w=(\d+)/.exec(location.hash);  // below chromium's smallest window: lay the page out that wide
    if (narrow) { document.documentElement.style.width = narrow[1] + 'px'; }
    var limit = narrow ? Number(narrow[1]) : document.documentElement.clientWidth;
    var wide = Array.prototype.filter.call(document.body.querySelectorAll('*'), function (el) {
      return !el.closest('.tw') && el.getBoundingClientRect().right > limit + 1;
    }).map(function (el) { return el.tagName + '.' + el.className; });
    var images = Array.prototype.map.call(document.images, function (i) {
      return {src: i.getAttribute('src').slice(0, 22), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
              shown_w: i.getBoundingClientRect().width};
    });
    var out = {images: images, errors: errors, violations: violations,
               resources: performance.getEntriesByType('resource').map(function (r) { return r.name.slice(0, 100); }),
               scroll_width: document.documentElement.scrollWidth, client_width: document.documentElement.clientWidth,
               body_scroll_width: document.body.scrollWidth, overflowing: wide.slice(0, 20), limit: limit, text_length: document.body.innerText.length};
    var pre = document.createElement('pre');
    pre.id = 'ssmdiag-check';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def chromium() -> str | None:
    """The Chromium binary, or None."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _run(args: list[str], profile: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def check_page(html: Path, work: Path, width: int = 1280) -> dict:
    """Load `html` (a copy with the checker appended) at `width` px; the checker's JSON plus chromium's stderr.

    Chromium's window is at least 500 px wide; a narrower `width` is laid out by setting the page's width.
    """
    text = html.read_text(encoding="utf-8")
    policy = "style-src 'unsafe-inline'"
    assert policy in text, "the page lost its Content-Security-Policy"
    copy = html.parent / f".browser-check-{width}.html"  # beside the page: same folder, same file:// origin rules
    copy.write_text(text.replace(policy, policy + "; script-src 'unsafe-inline'", 1)
                    .replace("</body>", CHECK_JS + "</body>", 1), encoding="utf-8")
    try:
        res = _run([f"--window-size={max(width, 500)},900", "--virtual-time-budget=15000", "--dump-dom",
                    copy.as_uri() + (f"#w={width}" if width < 500 else "")],
                   work / f"profile-{width}")
    finally:
        copy.unlink(missing_ok=True)
    found = re.search(r'<pre id="ssmdiag-check">(.*?)</pre>', res.stdout, re.S)
    assert found, f"the checker wrote nothing (rc {res.returncode}): {res.stderr[-2000:]}"
    raw = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    out = json.loads(raw)
    out["stderr"] = res.stderr
    return out


def screenshot(html: Path, png: Path, work: Path, width: int = 1280, height: int = 1600) -> Path:
    """A screenshot of the page exactly as written (no checker), `width` × `height` px."""
    res = _run([f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()], work / "profile-shot")
    assert png.is_file(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    return png


def console_problems(stderr: str) -> list[str]:
    """Lines of chromium's log that report a console error, an uncaught exception or a blocked request."""
    keys = ("Uncaught", "Refused to", "net::ERR", "Failed to load")
    return [line for line in stderr.splitlines() if any(k in line for k in keys)]
