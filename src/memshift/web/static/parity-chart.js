// The parity chart: pass rate of judged checks (left axis) and failed or errored
// checks (bars, right axis) per time bucket, from /api/parity/trend, with uPlot
// (vendored in static/vendor/uplot). Re-read every few seconds like the page.
(function () {
  "use strict";
  const box = document.getElementById("parity-chart");
  if (!box || !window.uPlot) return;
  const main = document.getElementById("content");
  const seconds = Number((main && main.dataset.refresh) || 5);
  const PASS = "#15803d";
  const FAIL = "#dc2626";
  let chart = null;

  function options(width) {
    return {
      width: width,
      height: 280,
      cursor: { points: { size: 7 } },
      legend: { live: true },
      scales: {
        x: { time: true },
        // Down to just below the lowest rate seen: 99 % and 100 % must look apart.
        rate: {
          range: function (u, min) {
            const low = min == null ? 0 : Math.max(0, Math.floor(min - 1));
            return [low, 100];
          },
        },
        count: { range: function (u, min, max) { return [0, Math.max(4, Math.ceil(max * 1.15))]; } },
      },
      series: [
        { value: "{YYYY}-{MM}-{DD} {HH}:{mm}:{ss}" },
        {
          label: "pass rate", scale: "rate", stroke: PASS, width: 2,
          fill: "rgba(21, 128, 61, 0.07)", points: { show: true, size: 5, fill: PASS },
          spanGaps: true,
          value: function (u, v) { return v == null ? "—" : v.toFixed(2) + " %"; },
        },
        {
          label: "failed / error", scale: "count", stroke: FAIL, width: 1,
          fill: "rgba(220, 38, 38, 0.55)",
          paths: uPlot.paths.bars({ size: [0.6, 28] }), points: { show: false },
          value: function (u, v) { return v == null ? "—" : String(v); },
        },
      ],
      axes: [
        { stroke: "#64748b", grid: { stroke: "#eef2f7" }, ticks: { stroke: "#e2e8f0" }, space: 80 },
        {
          scale: "rate", stroke: "#64748b", grid: { stroke: "#eef2f7" }, ticks: { show: false },
          values: function (u, ticks) { return ticks.map(function (t) { return t + " %"; }); },
          size: 56,
        },
        {
          scale: "count", side: 1, stroke: "#b91c1c", grid: { show: false },
          ticks: { show: false }, size: 44,
          values: function (u, ticks) {
            return ticks.map(function (t) { return Number.isInteger(t) ? String(t) : ""; });
          },
        },
      ],
    };
  }

  function empty(text) {
    if (chart) { chart.destroy(); chart = null; }
    box.classList.add("chart-empty");
    box.textContent = text;
  }

  async function load() {
    let response;
    try {
      response = await fetch(box.dataset.src, { credentials: "same-origin", cache: "no-store" });
    } catch (err) {
      return;
    }
    if (!response.ok) return;
    const trend = await response.json();
    const points = trend.points || [];
    if (!points.length) { empty("No parity results yet: run `memshift parity --all`."); return; }
    const xs = points.map(function (p) { return p.epoch; });
    const data = [
      xs,
      points.map(function (p) { return p.pass_rate; }),
      // A bucket without failures draws no bar (null), rather than a flat one.
      points.map(function (p) { return p.fail + p.error || null; }),
    ];
    if (chart) { chart.setData(data); return; }
    box.classList.remove("chart-empty");
    box.textContent = "";
    const opts = options(box.clientWidth);
    if (xs.length === 1) {
      // One bucket still needs a time axis: a minute (or two buckets) each side of it.
      const pad = Math.max(60, trend.bucket_seconds * 2);
      opts.scales.x.range = function () { return [xs[0] - pad, xs[0] + pad]; };
    }
    chart = new uPlot(opts, data, box);
  }

  window.addEventListener("resize", function () {
    if (chart) chart.setSize({ width: box.clientWidth, height: 280 });
  });
  load();
  window.setInterval(function () { if (!document.hidden) load(); }, seconds * 1000);
})();
