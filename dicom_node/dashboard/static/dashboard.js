/* NoduleAI dashboard: live refresh of the page's fragment, charts, sign-in and actions. */
(function () {
  "use strict";
  var live = document.getElementById("live");
  var flash = document.getElementById("flash");

  // Credentials typed into the sign-in form, as an Authorization header (sent once, to sign in).
  function credentialHeader(value) {
    return { Authorization: value.indexOf(":") > 0 ? "Basic " + btoa(value) : "Bearer " + value };
  }

  // The server holds the session (an HttpOnly cookie this script cannot read): ask who we are.
  function showSignedIn() {
    return fetch("/api/session").then(function (r) { return r.json(); }).then(function (s) {
      document.getElementById("signed-in").textContent = s.actor
        ? "signed in: " + s.actor + (s.role === "reader" ? " (read-only)" : "")
        : "read-only";
    }).catch(function () { /* the next refresh tells */ });
  }

  function say(text, ok) {
    flash.textContent = text;
    flash.className = ok ? "ok" : "fail";
  }

  function fmtMs(v) { return v < 1000 ? v.toFixed(0) + " ms" : (v / 1000).toFixed(1) + " s"; }

  function drawLatency(canvas, data) {
    var pct = (document.getElementById("percentile") || { value: "p95" }).value;
    var byStage = {};
    data.forEach(function (b) {
      b.stages.forEach(function (s) {
        (byStage[s.stage] = byStage[s.stage] || []).push([Date.parse(b.t), s[pct]]);
      });
    });
    var series = Object.keys(byStage).map(function (k) { return { name: k + " " + pct, points: byStage[k] }; });
    return { series: series, format: fmtMs };
  }

  function drawThroughput(canvas, data) {
    var names = ["instances", "jobs_queued", "jobs_done", "jobs_failed"];
    return {
      series: names.map(function (n) { return { name: n, points: data.map(function (b) { return [Date.parse(b.t), b[n]]; }) }; }),
      format: function (v) { return v.toFixed(0); }
    };
  }

  function drawCharts() {
    var canvases = live.querySelectorAll("canvas[data-src]");
    return Promise.all(Array.prototype.map.call(canvases, function (canvas) {
      return fetch(canvas.dataset.src).then(function (r) { return r.json(); }).then(function (data) {
        var spec = canvas.dataset.kind === "latency" ? drawLatency(canvas, data) : drawThroughput(canvas, data);
        var win = Number(new URL(canvas.dataset.src, location.href).searchParams.get("window") || 60) * 60000;
        var now = Date.now();
        window.NoduleChart.line(canvas, spec.series, { t0: now - win, t1: now, format: spec.format });
        canvas.dataset.drawn = String(spec.series.length);
      });
    }));
  }

  var refreshing = false;
  function refresh() {
    if (refreshing) return Promise.resolve();
    refreshing = true;
    return fetch(location.href, { headers: { "X-Partial": "1" } }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (html) {
      live.innerHTML = html;
      document.getElementById("refreshed-at").textContent = "updated " + new Date().toTimeString().slice(0, 8); // 24-hour, as the pages
      return drawCharts();
    }).catch(function (err) {
      document.getElementById("refreshed-at").textContent = "refresh failed: " + err.message;
    }).then(function () {
      refreshing = false;
      live.dataset.refreshes = String(Number(live.dataset.refreshes || 0) + 1);
    });
  }

  function act(button) {
    var action = button.dataset.action, target = button.dataset.target;
    var url = action === "discard" ? "/api/jobs/" + encodeURIComponent(target) + "/discard"
      : "/api/studies/" + encodeURIComponent(target) + "/" + action;
    button.disabled = true;
    // The session cookie goes along by itself; the header marks the request as this page's own.
    return fetch(url, { method: "POST", headers: { "X-NoduleAI-Action": "1" } }).then(function (r) {
      return r.json().then(function (body) {
        if (r.ok) say(action + " done: " + body.detail, true);
        else say(action + " refused (" + r.status + "): " + (body.detail || ""), false);
      });
    }).catch(function (err) { say(action + " failed: " + err.message, false); })
      .then(refresh);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (button) { event.preventDefault(); act(button); }
  });

  document.getElementById("signin").addEventListener("submit", function (event) {
    event.preventDefault();
    var value = document.getElementById("token").value.trim();
    document.getElementById("token").value = "";
    var request = value
      ? fetch("/api/session", { method: "POST", headers: credentialHeader(value) })
      : fetch("/api/session", { method: "DELETE" });
    request.then(function (r) {
      if (!r.ok) say("sign-in refused (" + r.status + ")", false);
    }).catch(function (err) { say("sign-in failed: " + err.message, false); })
      .then(showSignedIn).then(refresh);
  });

  var pct = document.getElementById("percentile");
  if (pct) pct.addEventListener("change", drawCharts);

  // Filters that apply when changed (no inline handlers: the pages' CSP allows none).
  document.querySelectorAll("[data-autosubmit]").forEach(function (el) {
    el.addEventListener("change", function () { el.form.submit(); });
  });

  showSignedIn();
  drawCharts();
  setInterval(refresh, Number(live.dataset.refresh || 3000));
})();
