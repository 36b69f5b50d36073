// One run: stages, live progress (stage, step, ETA), loss chart, metrics table, dataset card.
"use strict";
const RUN = document.getElementById("run-name").dataset.run;
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// A plain SVG line chart of train and validation loss against the step.
function lossChart(loss) {
  const box = document.getElementById("loss-chart");
  const all = [...loss.train, ...loss.val];
  if (!all.length) { box.textContent = "–"; return; }
  const W = 640, H = 260, L = 48, R = 12, Tp = 12, B = 32;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - Tp - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": T.loss_chart, id: "loss-svg" });
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }), svg("line", { x1: L, y1: Tp, x2: L, y2: H - B, stroke: "#999" }));
  for (const [value, y] of [[y1, Tp + 4], [y0, H - B]]) { const label = svg("text", { x: 4, y }); label.textContent = value.toFixed(3); chart.append(label); }
  for (const [value, anchor] of [[x0, "start"], [x1, "end"]]) {
    const label = svg("text", { x: X(value), y: H - 10, "text-anchor": anchor }); label.textContent = `${T.step} ${value}`; chart.append(label);
  }
  const series = [["train", loss.train, "#0b6bcb", T.train_loss], ["val", loss.val, "#d93025", T.val_loss]];
  series.forEach(([name, points, colour, label], index) => {
    if (!points.length) return;
    const path = points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    chart.append(svg("path", { d: path, fill: "none", stroke: colour, "stroke-width": 2, class: `series-${name}` }));
    if (points.length === 1) chart.append(svg("circle", { cx: X(points[0][0]), cy: Y(points[0][1]), r: 3, fill: colour }));
    const legend = svg("text", { x: W - R - 110, y: Tp + 14 + index * 16, fill: colour }); legend.textContent = `— ${label}`; chart.append(legend);
  });
  box.replaceChildren(chart);
}

function metricsTable(rows) {
  const body = document.querySelector("#metrics tbody");
  const cell = (value, ci) => el("td", { class: "num" }, value, " ", el("span", { class: "ci", text: ci }));
  body.replaceChildren(...rows.map((r) => el("tr", {}, el("td", { text: r.name }), el("td", { class: "num", text: String(r.n) }),
    cell(r.base, r.base_ci), cell(r.finetuned, r.finetuned_ci), cell(r.delta, r.delta_ci),
    el("td", { text: r.test || "" }), el("td", { class: "num", text: r.p }), el("td", { text: r.verdict || "" }))));
  document.getElementById("no-metrics").hidden = rows.length > 0;
}

function progressLine(run) {
  const current = run.stages.find((s) => s.status === "started");
  const fill = document.querySelector("#progress .fill"), label = document.querySelector("#progress .label");
  if (!current) {
    fill.style.width = `${(100 * run.done) / run.stages.length}%`;
    label.textContent = `${run.done}/${run.stages.length} ${T.status_done}`;
    return;
  }
  const p = run.progress || {};
  fill.style.width = `${100 * (p.share || 0)}%`;
  let text = `${T.stage}: ${current.label}`;
  if (p.step != null) text += ` · ${T.step} ${p.step}/${p.total_steps ?? "?"} · loss ${Number(p.loss).toFixed(4)}`;
  if (p.done != null) text += ` · ${p.done}/${p.total}`;
  if (p.eta_s != null) text += ` · ${T.eta} ${formatSeconds(p.eta_s)}`;
  label.textContent = text;
}

async function refresh() {
  const run = await api(`/api/runs/${encodeURIComponent(RUN)}`);
  document.getElementById("stages").replaceChildren(...run.stages.map((s) =>
    el("li", { class: `status-${s.status}`, "data-stage": s.name, title: s.seconds != null ? `${s.seconds} s` : s.status },
      `${s.label} · ${T["status_" + s.status] || s.status}`)));
  progressLine(run);
  lossChart(run.loss);
  metricsTable(run.metrics);
  // The server renders the card's Markdown with raw HTML disabled (report.render_markdown).
  document.getElementById("dataset-card").innerHTML = run.dataset_card_html || "–";
  const report = document.getElementById("report-link");
  report.hidden = !run.has_report;
  report.href = `/runs/${encodeURIComponent(RUN)}/report.html`;
  if (run.job) {
    document.getElementById("job-card").hidden = false;
    document.getElementById("job-log").textContent = `${run.job.status}\n${run.job.log_tail}`;
  }
  return run;
}

async function loop() {
  let run = null;
  try { run = await refresh(); } catch (error) { document.querySelector("#progress .label").textContent = error.message; }
  const live = run && (run.current || (run.job && run.job.status === "running"));
  setTimeout(loop, live ? 2000 : 10000);
}
loop();
