// lorakit dashboard, Compare: stream one prompt (or a few) to several models through the server's own
// /v1/chat/completions (via /ui/api/complete, which adds the session's key), side by side; then mark
// the tokens of each answer that are not in its longest common subsequence with the reference answer.
// With "per-token KL to base" ticked, each adapter's finished answer is scored through /ui/api/score (the
// server's /v1/score, on the engine): every token is shaded by KL(adapter || base) at its position.
"use strict";
(function () {
  var form, results, csrf;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;  // always text: names, prompts and answers never become HTML
    return e;
  }

  function splitPrompts(text) {
    return text.split(/^\s*---\s*$/m).map(function (s) { return s.trim(); })
      .filter(function (s) { return s.length > 0; }).slice(0, 4);
  }

  function addSegment(col, text, ids) {
    col.pending = col.pending.concat(ids || []);
    if (!text) return;  // an incomplete character: its token joins the next piece
    var span = el("span", "tok", text);
    col.body.appendChild(span);
    col.segs.push({text: text, ids: col.pending, span: span});
    col.pending = [];
  }

  function handleEvent(col, data) {
    if (data === "[DONE]") return;
    var obj;
    try { obj = JSON.parse(data); } catch (e) { return; }
    if (obj.error) { fail(col, obj.error.message || "error"); return; }
    if (obj.usage) col.usage = obj.usage;
    var ch = obj.choices && obj.choices[0];
    if (!ch) return;
    var d = ch.delta || {};
    if (typeof d.content === "string" || ch.token_ids) addSegment(col, d.content || "", ch.token_ids);
    if (ch.finish_reason) col.reason = ch.finish_reason;
  }

  function fail(col, message) {
    col.failed = true;
    col.art.classList.add("failed");
    col.body.appendChild(el("p", "flash error", message));
  }

  async function stream(col, prompt, maxTokens) {
    var t0 = performance.now(), resp;
    col.art.classList.add("busy");
    try {
      resp = await fetch("/ui/api/complete", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({model: col.model, prompt: prompt, max_tokens: maxTokens})
      });
      if (!resp.ok) {
        var msg = "HTTP " + resp.status;
        try { msg = (await resp.json()).error.message || msg; } catch (e) { /* not JSON */ }
        fail(col, msg);
        return;
      }
      var reader = resp.body.getReader(), dec = new TextDecoder(), buf = "";
      for (;;) {
        var r = await reader.read();
        if (r.done) break;
        buf += dec.decode(r.value, {stream: true});
        var i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          var evt = buf.slice(0, i);
          buf = buf.slice(i + 2);
          evt.split("\n").forEach(function (line) {
            if (line.indexOf("data: ") === 0) handleEvent(col, line.slice(6));
          });
        }
      }
    } catch (e) {
      fail(col, String(e));
    } finally {
      col.art.classList.remove("busy");
      var secs = (performance.now() - t0) / 1000;
      var n = col.usage ? col.usage.completion_tokens : col.segs.length;
      if (!col.failed) {
        col.foot.textContent = count(n, "token") + " · " + secs.toFixed(1) + " s · " + (n / secs).toFixed(1) +
          " tok/s" + (col.reason ? " · " + col.reason : "");
      }
    }
  }

  function count(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }  // "1 token", "2 tokens"

  var KL_LEVELS = [0.01, 0.1, 0.3, 1, 3];  // nats: shading classes kl1..kl5 start here

  function fmtKL(v) { return v >= 0.001 || v === 0 ? v.toFixed(3) : v.toExponential(1); }

  // score a finished answer against the base; shade each token, add the mean and the max to the footer
  async function scoreKL(col, prompt) {
    var ids = [];
    col.segs.forEach(function (s) { ids = ids.concat(s.ids); });
    ids = ids.concat(col.pending);
    if (!ids.length) return;
    var line = el("p", "kl-summary small", "KL to base …");
    col.art.insertBefore(line, col.foot);
    var r;
    try {
      var resp = await fetch("/ui/api/score", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({model: col.model, prompt: prompt, token_ids: ids})
      });
      r = await resp.json();
      if (!resp.ok) throw new Error((r.error && r.error.message) || ("HTTP " + resp.status));
    } catch (e) {
      line.textContent = "KL to base failed: " + String(e.message || e);
      line.classList.add("error");
      return;
    }
    var k = 0;
    col.segs.forEach(function (s) {
      var vals = r.kl.slice(k, k + s.ids.length);
      k += s.ids.length;
      if (!vals.length) return;
      var top = Math.max.apply(null, vals), level = 0;
      while (level < KL_LEVELS.length && top >= KL_LEVELS[level]) level++;
      if (level) s.span.classList.add("kl" + level);
      s.span.setAttribute("data-kl", String(top));
      s.span.title = "KL to base " + vals.map(fmtKL).join(" + ") + " nats";  // an attribute: never HTML
    });
    col.art.classList.add("kl-on");
    col.art.setAttribute("data-kl-mean", String(r.kl_mean));
    col.art.setAttribute("data-kl-max", String(r.kl_max));
    col.art.setAttribute("data-kl-n", String(r.kl.length));
    line.textContent = "KL to base per token: mean " + fmtKL(r.kl_mean) + " · max " + fmtKL(r.kl_max) +
      " nats (" + count(r.kl.length, "token") + ")";
  }

  // the tokens of `segs` and of `ref` outside their longest common subsequence (compared by text)
  function unmatched(segs, ref) {
    var n = segs.length, m = ref.length, i, j;
    var L = [];
    for (i = 0; i <= n; i++) L.push(new Int32Array(m + 1));
    for (i = n - 1; i >= 0; i--)
      for (j = m - 1; j >= 0; j--)
        L[i][j] = segs[i].text === ref[j].text ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    var mine = [], theirs = [];
    i = 0; j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && segs[i].text === ref[j].text) { i++; j++; }
      else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) { theirs.push(ref[j]); j++; }
      else { mine.push(segs[i]); i++; }
    }
    return {mine: mine, theirs: theirs};
  }

  function markDiffs(cols) {
    var ok = cols.filter(function (c) { return !c.failed; });
    if (ok.length < 2) return;
    var ref = ok.filter(function (c) { return c.model === "base"; })[0] || ok[0];
    ref.art.classList.add("reference");
    var others = ok.filter(function (c) { return c !== ref; });
    others.forEach(function (c) {
      var d = unmatched(c.segs, ref.segs);
      d.mine.forEach(function (s) { s.span.classList.add("diff"); });
      // with one answer beside the reference, also strike the reference's tokens that answer lacks
      if (others.length === 1) d.theirs.forEach(function (s) { s.span.classList.add("gone"); });
      c.art.setAttribute("data-differ", String(d.mine.length));
      c.art.setAttribute("data-missing", String(d.theirs.length));
      c.foot.textContent += " · " + d.mine.length + " of " + count(c.segs.length, "token") + " differ" +
        (d.theirs.length ? ", " + d.theirs.length + " of the reference's missing" : "");
    });
  }

  async function run(ev) {
    ev.preventDefault();
    var prompts = splitPrompts(form.elements.prompt.value);
    var models = Array.prototype.map.call(form.querySelectorAll("input[name=model]:checked"),
                                          function (i) { return i.value; });
    var stack = form.elements.stack.value.trim();
    if (stack) models.push(stack);
    var maxTokens = parseInt(form.elements.max_tokens.value, 10) || 48;
    var withKL = form.elements.kl.checked;
    results.replaceChildren();
    if (!prompts.length || !models.length) {
      results.appendChild(el("p", "flash error", "Enter a prompt and choose at least one model."));
      return;
    }
    var button = document.getElementById("compare-go");
    button.disabled = true;
    var all = prompts.map(function (prompt, pi) {
      var block = el("section", "prompt-block");
      block.appendChild(el("h2", "prompt-text", prompt));
      var grid = el("div", "answers");
      block.appendChild(grid);
      results.appendChild(block);
      var cols = models.map(function (m) {
        var art = el("article", "answer card");
        art.setAttribute("data-model", m);
        art.appendChild(el("header", "model", m));
        var body = el("div", "text");
        art.appendChild(body);
        var foot = el("footer", "muted small", "…");
        art.appendChild(foot);
        grid.appendChild(art);
        return {model: m, art: art, body: body, foot: foot, segs: [], pending: [], usage: null, reason: null};
      });
      return Promise.all(cols.map(function (c) {
        return stream(c, prompt, maxTokens).then(function () {
          if (withKL && c.model !== "base" && !c.failed) return scoreKL(c, prompt);
        });
      }))
        .then(function () { markDiffs(cols); });
    });
    await Promise.all(all);
    button.disabled = false;
    results.setAttribute("data-done", "1");
  }

  document.addEventListener("DOMContentLoaded", function () {
    form = document.getElementById("compare-form");
    results = document.getElementById("results");
    if (!form) return;
    csrf = document.querySelector("meta[name=csrf-token]").getAttribute("content");
    form.addEventListener("submit", run);
  });
})();
