// Compare page: one prompt, streamed to the base model and to the fine-tuned adapter at once.
"use strict";
const MODELS = JSON.parse(document.getElementById("models").textContent);
let controllers = [];

document.querySelectorAll(".preset").forEach((button) =>
  button.addEventListener("click", () => { document.getElementById("prompt").value = button.dataset.text; }));

function settings() {
  const number = (id) => Number(document.getElementById(id).value);
  return { temperature: number("temperature"), top_p: number("top_p"), max_tokens: number("max_tokens"), seed: number("seed") };
}

async function streamInto(column, request) {
  const text = column.querySelector(".text"), meta = column.querySelector(".meta");
  text.textContent = ""; meta.textContent = T.waiting; column.dataset.state = "streaming";
  const controller = new AbortController(); controllers.push(controller);
  const started = performance.now(); let first = null, pieces = 0;
  try {
    const response = await fetch(request.url, { method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(request.body) });
    await readStream(response, (piece) => {
      if (first === null) first = performance.now() - started;
      pieces += 1; text.textContent += piece;
      meta.textContent = `${T.first_token} ${(first / 1000).toFixed(2)} s`;
    });
    const seconds = (performance.now() - started - (first || 0)) / 1000;
    meta.textContent = `${T.first_token} ${((first || 0) / 1000).toFixed(2)} s · ${pieces > 1 && seconds > 0 ? (pieces / seconds).toFixed(1) : "–"} ${T.tokens_per_s}`;
    column.dataset.state = "done";
  } catch (error) {
    if (error.name !== "AbortError") { meta.textContent = `${T.failed}: ${error.message}`; column.dataset.state = "failed"; }
  }
}

async function send() {
  const prompt = document.getElementById("prompt").value.trim();
  if (!prompt) return;
  const options = settings(), messages = [{ role: "user", content: prompt }];
  const adapter = document.getElementById("adapter").value;
  const chat = (model) => ({ url: "/llm/v1/chat/completions", body: { model, messages, stream: true, ...options } });
  const jobs = [];
  document.querySelector("#col-base .model-name").textContent = MODELS.base;
  jobs.push(streamInto(document.getElementById("col-base"), chat(MODELS.base)));
  const tuned = document.getElementById("col-finetuned");
  tuned.querySelector(".model-name").textContent = adapter || "";
  if (adapter) jobs.push(streamInto(tuned, chat(adapter)));
  else tuned.querySelector(".meta").textContent = T.no_adapter;
  const deepseek = document.getElementById("use_deepseek");
  if (deepseek && deepseek.checked) {
    jobs.push(streamInto(document.getElementById("col-deepseek"),
      { url: "/api/deepseek", body: { prompt, temperature: options.temperature, max_tokens: options.max_tokens } }));
  }
  document.getElementById("send").disabled = true; document.getElementById("stop").disabled = false;
  await Promise.all(jobs);
  controllers = [];
  document.getElementById("send").disabled = false; document.getElementById("stop").disabled = true;
}

document.getElementById("send").addEventListener("click", send);
document.getElementById("stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
