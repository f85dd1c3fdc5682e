// The HTTP API as the page uses it: bearer key from sessionStorage, errors as ApiError, SSE over fetch.

const KEY_ITEM = "fluxtrain.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `request failed (${status})`);
    this.status = status;
    this.detail = detail;
  }
}

let askForKey = null;

/** The page registers how to ask for a key; api() calls it on a 401 and retries once. */
export function onKeyNeeded(handler) {
  askForKey = handler;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function send(path, { method = "GET", json, body, signal, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  return fetch(path, init);
}

/** fetch() with the key; a 401 asks for the key (saying the old one was refused) and tries again. */
export async function request(path, options = {}) {
  let response = await send(path, options);
  while (response.status === 401 && askForKey) {
    const refused = apiKey() !== null;
    await askForKey(refused ? "That API key was refused by the service. Enter the right one." : null);
    response = await send(path, options);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail ?? detail;
    } catch {
      // a body that is not JSON keeps the status text
    }
    throw new ApiError(response.status, detail);
  }
  return response;
}

export async function api(path, options = {}) {
  const response = await request(path, options);
  return response.json();
}

/** An object URL for an image or file the API serves, fetched with the key (never in the URL). */
export async function blobUrl(path, signal) {
  const response = await request(path, { signal });
  return URL.createObjectURL(await response.blob());
}

export function quote(name) {
  return encodeURIComponent(name);
}

/**
 * Follow a Server-Sent Events stream with fetch(), so the key goes in a header, not the URL.
 * A dropped connection is reopened with Last-Event-ID, so no event is lost or repeated.
 * Resolves when the stream ends after its `status` event, or when `signal` aborts.
 */
export async function followEvents(path, onEvent, { signal, retryMs = 1000 } = {}) {
  let lastId = null;
  for (;;) {
    let ended = false;
    try {
      const extraHeaders = lastId === null ? {} : { "Last-Event-ID": lastId };
      const response = await request(path, { signal, extraHeaders });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let event = { id: null, type: "message", data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
          if (line === "") {
            if (event.data.length) {
              if (event.id !== null) lastId = event.id;
              onEvent({ type: event.type, id: event.id, data: JSON.parse(event.data.join("\n")) });
              if (event.type === "status") ended = true;
            }
            event = { id: null, type: "message", data: [] };
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") event.data.push(text);
            else if (field === "id") event.id = text;
            else if (field === "event") event.type = text;
          }
        }
      }
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && error.status !== 503) throw error;
    }
    if (ended || signal?.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
}
