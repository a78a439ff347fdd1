// medagent web UI: chat (threads over SSE), a stored summary named in the URL, and the audit viewer,
// as one ES module.
//
// Where it sits: served by agent/service/routes_ui.py; talks only to the service's own API with the
// user's API key (kept in sessionStorage). Clinical text is data: every value reaches the page
// through textContent or attributes, never through an HTML parser.

const KEY_STORAGE = "medagent.apiKey";
const THUMB_SIZE = 256;
const TOP_LABELS = 3;
const CITATION = /\[([A-Z][A-Za-z]{1,63})\/([A-Za-z0-9\-.]{1,64})\]/g;
// The service's summary job ids (the same pattern its route enforces).
const JOB_ID = /^[0-9a-fA-F-]{36}$/;
const SUMMARY_POLL_MS = 2000;

const state = {
  patient: null, // {id, name, birth_date}
  threadId: null,
  threadPatient: null,
  runId: null, // the run whose answer is shown
  streaming: false,
  auditRunId: null,
};

// The summary named by ?summary=: polled while its job is queued or running and the chat view is shown.
const summary = {
  jobId: null, // null: the URL names none
  timer: null,
  generation: 0, // bumped on every stop, so a reply that arrives after leaving the view is dropped
  settled: false, // done, dead, or an error: no more polling until "Try again"
};

// -- small DOM helpers ----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "testid") node.dataset.testid = value;
    else if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  node.replaceChildren();
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// -- API ------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem.detail || problem.title || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.code = problem.code || "http_error";
    this.runId = problem.run_id || null;
  }

  describe() {
    const run = this.runId ? ` (run ${this.runId})` : "";
    return `${this.message} [${this.code}, HTTP ${this.status}]${run}`;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const key = apiKey();
  if (key) out["X-API-Key"] = key;
  return out;
}

async function problemOf(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    problem = { detail: response.statusText };
  }
  return new ApiError(response.status, problem);
}

async function api(path, { method = "GET", body, accept } = {}) {
  const init = { method, headers: headers(accept ? { Accept: accept } : {}) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await problemOf(response);
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function reportError(error) {
  showError(error instanceof ApiError ? error.describe() : `Error: ${error.message || error}`);
}

// Read a text/event-stream from a POST (EventSource can only GET): yields {event, data} until [DONE].
async function* readSse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (!data.length) continue;
      const payload = data.join("\n");
      if (payload === "[DONE]") return;
      yield { event, data: JSON.parse(payload) };
    }
  }
}

// Fetch an image with the API key and return it as a data: URL (the CSP allows data:, not blob:).
async function imageDataUrl(path) {
  const blob = await (await api(path, { accept: "image/png" })).blob();
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// -- header: key, service info, disclaimer --------------------------------------------------------

async function loadInfo() {
  try {
    const info = await apiJson("/v1/info");
    $("disclaimer").textContent = info.disclaimer;
    $("summary-disclaimer").textContent = info.disclaimer;
    const models = Object.entries(info.models)
      .map(([role, id]) => `${role}: ${id}`)
      .join(" · ");
    const test = info.test_models ? " · TEST MODELS (random weights)" : "";
    $("service-info").textContent = `medagent ${info.version} (${info.environment}) · ${models}${test}`;
  } catch (error) {
    $("service-info").textContent = "service info unavailable";
    reportError(error);
  }
}

function setupKey() {
  const input = $("api-key");
  input.value = apiKey();
  input.addEventListener("input", () => {
    const value = input.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
}

// -- chat: patient ------------------------------------------------------------------------------

function selectPatient(patient) {
  state.patient = patient;
  state.threadId = null; // a thread is about one patient: a new patient opens a new thread
  const born = patient.birth_date ? `, born ${patient.birth_date}` : "";
  $("current-patient").textContent = `Patient: ${patient.name || "(name unknown)"}${born} · id ${patient.id}`;
  $("current-patient").dataset.patientId = patient.id;
  $("ask-button").disabled = state.streaming;
  clear($("patient-results"));
}

function renderCandidates(list, candidates, onPick) {
  clear(list);
  if (!candidates.length) {
    list.append(el("li", { text: "No patient found.", testid: "patient-none" }));
    return;
  }
  for (const candidate of candidates) {
    const born = candidate.birth_date ? ` · born ${candidate.birth_date}` : "";
    const gender = candidate.gender ? ` · ${candidate.gender}` : "";
    list.append(
      el(
        "li",
        {},
        el("button", {
          type: "button",
          className: "link-button",
          testid: "patient-option",
          dataset: { patientId: candidate.id },
          text: `${candidate.name || "(no name)"}${born}${gender} · id ${candidate.id}`,
          onclick: () => onPick(candidate),
        }),
      ),
    );
  }
}

// A search goes in a POST body, so names, birth dates and MRNs stay out of URLs and access logs.
async function searchPatients(search) {
  clearError();
  try {
    const candidates = search
      ? await apiJson("/v1/patients/_search", { method: "POST", body: search })
      : await apiJson("/v1/patients");
    renderCandidates($("patient-results"), candidates, selectPatient);
  } catch (error) {
    reportError(error);
  }
}

function setupPatientPicker() {
  $("patient-search").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const value = (name) => String(form.get(name) || "").trim();
    const [identifier, name, birthdate] = [value("identifier"), value("name"), value("birthdate")];
    if (identifier && !name && !birthdate) searchPatients({ identifier });
    else if (!identifier && name && birthdate) searchPatients({ name, birthdate });
    else showError("Enter an identifier, or a name and a birth date (or list patients).");
  });
  $("patient-list-button").addEventListener("click", () => searchPatients(null));
  const fromUrl = new URLSearchParams(location.search).get("patient");
  if (fromUrl) selectPatient({ id: fromUrl });
}

// -- chat: asking and streaming -----------------------------------------------------------------

function resetAnswer() {
  clearError();
  clear($("progress"));
  clear($("answer"));
  $("answer").classList.remove("streaming");
  $("run-status").textContent = "";
  for (const box of ["citations-box", "warnings-box", "images-box", "similar-box"]) $(box).hidden = true;
  for (const list of ["citations", "warnings", "thumbnails", "similar-cases"]) clear($(list));
  $("run-models").textContent = "";
  $("open-audit").hidden = true;
  $("interrupt").hidden = true;
  clear($("interrupt"));
  closeResource();
}

async function ensureThread() {
  if (state.threadId && state.threadPatient === state.patient.id) return state.threadId;
  const thread = await apiJson("/v1/threads", { method: "POST", body: { patient_id: state.patient.id } });
  state.threadId = thread.thread_id;
  state.threadPatient = state.patient.id;
  return state.threadId;
}

async function postMessage(body) {
  const threadId = await ensureThread();
  try {
    return await api(`/v1/threads/${encodeURIComponent(threadId)}/messages`, {
      method: "POST",
      body,
      accept: "text/event-stream",
    });
  } catch (error) {
    // The thread may be gone (another database, another user): open a fresh one once.
    if (error instanceof ApiError && error.code === "thread_not_found" && body.question) {
      state.threadId = null;
      const fresh = await ensureThread();
      return api(`/v1/threads/${encodeURIComponent(fresh)}/messages`, {
        method: "POST",
        body,
        accept: "text/event-stream",
      });
    }
    throw error;
  }
}

function setStreaming(on) {
  state.streaming = on;
  $("ask-button").disabled = on || !state.patient;
  $("ask-button").textContent = on ? "Answering…" : "Ask";
}

async function send(body) {
  clearError();
  setStreaming(true);
  try {
    const response = await postMessage(body);
    for await (const { event, data } of readSse(response)) handleEvent(event, data);
  } catch (error) {
    reportError(error);
  } finally {
    setStreaming(false);
    $("answer").classList.remove("streaming");
  }
}

function progressStep(node, status) {
  const list = $("progress");
  let item = list.querySelector(`li[data-node="${CSS.escape(node)}"]`);
  if (!item) {
    item = el("li", { testid: "progress-step", dataset: { node } }, el("span", { className: "node", text: node }), " ");
    item.append(el("span", { className: "status" }));
    list.append(item);
  }
  item.dataset.status = status || "";
  item.querySelector(".status").textContent = status || "";
}

function handleEvent(type, event) {
  switch (type) {
    case "progress":
      progressStep(event.node || "?", event.status);
      break;
    case "token":
      $("answer").classList.add("streaming");
      $("answer").append(document.createTextNode(event.text || ""));
      break;
    case "citation":
    case "finding":
      break; // the final result carries every citation and finding, rendered together
    case "interrupt":
      renderInterrupt(event.data || {});
      break;
    case "final":
      renderFinal(event.data || {});
      break;
    case "error": {
      const data = event.data || {};
      const run = data.details && data.details.run_id ? ` (run ${data.details.run_id})` : "";
      showError(`${data.message || "the run failed"} [${data.code || "error"}]${run}`);
      if (data.details && data.details.run_id) showAuditLink(data.details.run_id);
      break;
    }
    default:
      break;
  }
}

function renderInterrupt(data) {
  const box = clear($("interrupt"));
  box.hidden = false;
  box.dataset.kind = data.kind || "";
  box.append(el("p", { className: "question", text: data.question || "The run needs an answer to go on." }));
  if (data.kind === "ambiguous_patient") {
    const list = el("ul", { className: "patient-results" });
    renderCandidates(list, data.candidates || [], (candidate) => {
      box.hidden = true;
      selectPatientInThread(candidate);
      send({ resume: { patient_id: candidate.id } });
    });
    box.append(list);
  } else if (data.kind === "restricted_types") {
    const purpose = el("input", { testid: "interrupt-purpose", placeholder: "Purpose of use (required to read)" });
    const confirm = el("button", {
      type: "button",
      testid: "interrupt-confirm",
      text: "Read them",
      onclick: () => {
        if (!purpose.value.trim()) {
          showError("Give a purpose of use to read restricted records.");
          return;
        }
        box.hidden = true;
        send({ resume: { confirm: true, purpose: purpose.value.trim() } });
      },
    });
    const decline = el("button", {
      type: "button",
      testid: "interrupt-decline",
      text: "Answer without them",
      onclick: () => {
        box.hidden = true;
        send({ resume: { confirm: false } });
      },
    });
    box.append(el("p", { text: `Restricted: ${(data.types || []).join(", ")}` }), purpose, " ", confirm, " ", decline);
  }
  if (data.run_id) showAuditLink(data.run_id);
}

function selectPatientInThread(candidate) {
  // The thread keeps its id (the resume answers its question); only the label changes.
  state.patient = { ...candidate };
  state.threadPatient = candidate.id;
  const born = candidate.birth_date ? `, born ${candidate.birth_date}` : "";
  $("current-patient").textContent = `Patient: ${candidate.name || "(no name)"}${born} · id ${candidate.id}`;
  $("current-patient").dataset.patientId = candidate.id;
}

function showAuditLink(runId) {
  const link = $("open-audit");
  link.href = `#/audit/${encodeURIComponent(runId)}`;
  link.hidden = false;
}

// Render a run's text (a chat answer, a stored summary) with each valid [Type/id] as a link to the
// resource the run read.
function renderCitedText(target, runId, text, citations) {
  clear(target);
  const valid = new Set((citations || []).filter((c) => c.valid).map((c) => c.reference));
  let last = 0;
  for (const match of text.matchAll(CITATION)) {
    target.append(document.createTextNode(text.slice(last, match.index)));
    const reference = `${match[1]}/${match[2]}`;
    target.append(valid.has(reference) ? citationLink(runId, reference) : match[0]);
    last = match.index + match[0].length;
  }
  target.append(document.createTextNode(text.slice(last)));
}

function citationLink(runId, reference) {
  if (reference.startsWith("DicomStudy/")) {
    return el("span", { className: "citation non-fhir", text: `[${reference}]`, title: "an archive study" });
  }
  return el("a", {
    href: "#",
    className: "citation",
    testid: "citation-link",
    dataset: { reference },
    text: `[${reference}]`,
    title: "Open the cited resource",
    onclick: (event) => {
      event.preventDefault();
      openResource(runId, reference);
    },
  });
}

// List every citation of a run's text: valid ones as links, dangling ones struck out. Shows `box` if any.
function renderCitationList(list, box, runId, citations) {
  clear(list);
  for (const citation of citations || []) {
    const item = el("li", { testid: "citation", dataset: { reference: citation.reference, valid: citation.valid } });
    if (citation.valid) {
      item.append(citationLink(runId, citation.reference));
    } else {
      item.append(
        el("s", { testid: "citation-dangling", className: "dangling", text: `[${citation.reference}]` }),
        el("span", { className: "hint", text: " not among the records this run read: removed from the answer" }),
      );
    }
    list.append(item);
  }
  box.hidden = !list.children.length;
}

function describeModels(models) {
  const named = Object.entries(models || {}).map(([role, id]) => `${role} ${id}`);
  return named.length ? named.join(", ") : "unknown models";
}

// One figure per image (findings come per image and per finding source), top labels of each source.
function renderImages(result) {
  const byImage = new Map();
  for (const finding of result.findings || []) {
    const image = finding.image || {};
    if (!image.sop_instance_uid) continue;
    if (!byImage.has(image.sop_instance_uid)) byImage.set(image.sop_instance_uid, { image, findings: [] });
    byImage.get(image.sop_instance_uid).findings.push(finding);
  }
  const box = $("thumbnails");
  for (const [uid, { image, findings }] of byImage) {
    const picture = el("img", {
      alt: `${image.modality || ""} ${image.view_position || ""} image`.trim(),
      width: THUMB_SIZE,
      height: THUMB_SIZE,
      testid: "thumbnail-img",
    });
    const caption = el("figcaption", {
      text: [image.modality, image.view_position, image.series_description].filter(Boolean).join(" · "),
    });
    for (const finding of findings) {
      const top = [...(finding.scores || [])].sort((a, b) => b.score - a.score).slice(0, TOP_LABELS);
      const source = finding.label_set ? `${finding.source} (${finding.label_set})` : finding.source;
      const list = el("ul", { className: "labels" });
      for (const score of top) {
        list.append(
          el("li", {
            testid: "finding-label",
            text: `${score.label}: ${Number(score.score).toFixed(2)}`,
            dataset: { label: score.label },
          }),
        );
      }
      caption.append(el("div", { className: "finding-source", text: `${source} · ${finding.model_id}` }), list);
    }
    box.append(el("figure", { testid: "thumbnail", dataset: { sopInstanceUid: uid } }, picture, caption));
    const path = `/v1/runs/${encodeURIComponent(result.run_id)}/images/${encodeURIComponent(uid)}.png?size=${THUMB_SIZE}`;
    imageDataUrl(path)
      .then((url) => {
        picture.src = url;
        picture.dataset.loaded = "true";
      })
      .catch((error) => {
        picture.alt = `image unavailable: ${error.message}`;
        picture.dataset.loaded = "false";
      });
  }
  $("images-box").hidden = !byImage.size;
}

function renderSimilar(result) {
  const list = $("similar-cases");
  for (const found of result.similar_cases || []) {
    const parts = [`[${found.citation}]`, found.modality, `similarity ${Number(found.score).toFixed(3)}`];
    const item = el("li", { testid: "similar-case", text: parts.filter(Boolean).join(" · ") });
    if (found.label) item.append(el("span", { className: "hint", text: ` · index label: ${found.label}` }));
    list.append(item);
  }
  $("similar-box").hidden = !list.children.length;
}

function renderFinal(result) {
  state.runId = result.run_id;
  $("answer").classList.remove("streaming");
  renderCitedText($("answer"), result.run_id, result.answer || "", result.citations);
  renderCitationList($("citations"), $("citations-box"), result.run_id, result.citations);
  const warnings = $("warnings");
  for (const warning of result.warnings || []) warnings.append(el("li", { text: warning }));
  $("warnings-box").hidden = !warnings.children.length;
  renderImages(result);
  renderSimilar(result);
  const run = $("run-models");
  run.textContent = `Answered by ${describeModels(result.models)} · run ${result.run_id}`;
  if (result.test_models) run.append(" ", el("strong", { className: "badge warn", text: "TEST MODELS: not a real answer" }));
  $("run-status").textContent = `Run status: ${result.status}`;
  $("run-status").dataset.status = result.status;
  showAuditLink(result.run_id);
}

async function openResource(runId, reference) {
  clearError();
  const panel = $("resource-panel");
  $("resource-title").textContent = reference;
  $("resource-json").textContent = "loading…";
  panel.hidden = false;
  try {
    const resource = await apiJson(`/v1/runs/${encodeURIComponent(runId)}/sources/${reference}`, {
      accept: "application/fhir+json",
    });
    $("resource-json").textContent = JSON.stringify(resource, null, 2);
  } catch (error) {
    $("resource-json").textContent = "";
    reportError(error);
  }
}

function closeResource() {
  $("resource-panel").hidden = true;
  $("resource-json").textContent = "";
}

function setupAsk() {
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!state.patient) {
      showError("Pick a patient first.");
      return;
    }
    if (!question || state.streaming) return;
    resetAnswer();
    send({ question });
  });
  $("resource-close").addEventListener("click", closeResource);
}

// -- chat: a stored summary named in the URL ----------------------------------------------------

function setupSummary() {
  const jobId = new URLSearchParams(location.search).get("summary");
  if (jobId === null) return;
  summary.jobId = jobId.trim();
  $("summary-panel").hidden = false;
  $("summary-retry").addEventListener("click", () => {
    summary.settled = false;
    loadSummary();
  });
  // Leaving the page stops the polling; coming back to it from the browser's history resumes it.
  window.addEventListener("pagehide", stopSummaryPolling);
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) resumeSummary();
  });
}

function stopSummaryPolling() {
  clearTimeout(summary.timer);
  summary.timer = null;
  summary.generation += 1;
}

// Load the summary unless it has settled; called whenever the chat view is shown.
function resumeSummary() {
  if (summary.jobId === null || summary.settled || summary.timer !== null) return;
  loadSummary();
}

async function loadSummary() {
  stopSummaryPolling();
  const generation = summary.generation;
  if (!JOB_ID.test(summary.jobId)) {
    summary.settled = true;
    showSummaryState("invalid", "This link does not name a summary (its summary id is malformed).");
    return;
  }
  let job;
  try {
    job = await apiJson(`/v1/summaries/${encodeURIComponent(summary.jobId)}`);
  } catch (error) {
    if (generation === summary.generation) showSummaryError(error);
    return;
  }
  if (generation !== summary.generation) return; // the view was left (or reloaded) meanwhile
  renderSummaryJob(job);
  if (job.status === "queued" || job.status === "running") {
    summary.timer = setTimeout(() => {
      summary.timer = null;
      loadSummary();
    }, SUMMARY_POLL_MS);
  } else {
    summary.settled = true;
  }
}

// Empty the panel and show one state: its name (data-state) and a status line.
function showSummaryState(state, message, { retry = false } = {}) {
  const panel = $("summary-panel");
  panel.dataset.state = state;
  $("summary-status").textContent = message;
  clear($("summary-text"));
  clear($("summary-citations"));
  $("summary-citations-box").hidden = true;
  clear($("summary-warnings"));
  $("summary-warnings").hidden = true;
  $("summary-models").textContent = "";
  $("summary-disclaimer").hidden = true;
  $("summary-retry").hidden = !retry;
}

function showSummaryError(error) {
  summary.settled = true;
  if (!(error instanceof ApiError)) {
    showSummaryState("error", `The summary could not be loaded: ${error.message || error}`, { retry: true });
  } else if (error.status === 404) {
    showSummaryState("not-found", `No such summary: the service has no summary with id ${summary.jobId}.`);
  } else if (error.status === 403) {
    showSummaryState("forbidden", `You may not read this summary: ${error.message}.`, { retry: true });
  } else if (error.status === 401) {
    showSummaryState("unauthenticated", `Enter your API key above, then try again (${error.message}).`, {
      retry: true,
    });
  } else {
    showSummaryState("error", `The summary could not be loaded: ${error.describe()}`, { retry: true });
  }
}

function renderSummaryJob(job) {
  const panel = $("summary-panel");
  panel.dataset.jobId = job.id;
  panel.dataset.patientId = job.patient_id;
  $("summary-title").textContent = `Summary · patient ${job.patient_id}`;
  // A card link names its patient; a bare summary link still opens the chat on the summary's patient.
  if (!state.patient) selectPatient({ id: job.patient_id });
  else if (state.patient.id !== job.patient_id) {
    $("summary-title").append(" ", el("strong", { className: "badge warn", text: "not the selected patient" }));
  }
  const requested = `requested ${localTime(job.created_at)}${job.requested_by ? ` by ${job.requested_by}` : ""}`;
  if (job.status === "queued" || job.status === "running") {
    const attempt = job.attempts > 1 ? `, attempt ${job.attempts} of ${job.max_attempts}` : "";
    const failed = job.error_code ? ` · the last attempt failed (${job.error_code}) and will be retried` : "";
    showSummaryState(job.status, `Being prepared (${job.status}${attempt}) · ${requested}${failed}. Checking every 2 s…`);
    return;
  }
  if (job.status === "dead") {
    const attempts = `after ${job.attempts} attempt(s)`;
    showSummaryState(
      "dead",
      `This summary could not be written ${attempts}: ${job.error_message || "no reason recorded"} ` +
        `[${job.error_code || "error"}] · ${requested}${job.run_id ? ` · run ${job.run_id}` : ""}`,
    );
    return;
  }
  if (job.status !== "done") {
    showSummaryState("error", `The summary is in an unknown state: ${job.status}`, { retry: true });
    return;
  }
  showSummaryState("done", `Written ${localTime(job.finished_at || job.created_at)} · ${requested}`);
  if (job.summary_readable === false) {
    $("summary-text").textContent = "The summary is stored encrypted and this server holds no key to read it.";
  } else {
    renderCitedText($("summary-text"), job.run_id, job.summary || "", job.citations);
    renderCitationList($("summary-citations"), $("summary-citations-box"), job.run_id, job.citations);
  }
  // what the run could not read (a study, a record type): the reader must know the summary is partial
  for (const warning of job.warnings || []) $("summary-warnings").append(el("li", { text: warning }));
  $("summary-warnings").hidden = !$("summary-warnings").children.length;
  const written = job.write_back_ref ? ` · saved to the record as ${job.write_back_ref}` : "";
  $("summary-models").textContent = `Written by ${describeModels(job.models)} · run ${job.run_id}${written}`;
  $("summary-disclaimer").textContent = $("disclaimer").textContent;
  $("summary-disclaimer").hidden = false;
}

// -- audit viewer ---------------------------------------------------------------------------------

function localTime(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleString();
}

function filterParams() {
  const form = new FormData($("run-filters"));
  const params = new URLSearchParams();
  for (const name of ["patient", "user", "status", "trigger"]) {
    const value = String(form.get(name) || "").trim();
    if (value) params.set(name, value);
  }
  for (const name of ["since", "until"]) {
    const value = String(form.get(name) || "");
    if (value) params.set(name, new Date(value).toISOString()); // the input is local time
  }
  return params;
}

async function loadRuns() {
  clearError();
  const body = clear($("run-rows"));
  try {
    const query = filterParams().toString();
    const runs = await apiJson(`/v1/runs${query ? `?${query}` : ""}`);
    if (!runs.length) body.append(el("tr", {}, el("td", { colspan: 7, text: "No runs match." })));
    for (const run of runs) {
      const row = el(
        "tr",
        {
          testid: "run-row",
          className: "clickable",
          dataset: { runId: run.run_id, status: run.status, kind: run.kind },
          tabindex: 0,
          onclick: () => {
            location.hash = `#/audit/${encodeURIComponent(run.run_id)}`;
          },
        },
        el("td", { text: localTime(run.created_at) }),
        el("td", {}, el("span", { className: `badge status-${run.status}`, text: run.status })),
        el("td", { text: run.kind }),
        el("td", { text: run.trigger }),
        el("td", { text: run.patient_ref || "-" }),
        el("td", { text: run.user_id ? `${run.user_id} (${run.user_role || "?"})` : "-" }),
        el("td", { text: run.events }),
      );
      row.addEventListener("keydown", (event) => {
        if (event.key === "Enter") row.click();
      });
      body.append(row);
    }
  } catch (error) {
    reportError(error);
  }
}

const KIND_LABELS = {
  run_started: "run started",
  run_finished: "run finished",
  node_started: "step",
  node_finished: "step done",
  fhir_request: "FHIR",
  dicom_retrieval: "DICOM",
  index_search: "index",
  model_call: "model",
  model_load: "model load",
  note: "note",
};

function eventDetail(event) {
  const meta = event.meta || {};
  switch (event.kind) {
    case "fhir_request": {
      const ids = meta.resource_ids || [];
      return `${meta.backend || ""} HTTP ${meta.status ?? "-"} · ${ids.length} resource(s)${meta.error ? ` · ${meta.error}` : ""}`;
    }
    case "dicom_retrieval":
      return [meta.backend, meta.action, meta.sop_instance_uid || meta.series_uid, meta.bytes ? `${meta.bytes} bytes` : null]
        .filter(Boolean)
        .join(" · ");
    case "model_call":
    case "model_load": {
      const tokens =
        meta.prompt_tokens !== undefined ? ` · ${meta.prompt_tokens} prompt / ${meta.output_tokens ?? "?"} output tokens` : "";
      const revision = meta.revision ? ` @ ${meta.revision}` : "";
      return `${meta.model_id || "?"}${revision}${tokens}`;
    }
    case "node_finished":
      return meta.error ? `${meta.error.code}: ${meta.error.message}` : "";
    case "run_finished":
      return meta.error ? `${meta.error.code}: ${meta.error.message}` : meta.reason || "";
    case "run_started": {
      const run = meta.run || {};
      return `${run.kind || ""} · trigger ${run.trigger || "?"} · user ${run.user_id || "-"} · purpose ${run.purpose_of_use || "-"}`;
    }
    default:
      return "";
  }
}

async function loadRun(runId) {
  clearError();
  state.auditRunId = runId;
  const detail = $("run-detail");
  detail.hidden = false;
  $("run-title").textContent = `Run ${runId}`;
  $("verify-result").textContent = "";
  delete $("verify-result").dataset.ok;
  clear($("verify-problems"));
  const timeline = clear($("timeline"));
  try {
    const trace = await apiJson(`/v1/runs/${encodeURIComponent(runId)}`);
    const run = trace.run;
    $("run-meta").textContent =
      `${run.kind} · ${run.status} · trigger ${run.trigger} · patient ${run.patient_ref || "-"} · user ` +
      `${run.user_id || "-"} (${run.user_role || "-"}, purpose ${run.purpose_of_use || "-"}) · ` +
      `medagent ${trace.software_version} · settings ${trace.settings_fingerprint.slice(0, 12)}`;
    const counts = {};
    for (const event of trace.events) {
      counts[event.kind] = (counts[event.kind] || 0) + 1;
      const duration = event.duration_ms !== null && event.duration_ms !== undefined ? `${event.duration_ms.toFixed(1)} ms` : "";
      timeline.append(
        el(
          "li",
          { testid: "timeline-event", className: `kind-${event.kind}`, dataset: { kind: event.kind, status: event.status || "" } },
          el("span", { className: "seq", text: `#${event.seq}` }),
          el("span", { className: "at", text: new Date(event.at).toLocaleTimeString() }),
          el("span", { className: "badge kind", text: KIND_LABELS[event.kind] || event.kind }),
          el("span", { className: "name", text: event.name }),
          el("span", event.status ? { className: `badge status-${event.status}`, text: event.status } : {}),
          el("span", { className: "duration", text: duration }),
          el("span", { className: "detail", text: eventDetail(event) }),
        ),
      );
    }
    const steps = counts.node_finished || 0;
    $("timeline-summary").textContent =
      `${steps} step(s) · ${counts.fhir_request || 0} FHIR request(s) · ${counts.dicom_retrieval || 0} DICOM ` +
      `access(es) · ${counts.model_call || 0} model call(s) · ${trace.events.length} record(s)`;
    $("timeline-summary").dataset.fhir = counts.fhir_request || 0;
    $("timeline-summary").dataset.models = counts.model_call || 0;
  } catch (error) {
    reportError(error);
  }
}

async function verifyRun() {
  const runId = state.auditRunId;
  if (!runId) return;
  const result = $("verify-result");
  result.textContent = "verifying…";
  clear($("verify-problems"));
  try {
    const report = await apiJson(`/v1/runs/${encodeURIComponent(runId)}/verify`);
    result.dataset.ok = String(report.ok);
    result.textContent = report.ok
      ? `intact: ${report.records} record(s) and ${report.checkpoints} checkpoint(s) verified`
      : `NOT intact: ${report.problems.length} problem(s)`;
    for (const problem of report.problems || []) {
      $("verify-problems").append(el("li", { text: `${problem.code} at ${problem.where}: ${problem.message}` }));
    }
    for (const warning of report.warnings || []) $("verify-problems").append(el("li", { className: "hint", text: warning }));
  } catch (error) {
    result.textContent = "";
    reportError(error);
  }
}

function setupAudit() {
  $("run-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadRuns();
  });
  $("verify-button").addEventListener("click", verifyRun);
}

// -- routing ------------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/chat";
  const audit = hash.startsWith("#/audit");
  $("chat-view").hidden = audit;
  $("audit-view").hidden = !audit;
  $("nav-chat").classList.toggle("active", !audit);
  $("nav-audit").classList.toggle("active", audit);
  if (audit) stopSummaryPolling();
  else resumeSummary();
  if (audit) {
    const runId = decodeURIComponent(hash.slice("#/audit/".length));
    loadRuns();
    if (hash.startsWith("#/audit/") && runId) loadRun(runId);
    else $("run-detail").hidden = true;
  }
}

function start() {
  setupKey();
  setupPatientPicker();
  setupSummary();
  setupAsk();
  setupAudit();
  window.addEventListener("hashchange", route);
  route();
  loadInfo();
  document.body.dataset.ready = "true";
}

start();
