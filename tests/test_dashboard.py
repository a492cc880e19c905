"""The live dashboard: what it reads from a run folder, who may see it, and the page in a real
browser (headless Chromium driven by Playwright) while a real run goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomli_w
from tests.deploy_tools import free_port

from fedfm.reporting.dashboard.app import DashboardError, check_binding
from fedfm.reporting.dashboard.state import RunView

pytest.importorskip("starlette")
pytest.importorskip("sse_starlette")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("FEDFM_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
BROWSER_ARGS = [  # as root, with no network: no sandbox, no background connections
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_a_run_view_reads_whole_lines_and_every_client_status(tmp_path):
    (tmp_path / "config.toml").write_text("[run]\nrounds = 3\n")
    rnd = {"event": "round", "round": 1, "cohort": [0, 1, 2, 3, 4], "num_clients": 2,
           "failed": [{"client": 2, "stage": "timeout", "reason": "no update within 60 s"},
                      {"client": 3, "stage": "decode", "reason": "<script>alert(1)</script>"}],
           "rejected": [{"client": 4, "reason": "update norm 91.2 exceeds the bound"}]}  # fmt: skip
    client = {"event": "client", "round": 1, "client": 0, "train_loss": 0.5, "num_examples": 9}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(client) + "\n" + json.dumps(rnd)[:40])  # the round line half written
    view = RunView(tmp_path)
    assert view.poll() and view.rounds == []
    path.write_text(json.dumps(client) + "\n" + json.dumps(rnd) + "\n")
    assert view.poll()
    status = {c["client"]: c for c in view.snapshot()["cohort"]}
    assert [status[k]["status"] for k in range(5)] == [
        "trained",
        "sampled",
        "timed out",
        "failed",
        "rejected",
    ]
    assert status[3]["reason"] == "<script>alert(1)</script>"  # as data: the page inserts it as text
    assert status[0]["train_loss"] == 0.5


def test_under_secure_aggregation_or_dp_no_client_metrics_are_shown(tmp_path):
    (tmp_path / "config.toml").write_text('[run]\nrounds = 2\n[privacy]\ndp = "client"\n')
    rows = [{"event": "client", "round": 1, "client": 0, "train_loss": 0.5},
            {"event": "round", "round": 1, "cohort": [0], "num_clients": 1}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    view = RunView(tmp_path)
    view.poll()
    assert view.snapshot()["cohort"] == [{"client": 0, "status": "trained"}]


def test_off_loopback_the_dashboard_needs_a_token_and_tls():
    check_binding("127.0.0.1", None, None, None)
    with pytest.raises(DashboardError, match="--token, --cert, --key"):
        check_binding("0.0.0.0", None, None, None)
    with pytest.raises(DashboardError, match="--cert, --key"):
        check_binding("10.0.0.5", "s3cret", None, None)


def _start(args, log):
    return subprocess.Popen([sys.executable, "-m", "fedfm.cli", *map(str, args)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _wait_until_up(url, proc, log):
    stop = time.monotonic() + 60
    while time.monotonic() < stop:
        try:
            return _get(url)
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.mark.skipif(  # in CI (CI=true) a missing browser is a failure, not a skip
    not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_the_page_in_a_real_browser_follows_a_live_run(tiny_config, tmp_path):
    from playwright.sync_api import sync_playwright

    cfg = tiny_config(
        run={"rounds": 12}, partition={"num_clients": 5}, attack={"kind": "nan", "fraction": 0.2}
    )
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    run_dir, port = tmp_path / "run", free_port()
    run = _start(["run", path, "--output", run_dir, "--quiet"], tmp_path / "run.log")
    hostile = tmp_path / "hostile"  # a second run, side by side, whose client sent a reason made of HTML
    hostile.mkdir()
    (hostile / "config.toml").write_text("[run]\nrounds = 2\n")
    evil = '<img src=x onerror="window.__owned = 1"><b>bold</b>'
    record = {"event": "round", "round": 1, "cohort": [7], "num_clients": 0,
              "failed": [{"client": 7, "stage": "decode", "reason": evil}]}  # fmt: skip
    (hostile / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    token = "t0ken-for-the-test"
    page_server = _start(
        ["dashboard", run_dir, hostile, "--port", port, "--token", token], tmp_path / "dash.log"
    )
    try:
        base = f"http://127.0.0.1:{port}/"
        assert _wait_until_up(base, page_server, tmp_path / "dash.log") == 401  # no token, no page
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            page.goto(f"{base}?token={token}")
            progress = page.locator("[data-run=run] [data-role=progress]")
            progress.wait_for(timeout=60_000)
            failed = page.locator("[data-run=hostile] tr.failed")
            assert evil in failed.inner_text()  # shown as text: the markup is not the page's
            assert (
                page.evaluate("window.__owned") is None and page.locator("[data-run=hostile] b").count() == 0
            )

            def shown_round() -> int:
                return int(progress.inner_text().split()[1])

            first = shown_round()
            stop = time.monotonic() + 120
            while shown_round() <= first + 1 and time.monotonic() < stop:  # it advances by itself
                time.sleep(0.3)
            assert shown_round() > first + 1
            rejected = page.locator("tr.rejected").first
            rejected.wait_for(timeout=60_000)
            assert "non-finite" in rejected.inner_text() or "nan" in rejected.inner_text().lower()
            card = page.locator("[data-run=run]")
            assert card.locator("[data-role=axes]").count() == 2  # both curves have axes
            assert "no DP" in card.locator("[data-role=privacy]").inner_text()
            cell = card.locator("[data-role=timeline] td.rejected").first  # the site × round grid
            assert "rejected" in cell.get_attribute("title")
            assert card.locator("[data-role=log]").inner_text().strip()  # the run's own log, streamed
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        page_server.terminate()
        run.wait(timeout=300)
        page_server.wait(timeout=30)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


@pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_a_plain_headless_screenshot_shows_a_finished_run(tiny_config, tmp_path):
    """What a person tries first: chromium --headless --dump-dom / --screenshot, no waiting for
    events. The page is served with the runs' state inside, so the first paint shows them."""
    import fedfm

    result = fedfm.run(tiny_config(run={"rounds": 2}), output=tmp_path / "run", progress=False)
    port = free_port()
    page_server = _start(["dashboard", result.run_dir, "--port", port], tmp_path / "dash.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        assert _wait_until_up(url, page_server, tmp_path / "dash.log") == 200
        dom = subprocess.run([CHROMIUM, *BROWSER_ARGS, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout  # fmt: skip
        assert "round 2 of 2" in dom and 'data-role="axes"' in dom and "no DP" in dom
        assert 'data-role="timeline"' in dom and ">connecting…</span>" not in dom
        shot = tmp_path / "first-paint.png"
        subprocess.run([CHROMIUM, *BROWSER_ARGS, f"--screenshot={shot}", "--window-size=1000,900", url],
                       capture_output=True, timeout=120)  # fmt: skip
        assert shot.stat().st_size > 20_000
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "dashboard-first-paint.png")
    finally:
        page_server.terminate()
        page_server.wait(timeout=30)


def test_the_first_paint_carries_the_state_and_no_value_can_close_its_script(tmp_path):
    from fedfm.reporting.dashboard.app import first_paint

    html = first_paint([{"name": "r", "now": "</script><script>window.__owned=1</script>"}])
    inside = html.split('<script id="initial" type="application/json">')[1].split("</script>")[0]
    assert json.loads(inside)[0]["now"].startswith("</script>")  # the value, whole, as data
    assert "/*INITIAL*/" not in html
