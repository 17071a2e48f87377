"""Open a report.html in headless Chromium and check that its tables and embedded images render.

Prints the counts and writes a full-page screenshot beside the report (report.png). Exit 1 when a
table is missing or an image fails to decode; exit 2 when Chromium is not installed.

    python scripts/check_report_html.py runs/smollm2-demo/report/report.html
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement('div'); d.id = 'render-check';
  const count = sel => document.querySelectorAll(sel).length;
  d.textContent = `tables=${count('table')} rows=${count('tbody tr')} images=${imgs.length} decoded=${ok}`;
  document.body.appendChild(d);
});</script>"""


def check(report: Path) -> dict[str, int]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        common = [browser, *FLAGS, f"--user-data-dir={tmp}/profile"]
        dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*common, f"--screenshot={report.with_suffix('.png')}", "--window-size=1280,2400",
                        report.resolve().as_uri()], capture_output=True, timeout=120)
    found = re.search(r"tables=(\d+) rows=(\d+) images=(\d+) decoded=(\d+)", dom)
    if not found:
        raise RuntimeError("the page did not finish loading in Chromium")
    return dict(zip(("tables", "rows", "images", "decoded"), map(int, found.groups())))


def main() -> int:
    report = Path(sys.argv[1])
    try:
        counts = check(report)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v}" for k, v in counts.items()), f"screenshot={report.with_suffix('.png')}")
    return 0 if counts["tables"] > 0 and counts["images"] == counts["decoded"] else 1


if __name__ == "__main__":
    sys.exit(main())
