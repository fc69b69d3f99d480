"""The dashboard's jobs in a real browser (Debian's Chromium driven by Playwright),
against the API as a process (its job runner) and a device on the real broker: the
jobs list with each job's progress (sorted by column), a rollout linked to its rollout
page, a method job's page with each device's outcome (the device's answer, an offline
device's failure), and a job cancelled from its page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from playwright.async_api import async_playwright, expect

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, record_problems
from tests.integration.test_api import client
from tests.integration.test_jobs import (
    JobDevice,
    cancel_leftover_jobs,
    job_devices,  # noqa: F401 (a fixture)
    method_job,
    offline,
    register,
    wait_job,
)
from tests.integration.test_rollouts import release
from tests.support import ApiProcess

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
async def _only_our_jobs(db: asyncpg.Pool[Any]) -> None:
    await cancel_leftover_jobs(db)


async def test_jobs_list_progress_outcomes_and_cancel(
    api: ApiProcess,
    make_key: Callable[..., Any],
    job_devices: Callable[..., JobDevice],  # noqa: F811
    db: asyncpg.Pool[Any],
    uid: str,
    artifacts: Path,
) -> None:
    token = await make_key("devices:read", "commands:write", "firmware:write")
    c = client(api, token)
    answers, away = f"{uid}-answers", f"{uid}-away"
    await register(db, [answers], {"run": uid}, online=True)
    await register(db, [away], {"run": uid})
    await register(db, [f"{uid}-slow-{i}" for i in range(6)], {"slow": uid})
    job_devices(answers)
    created: list[int] = []
    try:
        done = c.post(
            "/v1/jobs", json=method_job(f"tags.run = '{uid}'", "blink", params={"times": 3})
        )
        assert done.status_code == 201, done.text
        done_id = done.json()["id"]
        wait_job(c, done_id)
        fw = release(c, "3.1.0", f"board-{uid}")
        rollout = c.post(
            "/v1/jobs",
            json={"type": "rollout", "query": f"tags.run = '{uid}'", "firmware_id": fw["id"]},
        )
        assert rollout.status_code == 201, rollout.text
        rollout_id = rollout.json()["id"]
        created.append(rollout_id)
        # Offline devices fail at once; one start every 2 s keeps this job running.
        running = c.post(
            "/v1/jobs",
            json=method_job(f"tags.slow = '{uid}'", "reboot", batch_size=1, max_per_second=0.5),
        )
        assert running.status_code == 201, running.text
        running_id = running.json()["id"]
        created.append(running_id)

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                problems = record_problems(page)
                await page.goto(f"{api.url}/dashboard/#/jobs")
                await page.get_by_test_id("api-key").fill(token)
                await page.get_by_test_id("login-submit").click()
                nav = page.get_by_role("navigation", name="Main")
                await expect(nav.get_by_role("link", name="Jobs")).to_have_attribute(
                    "aria-current", "page"
                )

                # The list: each job's type, what it does, state and progress.
                row = page.locator(f'[data-testid="job-row"][data-job-id="{done_id}"]')
                await expect(row.get_by_test_id("job-type")).to_have_text("method")
                await expect(row.get_by_test_id("job-what")).to_contain_text('blink({"times":3})')
                await expect(row.get_by_test_id("job-state")).to_have_text("completed")
                progress = row.get_by_test_id("job-progress")
                await expect(progress).to_have_attribute("data-total", "2")
                await expect(progress).to_have_attribute("data-succeeded", "1")
                await expect(progress).to_have_attribute("data-failed", "1")
                await expect(progress.get_by_test_id("progress-done")).to_have_text(
                    "2 of 2 done (100 %)"
                )
                rollout_row = page.locator(f'[data-testid="job-row"][data-job-id="{rollout_id}"]')
                await expect(rollout_row.get_by_test_id("job-link")).to_have_attribute(
                    "href", f"#/rollouts/{rollout_id}"
                )
                await expect(rollout_row.get_by_test_id("job-what")).to_contain_text(
                    "firmware 3.1.0"
                )
                running_row = page.locator(f'[data-testid="job-row"][data-job-id="{running_id}"]')
                await expect(running_row.get_by_test_id("job-state")).to_have_text("running")
                await page.screenshot(path=artifacts / "dashboard-jobs.png", full_page=True)

                # The column headers sort the page: by type, methods before rollouts.
                await page.get_by_role("button", name="Type", exact=True).click()
                await expect(page.locator('#jobs-table th[data-sort="type"]')).to_have_attribute(
                    "aria-sort", "ascending"
                )
                types = await page.get_by_test_id("job-type").all_inner_texts()
                assert types == sorted(types) and "rollout" in types, types

                # The method job: each device's outcome.
                await row.get_by_test_id("job-link").click()
                await expect(page.get_by_test_id("job-title")).to_have_text(
                    f"Job #{done_id}: method blink"
                )
                await expect(page.get_by_test_id("job-state")).to_have_text("completed")
                await expect(page.get_by_test_id("job-cancel")).to_be_disabled()
                devices = page.get_by_test_id("job-device-row")
                await expect(devices.locator("th")).to_have_text([answers, away])
                ok = devices.nth(0)
                await expect(ok.get_by_test_id("job-device-state")).to_have_text("succeeded")
                await expect(ok.get_by_test_id("job-device-outcome")).to_have_text(
                    "answered, status 200"
                )
                assert orjson.loads(await ok.get_by_test_id("job-device-result").inner_text()) == {
                    "device": answers,
                    "method": "blink",
                    "times": 3,
                }
                failed = devices.nth(1)
                await expect(failed.get_by_test_id("job-device-state")).to_have_text("failed")
                await expect(failed.get_by_test_id("job-device-outcome")).to_have_text(
                    "offline, status 409"
                )
                await expect(failed.get_by_test_id("job-device-error")).not_to_be_empty()
                await page.screenshot(path=artifacts / "dashboard-job.png", full_page=True)

                # A running job, cancelled once confirmed: its pending devices are left out.
                await page.goto(f"{api.url}/dashboard/#/jobs/{running_id}")
                state = page.get_by_test_id("job-state")
                await expect(state).to_have_text("running")
                page.once("dialog", lambda dialog: dialog.accept())
                await page.get_by_test_id("job-cancel").click()
                await expect(state).to_have_text("cancelled")
                await expect(page.get_by_test_id("job-cancel")).to_be_disabled()
                await expect(
                    page.locator('[data-testid="job-device-row"][data-state="cancelled"]').first
                ).to_be_visible()
                assert c.get(f"/v1/jobs/{running_id}").json()["state"] == "cancelled"
                await page.screenshot(
                    path=artifacts / "dashboard-job-cancelled.png", full_page=True
                )

                # Jobs link to the rollout pages.
                await page.goto(f"{api.url}/dashboard/#/jobs")
                await page.get_by_test_id("jobs-rollouts-link").click()
                await expect(
                    page.locator(f'[data-testid="rollout-row"][data-job-id="{rollout_id}"]')
                ).to_be_visible()
                assert problems == []
            finally:
                await browser.close()
    finally:
        # No device of these jobs is left to start.
        for job_id in created:
            c.post(f"/v1/jobs/{job_id}/cancel")
        await offline(db, uid)
        c.close()
