// Form fields generated from the API's own OpenAPI schema, so bounds and defaults are defined once.

import { api } from "./api.js";
import { h } from "./dom.js";

let openapi = null;

/** The named request schema from /openapi.json (read once per page load). */
export async function requestSchema(name) {
  openapi ??= api("/openapi.json");
  const schema = (await openapi).components.schemas[name];
  if (!schema) throw new Error(`the API has no schema ${name}`);
  return schema;
}

function plain(property) {
  const options = property.anyOf ?? [property];
  const concrete = options.filter((option) => option.type !== "null");
  const nullable = options.length > concrete.length;
  const numeric = (option) => option.type === "number" || option.type === "integer";
  if (concrete.length > 1 && concrete.every(numeric)) {
    // A union such as "a fraction or a count": one number input whose bounds admit every option.
    const lows = concrete.map((option) => option.minimum ?? option.exclusiveMinimum);
    const highs = concrete.map((option) => option.maximum ?? option.exclusiveMaximum);
    return {
      type: "number",
      minimum: lows.includes(undefined) ? undefined : Math.min(...lows),
      maximum: highs.includes(undefined) ? undefined : Math.max(...highs),
      nullable,
    };
  }
  return { ...(concrete[0] ?? {}), nullable };
}

function humanName(name) {
  return name.replaceAll("_", " ");
}

/** One input for one schema property: read() gives its value, or undefined when left empty. */
function field(name, property, required, formId) {
  const type = plain(property);
  const id = `${formId}-${name}`;
  const help = property.description ?? type.description ?? "";
  const error = h("p", { class: "field-error", id: `${id}-error`, role: "alert" });
  const describedBy = `${id}-help ${id}-error`;
  const hasDefault = "default" in property && property.default !== null;
  let input;
  let read;
  let write;
  if (type.enum) {
    input = h("select", { id, name, "aria-describedby": describedBy });
    if (!hasDefault) input.append(h("option", { value: "" }, "(default)"));
    for (const option of type.enum) input.append(h("option", { value: option }, option));
    read = () => (input.value === "" ? undefined : input.value);
    write = (value) => (input.value = value ?? "");
  } else if (type.type === "boolean" && !type.nullable) {
    input = h("input", { id, name, type: "checkbox", "aria-describedby": describedBy });
    read = () => input.checked;
    write = (value) => (input.checked = Boolean(value));
  } else if (type.type === "boolean") {
    input = h("select", { id, name, "aria-describedby": describedBy }, [
      h("option", { value: "" }, "(default)"),
      h("option", { value: "true" }, "on"),
      h("option", { value: "false" }, "off"),
    ]);
    read = () => (input.value === "" ? undefined : input.value === "true");
    write = (value) => (input.value = value === undefined || value === null ? "" : String(value));
  } else if (type.type === "integer" || type.type === "number") {
    input = h("input", {
      id,
      name,
      type: "number",
      inputmode: type.type === "integer" ? "numeric" : "decimal",
      step: type.type === "integer" ? "1" : "any",
      "aria-describedby": describedBy,
    });
    const low = type.minimum ?? type.exclusiveMinimum;
    const high = type.maximum ?? type.exclusiveMaximum;
    if (low !== undefined) input.min = String(low);
    if (high !== undefined) input.max = String(high);
    if (!hasDefault) input.placeholder = "(default)";
    read = () => (input.value.trim() === "" ? undefined : Number(input.value));
    write = (value) => (input.value = value === undefined || value === null ? "" : String(value));
  } else if (type.type === "array") {
    input = h("textarea", { id, name, rows: "3", placeholder: "one a line", "aria-describedby": describedBy });
    read = () => {
      const lines = input.value.split("\n").map((line) => line.trim()).filter(Boolean);
      return lines.length ? lines : undefined;
    };
    write = (value) => (input.value = (value ?? []).join("\n"));
  } else {
    input = h("input", { id, name, type: "text", autocomplete: "off", "aria-describedby": describedBy });
    if (type.maxLength) input.maxLength = type.maxLength;
    read = () => (input.value.trim() === "" ? undefined : input.value.trim());
    write = (value) => (input.value = value ?? "");
  }
  if (hasDefault) write(property.default);
  const bounds = [];
  if (type.minimum !== undefined) bounds.push(`≥ ${type.minimum}`);
  if (type.exclusiveMinimum !== undefined) bounds.push(`> ${type.exclusiveMinimum}`);
  if (type.maximum !== undefined) bounds.push(`≤ ${type.maximum}`);
  if (type.exclusiveMaximum !== undefined) bounds.push(`< ${type.exclusiveMaximum}`);
  const note = [help, bounds.join(", ")].filter(Boolean).join(" ");
  const labelText = humanName(name) + (required ? " *" : "");
  const wrapper = h("div", { class: `field field-${input.type === "checkbox" ? "check" : "text"}` }, [
    h("label", { for: id }, labelText),
    input,
    h("p", { class: "field-help", id: `${id}-help` }, note),
    error,
  ]);
  return {
    name,
    input,
    element: wrapper,
    read,
    write,
    setError(message) {
      error.textContent = message ?? "";
      input.setAttribute("aria-invalid", message ? "true" : "false");
    },
  };
}

/**
 * Build fields for `schemaName`'s properties: `front` names go first, the rest under "advanced".
 * `skip` names are left out (the caller fills them in).
 */
export async function schemaForm(schemaName, { front = [], skip = [], formId }) {
  const schema = await requestSchema(schemaName);
  const required = new Set(schema.required ?? []);
  const fields = new Map();
  for (const [name, property] of Object.entries(schema.properties)) {
    if (!skip.includes(name)) fields.set(name, field(name, property, required.has(name), formId));
  }
  const frontFields = front.filter((name) => fields.has(name)).map((name) => fields.get(name));
  const rest = [...fields.values()].filter((f) => !front.includes(f.name));
  const main = h("div", { class: "fields" }, frontFields.map((f) => f.element));
  const advanced = h("details", { class: "advanced" }, [
    h("summary", {}, `Advanced (${rest.length} more)`),
    h("div", { class: "fields" }, rest.map((f) => f.element)),
  ]);
  return {
    fields,
    elements: [main, advanced],
    advanced,
    values() {
      const body = {};
      for (const f of fields.values()) {
        const value = f.read();
        if (value !== undefined) body[f.name] = value;
      }
      return body;
    },
    clearErrors() {
      for (const f of fields.values()) f.setError(null);
    },
    /** Put each 422 entry beside its field; what matches no field is returned for the form's own line. */
    showErrors(detail) {
      if (!Array.isArray(detail)) return [String(detail)];
      const unplaced = [];
      for (const entry of detail) {
        const target = fields.get(entry.loc?.[1]);
        const message = entry.msg?.replace(/^Value error, /, "") ?? String(entry);
        if (target) {
          target.setError(message);
          if (target.element.closest("details")) advanced.open = true;
        } else {
          unplaced.push(message);
        }
      }
      return unplaced;
    },
  };
}
