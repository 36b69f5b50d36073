// Owner's rating page: create a round, hand out links, watch win rate and agreement.
"use strict";

const fixed = (v, digits = 3) => (v == null ? "–" : Number(v).toFixed(digits));

function linkList(links) {
  return el("ul", { class: "links" }, ...Object.entries(links).map(([rater, url]) =>
    el("li", { "data-rater": rater }, el("strong", { text: `${rater}: ` }), el("code", { class: "rater-link", text: url }))));
}

function roundCard(r) {
  const progress = Object.entries(r.progress).map(([rater, n]) => `${rater} ${n}/${r.pairs}`).join(" · ");
  const cohen = Object.entries(r.cohen_by_pair).map(([pair, k]) => `${pair}: ${fixed(k)}`).join(" · ") || "–";
  const score = (variant, f) => fixed(r.mean_scores[variant][f], 2);
  return el("div", { class: "round", "data-round": r.round },
    el("h2", { text: `${r.round} · ${T.run} ${r.run} · ${r.created_at}` }),
    el("p", {}, `${T.win_rate}: `, el("span", { class: "big win-rate", text: percent(r.win_rate) }),
      ` ${T.ci95} `, el("span", { class: "win-ci", text: r.win_rate == null ? "–" : `[${percent(r.win_ci_low)}, ${percent(r.win_ci_high)}]` }),
      ` · ${T.wins} ${r.wins} · ${T.ties} ${r.ties} · ${T.losses} ${r.losses} · ${T.ratings} ${r.ratings}`),
    el("p", {}, `${T.fleiss}: `, el("strong", { class: "fleiss", text: fixed(r.fleiss_kappa) }), ` (${T.kappa_items} ${r.agreement_items})`),
    el("p", { class: "cohen" }, `${T.cohen}: ${cohen}`),
    el("p", {}, `${T.mean_scores}: ${T.base} ${T.professional} ${score("base", "professional")} / ${T.accuracy} ${score("base", "accuracy")} · `
      + `${T.finetuned} ${T.professional} ${score("finetuned", "professional")} / ${T.accuracy} ${score("finetuned", "accuracy")}`),
    el("p", { class: "note" }, `${T.rater_progress}: ${progress}`),
    el("details", {}, el("summary", { text: T.links }), linkList(r.links)));
}

async function refresh() {
  const data = await api("/api/rounds");
  const select = document.getElementById("round-run");
  if (select.options.length !== data.rateable_runs.length) {
    select.replaceChildren(...data.rateable_runs.map((name) => el("option", { value: name, text: name })));
  }
  document.getElementById("no-eval").hidden = data.rateable_runs.length > 0;
  document.getElementById("rounds").replaceChildren(...data.rounds.map(roundCard));
  document.getElementById("no-rounds").hidden = data.rounds.length > 0;
}

document.getElementById("create-round").addEventListener("click", async () => {
  const out = document.getElementById("new-links");
  const limit = document.getElementById("round-limit").value;
  const body = {
    run: document.getElementById("round-run").value,
    raters: document.getElementById("round-raters").value.split(/[,，\s]+/).filter(Boolean),
    limit: limit ? Number(limit) : null,
    name: document.getElementById("round-name").value.trim() || null,
  };
  try {
    const created = await api("/api/rounds", { method: "POST", body: JSON.stringify(body) });
    out.replaceChildren(el("p", { text: `${T.links} (${created.round}, ${created.pairs})` }), linkList(created.links));
    refresh();
  } catch (error) { out.replaceChildren(el("p", { class: "error", text: error.message })); }
});

refresh();
setInterval(refresh, 5000);
