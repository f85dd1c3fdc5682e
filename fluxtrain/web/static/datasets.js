// Datasets: the list, new ones from URLs or files, the thumbnail grid with captions and each target's
// control images (edit pairs), captioning, config.

import { ApiError, api, blobUrl, quote, request } from "./api.js";
import { h } from "./dom.js";
import { schemaForm } from "./forms.js";

const URL_CHUNK = 4;
const CAPTION_CHUNK = 2;

/** A form that adds URLs and files to dataset `fixedName` (or the one typed in); each outcome listed. */
function addImagesForm({ fixedName = null, onDone }) {
  const nameInput = h("input", { id: "new-name", name: "output_name", autocomplete: "off", required: true });
  const nameError = h("p", { class: "field-error", id: "new-name-error", role: "alert" });
  const urls = h("textarea", { id: "new-urls", rows: "5", placeholder: "https://example.com/a.jpg (one a line)" });
  const files = h("input", { id: "new-files", type: "file", multiple: true, accept: "image/*,.zip" });
  const outcomes = h("ul", { class: "outcomes", "aria-live": "polite", id: "outcomes" });
  const formError = h("p", { class: "error", role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, fixedName ? "Add images" : "Create dataset");
  const drop = h("div", { class: "drop", tabindex: "-1" }, [
    h("label", { for: "new-files" }, "Images or .zip files: choose or drop them here"),
    files,
  ]);
  let dropped = [];
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    dropped = [...event.dataTransfer.files];
    drop.querySelector("label").textContent = `${dropped.length} file(s) dropped`;
  });

  const row = (what) => {
    const state = h("span", { class: "state pending" }, "waiting…");
    const item = h("li", {}, [h("span", { class: "what" }, what), state]);
    outcomes.append(item);
    return (ok, text) => {
      state.className = `state ${ok ? "saved" : "failed"}`;
      state.textContent = text;
    };
  };

  const form = h("form", { class: "card", novalidate: true }, [
    h("h2", {}, fixedName ? "Add images" : "New dataset"),
    fixedName
      ? null
      : h("div", { class: "field" }, [
          h("label", { for: "new-name" }, "Name *"),
          nameInput,
          h("p", { class: "field-help" }, "Letters, digits, '-', '_' and '.'."),
          nameError,
        ]),
    h("div", { class: "field" }, [h("label", { for: "new-urls" }, "Image URLs"), urls]),
    drop,
    h("div", { class: "actions" }, [button]),
    formError,
    outcomes,
  ]);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = fixedName ?? nameInput.value.trim();
    const list = [...new Set(urls.value.split("\n").map((u) => u.trim()).filter(Boolean))];
    const chosen = [...files.files, ...dropped];
    nameError.textContent = "";
    formError.textContent = "";
    if (!list.length && !chosen.length) {
      formError.textContent = "Paste at least one URL or choose a file.";
      return;
    }
    button.disabled = true;
    outcomes.replaceChildren();
    let saved = 0;
    try {
      const pending = new Map(list.map((url) => [url, row(url)]));
      for (let start = 0; start < list.length; start += URL_CHUNK) {
        const chunk = list.slice(start, start + URL_CHUNK);
        const answer = await api("/download-images", { method: "POST", json: { urls: chunk, output_name: name } });
        for (const url of chunk) {
          if (url in answer.files) {
            saved += 1;
            pending.get(url)(true, "saved");
          } else {
            pending.get(url)(false, `failed: ${answer.failed[url] ?? "not saved"}`);
          }
        }
      }
      for (const file of chosen) {
        const mark = row(file.name);
        const body = new FormData();
        body.append("files", file, file.name);
        try {
          const answer = await api(`/datasets/${quote(name)}/images`, { method: "POST", body });
          const done = Object.keys(answer.files).length;
          const failed = Object.entries(answer.failed);
          saved += done;
          const reasons = failed.map(([what, why]) => `${what}: ${why}`).join("; ");
          mark(failed.length === 0, `${done} saved${failed.length ? `, failed: ${reasons}` : ""}`);
        } catch (error) {
          mark(false, `failed: ${error.message}`);
        }
      }
      urls.value = "";
      files.value = "";
      dropped = [];
      onDone?.(name, saved);
    } catch (error) {
      if (error instanceof ApiError && Array.isArray(error.detail)) {
        const messages = error.detail.map((d) => d.msg?.replace(/^Value error, /, "") ?? String(d));
        (fixedName ? formError : nameError).textContent = messages.join("; ");
      } else {
        formError.textContent = error.message;
      }
      for (const item of outcomes.querySelectorAll(".state.pending")) item.textContent = "not sent";
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function datasetsPage(page, signal) {
  const { datasets } = await api("/datasets", { signal });
  const table = datasets.length
    ? h("table", { class: "list" }, [
        h("thead", {}, h("tr", {}, [h("th", {}, "Dataset"), h("th", { class: "num" }, "Images"), h("th", { class: "num" }, "Captions")])),
        h(
          "tbody",
          {},
          datasets.map((d) =>
            h("tr", {}, [
              h("td", {}, h("a", { href: `#/datasets/${quote(d.name)}` }, d.name)),
              h("td", { class: "num" }, String(d.images)),
              h("td", { class: "num" }, String(d.captions)),
            ]),
          ),
        ),
      ])
    : h("p", { class: "muted" }, "No datasets yet.");
  const opened = h("p", { class: "next", "aria-live": "polite" });
  page.append(
    h("h1", {}, "Datasets"),
    table,
    addImagesForm({
      onDone: (name, saved) => {
        opened.replaceChildren(
          `${saved} image(s) saved. `,
          h("a", { href: `#/datasets/${quote(name)}`, id: "open-dataset" }, `Open ${name}`),
        );
      },
    }),
    opened,
  );
}

function captionCard(name, image, signal) {
  const img = h("img", { alt: image.file, width: "256", height: "256", loading: "lazy" });
  blobUrl(`/datasets/${quote(name)}/thumbnails/${quote(image.file)}`, signal)
    .then((url) => (img.src = url))
    .catch(() => img.replaceWith(h("div", { class: "noimg" }, "no preview")));
  const id = `caption-${image.file.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const text = h("textarea", { id, rows: "3", "data-image": image.file }, image.caption ?? "");
  const unread = image.caption_error ? `${image.caption_error}; saving replaces it` : "no caption";
  const state = h("span", { class: "state", "aria-live": "polite" }, image.caption === null ? unread : "");
  let saved = image.caption ?? "";
  text.addEventListener("blur", async () => {
    if (text.value === saved) return;
    state.className = "state pending";
    state.textContent = "saving…";
    try {
      const answer = await api(`/datasets/${quote(name)}/captions/${quote(image.file)}`, {
        method: "PUT",
        json: { caption: text.value },
      });
      saved = answer.caption;
      state.className = "state saved";
      state.textContent = "saved";
    } catch (error) {
      state.className = "state failed";
      state.textContent = `not saved: ${error.message}`;
    }
  });
  const remove = h("button", { type: "button", class: "small danger", "aria-label": `Delete ${image.file}` }, "Delete");
  const card = h("figure", { class: "thumb", "data-image": image.file }, [
    img,
    h("figcaption", {}, [
      h("label", { for: id }, image.file),
      text,
      h("div", { class: "row" }, [state, remove]),
      controlStrip(name, image, signal),
    ]),
  ]);
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete ${image.file} and its caption?`)) return;
    try {
      await api(`/datasets/${quote(name)}/images/${quote(image.file)}`, { method: "DELETE" });
      card.remove();
    } catch (error) {
      state.className = "state failed";
      state.textContent = error.message;
    }
  });
  return {
    card,
    setCaption(caption) {
      text.value = caption;
      saved = caption;
      state.className = "state saved";
      state.textContent = "captioned";
    },
  };
}

const extension = (file) => (/\.[^.]+$/.exec(file) ?? [""])[0];
const stemOf = (file) => file.slice(0, file.length - extension(file).length);

/** Upload names that pair `files` with the target `stem` after its `existing` controls: the bare
 * stem for a first single reference, else `stem_<n>` numbered on from the last (datasets/pairs.py). */
function controlNames(stem, existing, files) {
  if (!existing.length && files.length === 1) return [stem + extension(files[0].name)];
  const numbers = existing.map((file) => (stemOf(file) === stem ? 0 : Number(stemOf(file).slice(stem.length + 1))));
  let next = existing.length ? Math.max(0, ...numbers.filter(Number.isInteger)) + 1 : 0;
  return files.map((file) => `${stem}_${next++}${extension(file.name)}`);
}

/** A target's control (reference) images as small previews, and a picker that uploads more for it. */
function controlStrip(name, image, signal) {
  let controls = image.controls ?? [];
  const key = image.file.replace(/[^A-Za-z0-9_-]/g, "_");
  const list = h("ul", { class: "controls", "aria-label": `Control images of ${image.file}` });
  const count = h("span", { class: "muted" });
  const state = h("span", { class: "state", "aria-live": "polite" });
  const show = () => {
    count.textContent = controls.length ? `controls: ${controls.length}` : "no controls";
    list.replaceChildren(
      ...controls.map((file) => {
        const preview = h("img", { alt: `control ${file}`, title: file, width: "56", height: "56", "data-control": file });
        blobUrl(`/datasets/${quote(name)}/control-thumbnails/${quote(file)}`, signal)
          .then((url) => (preview.src = url))
          .catch(() => preview.replaceWith(h("span", { class: "noimg" }, file)));
        return h("li", {}, preview);
      }),
    );
  };
  const input = h("input", { id: `control-${key}`, type: "file", multiple: true, accept: "image/*", class: "visually-hidden" });
  input.addEventListener("change", async () => {
    const chosen = [...input.files];
    if (!chosen.length) return;
    const body = new FormData();
    controlNames(stemOf(image.file), controls, chosen).forEach((upload, i) => body.append("files", chosen[i], upload));
    body.append("role", "control");
    state.className = "state pending";
    state.textContent = "uploading…";
    try {
      const answer = await api(`/datasets/${quote(name)}/images`, { method: "POST", body });
      const failed = Object.entries(answer.failed).map(([what, why]) => `${what}: ${why}`);
      const detail = await api(`/datasets/${quote(name)}`);
      controls = detail.images.find((other) => other.file === image.file)?.controls ?? [];
      show();
      state.className = `state ${failed.length ? "failed" : "saved"}`;
      state.textContent = failed.length ? `not saved: ${failed.join("; ")}` : `${Object.keys(answer.files).length} added`;
    } catch (error) {
      state.className = "state failed";
      state.textContent = `not saved: ${error.message}`;
    } finally {
      input.value = "";
    }
  });
  show();
  return h("div", { class: "control-strip", "data-controls-of": image.file }, [
    list,
    h("div", { class: "row" }, [
      count,
      h("label", { class: "button small", for: `control-${key}` }, ["Add control", input]),
    ]),
    state,
  ]);
}

async function captionForm(name, images, cards, onCounts) {
  const schema = await schemaForm("CaptionRequest", {
    front: ["trigger_word", "overwrite"],
    skip: ["output_name", "images"],
    formId: "caption",
  });
  const progress = h("progress", { id: "caption-progress", max: String(images.length), value: "0" });
  const line = h("p", { class: "muted", "aria-live": "polite", id: "caption-status" });
  const error = h("p", { class: "error", role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, "Caption all");
  const form = h("form", { class: "card", novalidate: true }, [
    h("h2", {}, "Captions"),
    ...schema.elements,
    h("div", { class: "actions" }, [button, progress]),
    line,
    error,
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    schema.clearErrors();
    error.textContent = "";
    const names = images.map((image) => image.file).filter((file) => cards.has(file) && cards.get(file).card.isConnected);
    button.disabled = true;
    let done = 0;
    progress.max = names.length;
    progress.value = 0;
    try {
      for (let start = 0; start < names.length; start += CAPTION_CHUNK) {
        const chunk = names.slice(start, start + CAPTION_CHUNK);
        line.textContent = `captioning ${done + 1}–${done + chunk.length} of ${names.length}…`;
        const answer = await api("/caption-images", {
          method: "POST",
          json: { ...schema.values(), output_name: name, images: chunk },
        });
        for (const [file, caption] of Object.entries(answer.captions)) cards.get(file)?.setCaption(caption);
        for (const [file, reason] of Object.entries(answer.failed)) error.append(`${file}: ${reason}. `);
        done += chunk.length;
        progress.value = done;
      }
      line.textContent = `${done} of ${names.length} images captioned.`;
      onCounts();
    } catch (err) {
      line.textContent = "";
      const rest = err instanceof ApiError ? schema.showErrors(err.detail) : [err.message];
      error.textContent = rest.join("; ");
    } finally {
      button.disabled = false;
    }
  });
  return { form, trigger: schema.fields.get("trigger_word").input };
}

async function configForm(name, trigger) {
  const schema = await schemaForm("DatasetConfig", {
    front: ["resolution", "num_repeats", "batch_size", "enable_bucket"],
    skip: ["output_name", "trigger_word"],
    formId: "config",
  });
  const result = h("p", { class: "muted", "aria-live": "polite", id: "config-result" });
  const error = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "card", novalidate: true, id: "config-form" }, [
    h("h2", {}, "Dataset config"),
    h("p", { class: "field-help" }, "Writes datasets/<name>.toml with the trigger word above."),
    ...schema.elements,
    h("div", { class: "actions" }, [h("button", { type: "submit" }, "Write config")]),
    result,
    error,
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    schema.clearErrors();
    error.textContent = "";
    result.textContent = "";
    try {
      const body = { ...schema.values(), output_name: name, trigger_word: trigger.value };
      const answer = await api("/create-dataset-config", { method: "POST", json: body });
      result.replaceChildren(
        `Written: ${answer.path}. `,
        h("a", { href: `#/train?dataset=${quote(name)}` }, "Train on it"),
      );
    } catch (err) {
      const rest = err instanceof ApiError ? schema.showErrors(err.detail) : [err.message];
      error.textContent = rest.map((m) => (m.includes("trigger") ? `Trigger word: ${m}` : m)).join("; ");
    }
  });
  return form;
}

export async function datasetPage(page, name, signal) {
  const dataset = await api(`/datasets/${quote(name)}`, { signal });
  const counts = h("p", { class: "muted", id: "counts" });
  const grid = h("div", { class: "grid", id: "grid" });
  const cards = new Map();
  const refreshCounts = () => {
    const captions = [...grid.querySelectorAll("textarea")].filter((t) => t.value.trim()).length;
    counts.textContent = `${grid.children.length} images, ${captions} captions`;
  };
  for (const image of dataset.images) {
    const card = captionCard(name, image, signal);
    cards.set(image.file, card);
    grid.append(card.card);
  }
  new MutationObserver(refreshCounts).observe(grid, { childList: true });
  refreshCounts();
  const { form: captions, trigger } = await captionForm(name, dataset.images, cards, refreshCounts);
  const remove = h("button", { type: "button", class: "danger" }, "Delete dataset");
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete the dataset ${name} with all its images and captions?`)) return;
    try {
      await request(`/datasets/${quote(name)}`, { method: "DELETE" });
      location.hash = "#/datasets";
    } catch (error) {
      removeError.textContent = error.message;
    }
  });
  const removeError = h("p", { class: "error", role: "alert" });
  page.append(
    h("p", { class: "crumbs" }, [h("a", { href: "#/datasets" }, "Datasets"), " / ", name]),
    h("h1", {}, name),
    counts,
    captions,
    grid,
    await configForm(name, trigger),
    addImagesForm({ fixedName: name, onDone: () => window.dispatchEvent(new HashChangeEvent("hashchange")) }),
    h("div", { class: "actions" }, [h("a", { class: "button", href: `#/train?dataset=${quote(name)}` }, "Train"), remove]),
    removeError,
  );
}
