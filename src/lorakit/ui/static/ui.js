// lorakit dashboard: confirm before destructive forms; refresh a running training run's curve.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
    });
  });

  var live = document.getElementById("live");
  if (!live) return;
  var every = parseInt(live.getAttribute("data-every") || "2000", 10);
  function tick() {
    if (live.getAttribute("data-status") !== "running") return;
    fetch(live.getAttribute("data-src"), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (!r.ok) throw new Error(r.status);
        live.setAttribute("data-status", r.headers.get("X-Run-Status") || "stopped");
        return r.text();
      })
      .then(function (html) { live.innerHTML = html; })  // server-rendered, autoescaped fragment
      .catch(function () { /* keep the last picture; try again next tick */ })
      .finally(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
});
