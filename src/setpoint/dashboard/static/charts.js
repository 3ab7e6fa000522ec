/* setpoint dashboard: the overview's charts (uPlot, vendored). Data: GET data-series-url (JSON). */
(function () {
  "use strict";
  var root = document.getElementById("charts");
  if (!root || typeof uPlot === "undefined") return;

  var PALETTE = ["#2457c5", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4", "#a15c07", "#e31b54"];
  var OTHER = "#98a2b3";
  var HEIGHT = 250;
  var charts = [];
  window.setpointCharts = {};

  function usd(micros, digits) {
    var d = micros / 1e6;
    if (digits == null) digits = Math.abs(d) >= 0.01 || d === 0 ? 2 : 6;
    return "$" + d.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function usdAxis(u, splits, axisIdx, space, incr) {
    var digits = Math.max(2, Math.min(8, Math.ceil(-Math.log10((incr || 1) / 1e6))));
    return splits.map(function (v) { return usd(v, digits); });
  }
  function count(v) { return v == null ? "—" : Math.round(v).toLocaleString("en-US"); }
  function ms(v) {
    if (v == null) return "—";
    return v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 1 : 2) + " s" : (v >= 10 ? v.toFixed(0) : v.toFixed(1)) + " ms";
  }
  function pad(n) { return n < 10 ? "0" + n : "" + n; }
  // 24-hour UTC ticks; the date is shown under the first tick and wherever the day changes
  function timeAxis(u, splits, axisIdx, space, incr) {
    var lastDay = null;
    return splits.map(function (ts) {
      var d = new Date(ts * 1e3);
      var day = d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate());
      var showDay = day !== lastDay;
      lastDay = day;
      if (incr >= 86400) return day.slice(5);
      var hm = pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
      return showDay ? hm + "\n" + day.slice(5) : hm;
    });
  }
  function utc(ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); }
  function alpha(hex, a) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + a + ")";
  }

  // a value with no neighbour draws no line: mark it with a dot
  function isolated(u, si) {
    var d = u.data[si], out = [];
    for (var i = 0; i < d.length; i++) {
      if (d[i] != null && (i === 0 || d[i - 1] == null) && (i === d.length - 1 || d[i + 1] == null)) out.push(i);
    }
    return out;
  }

  function make(el, series, data, yValues, extra) {
    var opts = {
      width: Math.max(280, el.clientWidth),
      height: HEIGHT,
      tzDate: utc,
      scales: { x: { time: true } },
      series: [{ value: "{YYYY}-{MM}-{DD} {HH}:{mm}Z" }].concat(series),
      axes: [
        { stroke: "#5b6470", grid: { stroke: "#eaecf0" }, ticks: { stroke: "#eaecf0" }, values: timeAxis },
        { stroke: "#5b6470", grid: { stroke: "#eaecf0" }, ticks: { stroke: "#eaecf0" }, size: 74, values: yValues }
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } }
    };
    if (extra) extra(opts);
    var u = new uPlot(opts, data, el);
    charts.push([u, el]);
    window.setpointCharts[el.id] = u;  // for tests and the curious
    return u;
  }

  function noData(el, text) {
    var p = document.createElement("p");
    p.className = "nodata";
    p.textContent = text;
    el.appendChild(p);
  }

  function spendChart(el, d) {
    var groups = d.spend.groups, vals = d.spend.values, n = d.x.length;
    if (!groups.length) { noData(el, "No spend in this window."); return; }
    // Stacked bars: series k is the sum of groups k..end, drawn tallest first, so group 0 (the
    // biggest spender) is the top segment and the legend lists groups biggest first.
    var stacked = [], acc = new Array(n).fill(0);
    for (var k = groups.length - 1; k >= 0; k--) {
      acc = acc.map(function (a, i) { return a + vals[k][i]; });
      stacked[k] = acc.slice();
    }
    var bars = uPlot.paths.bars({ size: [0.8, 48] });
    var series = groups.map(function (g, k) {
      var c = g === "other" ? OTHER : PALETTE[k % PALETTE.length];
      return {
        label: g, stroke: c, fill: c, width: 0, paths: bars, points: { show: false },
        value: function (u, v, si, idx) { return idx == null ? "" : usd(vals[k][idx]); }
      };
    });
    make(el, series, [d.x].concat(stacked), usdAxis);
    el.setAttribute("aria-label", "Spend by " + d.by + ": " + groups.join(", "));
  }

  function trafficChart(el, d) {
    var t = d.traffic;
    var series = [
      { label: "requests", stroke: "#2457c5", fill: alpha("#2457c5", 0.12), width: 1.5, value: function (u, v) { return count(v); } },
      { label: "errors", stroke: "#b42318", fill: alpha("#b42318", 0.18), width: 1.5, value: function (u, v) { return count(v); } },
      { label: "cache hits", stroke: "#12b76a", width: 1.5, dash: [4, 3], value: function (u, v) { return count(v); } }
    ];
    make(el, series, [d.x, t.requests, t.errors, t.cache_hits], function (u, s) { return s.map(count); });
    var req = t.requests.reduce(function (a, b) { return a + b; }, 0);
    var err = t.errors.reduce(function (a, b) { return a + b; }, 0);
    el.setAttribute("aria-label", "Requests and errors: " + count(req) + " requests, " + count(err) + " errors");
  }

  function latencyChart(el, d) {
    var L = d.latency;
    var any = L.p50.some(function (v) { return v != null; });
    if (!any) { noData(el, "No latency data in this window."); return; }
    function s(label, color, dash) {
      return { label: label, stroke: color, width: 1.5, dash: dash, spanGaps: false, value: function (u, v) { return ms(v); },
               points: { show: true, size: 5, fill: color, filter: isolated } };
    }
    var series = [
      s("p50", "#2457c5"), s("p95", "#f79009"), s("p99", "#b42318"),
      s("TTFT p50", "#7a5af8", [5, 4]), s("TTFT p99", "#ee46bc", [5, 4])
    ];
    make(el, series, [d.x, L.p50, L.p95, L.p99, L.ttft_p50, L.ttft_p99], function (u, v) { return v.map(ms); },
      function (o) { o.scales.y = { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } }; });
    el.setAttribute("aria-label", "Latency percentiles and time to first token over time");
  }

  function render(d) {
    var spend = document.getElementById("chart-spend");
    var traffic = document.getElementById("chart-traffic");
    var latency = document.getElementById("chart-latency");
    if (!d.points) {
      [spend, traffic, latency].forEach(function (el) { if (el) noData(el, "No requests in this window."); });
    } else {
      if (spend) spendChart(spend, d);
      if (traffic) trafficChart(traffic, d);
      if (latency) latencyChart(latency, d);
    }
    root.setAttribute("data-points", String(d.points));
    root.setAttribute("data-ready-ms", String(Math.round(performance.now())));  // since navigation start
    root.setAttribute("data-ready", "1");
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      charts.forEach(function (c) { c[0].setSize({ width: Math.max(280, c[1].clientWidth), height: HEIGHT }); });
    }, 100);
  });

  var embedded = document.getElementById("series-data");  // rendered with the page: no second round trip
  if (embedded) {
    try { render(JSON.parse(embedded.textContent)); } catch (e) { root.setAttribute("data-ready", "error"); throw e; }
    return;
  }
  fetch(root.getAttribute("data-series-url"), { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then(function (r) {
      if (r.status === 401) { window.location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search)); }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    })
    .then(render)
    .catch(function (e) {
      var el = document.getElementById("chart-spend");
      if (el) noData(el, "Could not load chart data (" + e.message + ").");
      root.setAttribute("data-ready", "error");
    });
})();
