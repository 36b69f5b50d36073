// Runs page: every run folder with its stages; start `finqlora run` from a config.
"use strict";

function stageChip(stage) {
  return el("span", { class: `chip status-${stage.status}`, title: stage.name, text: stage.label });
}

async function refresh() {
  const data = await api("/api/runs");
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  for (const run of data.runs) {
    const current = run.stages.find((s) => s.status === "started");
    const link = el("a", { href: `/runs/${encodeURIComponent(run.name)}`, text: run.name });
    const chips = el("td", {}, ...run.stages.map(stageChip));
    const status = current ? `${T.status_started}: ${current.label}` : `${run.done}/${run.stages.length} ${T.status_done}`;
    const report = run.has_report ? el("a", { href: `/runs/${encodeURIComponent(run.name)}/report.html`, target: "_blank", text: "report.html" }) : "–";
    body.append(el("tr", { "data-run": run.name }, el("td", {}, link), chips, el("td", { text: status }), el("td", {}, report)));
  }
  document.getElementById("no-runs").hidden = data.runs.length > 0;
  const select = document.getElementById("config");
  if (select.options.length !== data.configs.length) {
    select.replaceChildren(...data.configs.map((c) => el("option", { value: c, text: c })));
  }
}

document.getElementById("start").addEventListener("click", async () => {
  const result = document.getElementById("start-result");
  try {
    const job = await api("/api/jobs", { method: "POST", body: JSON.stringify({ config: document.getElementById("config").value }) });
    result.textContent = `${T.jobs} #${job.id}: ${job.run} (pid ${job.pid})`;
    setTimeout(() => { window.location.href = `/runs/${encodeURIComponent(job.run)}`; }, 800);
  } catch (error) { result.textContent = error.message; }
});

refresh();
setInterval(refresh, 3000);
