// The operator console's only script: live clocks, a gentle refresh, confirmations.
// Everything works without it; nothing here is loaded from elsewhere.
(function () {
  "use strict";
  var body = document.body;
  var skew = Date.parse(body.dataset.now) - Date.now(); // the record's clock minus ours
  var REFRESH_MS = 5000;
  var live = localStorage.getItem("crux-console-live") !== "0" && body.dataset.live === "1";

  function amount(s) {
    s = Math.abs(s);
    if (s < 1) return "now";
    if (s < 60) return Math.floor(s) + "s";
    var m = s / 60;
    if (m < 60) { var rs = Math.floor(s % 60); return Math.floor(m) + "m" + (rs && m < 10 ? " " + rs + "s" : ""); }
    var h = m / 60;
    if (h < 48) { var rm = Math.floor(m % 60); return Math.floor(h) + "h" + (rm && h < 10 ? " " + rm + "m" : ""); }
    return Math.floor(h / 24) + "d";
  }

  function tick() {
    var now = Date.now() + skew;
    document.querySelectorAll("time[data-rel]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) return;
      var secs = (at - now) / 1000;
      var text;
      if (el.dataset.rel === "until") {
        var a = amount(secs);
        text = a === "now" ? "now" : secs > 0 ? "in " + a : "overdue " + a;
      } else {
        var b = amount(-secs);
        text = b === "now" ? "just now" : b + " ago";
      }
      if (el.textContent !== text) el.textContent = text;
    });
  }

  function busy(region) {
    var active = document.activeElement;
    return (active && region.contains(active) && active !== document.body) ||
      (window.getSelection && String(window.getSelection()) !== "");
  }

  function refresh() {
    if (!live || document.hidden) return;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Requested-With": "crux-console" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var now = fresh.body && fresh.body.dataset.now;
        if (now) skew = Date.parse(now) - Date.now();
        document.querySelectorAll("[data-live-id]").forEach(function (region) {
          var next = fresh.querySelector('[data-live-id="' + region.dataset.liveId + '"]');
          if (!next || busy(region)) return;
          // A region with a key (the actions beside a flow) is replaced only when the
          // flow moved on, so what the operator typed there is never wiped.
          if (region.dataset.liveKey !== undefined) {
            if (region.dataset.liveKey === next.dataset.liveKey) return;
            region.dataset.liveKey = next.dataset.liveKey;
          }
          // Keep what the operator opened: details stay open across refreshes.
          var open = {};
          region.querySelectorAll("details[data-key]").forEach(function (d) { open[d.dataset.key] = d.open; });
          next.querySelectorAll("details[data-key]").forEach(function (d) {
            if (d.dataset.key in open) d.open = open[d.dataset.key];
          });
          if (region.innerHTML !== next.innerHTML) region.innerHTML = next.innerHTML;
        });
        tick();
      })
      .catch(function () { /* a missed refresh is retried on the next one */ });
  }

  var toggle = document.getElementById("live-toggle");
  function paint() {
    if (!toggle) return;
    toggle.setAttribute("aria-pressed", live ? "true" : "false");
    toggle.textContent = live ? "● live" : "❚❚ paused";
  }
  if (toggle) {
    toggle.addEventListener("click", function () {
      live = !live;
      localStorage.setItem("crux-console-live", live ? "1" : "0");
      paint();
      if (live) refresh();
    });
  }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });
  paint();
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, REFRESH_MS);
})();
