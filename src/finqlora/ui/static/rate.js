// A rater's page: one pair at a time in this rater's own A/B order; resumes at the first unrated pair.
"use strict";
const TOKEN = decodeURIComponent(location.pathname.split("/").pop());
const FIELDS = [["professional", T.professional], ["accuracy", T.accuracy]];
let pairs = [], index = 0;

function scoreInputs(side) {
  const box = document.querySelector(`.scores[data-side="${side}"]`);
  box.replaceChildren(...FIELDS.map(([field, label]) => el("fieldset", {}, el("legend", { text: label }),
    ...[1, 2, 3, 4, 5].map((n) => el("label", {}, el("input", { type: "radio", name: `${side}-${field}`, value: String(n) }), ` ${n} `)))));
}

function setRadio(name, value) {
  document.querySelectorAll(`input[name="${name}"]`).forEach((input) => { input.checked = value != null && input.value === String(value); });
}

function picked(name) {
  const input = document.querySelector(`input[name="${name}"]:checked`);
  return input ? input.value : null;
}

function show(i) {
  index = Math.max(0, Math.min(i, pairs.length - 1));
  const pair = pairs[index];
  document.getElementById("position").textContent = T.pair_of.replace("{i}", index + 1).replace("{n}", pairs.length);
  document.getElementById("question").textContent = pair.question;
  document.getElementById("answer-A").textContent = pair.answer_A;
  document.getElementById("answer-B").textContent = pair.answer_B;
  const rating = pair.rating || { choice: null, scores: { A: {}, B: {} } };
  setRadio("choice", rating.choice);
  for (const side of ["A", "B"]) for (const [field] of FIELDS) setRadio(`${side}-${field}`, rating.scores[side][field]);
  document.getElementById("rate-status").textContent = pair.rating ? T.saved : "";
  document.getElementById("previous").disabled = index === 0;
  document.getElementById("next").disabled = index === pairs.length - 1;
}

async function submit() {
  const pair = pairs[index];
  const choice = picked("choice");
  const scores = {};
  for (const side of ["A", "B"]) {
    scores[side] = {};
    for (const [field] of FIELDS) scores[side][field] = Number(picked(`${side}-${field}`)) || null;
  }
  const complete = choice && Object.values(scores).every((s) => s.professional && s.accuracy);
  const status = document.getElementById("rate-status");
  if (!complete) { status.textContent = T.need_all; return; }
  try {
    const saved = await api(`/api/rate/${encodeURIComponent(TOKEN)}`, { method: "POST", body: JSON.stringify({ item: pair.item, choice, scores }) });
    pair.rating = { choice, scores };
    document.getElementById("all-done").hidden = saved.rated < saved.pairs;
    const next = pairs.findIndex((p, i) => i > index && !p.rating);
    const first = pairs.findIndex((p) => !p.rating);
    show(next >= 0 ? next : first >= 0 ? first : index);
    status.textContent = `${T.saved} (${saved.rated}/${saved.pairs})`;
  } catch (error) { status.textContent = error.message; }
}

async function start() {
  scoreInputs("A"); scoreInputs("B");
  const data = await api(`/api/rate/${encodeURIComponent(TOKEN)}`);
  pairs = data.pairs;
  const first = pairs.findIndex((p) => !p.rating);
  document.getElementById("all-done").hidden = first >= 0;
  show(first >= 0 ? first : 0);
}

document.getElementById("submit").addEventListener("click", submit);
document.getElementById("previous").addEventListener("click", () => show(index - 1));
document.getElementById("next").addEventListener("click", () => show(index + 1));
start();
