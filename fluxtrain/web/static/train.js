// The train form: fields, bounds and defaults from the OpenAPI schemas of /train and the dataset config.

import { ApiError, api, quote } from "./api.js";
import { h } from "./dom.js";
import { schemaForm } from "./forms.js";

// The seed's TrainRequest fields, shown first; every other field is under "advanced".
const SEED_FIELDS = [
  "output_name", "dataset", "max_train_epochs", "learning_rate", "network_dim", "save_every_n_epochs",
  "pretrained_model", "clip_l", "t5xxl", "ae", "enable_bucket", "full_bf16",
];
// The model-file fields offered the models folder's files: FLUX.1's four and FLUX.2's text encoder.
const MODEL_FIELDS = ["pretrained_model", "ae", "clip_l", "t5xxl", "text_encoder"];

// What fits in how much GPU memory (fluxgym's and kohya's usual FLUX.1 LoRA recipes).
export const MEMORY_PRESETS = {
  "12 GB": { train: { fp8_base: true, optimizer: "adafactor", gradient_checkpointing: true }, config: { resolution: 512, batch_size: 1 } },
  "16 GB": { train: { fp8_base: true, optimizer: "adafactor", gradient_checkpointing: true }, config: { resolution: 768, batch_size: 1 } },
  "24 GB": { train: { fp8_base: true, optimizer: "adamw8bit", gradient_checkpointing: true }, config: { resolution: 1024, batch_size: 1 } },
  "48+ GB": { train: { fp8_base: false, optimizer: "adamw", gradient_checkpointing: false }, config: { resolution: 1024, batch_size: 2 } },
};

export async function trainPage(page, params, signal) {
  const [train, config, models, datasets] = await Promise.all([
    schemaForm("TrainRequest", { front: SEED_FIELDS, formId: "train" }),
    schemaForm("DatasetConfig", {
      front: ["trigger_word", "resolution", "batch_size", "num_repeats", "enable_bucket"],
      skip: ["output_name"],
      formId: "dsconfig",
    }),
    api("/models", { signal }),
    api("/datasets", { signal }),
  ]);
  const list = h("datalist", { id: "model-files" }, models.models.map((m) => h("option", { value: m.path })));
  for (const name of MODEL_FIELDS) train.fields.get(name)?.input.setAttribute("list", "model-files");
  const datasetNames = h("datalist", { id: "dataset-names" }, datasets.datasets.map((d) => h("option", { value: d.name })));
  train.fields.get("dataset").input.setAttribute("list", "dataset-names");
  const chosen = params.get("dataset");
  if (chosen) {
    train.fields.get("dataset").write(chosen);
    train.fields.get("output_name").write(chosen);
  }

  const writeConfig = h("input", { id: "write-config", type: "checkbox", checked: true });
  const configBox = h("fieldset", { class: "card", id: "config-fields" }, [
    h("legend", {}, "Dataset config"),
    h("div", { class: "field field-check" }, [
      h("label", { for: "write-config" }, "Write the dataset's config with these values before training"),
      writeConfig,
    ]),
    ...config.elements,
  ]);
  writeConfig.addEventListener("change", () => configBox.classList.toggle("off", !writeConfig.checked));

  const presetLine = h("p", { class: "muted", "aria-live": "polite", id: "preset-line" });
  const presets = h("div", { class: "presets", role: "group", "aria-label": "Memory presets" },
    Object.entries(MEMORY_PRESETS).map(([label, preset]) => {
      const button = h("button", { type: "button", class: "small", "data-preset": label }, label);
      button.addEventListener("click", () => {
        for (const [key, value] of Object.entries(preset.train)) train.fields.get(key)?.write(value);
        for (const [key, value] of Object.entries(preset.config)) config.fields.get(key)?.write(value);
        const all = { ...preset.train, ...preset.config };
        presetLine.textContent = `${label}: ${Object.entries(all).map(([k, v]) => `${k} ${v}`).join(", ")}`;
      });
      return button;
    }),
  );

  const error = h("p", { class: "error", role: "alert", id: "train-error" });
  const submit = h("button", { type: "submit", class: "primary" }, "Start training");
  const form = h("form", { novalidate: true, id: "train-form" }, [
    h("section", { class: "card" }, [h("h2", {}, "Memory preset"), presets, presetLine]),
    h("section", { class: "card" }, [h("h2", {}, "Training"), ...train.elements]),
    configBox,
    list,
    datasetNames,
    h("div", { class: "actions" }, [submit]),
    error,
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    train.clearErrors();
    config.clearErrors();
    error.textContent = "";
    submit.disabled = true;
    const body = train.values();
    const dataset = body.dataset ?? body.output_name;
    try {
      if (writeConfig.checked) {
        try {
          await api("/create-dataset-config", { method: "POST", json: { ...config.values(), output_name: dataset } });
        } catch (err) {
          if (!(err instanceof ApiError)) throw err;
          const rest = config.showErrors(err.detail);
          error.textContent = rest.length
            ? `Dataset config: ${rest.join("; ")}`
            : "The dataset config needs fixing: see the messages beside its fields.";
          return;
        }
      }
      const answer = await api("/train", { method: "POST", json: body });
      location.hash = `#/runs/${quote(answer.run_id)}`;
    } catch (err) {
      error.textContent = (err instanceof ApiError ? train.showErrors(err.detail) : [err.message]).join("; ");
      if (!error.textContent) error.textContent = "Some fields need fixing: see the messages beside them.";
    } finally {
      submit.disabled = false;
    }
  });
  page.append(h("h1", {}, "Train a LoRA"), form);
}
