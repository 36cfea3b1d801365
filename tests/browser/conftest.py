"""Browser tests: Debian's chromium driven headless by Playwright (executable_path: no downloaded browser)
against a real `lorakit serve` subprocess. Skipped, with the reason, only when chromium or playwright is absent;
CI installs both (.ci/run, scripts/setup.sh)."""
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

CHROMIUM = harness.chromium_path()
try:
    import playwright.sync_api  # noqa: F401
    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False


def pytest_collection_modifyitems(config, items):
    reason = None if CHROMIUM else "chromium is not installed (apt-get install chromium)"
    reason = reason or (None if HAVE_PLAYWRIGHT else "playwright for Python is not installed (pip install playwright)")
    for item in items:
        if "tests/browser" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def served():
    with tempfile.TemporaryDirectory(prefix="lorakit-ui-") as tmp:
        env = harness.build(Path(tmp))
        proc, url = harness.start(env)
        try:
            yield {**env, "url": url}
        finally:
            harness.stop(proc)


@pytest.fixture(scope="session")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = harness.launch(p)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    """A fresh browser context (no cookies) per test; fails the test on any script error in the page."""
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"script errors in the page: {errors}"
