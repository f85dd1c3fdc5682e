// The page's router: #/datasets, #/datasets/<name>, #/train, #/runs, #/runs/<id>; and the API key dialog.

import { apiKey, onKeyNeeded, setApiKey } from "./api.js";
import { h } from "./dom.js";
import { datasetPage, datasetsPage } from "./datasets.js";
import { runPage, runsPage } from "./runs.js";
import { trainPage } from "./train.js";

const view = document.getElementById("view");
let current = null;

function askForKey(message) {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message ?? "";
  input.value = "";
  return new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      if (!input.value) return;
      form.removeEventListener("submit", submit);
      setApiKey(input.value);
      dialog.close();
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", (event) => event.preventDefault());
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

let pendingKey = null;
onKeyNeeded((message) => {
  pendingKey ??= askForKey(message).finally(() => (pendingKey = null));
  return pendingKey;
});

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "datasets" && parts[1]) return ["datasets", (el, s) => datasetPage(el, parts[1], s)];
  if (parts[0] === "train") return ["train", (el, s) => trainPage(el, params, s)];
  if (parts[0] === "runs" && parts[1]) return ["runs", (el, s) => runPage(el, parts[1], s)];
  if (parts[0] === "runs") return ["runs", (el, s) => runsPage(el, s)];
  return ["datasets", (el, s) => datasetsPage(el, s)];
}

async function show() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const [section, render] = route();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const page = h("div", { class: "page" });
  view.replaceChildren(page);
  try {
    await render(page, controller.signal);
  } catch (error) {
    if (controller.signal.aborted) return;
    page.append(h("p", { class: "error", role: "alert" }, error.message));
  }
}

async function start() {
  const health = await fetch("/health").then((response) => response.json());
  if (health.api_key === "required" && apiKey() === null) await askForKey(null);
  window.addEventListener("hashchange", show);
  await show();
}

start();
