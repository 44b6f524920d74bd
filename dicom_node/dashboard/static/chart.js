/* A very small line chart on a canvas (no dependencies). NoduleAI dashboard. */
(function () {
  "use strict";
  var COLORS = ["#2f6fde", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#5c940d", "#862e9c"];

  function niceMax(v) {
    if (v <= 0) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var n = v / p;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * p;
  }

  /* series: [{name, points: [[t(ms), value], ...]}] */
  function lineChart(canvas, series, opts) {
    var ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height, left = 52, bottom = 22, top = 8, right = 110;
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    var all = [];
    series.forEach(function (s) { s.points.forEach(function (p) { all.push(p); }); });
    if (!all.length) { ctx.fillStyle = "#7a8394"; ctx.fillText("no data in this window", left, h / 2); return; }
    var t0 = opts.t0, t1 = opts.t1;
    var ymax = niceMax(Math.max.apply(null, all.map(function (p) { return p[1]; })));
    var x = function (t) { return left + (w - left - right) * (t - t0) / Math.max(1, t1 - t0); };
    var y = function (v) { return h - bottom - (h - bottom - top) * v / ymax; };
    ctx.strokeStyle = "#e4e7ec"; ctx.fillStyle = "#7a8394";
    for (var i = 0; i <= 4; i++) {
      var v = ymax * i / 4;
      ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - right, y(v)); ctx.stroke();
      ctx.fillText(opts.format ? opts.format(v) : String(v), 2, y(v) + 4);
    }
    ctx.fillText(new Date(t0).toTimeString().slice(0, 8), left, h - 6);
    ctx.fillText(new Date(t1).toTimeString().slice(0, 8), w - right - 50, h - 6);
    series.forEach(function (s, k) {
      ctx.strokeStyle = ctx.fillStyle = COLORS[k % COLORS.length];
      ctx.lineWidth = 2; ctx.beginPath();
      s.points.forEach(function (p, j) { if (j) ctx.lineTo(x(p[0]), y(p[1])); else ctx.moveTo(x(p[0]), y(p[1])); });
      ctx.stroke();
      s.points.forEach(function (p) { ctx.fillRect(x(p[0]) - 2, y(p[1]) - 2, 4, 4); });
      ctx.fillText(s.name, w - right + 8, top + 12 + 14 * k);
    });
    ctx.lineWidth = 1;
  }

  window.NoduleChart = { line: lineChart };
})();
