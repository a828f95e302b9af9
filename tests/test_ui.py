"""The product as a user sees it: `dagster dev` on 127.0.0.1, driven by headless Chromium (Debian's chromium and
chromium-driver, spoken to over the W3C WebDriver HTTP protocol) and by Dagster's GraphQL API.

Both materialize the whole demo graph on the session's home, where everything is already built, so the runs reuse
the cleaned data and trained adapters and keep the session's vLLM server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
    demo = (ROOT / "examples" / "tiny.yaml").read_text()
    spec_file = work / "demo.yaml"
    spec_file.write_text(
        demo.replace("path: data/", f"path: {ROOT / 'examples' / 'data'}/").replace(
            "port: 8000", f"port: {served_spec.serving.port}"
        )
    )
    dagster_home = work / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    env = os.environ | {
        "LORAFOUNDRY_SPEC": str(spec_file),
        "LORAFOUNDRY_HOME": str(session_home),
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
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
                            "--window-size=1600,1000",
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

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self) -> None:
        httpx.delete(self.session, timeout=60)


def test_materialize_everything_from_the_browser(need_browser, dagster_dev, session_home, served_spec):
    url, work = dagster_dev
    known = {r["runId"] for r in _runs(url)}
    port = free_port()
    driver_proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(60):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        browser = WebDriver(port)
        try:
            browser.get(f"{url}/asset-groups")  # the global asset lineage graph
            materialize_all = "//button[contains(., 'Materialize all')]"
            browser.find(materialize_all)
            time.sleep(3)  # a first visit may open Dagster's "join the community" dialog over the page
            for skip in browser.find_all("//button[normalize-space(.)='Skip']"):
                browser.click(skip)
            for group in ("datasets", "adapters", "serving"):
                browser.find(f"//*[normalize-space(text())='{group}']")  # the three groups are drawn
            browser.click(browser.find(materialize_all))
            run = _wait_for_run(url, known)
            browser.get(f"{url}/runs/{run['runId']}")
            browser.find(f"//*[contains(., '{run['runId'][:8]}')]", timeout_s=60)
            time.sleep(3)
            browser.screenshot(work / "run.png")
            browser.get(f"{url}/asset-groups")
            browser.find(materialize_all)
            time.sleep(3)
            browser.screenshot(work / "asset-graph.png")
            print(f"screenshots: {work / 'run.png'}, {work / 'asset-graph.png'}")
        finally:
            browser.quit()
    finally:
        driver_proc.kill()  # SIGKILL: CI may start us with SIGTERM ignored, which chromedriver then inherits
        driver_proc.wait(30)
    assert run["status"] == "SUCCESS", run
    assert (work / "asset-graph.png").stat().st_size > 10_000
    _check_product(session_home, served_spec)


def test_materialize_everything_through_graphql(dagster_dev, session_home, served_spec):
    from dagster_graphql import DagsterGraphQLClient

    url, _ = dagster_dev
    host, port = url.removeprefix("http://").split(":")
    client = DagsterGraphQLClient(host, port_number=int(port))
    run_id = client.submit_job_execution("all_adapters")
    deadline = time.monotonic() + 900
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, "the run did not finish in time"
        time.sleep(3)
    assert status == "SUCCESS"
    _check_product(session_home, served_spec)
