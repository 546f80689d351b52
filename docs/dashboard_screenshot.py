"""Screenshot the Ray dashboard of a running search with headless Chromium (a dev script for the README).

    python docs/dashboard_screenshot.py http://127.0.0.1:8265 docs/dashboard.png [--page jobs|overview|actors]

Token auth is on, so the browser gets the token as the ``ray-authentication-token`` cookie, the one the
dashboard's own login form sets (read from $RAY_AUTH_TOKEN, else ~/.ray/auth_token). With ``--page jobs``
(the default) it opens the detail page of the running driver job and shows its tasks and its actors
(the Tune trials).

Needs ``pip install playwright`` (not a project dependency) and a system Chromium; it never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

COOKIE = "ray-authentication-token"  # ray/_private/authentication/authentication_constants.py
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def read_token() -> str:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path.home() / ".ray" / "auth_token"
        try:
            token = path.read_text().strip()
        except OSError:
            sys.exit(f"error: no RAY_AUTH_TOKEN and no readable {path}; run `ray get-auth-token`")
    return token


def running_driver_job(url: str, token: str) -> str | None:
    """The id of the newest running driver job (the search), from the dashboard's jobs API."""
    req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            jobs = json.load(resp)
    except urllib.error.HTTPError as exc:
        sys.exit(f"error: {url}/api/jobs/ answered {exc.code} {exc.reason}: wrong token? (`ray get-auth-token`)")
    except urllib.error.URLError as exc:
        sys.exit(f"error: no dashboard at {url} ({exc.reason}); is the search still running?")
    running = [j for j in jobs if j.get("type") == "DRIVER" and j.get("status") == "RUNNING"]
    running.sort(key=lambda j: j.get("start_time") or 0)
    return running[-1]["job_id"] if running else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="dashboard URL, as `python -m ips_search.run` prints it")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--page", choices=["jobs", "overview", "actors"], default="jobs")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--wait-s", type=float, default=8.0, help="extra time for the page's charts and tables to fill")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    url = args.url.rstrip("/")
    token = read_token()
    route = {"overview": "#/overview", "actors": "#/actors", "jobs": "#/jobs"}[args.page]
    if args.page == "jobs":
        job = running_driver_job(url, token)
        if job:
            route = f"#/jobs/{job}"
        else:
            print("warning: no running driver job; taking the jobs list", file=sys.stderr)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            host = urlsplit(url).hostname
            context.add_cookies([{"name": COOKIE, "value": token, "domain": host, "path": "/"}])
            page = context.new_page()
            page.goto(f"{url}/{route}", wait_until="networkidle", timeout=60_000)
            if args.page == "jobs" and "/jobs/" in route:
                # fold the sections that say little for a local search and open the trial actors' table
                for title in ("Logs", "Task Timeline (beta)", "Cluster status and autoscaler", "Actor Table"):
                    header = page.locator("h4", has_text=title).first
                    if header.count():
                        header.click()
                        page.wait_for_timeout(300)
                page.evaluate(
                    "() => { const h = [...document.querySelectorAll('h4')]"
                    ".find(e => e.textContent.trim() === 'Ray Core Overview');"
                    " if (h) window.scrollBy(0, h.getBoundingClientRect().top - 100); }"
                )
            page.wait_for_timeout(args.wait_s * 1000)
            if page.get_by_text("Authentication Token Required").count():
                sys.exit("error: the dashboard shows its login prompt: the token was refused; nothing written")
            page.screenshot(path=args.out)
        finally:
            browser.close()
    print(f"wrote {args.out} ({url}/{route})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
