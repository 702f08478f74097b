"""Open an HTML file in a real headless Chromium and report what a reader's browser would see: each
image's natural size, and every error (script, resource, Content-Security-Policy violation, console).

A probe script is inserted right after the page's CSP (which is widened only to let that one inline
script run) so that it sees everything that follows; on load it writes its findings into the DOM as
JSON, and `--dump-dom` brings the DOM back. Chromium's own console log on stderr is checked too.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

PROBE = """<script>
window.__koldErrors = [];
addEventListener("error", (e) => __koldErrors.push("error: " + (e.message || (e.target && (e.target.src || e.target.href || e.target.tagName)))), true);
addEventListener("securitypolicyviolation", (e) => __koldErrors.push("csp: " + e.violatedDirective + " " + e.blockedURI));
const __koldConsoleError = console.error;
console.error = (...args) => { __koldErrors.push("console: " + args.join(" ")); __koldConsoleError(...args); };
addEventListener("load", () => setTimeout(() => {
  const images = [...document.images].map((i) => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "kold-browser-check";
  out.textContent = JSON.stringify({images, errors: __koldErrors});
  document.body.appendChild(out);
}, 200));
</script>"""


@dataclass
class Rendered:
    images: list[dict[str, int | bool]]
    errors: list[str]  # from the probe
    console: list[str]  # Chromium's console lines on stderr
    dom: str


def chromium() -> str:
    """The Chromium binary; a missing one fails the test (scripts/setup.sh installs it), never skips."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium not found: run `bash scripts/setup.sh` (it installs Debian's chromium)")


def render(page: Path, csp: str) -> Rendered:
    """Load `page` (which carries the Content-Security-Policy `csp`) in headless Chromium."""
    text = page.read_text(encoding="utf-8")
    meta = f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
    assert text.count(meta) == 1, "the page must carry exactly its own CSP"
    widened = meta.replace("script-src 'none'", "script-src 'unsafe-inline'")
    probe_page = page.with_name(page.stem + ".probe.html")
    probe_page.write_text(text.replace(meta, widened + PROBE), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="kold-chromium-") as profile:
        result = subprocess.run(
            [
                chromium(),
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe_page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    found = re.search(r'<pre id="kold-browser-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the probe did not report (page did not load?): {result.stderr[-2000:]}"
    report = json.loads(html.unescape(found.group(1)))
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    return Rendered(images=report["images"], errors=report["errors"], console=console, dom=result.stdout)
