"""The dashboard in a real browser: log in, the registry, Compare (answers equal to the API's), rollback,
a run's live curve, escaping of hostile names, and a phone-width layout without sideways scrolling."""
import json
import os

import httpx
import pytest

from harness import ADMIN, KEY, XSS, XSS_RUN, live_record, login

expect = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed").expect
RAINBOW = "Name three colours of the rainbow."


def no_xss(page) -> None:
    assert page.evaluate("window.__xss") is None


def api_answer(served, model: str, prompt: str, n: int) -> str:
    r = httpx.post(served["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                         "temperature": 0}, timeout=300)
    return r.json()["choices"][0]["message"]["content"]


def test_wrong_key_is_refused(page, served):
    login(page, served["url"], "sk-not-the-key")
    assert "Wrong key" in page.inner_text("#login-error")
    assert page.url.endswith("/ui/login")
    page.goto(served["url"] + "/ui/adapters")
    assert "/ui/login?next=/ui/adapters" in page.url and page.locator("#adapters").count() == 0


def test_login_shows_the_registry_with_names_as_text(page, served):
    login(page, served["url"], KEY)
    assert page.url.endswith("/ui/adapters")
    assert page.locator("#adapters tbody tr").evaluate_all("rows => rows.map(r => r.dataset.name)") == \
        ["iso-dates", "noisy"]
    row = page.locator('tr[data-name="iso-dates"]')
    assert row.locator("td.current").inner_text().startswith("v2") and "921,600" in row.inner_text()
    assert XSS in row.locator(".desc").inner_text()  # the hostile description is shown as text
    assert page.inner_text("#level") == "user" and page.locator("button.rollback").count() == 0
    page.click('a.name:text-is("iso-dates")')
    assert page.inner_text("#description").endswith(XSS)
    no_xss(page)


def test_compare_shows_base_and_adapter_answers(page, served):
    login(page, served["url"], KEY)
    page.goto(served["url"] + "/ui/compare")
    prompt = RAINBOW + " <script>window.__xss=4</script>"
    page.fill("#prompt", prompt)
    page.check("input[value='iso-dates@2']")
    page.fill("#max_tokens", "16")
    page.click("#compare-go")
    page.wait_for_selector("#results[data-done]")
    assert page.inner_text(".prompt-text") == prompt
    base = page.locator('.answer[data-model="base"] .text').inner_text()
    adapter = page.locator('.answer[data-model="iso-dates@2"] .text').inner_text()
    assert base == api_answer(served, "base", prompt, 16) and base
    assert adapter == api_answer(served, "iso-dates@2", prompt, 16) and adapter
    assert adapter != base
    col = page.locator('.answer[data-model="iso-dates@2"]')
    marked = col.locator(".tok.diff").count()
    assert marked > 0 and col.get_attribute("data-differ") == str(marked)
    base_col = page.locator('.answer[data-model="base"]')
    assert base_col.locator(".tok.diff").count() == 0
    assert base_col.locator(".tok.gone").count() == int(col.get_attribute("data-missing"))
    no_xss(page)


def test_compare_shades_each_token_by_its_kl_to_the_base(page, served):
    """Ticked, the per-token KL box scores every adapter column through /v1/score: the page shows the API's
    numbers (mean, max, one value per token in the tokens' titles), the base column none; an answer holding
    '<script>' and a hostile stack name show as text."""
    login(page, served["url"], KEY)
    page.goto(served["url"] + "/ui/compare")
    prompt, hostile = "What does the HTML tag <script> do?", '<img src=x onerror="window.__xss=5">'
    page.fill("#prompt", prompt)
    page.check("input[value='noisy']")
    page.check("#kl")
    page.fill("#stack", hostile)
    page.fill("#max_tokens", "16")
    page.click("#compare-go")
    page.wait_for_selector("#results[data-done]")
    col = page.locator('.answer[data-model="noisy"]')
    text = col.locator(".text").inner_text()
    gen = httpx.post(served["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "noisy", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                           "temperature": 0, "return_token_ids": True}, timeout=300).json()["choices"][0]
    assert text == gen["message"]["content"] and "<script>" in text  # the model's markup, shown as text
    score = httpx.post(served["url"] + "/v1/score", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                       json={"model": "noisy", "messages": [{"role": "user", "content": prompt}],
                             "completion": gen["token_ids"]}).json()
    assert float(col.get_attribute("data-kl-mean")) == pytest.approx(score["kl_mean"], abs=1e-12)
    assert float(col.get_attribute("data-kl-max")) == pytest.approx(score["kl_max"], abs=1e-12) and score["kl_max"] > 0
    assert int(col.get_attribute("data-kl-n")) == len(gen["token_ids"]) == len(score["kl"])
    toks = col.locator(".tok[data-kl]").evaluate_all(
        "ts => ts.map(t => [parseFloat(t.dataset.kl), t.title, t.className])")
    assert max(k for k, _, _ in toks) == pytest.approx(score["kl_max"], abs=1e-12)
    assert all(t.startswith("KL to base ") and t.endswith(" nats") for _, t, _ in toks)
    assert sum(len(t.split(" + ")) for _, t, _ in toks) == len(score["kl"])  # every token's value is shown
    assert any(" kl" in c for _, _, c in toks)  # some tokens are shaded
    assert f"max {score['kl_max']:.3f}" in col.locator(".kl-summary").inner_text()
    base = page.locator('.answer[data-model="base"]')
    assert base.locator(".tok[data-kl]").count() == 0 and base.locator(".kl-summary").count() == 0
    bad = page.locator(".answer").nth(2)
    assert bad.locator(".model").inner_text() == hostile and bad.locator(".flash.error").count() == 1
    assert bad.locator(".kl-summary").count() == 0
    no_xss(page)


def test_admin_rollback_changes_the_list(page, served):
    login(page, served["url"], ADMIN)
    assert page.inner_text("#level") == "admin"
    page.goto(served["url"] + "/ui/adapters/iso-dates")
    assert page.inner_text("#current-version") == "v2"
    page.click('article[data-version="1"] button.rollback')
    page.wait_for_selector(".flash.ok")
    assert "version 1 is now current" in page.inner_text(".flash.ok")
    assert page.inner_text("#current-version") == "v1"
    page.click('nav a:text-is("Adapters")')
    assert page.locator('tr[data-name="iso-dates"] td.current').inner_text().startswith("v1")
    listed = httpx.get(served["url"] + "/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert {a["name"]: a["version"] for a in listed["data"]} == {"iso-dates": 1, "noisy": 1}
    page.goto(served["url"] + "/ui/adapters/iso-dates")
    page.click('article[data-version="2"] button.rollback')  # put it back for the other tests
    page.wait_for_selector(".flash.ok")
    assert page.inner_text("#current-version") == "v2"


def test_a_runs_curve_and_its_live_refresh(page, served):
    login(page, served["url"], KEY)
    page.goto(served["url"] + "/ui/runs")
    page.click('a.name:text-is("iso-dates-r8")')
    steps = [json.loads(x) for x in (served["run"] / "metrics.jsonl").read_text().splitlines()]
    n_steps = sum("loss" in r for r in steps)
    loss = page.locator('#loss-chart g[data-series="loss"]')
    assert loss.get_attribute("data-n") == str(n_steps) and n_steps > 2
    assert len(loss.locator("polyline").get_attribute("points").split()) == n_steps
    assert page.locator('#loss-chart g[data-series="eval_loss"]').get_attribute("data-n") == \
        str(sum("eval_loss" in r for r in steps))
    assert page.inner_text("#run-status") == "done" and page.locator("#eval td").count() > 0
    os.utime(served["live"] / "metrics.jsonl")  # a going run writes often: "running" means written in the last 2 min
    page.goto(served["url"] + "/ui/runs/live")
    assert page.inner_text("#run-status") == "running" and page.inner_text("#run-step") == "5 / 40"
    with open(served["live"] / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(live_record(s)) + "\n" for s in (6, 7, 8)))
    # the page's CSP forbids eval, so wait through a locator rather than wait_for_function
    expect(page.locator('#loss-chart g[data-series="loss"]')).to_have_attribute("data-n", "8", timeout=15_000)
    assert page.inner_text("#run-step") == "8 / 40"


def test_a_hostile_run_name_shows_as_text(page, served):
    login(page, served["url"], KEY)
    page.goto(served["url"] + "/ui/runs")
    link = page.locator(f'#runs tr[data-name="{XSS_RUN}"] a.name')
    assert link.inner_text() == XSS_RUN
    link.click()
    assert page.inner_text("#run-name") == XSS_RUN and page.locator("#loss-chart").count() == 1
    no_xss(page)


def test_phone_width_needs_no_sideways_scrolling(chromium, served):
    context = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    login(page, served["url"], ADMIN)
    for path in ("/ui/adapters", "/ui/adapters/iso-dates", "/ui/compare", "/ui/runs", "/ui/runs/iso-dates-r8",
                 "/ui/sweeps", "/ui/sweeps/sweep"):
        page.goto(served["url"] + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width}px wide on a 390px screen"
    context.close()


def test_one_token_answers_and_wide_sweep_tables(chromium, served, tmp_path):
    """A one-token answer's footer says "1 token"; on a 1920px screen the sweep report's tables fit without
    scrolling (the page is not held to 1280px), and only the every-column results table scrolls."""
    context = chromium.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    login(page, served["url"], KEY)
    page.goto(served["url"] + "/ui/compare")
    page.fill("#prompt", RAINBOW)
    page.fill("#max_tokens", "1")
    page.click("#compare-go")
    page.wait_for_selector("#results[data-done]")
    foot = page.locator('.answer[data-model="base"] footer').inner_text()
    assert foot.startswith("1 token · "), foot
    page.goto(served["url"] + "/ui/sweeps/sweep")
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    fits = page.evaluate("""() => [...document.querySelectorAll('.report table')].map(t => {
        const box = t.closest('.scroll') || t.parentElement; return box.scrollWidth <= box.clientWidth; })""")
    assert len(fits) == 3 and all(fits), fits
    page.screenshot(path=str(tmp_path / "sweep-1920.png"))
    print("screenshot:", tmp_path / "sweep-1920.png")
    context.close()
