"""The MLflow UI over a finished, promoted sweep, in a real browser (issue 22, item 1): a tiny real
sweep (local Ray, sqlite MLflow), ``lorasweep promote``'s registration, a real ``mlflow ui`` on a
free loopback port, and Debian's headless Chromium driven through its chromedriver (a test tool's
own browser download cannot work on a closed network; ``scripts/ensure-chromium.sh`` installs it).

Without chromium or chromedriver the browser tests skip, saying why, except under ``CI=true``,
where they fail. Each page is saved as a PNG in the test's tmp_path (look at it when a check fails).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.run_notes import NOTE_TAG
from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep
from orchestrator.tracking import EXPERIMENT_KIND_TAG, runs_url

NAME = "uisweep"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
UI_START_S = 180.0  # mlflow ui takes 12-40 s to answer on 2 busy cores
WAIT_S = 60.0  # one page's content (the UI's JS bundle loads, then its API calls)
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model, small_data, ray_local):
    """A finished two-trial sweep of the tiny model, its best trial promoted (``champion``)."""
    from orchestrator.registry import promote

    tmp = tmp_path_factory.mktemp("ui-sweep")
    spec = parse_spec(
        {
            "name": NAME,
            "budget_usd": 5.0,
            "objective": {"metric": "eval_loss", "mode": "min"},  # the tiny model scores 0
            "model": {"name_or_path": str(tiny_model)},
            "data": {"source": "files", **{k: str(v) for k, v in small_data.items()}},
            "search_space": {
                "preset": "default",
                "rank": {"choices": [4]},
                "target_modules": {"value": "all_linear"},
                "learning_rate": {"choices": [0.5, 3.0]},
            },
            "trial": {
                "max_steps": 4,
                "eval_every": 2,
                "batch_size": 4,
                "max_seq_len": 160,
                "eval_examples": 4,
                "max_new_tokens": 8,
            },
            "early_stopping": {"enabled": False},
            "resources": {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 2},
            "max_trials": 2,
            "prices": {"overrides": {"cpu": 36.0}},
            "storage": {"data_dir": str(tmp / "data")},
        }
    )
    result = run_sweep(spec, Console(file=io.StringIO(), width=200))
    promotion = promote(result.tracking_uri, result.sweep_id)
    return {"result": result, "promotion": promotion, "tmp": tmp}


@pytest.mark.slow
def test_a_real_sweeps_runs_carry_kind_descriptions_cents_and_system_metrics(sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator import leaderboard

    result = sweep["result"]
    client = MlflowClient(result.tracking_uri)
    parent = leaderboard.find_sweep(result.tracking_uri, result.sweep_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    note = parent.data.tags[NOTE_TAG]
    assert f"Sweep `{result.sweep_id}`: completed" in note and "| Best | trial-00" in note
    assert f"`lorasweep promote {result.sweep_id}`" in note and "| Budget | $5.00 |" in note
    assert parent.data.metrics["spent_cents"] == pytest.approx(100 * result.spent_usd)
    rows = leaderboard.trial_rows(result.tracking_uri, parent)
    assert len(rows) == 2
    for row in rows:
        run = client.get_run(row.run_id)
        m = run.data.metrics
        assert m["cost_cents"] == pytest.approx(100 * m["cost_usd"]) and m["cost_usd"] > 0
        assert f"{row.trial}: completed" in run.data.tags[NOTE_TAG]
        assert "lora r4" in run.data.tags[NOTE_TAG] and "cents" in run.data.tags[NOTE_TAG]
        # sampled in the trial's Ray worker, sent with its reports, logged on its child run
        cpu = client.get_metric_history(row.run_id, "system/cpu_utilization_percentage")
        assert cpu and all(0 <= s.value <= 100 for s in cpu), row.trial
        assert m["system/system_memory_usage_megabytes"] > 10


# --- the browser ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(sweep, tmp_path_factory):
    """``mlflow ui`` over the sweep's store on a free loopback port; its base URL."""
    _need_browser()
    port = _free_port()
    log = (tmp_path_factory.mktemp("mlflow-ui") / "mlflow-ui.log").open("w")
    proc = subprocess.Popen(
        [MLFLOW, "ui", "--backend-store-uri", sweep["result"].tracking_uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=sweep["tmp"],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow ui exited {proc.returncode}: see {log.name}"
            assert time.monotonic() < deadline, f"mlflow ui not up in {UI_START_S:.0f} s"
            time.sleep(0.5)  # polling a port that is not open yet: nothing to wait on
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _need_browser() -> None:
    """Skip (fail under CI=true) without Debian's chromium + chromedriver or selenium."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        why = (
            f"browser tests need {', '.join(missing)}: run scripts/ensure-chromium.sh "
            "(as root it installs Debian's chromium and chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    profile = tmp_path_factory.mktemp("chromium-profile")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, what: str, condition, png: Path):
    """``condition`` met within WAIT_S, else a failure that says what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(png))
        text = driver.find_element("tag name", "body").text[:1500]
        pytest.fail(f"{what} not shown in {WAIT_S:.0f} s at {driver.current_url} ({png}):\n{text}")


def _run_name(driver, name: str):
    """The visible run-name link ``name`` in the runs table, or None."""
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.XPATH, f"//div[@role='row']//a[normalize-space()='{name}']"):
        if el.is_displayed():
            return el
    return None


@pytest.mark.slow
@pytest.mark.browser
def test_the_experiment_opens_on_its_training_runs_with_the_trials_nested(
    sweep, ui, browser, tmp_path
):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    result = sweep["result"]
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name(NAME)
    trials = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    trials.remove(result.sweep_id)
    assert trials == ["trial-001", "trial-002"]

    browser.get(runs_url(ui, experiment.experiment_id))
    runs_png = tmp_path / "runs.png"
    parent = _wait(browser, "the sweep's run", lambda d: _run_name(d, result.sweep_id), runs_png)
    browser.save_screenshot(str(runs_png))
    # the training runs table (the UI's Model training side), not the GenAI overview of traces
    assert _visible(browser, "//h2[normalize-space()='Runs']"), runs_png
    assert not _visible(browser, "//*[normalize-space()='Detect Issues' or .='Latency']")
    # the trials are nested under the sweep: hidden until its row is expanded, then indented
    row = parent.find_element(By.XPATH, "./ancestor::div[@role='row'][1]")
    assert all(_run_name(browser, t) is None for t in trials)
    expand = row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")
    _wait(browser, "the sweep's expand button", ec.element_to_be_clickable(expand), runs_png)
    expand.click()
    nested_png = tmp_path / "nested.png"
    for trial in trials:
        link = _wait(browser, trial, lambda d, t=trial: _run_name(d, t), nested_png)
        assert link.location["x"] >= parent.location["x"] + 16, (trial, nested_png)
        assert link.location["y"] > parent.location["y"], (trial, nested_png)
    browser.save_screenshot(str(nested_png))

    # the sweep's run page opens on its description: what to do next, then the money
    parent.click()
    head = f"Best: {result.best.trial}, eval_loss"
    _wait(browser, "the sweep's description", lambda d: head in _body(d), tmp_path / "parent.png")
    text = _body(browser)
    browser.save_screenshot(str(tmp_path / "parent.png"))
    assert f"lorasweep promote {result.sweep_id}" in text, text[:1500]
    assert f"Spent ${result.spent_usd:.3g} ({100 * result.spent_usd:.3g} cents)" in text


@pytest.mark.slow
@pytest.mark.browser
def test_the_registry_shows_champion_on_the_promoted_model(sweep, ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    promotion = sweep["promotion"]
    assert promotion.alias == "champion" and promotion.version == "1"
    browser.get(f"{ui}/#/models/{promotion.name}")

    def champion(d):
        tags = d.find_elements(By.CSS_SELECTOR, "[data-component-id*='modelversionaliastag']")
        for tag in tags:
            if tag.is_displayed() and " ".join(tag.text.split()) == "@ champion":
                return tag
        return None

    tag = _wait(browser, "the champion alias", champion, tmp_path / "registry.png")
    browser.save_screenshot(str(tmp_path / "registry.png"))
    row = tag.find_element(By.XPATH, "./ancestor::tr[1] | ./ancestor::*[@role='row'][1]")
    assert row.text.startswith(f"Version {promotion.version}"), row.text[:300]


@pytest.mark.slow
@pytest.mark.browser
def test_a_trials_system_metrics_tab_charts_its_cpu_and_memory(sweep, ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    result = sweep["result"]
    best = MlflowClient(result.tracking_uri).get_run(result.best.run_id)
    browser.get(
        f"{ui}/#/experiments/{best.info.experiment_id}/runs/{best.info.run_id}/system-metrics"
    )
    png = tmp_path / "system-metrics.png"
    for chart in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        series = f"{result.best.trial} (system/{chart})"  # a chart's legend: run and metric
        _wait(browser, f"the {chart} chart", lambda d, s=series: s in _body(d), png)
    browser.save_screenshot(str(png))


@pytest.mark.slow
@pytest.mark.browser
def test_once_switched_to_model_training_an_experiment_opens_on_its_runs(
    sweep, ui, browser, tmp_path
):
    """MLflow 3.17 opens an experiment by its sidebar switch (GenAI by default, remembered in
    the browser), not by the experiment's kind tag: one click on "Model training" and a plain
    experiment link opens on the runs table."""
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.support import expected_conditions as ec

    browser.get(f"{ui}/")
    png = tmp_path / "switch.png"
    switch = "//*[normalize-space(text())='Model training']"
    _wait(browser, "the Model training switch", ec.element_to_be_clickable(("xpath", switch)), png)
    browser.find_element("xpath", switch).click()
    result = sweep["result"]
    experiment = MlflowClient(result.tracking_uri).get_experiment_by_name(NAME)
    browser.get(f"{ui}/#/experiments/{experiment.experiment_id}")
    _wait(browser, "the sweep's run", lambda d: _run_name(d, result.sweep_id), png)
    assert "/runs" in browser.current_url and _visible(browser, "//h2[normalize-space()='Runs']")
    browser.save_screenshot(str(png))


def test_without_chromium_the_browser_tests_skip_saying_why_but_fail_under_ci(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium: run scripts/ensure-chromium"):
        _need_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-chromium"):
        _need_browser()


def _body(driver) -> str:
    return driver.find_element("tag name", "body").text


def _visible(driver, xpath: str) -> bool:
    return any(el.is_displayed() for el in driver.find_elements("xpath", xpath))
