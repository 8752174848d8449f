"""The HTML report and the offline `dvc plots` page in a real headless Chromium.

Chromium (Debian's ``chromium``, installed by scripts/setup.sh when missing) is driven
over the Chrome DevTools protocol (``--remote-debugging-port`` + websocket-client): each
page is opened from disk (file://) and must load with no console error, no uncaught
exception, no failed request and no network request at all; every <img> must decode
(naturalWidth > 0) and every link must resolve. The DVC page must draw its charts
offline (an <svg>/<canvas> per plot). Skips, with the reason, only when no Chromium
binary or no websocket client can be found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import REPO
from helpers.report import build_synthetic, build_template, check_internal_links, make_inputs, synthetic_controls

websocket = pytest.importorskip("websocket", reason="websocket-client not installed (pip install -e '.[dev]')")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--window-size=1280,900"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium binary found (chromium / chromium-browser / google-chrome); "
                "scripts/setup.sh installs Debian's chromium when run as root")


class Browser:
    """A headless Chromium and one page target, spoken to over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([binary, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (exit {self.proc.returncode})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            time.sleep(0.05 if ws_url else 0.2)
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        self._id += 1
        my_id = self._id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _pump(self, until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                return True
            self.ws.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            finally:
                self.ws.settimeout(30)
            if "method" in msg:
                self.events.append(msg)
        return until()

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def visit(self, path: Path, wait_js: str | None = None, timeout: float = 30, warnings: bool = True) -> dict:
        """Open ``path``; wait for load (and ``wait_js`` to be truthy); return what went wrong."""
        self.events.clear()
        self.send("Page.navigate", url=path.resolve().as_uri())
        loaded = self._pump(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events), timeout)
        assert loaded, f"{path}: no load event within {timeout} s"
        if wait_js:
            deadline = time.monotonic() + timeout
            while not self.eval(wait_js):
                assert time.monotonic() < deadline, f"{path}: timed out waiting for {wait_js}"
                self._pump(lambda: False, 0.2)
        self._pump(lambda: False, 0.3)  # late console messages / failures
        return self.problems(warnings)

    def problems(self, warnings: bool = True) -> dict:
        """Console errors (and warnings unless ``warnings=False``), uncaught exceptions, failed
        requests, requests that left the disk, and browser log errors since the last visit."""
        levels = ("error", "assert", "warning") if warnings else ("error", "assert")
        out: dict[str, list] = {"console": [], "exceptions": [], "failed": [], "network": [], "log": []}
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in levels:
                out["console"].append([a.get("value", a.get("description")) for a in p.get("args", [])])
            elif m == "Runtime.exceptionThrown":
                out["exceptions"].append(p["exceptionDetails"].get("text"))
            elif m == "Network.loadingFailed":
                out["failed"].append(p.get("errorText"))
            elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:",
                                                                                        "about:")):
                out["network"].append(p["request"]["url"])
            elif m == "Network.responseReceived" and p["response"].get("status", 200) >= 400:
                out["failed"].append(p["response"]["url"])
            elif m == "Log.entryAdded" and p["entry"]["level"] in levels:
                out["log"].append(p["entry"].get("text"))
        return {k: v for k, v in out.items() if v}

    def screenshot(self, path: Path, width: int = 1100, height: int = 760) -> None:
        import base64

        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _, report, _ = build_synthetic(tmp_path_factory.mktemp("site"))
    return report


IMAGES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]))"
LINKS_JS = "JSON.stringify(Array.from(document.querySelectorAll('a[href]')).map(a => a.href))"


def _check_page(browser: Browser, page: Path) -> int:
    problems = browser.visit(page, wait_js="document.readyState === 'complete'")
    assert not problems, f"{page.name}: {problems}"
    images = json.loads(browser.eval(IMAGES_JS))
    bad = [src for src, complete, width in images if not (complete and width > 0)]
    assert not bad, f"{page.name}: images that did not load: {bad}"
    for href in json.loads(browser.eval(LINKS_JS)):
        u = urlparse(href)
        assert u.scheme == "file", f"{page.name}: non-file link {href}"
        assert Path(unquote(u.path)).is_file(), f"{page.name}: broken link {href}"
    return len(images)


def test_report_pages_open_from_disk_with_no_errors_and_every_image_loads(browser, report):
    assert check_internal_links(report) > 0
    n_img = 0
    unit_page = sorted((report / "units").glob("*.html"))[0]
    image_page = sorted((report / "images").glob("*.html"))[0]
    for page in (report / "index.html", unit_page, image_page, report / "units.html", report / "figures.html",
                 report / "tables.html"):
        n_img += _check_page(browser, page)
    assert n_img > 10
    # the index shows the images, their captions with the target marked, and unit links
    browser.visit(report / "index.html")
    n_pages = len(list((report / "images").glob("*.html")))
    assert browser.eval("document.querySelectorAll('table.images tbody tr').length") == n_pages >= 4
    assert browser.eval("document.querySelectorAll('mark').length") >= 4
    assert browser.eval("document.querySelectorAll('a[href^=\"units/\"]').length") >= 4


def test_every_report_page_renders_cleanly(browser, report):
    """All pages (a few dozen here), not just a sample: no errors, images decode, links resolve."""
    for page in sorted(report.rglob("*.html")):
        _check_page(browser, page)


# --------------------------------------------------------------------------- dvc plots

def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """A git+DVC repo with the project's dvc.yaml, .dvc/config, custom vega templates and the
    offline HTML template, and plot-ready tables from the synthetic build (committed)."""
    repo = tmp_path_factory.mktemp("plotsrepo")
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(REPO / "params.yaml", repo / "params.yaml")
    (repo / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    if (REPO / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / ".cache" / "dvc-plots").mkdir(parents=True)
    build_template(repo / ".cache" / "dvc-plots" / "offline.html")
    inp = make_inputs()
    build_synthetic(repo, inp)
    shutil.rmtree(repo / "report")
    (repo / "data" / "projection").mkdir(parents=True)
    inp.layers.write_csv(repo / "data" / "layer_distribution.csv")
    (repo / "data" / "iou_categories.csv").write_text(  # the iou stage's per-category table (top-level plot)
        "category,n_images,multimodal,multimodal_lo,multimodal_hi,random,random_lo,random_hi,diff,diff_lo,diff_hi,p\n"
        "cat,3,0.12,0.08,0.16,0.06,0.04,0.08,0.06,0.02,0.1,0.25\n"
        "dog,2,0.10,0.07,0.13,0.07,0.05,0.09,0.03,0.0,0.06,0.5\n")
    synthetic_controls()[0].write_csv(repo / "data" / "controls_cascade.csv")  # the controls stage's table
    for split, rows in (("train", "10\t3.5\n20\t3.1\n30\t2.9\n"), ("val", "0\t3.9\n10\t3.6\n30\t3.2\n")):
        tsv = repo / "data" / "projection_live" / "plots" / "metrics" / split / "loss.tsv"
        tsv.parent.mkdir(parents=True)
        tsv.write_text("step\tloss\n" + rows)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "plots"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def _n_plots(repo: Path) -> int:
    import yaml

    return len(yaml.safe_load((repo / "dvc.yaml").read_text())["plots"])


# vega-embed draws on a <canvas> by default (or an <svg>): count charts with something drawn
CHARTS_JS = """(() => {{
  const drawn = c => {{
    if (c.tagName.toLowerCase() === 'svg') return c.querySelectorAll('path, rect, line').length > 0;
    if (!c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
    return false;
  }};
  return Array.from(document.querySelectorAll('div[id] canvas, div[id] svg')).filter(drawn).length >= {n};
}})()"""


def test_dvc_plots_show_renders_its_charts_offline(browser, plots_repo):
    r = _dvc(["plots", "show", "-o", "out_show"], plots_repo)
    assert r.returncode == 0, r.stdout + r.stderr
    page = plots_repo / "out_show" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "vega-embed@6." in html
    n = _n_plots(plots_repo)
    # DVC's built-in `linear` template (the projection loss plot) makes vega log "WARN Infinite
    # extent" for its empty hover layers: warnings are tolerated on DVC's page, errors are not
    problems = browser.visit(page, wait_js=CHARTS_JS.format(n=n), warnings=False)
    assert not problems, problems
    assert browser.eval("document.querySelectorAll('div[id] svg, div[id] canvas').length") >= n
    assert browser.eval(CHARTS_JS.format(n=n))


def test_dvc_plots_diff_renders_both_revisions_offline(browser, plots_repo):
    csv = plots_repo / "plots" / "data" / "iou.csv"
    original = csv.read_text()
    try:
        csv.write_text(original.replace("0.", "0.0", 1))  # change one value in the workspace
        r = _dvc(["plots", "diff", "HEAD", "-o", "out_diff"], plots_repo)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        csv.write_text(original)
    page = plots_repo / "out_diff" / "index.html"
    html = page.read_text()
    assert '"rev": "HEAD"' in html and '"rev": "workspace"' in html
    problems = browser.visit(page, wait_js=CHARTS_JS.format(n=_n_plots(plots_repo)), warnings=False)
    assert not problems, problems
