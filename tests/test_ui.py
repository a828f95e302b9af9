"""The product as a user sees it: `dagster dev` on 127.0.0.1, driven by headless Chromium (Debian's chromium and
chromium-driver, spoken to over the W3C WebDriver HTTP protocol) and by Dagster's GraphQL API.

Both materialize the whole demo graph on the session's home, where everything is already built, so the runs reuse
the cleaned data and trained adapters and keep the session's vLLM server. The screenshot tests open what a user
looks at afterwards (the asset graph, a training's loss plot, an evaluation's metrics) and save each page as a PNG
under $LORAFOUNDRY_ARTIFACTS (default: a `screenshots` dir under pytest's tmp dir).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lora_assets import envs
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = "LORAFOUNDRY_ARTIFACTS"  # set it to keep the screenshots, e.g. as a CI job's artifacts
WINDOW = (1600, 1000)  # headless Chromium's window; the page (and each screenshot) is what is left inside it
LOSS_LINE = (0x1F, 0x77, 0xB4)  # the colour lora_assets.plot draws the loss line in


@pytest.fixture(scope="session")
def need_browser() -> None:
    """Skip without a browser on a developer's machine; under CI a missing browser fails the run instead."""
    if CHROMEDRIVER and CHROMIUM:
        return
    why = "needs Debian's chromium and chromium-driver (`make test` installs them)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI={os.environ['CI']}: {why}; the browser test must run in CI, not be skipped")
    pytest.skip(why)


@pytest.fixture(scope="module")
def dagster_dev(vllm_server, served_spec, session_home, tmp_path_factory):
    """`dagster dev -w workspace.yaml` on a free port, with the session's spec (its server port) and home."""
    work = tmp_path_factory.mktemp("dagster-dev")
    raw = served_spec.model_dump(mode="json")  # the session server's settings: its deployment is kept
    for name in raw["datasets"]:  # the spec file is written elsewhere: its data paths made absolute
        raw["datasets"][name]["path"] = str(served_spec.dataset_path(name))
    spec_file = work / "demo.yaml"
    spec_file.write_text(json.dumps(raw))  # JSON is YAML
    dagster_home = work / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    env = os.environ | {
        envs.SPEC.name: str(spec_file),
        envs.HOME.name: str(session_home),
        "DAGSTER_HOME": str(dagster_home),
    }
    log = (work / "dagster-dev.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (work / "dagster-dev.log").read_text()[-3000:]
            try:
                r = httpx.post(f"{url}/graphql", json={"query": "{ repositoriesOrError { __typename } }"}, timeout=5)
                if r.status_code == 200 and "RepositoryConnection" in r.text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("dagster dev did not come up: " + (work / "dagster-dev.log").read_text()[-3000:])
        yield url, work
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # its graceful stop took the whole 10 s it was once given, for nothing this test checks
            proc.wait(3)
        except subprocess.TimeoutExpired:  # CI may start us with SIGTERM ignored, and dagster dev inherits that
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """The dir the screenshots are saved in: $LORAFOUNDRY_ARTIFACTS, else `screenshots` under pytest's tmp dir."""
    path = Path(os.environ[ARTIFACTS]) if os.environ.get(ARTIFACTS) else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromedriver(need_browser) -> Iterator[int]:
    """chromedriver on a free port; yields the port."""
    port = free_port()
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield port
    finally:
        proc.kill()  # SIGKILL: CI may start us with SIGTERM ignored, which chromedriver then inherits
        proc.wait(30)


@pytest.fixture
def browser(chromedriver) -> Iterator[WebDriver]:
    """A fresh headless Chromium for one test."""
    driver = WebDriver(chromedriver)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def save_screenshot(browser, screenshots, capsys) -> Callable[[str], Path]:
    """``save_screenshot(name)`` saves the page as ``name`` in the screenshots dir, checks the PNG, and prints
    where it went (under -q too)."""

    def save(name: str) -> Path:
        path = browser.screenshot(screenshots / name)
        _check_png(path, browser.viewport())
        with capsys.disabled():
            print(f"\nscreenshot: {path}")
        return path

    return save


@pytest.fixture(scope="module")
def ui_history(dagster_dev) -> str:
    """The UI's URL once `dagster dev`'s own instance has a successful run of every asset (the session's run went
    to an ephemeral instance), so the asset pages have materializations and metadata to show."""
    url, _ = dagster_dev
    if not any(r["status"] == "SUCCESS" for r in _runs(url)):
        assert _materialize_all(url) == "SUCCESS"
    return url


def _runs(url: str) -> list[dict]:
    q = "{ runsOrError { ... on Runs { results { runId status jobName } } } }"
    return httpx.post(f"{url}/graphql", json={"query": q}, timeout=30).json()["data"]["runsOrError"]["results"]


def _wait_for_run(url: str, known: set[str], timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [r for r in _runs(url) if r["runId"] not in known]
        if new and new[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return new[0]
        time.sleep(3)
    pytest.fail("the run did not finish in time")


def _check_product(session_home: Path, served_spec) -> None:
    """The adapters are in the registry and answer on the endpoint."""
    from openai import OpenAI

    from registry.store import AdapterRegistry
    from serving import deployment

    served = {r.name for r in AdapterRegistry(session_home / "registry.duckdb").servable()}
    assert set(served_spec.adapters) <= served
    state = deployment.current(session_home)
    client = OpenAI(base_url=f"{state['url']}/v1", api_key="unused")
    ids = {m.id for m in client.models.list()}
    assert set(served_spec.adapters) <= ids
    reply = client.chat.completions.create(
        model="sentiment",
        max_tokens=8,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": "Review: the soup was delicious and the staff was kind.\n"
                "Is this review positive or negative?",
            }
        ],
    )
    assert reply.choices[0].message.content.strip() == "positive"


ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriver:
    """The few W3C WebDriver commands this test needs, over HTTP to chromedriver."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        ],
                    },
                }
            }
        }
        r = httpx.post(f"{self.base}/session", json=caps, timeout=120)
        r.raise_for_status()
        self.session = f"{self.base}/session/{r.json()['value']['sessionId']}"

    def cmd(self, method: str, path: str, body: dict | None = None):
        r = httpx.request(method, f"{self.session}{path}", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["value"]

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, xpath: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.post(f"{self.session}/element", json={"using": "xpath", "value": xpath}, timeout=60)
            if r.status_code == 200:
                return next(iter(r.json()["value"].values()))
            if time.monotonic() > deadline:
                raise AssertionError(f"no element {xpath!r} on the page")
            time.sleep(1)

    def find_all(self, xpath: str) -> list[str]:
        r = httpx.post(f"{self.session}/elements", json={"using": "xpath", "value": xpath}, timeout=60)
        r.raise_for_status()
        return [next(iter(e.values())) for e in r.json()["value"]]

    def click(self, element: str) -> None:
        self.cmd("POST", f"/element/{element}/click", {})

    def script(self, js: str, *elements: str):
        """The value of the JavaScript function body ``js`` run in the page, with ``elements`` (from `find`) as its
        ``arguments``."""
        return self.cmd("POST", "/execute/sync", {"script": js, "args": [{ELEMENT: e} for e in elements]})

    def viewport(self) -> tuple[int, int]:
        """The page's size in device pixels: the size of a screenshot."""
        return tuple(self.script("return [innerWidth, innerHeight].map(v => Math.round(v * devicePixelRatio))"))

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def quit(self) -> None:
        httpx.delete(self.session, timeout=60)


def _skip_welcome_dialog(browser: WebDriver) -> None:
    time.sleep(3)  # a first visit may open Dagster's "join the community" dialog over the page
    for skip in browser.find_all("//button[normalize-space(.)='Skip']"):
        browser.click(skip)


def _check_png(path: Path, size: tuple[int, int]) -> None:
    """``path`` is a PNG of ``size`` with a drawn page in it, not one background colour or a nearly empty page."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert struct.unpack(">II", data[16:24]) == size, f"{path}: not the page's size {size}"
    with Image.open(path) as img:
        pixels = img.convert("RGB")
    colours = pixels.getcolors(maxcolors=size[0] * size[1])
    background = max(n for n, _ in colours) / (size[0] * size[1])
    assert len(colours) > 100 and background < 0.98, f"{path}: {len(colours)} colours, {background:.0%} background"


def _expand_all_groups(browser: WebDriver) -> None:
    """Opens every collapsed group of the lineage graph, then reloads the page, which fits the graph into view."""
    deadline = time.monotonic() + 60
    while folded := browser.find_all("//*[@aria-label='unfold_more']"):
        assert time.monotonic() < deadline, "the asset groups did not open"
        # a script click: the group may be panned out of view, where a WebDriver click is refused
        browser.script("arguments[0].click()", folded[0])
        time.sleep(1)
    browser.cmd("POST", "/refresh", {})


def _metadata_row(key: str) -> str:
    """The XPath of metadata entry ``key``'s row in an asset page's metadata table."""
    return f"//tr[td[1][normalize-space(.)='{key}']]"


def _open_markdown(browser: WebDriver, key: str) -> str:
    """The XPath of metadata entry ``key``'s rendered markdown: in its row, or for a long one in the dialog that
    its "[Show Markdown]" link opens (clicked here)."""
    row = _metadata_row(key)
    browser.find(row)
    for link in browser.find_all(f"{row}//a[contains(., 'Show Markdown')]"):
        browser.click(link)
        return "//*[@role='dialog']//*[contains(@class, 'dagster-markdown')]"
    return f"{row}//*[contains(@class, 'dagster-markdown')]"


def _table(browser: WebDriver, xpath: str) -> list[list[str]]:
    """The cells' text of the first table under ``xpath``, header row first."""
    return browser.script(
        "return [...arguments[0].querySelector('table').rows].map(r => [...r.cells].map(c => c.innerText.trim()))",
        browser.find(f"{xpath}[.//table]"),
    )


def _scroll_to_top(browser: WebDriver, xpath: str) -> None:
    browser.script("arguments[0].scrollIntoView({block: 'start'})", browser.find(xpath))
    time.sleep(1)


def test_materialize_everything_from_the_browser(browser, dagster_dev, session_home, served_spec, save_screenshot):
    url, _ = dagster_dev
    known = {r["runId"] for r in _runs(url)}
    browser.get(f"{url}/asset-groups")  # the global asset lineage graph
    materialize_all = "//button[contains(., 'Materialize all')]"
    browser.find(materialize_all)
    _skip_welcome_dialog(browser)
    for group in ("datasets", "adapters", "serving"):
        browser.find(f"//*[normalize-space(text())='{group}']")  # the three groups are drawn
    browser.click(browser.find(materialize_all))
    run = _wait_for_run(url, known)
    browser.get(f"{url}/runs/{run['runId']}")
    browser.find(f"//*[contains(., '{run['runId'][:8]}')]", timeout_s=60)
    time.sleep(3)
    save_screenshot("materialize-all-run.png")
    assert run["status"] == "SUCCESS", run
    _check_product(session_home, served_spec)


def _materialize_all(url: str) -> str:
    """Runs the `all_adapters` job through Dagster's GraphQL API; returns the run's final status."""
    from dagster_graphql import DagsterGraphQLClient

    host, port = url.removeprefix("http://").split(":")
    client = DagsterGraphQLClient(host, port_number=int(port))
    run_id = client.submit_job_execution("all_adapters")
    deadline = time.monotonic() + 900
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, "the run did not finish in time"
        time.sleep(3)
    return status


def test_materialize_everything_through_graphql(dagster_dev, session_home, served_spec):
    url, _ = dagster_dev
    assert _materialize_all(url) == "SUCCESS"
    _check_product(session_home, served_spec)


def test_asset_graph_draws_every_asset(browser, ui_history, served_spec, save_screenshot):
    """The global lineage graph, every group open: a node per dataset's cleaning, per adapter's training,
    evaluation and registration, and the deployment (nodes are labelled with their key's last part)."""
    from lora_assets.pipeline import adapter_jobs

    browser.get(f"{ui_history}/asset-groups")
    browser.find("//button[contains(., 'Materialize all')]")
    _skip_welcome_dialog(browser)
    _expand_all_groups(browser)
    jobs = len(adapter_jobs(served_spec))
    expected = {"clean": len(served_spec.datasets), "train": jobs, "eval": jobs, "register": jobs, "deployment": 1}
    node = "//*[local-name()='foreignObject']//div[normalize-space(text())='{}']"
    browser.find(node.format("deployment"))
    time.sleep(2)  # the edges and the other nodes settle
    drawn = {label: len(browser.find_all(node.format(label))) for label in expected}
    assert drawn == expected
    save_screenshot("asset-graph.png")


def test_train_asset_page_shows_the_loss_plot(browser, ui_history, served_spec, save_screenshot):
    """A training's page: its metadata, and behind `loss_curve` the loss plot, drawn, with the numbers under it."""
    from PIL import Image

    from lora_assets import plot
    from lora_assets.pipeline import adapter_jobs

    job = next(iter(adapter_jobs(served_spec)))
    browser.get(f"{ui_history}/assets/adapter/{job}/train")
    _skip_welcome_dialog(browser)
    for key in ("method", "train_loss", "steps", "tokens_per_s", "trainable_params", "peak_memory_mb"):
        browser.find(_metadata_row(key))
    _scroll_to_top(browser, "//*[normalize-space(text())='Metadata']")
    save_screenshot("train-asset.png")

    loss_curve = _open_markdown(browser, "loss_curve")
    img = browser.find(f"{loss_curve}//img[starts-with(@src, 'data:image/png;base64,')]")
    time.sleep(1)
    shown = browser.script(
        "const i = arguments[0], r = i.getBoundingClientRect();"
        "return [i.complete, i.naturalWidth, i.naturalHeight, r.left, r.top, r.right, r.bottom]",
        img,
    )
    assert shown[:3] == [True, plot.WIDTH, plot.HEIGHT], shown
    steps = _table(browser, loss_curve)
    assert steps[0] == ["step", "loss"] and len(steps) > 2 and all(float(loss) > 0 for _, loss in steps[1:])
    path = save_screenshot("train-loss-curve.png")
    # the plot's line is on screen, not just in the DOM: its blue is inside the image's box in the screenshot
    with Image.open(path) as png:
        box = png.convert("RGB").crop(tuple(round(v) for v in shown[3:]))
    line = sum(
        n
        for n, (r, g, b) in box.getcolors(box.width * box.height)
        if abs(r - LOSS_LINE[0]) + abs(g - LOSS_LINE[1]) + abs(b - LOSS_LINE[2]) < 40
    )
    assert line > 200, f"the loss line is not drawn in {path}"


def test_eval_asset_page_shows_base_against_adapter(browser, ui_history, served_spec, save_screenshot):
    """An evaluation's page: the metrics table, base against adapter, with the same numbers as the plain metadata
    entries, and the sample answers of both."""
    from lora_assets.pipeline import adapter_jobs

    job = next(iter(adapter_jobs(served_spec)))
    browser.get(f"{ui_history}/assets/adapter/{job}/eval")
    _skip_welcome_dialog(browser)
    metrics = _table(browser, _open_markdown(browser, "metrics"))
    assert metrics[0][:3] == ["metric", "base", "adapter"]
    rows = {r[0]: r for r in metrics[1:]}
    assert {"exact_match", "chrf", "eval_loss", "perplexity"} <= set(rows)
    for side, column in (("base", 1), ("adapter", 2)):
        entry = browser.script(
            "return arguments[0].cells[2].innerText", browser.find(_metadata_row(f"exact_match_{side}"))
        )
        assert float(rows["exact_match"][column]) == pytest.approx(float(entry), abs=1e-4)
    _scroll_to_top(browser, "//*[normalize-space(text())='Metadata']")
    save_screenshot("eval-asset.png")

    samples = _table(browser, _open_markdown(browser, "samples"))
    assert samples[0] == ["prompt", "reference", "base", "adapter"]
    assert len(samples) > 1 and all(len(r) == 4 and r[0] and r[1] for r in samples[1:])
    save_screenshot("eval-samples.png")
