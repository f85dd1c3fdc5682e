// Runs: the list, and one run's page drawn from its event stream (chart, progress, samples, files).

import { api, blobUrl, followEvents, quote, request } from "./api.js";
import { bytes, duration, h, when } from "./dom.js";
import { LossChart } from "./chart.js";

const ACTIVE = new Set(["queued", "running"]);
const LOG_POLL_MS = 2000;

export async function runsPage(page, signal) {
  const { runs } = await api("/runs", { signal });
  const rows = runs.map((run) =>
    h("tr", {}, [
      h("td", {}, h("a", { href: `#/runs/${quote(run.run_id)}` }, run.run_id)),
      h("td", {}, h("span", { class: `badge ${run.status}` }, run.status)),
      h("td", { class: "num" }, `${run.progress.step}${run.progress.total_steps ? ` / ${run.progress.total_steps}` : ""}`),
      h("td", {}, when(run.created_at)),
    ]),
  );
  page.append(
    h("h1", {}, "Runs"),
    runs.length
      ? h("table", { class: "list" }, [
          h("thead", {}, h("tr", {}, ["Run", "Status", "Step", "Created"].map((t) => h("th", {}, t)))),
          h("tbody", {}, rows),
        ])
      : h("p", { class: "muted" }, "No runs yet."),
    h("p", {}, h("a", { class: "button", href: "#/train" }, "Start a run")),
  );
}

function download(runId, file) {
  const button = h("button", { type: "button", class: "small" }, "Download");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const url = await blobUrl(`/runs/${quote(runId)}/artifacts/${quote(file.name)}`);
      const link = h("a", { href: url, download: file.name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

export async function runPage(page, runId, signal) {
  const badge = h("span", { class: "badge", id: "run-status" }, "…");
  const cancel = h("button", { type: "button", class: "danger", id: "cancel", hidden: true }, "Cancel");
  const bar = h("progress", { id: "run-progress", max: "1", value: "0", "aria-label": "Training progress" });
  const stepText = h("span", { id: "step-text" }, "waiting to start");
  const stats = h("dl", { class: "stats" });
  const canvas = h("canvas", { id: "loss-chart", role: "img", "aria-label": "Loss by step: raw and smoothed" });
  const chart = new LossChart(canvas);
  const samples = h("div", { class: "samples", id: "samples" }, h("p", { class: "muted" }, "No samples yet."));
  const files = h("ul", { class: "files", id: "files" });
  const logs = h("pre", { class: "logs", id: "logs", tabindex: "0" });
  const error = h("p", { class: "error", role: "alert", id: "run-error" });

  page.append(
    h("p", { class: "crumbs" }, [h("a", { href: "#/runs" }, "Runs"), " / ", runId]),
    h("div", { class: "title" }, [h("h1", {}, runId), badge, cancel]),
    error,
    h("section", { class: "card" }, [h("div", { class: "progress" }, [bar, stepText]), stats]),
    h("section", { class: "card" }, [
      h("h2", {}, "Loss"),
      h("p", { class: "legend" }, [h("span", { class: "key raw" }), "raw ", h("span", { class: "key smooth" }), "smoothed"]),
      canvas,
    ]),
    h("section", { class: "card" }, [h("h2", {}, "Samples"), samples]),
    h("section", { class: "card" }, [h("h2", {}, "LoRA files"), files]),
    h("section", { class: "card" }, [h("h2", {}, "Last log lines"), logs]),
  );

  const state = { status: null, step: 0, total: null, itPerS: null, eta: null, memory: null, epoch: null, validation: null };
  const sampleSteps = [];
  const sampleRows = new Map();

  const setStatus = (status) => {
    state.status = status;
    badge.textContent = status;
    badge.className = `badge ${status}`;
    cancel.hidden = !ACTIVE.has(status);
  };
  const drawProgress = () => {
    const total = state.total ?? 0;
    bar.max = Math.max(total, 1);
    bar.value = Math.min(state.step, bar.max);
    stepText.textContent = total ? `step ${state.step} / ${total}` : `step ${state.step}`;
    stats.replaceChildren(
      ...[
        ["epoch", state.epoch ?? "–"],
        ["it/s", state.itPerS === null ? "–" : state.itPerS.toFixed(2)],
        ["ETA", duration(state.eta)],
        ["peak memory", state.memory === null ? "–" : bytes(state.memory * 1024 * 1024)],
        ...(state.validation === null ? [] : [["validation loss", state.validation.toFixed(5)]]),
      ].map(([k, v]) => h("div", {}, [h("dt", {}, k), h("dd", { "data-stat": k }, String(v))])),
    );
  };
  const addSample = (event) => {
    const name = String(event.path).split(/[\\/]/).pop();
    if (!sampleSteps.length) samples.replaceChildren(h("table", { class: "sample-grid" }, [h("thead", {}, h("tr")), h("tbody")]));
    const table = samples.querySelector("table");
    if (!sampleSteps.includes(event.step)) {
      sampleSteps.push(event.step);
      table.querySelector("thead tr").replaceChildren(h("th", {}, "prompt"), ...sampleSteps.map((s) => h("th", {}, `step ${s}`)));
      for (const row of sampleRows.values()) row.append(h("td"));
    }
    let row = sampleRows.get(event.prompt);
    if (!row) {
      row = h("tr", {}, [h("th", { scope: "row" }, event.prompt), ...sampleSteps.map(() => h("td"))]);
      sampleRows.set(event.prompt, row);
      table.querySelector("tbody").append(row);
    }
    const img = h("img", { alt: `${event.prompt} at step ${event.step}`, "data-sample": name });
    row.children[sampleSteps.indexOf(event.step) + 1].replaceChildren(img);
    blobUrl(`/runs/${quote(runId)}/artifacts/${quote(name)}`, signal).then((url) => (img.src = url)).catch(() => {});
  };
  const refreshFiles = async () => {
    const answer = await api(`/runs/${quote(runId)}/artifacts`, { signal });
    const loras = answer.files.filter((f) => f.kind === "lora");
    files.replaceChildren(
      ...(loras.length
        ? loras.map((f) => h("li", { "data-file": f.name, "data-size": f.size }, [h("span", { class: "what" }, f.name), h("span", { class: "size" }, bytes(f.size)), download(runId, f)]))
        : [h("li", { class: "muted" }, "None yet.")]),
    );
  };
  const showLogs = (lines) => {
    logs.textContent = lines.join("\n");
  };

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      const answer = await api(`/runs/${quote(runId)}/cancel`, { method: "POST" });
      setStatus(answer.status);
    } catch (err) {
      error.textContent = err.message;
    } finally {
      cancel.disabled = false;
    }
  });

  const first = await api(`/status/${quote(runId)}`, { signal });
  setStatus(first.status);
  showLogs(first.logs);
  drawProgress();
  await refreshFiles();

  const poll = setInterval(async () => {
    if (!ACTIVE.has(state.status)) return;
    try {
      const status = await api(`/status/${quote(runId)}`, { signal });
      showLogs(status.logs);
      if (state.status !== "canceled") setStatus(status.status);
    } catch {
      // the stream reports the run's end; a missed poll only delays the log lines
    }
  }, LOG_POLL_MS);
  signal.addEventListener("abort", () => clearInterval(poll));

  await followEvents(
    `/runs/${quote(runId)}/events`,
    ({ type, data }) => {
      if (type === "status") {
        setStatus(data.status);
        showLogs(data.logs);
        if (data.error) error.textContent = data.error;
        state.step = data.progress.step || state.step;
        state.total = data.progress.total_steps ?? state.total;
        drawProgress();
        refreshFiles().catch(() => {});
        return;
      }
      switch (data.event) {
        case "started":
          if (state.status === "queued") setStatus("running");
          state.total = data.total_steps ?? state.total;
          chart.totalSteps = state.total;
          break;
        case "step":
          state.step = data.step;
          state.total = data.total_steps ?? state.total;
          state.epoch = data.epoch ?? state.epoch;
          state.itPerS = data.it_per_s ?? state.itPerS;
          state.eta = data.eta_seconds ?? state.eta;
          if (typeof data.memory === "number") state.memory = Math.max(state.memory ?? 0, data.memory);
          chart.totalSteps = state.total;
          chart.add(data.step, data.loss);
          break;
        case "sample":
          addSample(data);
          break;
        case "validation":
          if (data.step > 0 && typeof data.loss === "number") state.validation = data.loss;
          break;
        case "checkpoint":
        case "finished":
          refreshFiles().catch(() => {});
          break;
        case "error":
          error.textContent = data.message ?? data.error ?? "the trainer reported an error";
          break;
        default:
          break;
      }
      drawProgress();
    },
    { signal },
  );
  clearInterval(poll);
}
