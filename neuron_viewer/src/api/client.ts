// Calls to the activation server. The base URL is the page's own origin unless set at runtime
// (`?api=http://host:port` once, remembered in localStorage): nothing is baked in at build time.
// A server started with an access token (--auth-token) gets it as `Authorization: Bearer` on
// every call: the page takes it once from `?access_token=...` (rememberToken), per server.
import type {
  AttentionHeadRecordRequest,
  AttentionHeadRecordResponse,
  BatchedRequest,
  BatchedResponse,
  BatchedTdbRequest,
  BatchedTdbResponse,
  DatasetsMetadataResponse,
  DerivedAttentionScalarsRequest,
  DerivedAttentionScalarsResponse,
  DerivedScalarsRequest,
  DerivedScalarsResponse,
  ErrorResponse,
  ExistingExplanationsResponse,
  ExplainResponse,
  ExplainRequest,
  HealthResponse,
  JobsResponse,
  ModelInfo,
  NeuronRecordRequest,
  NeuronRecordResponse,
  NodeTypesResponse,
  ScoreRequest,
  ScoreResponse,
  TokenizeResponse,
} from "./types";

const STORAGE_KEY = "tdb.apiBase";

export function apiBase(): string {
  const fromUrl = new URLSearchParams(window.location.search).get("api");
  if (fromUrl) {
    window.localStorage.setItem(STORAGE_KEY, fromUrl);
    return fromUrl.replace(/\/$/, "");
  }
  return (window.localStorage.getItem(STORAGE_KEY) ?? window.location.origin).replace(/\/$/, "");
}

const TOKEN_KEY = "tdb.token ";
// Not `token`: a component page's address already uses that for a token index.
export const TOKEN_PARAM = "access_token";

/** The URL's query without its access token parameter, and that token (null when absent). */
export function splitToken(search: string): { token: string | null; search: string } {
  const params = new URLSearchParams(search);
  const token = params.get(TOKEN_PARAM);
  params.delete(TOKEN_PARAM);
  const rest = params.toString();
  return { token: token || null, search: rest ? `?${rest}` : "" };
}

/** Takes `?access_token=...` from the page's address: remembered for the server the page talks
 * to, and removed from the address, so that it stays out of shared links and the history. */
export function rememberToken(): void {
  const { token, search } = splitToken(window.location.search);
  if (token == null) return;
  setApiToken(token);
  const { pathname, hash } = window.location;
  window.history.replaceState(window.history.state, "", pathname + search + hash);
}

/** The access token remembered for the server at `base`, or null. */
export function apiToken(base: string = apiBase()): string | null {
  return window.localStorage.getItem(TOKEN_KEY + base);
}

export function setApiToken(token: string, base: string = apiBase()): void {
  window.localStorage.setItem(TOKEN_KEY + base, token);
}

/** What a 401 means for the person at the page: the token is missing or not the server's. */
export function tokenMessage(hadToken: boolean): string {
  const how =
    "open this page once with ?access_token=YOUR_TOKEN added to its address (the token the " +
    "server was started with: --auth-token or TDB_AUTH_TOKEN)";
  return hadToken
    ? `The server refused this page's access token: ${how}.`
    : `This server requires an access token: ${how}.`;
}

/** An error answer from the server (or no answer), with the server's own message. */
export class ApiError extends Error {
  status: number;
  requestId: string | null;
  detail: unknown;
  /** The request field the error is about, as the server names it in `detail.field`
   * ("subRequests[1].nodeAblations[0].node.layerIndex"); for a schema violation, the first
   * violation's. Null when the server names none. */
  field: string | null;
  constructor(
    status: number,
    message: string,
    requestId: string | null = null,
    detail: unknown = null,
  ) {
    super(message);
    this.status = status;
    this.requestId = requestId;
    this.detail = detail;
    this.field = detailField(Array.isArray(detail) ? detail[0] : detail);
  }
}

function detailField(detail: unknown): string | null {
  if (detail == null || typeof detail !== "object") return null;
  const field = (detail as { field?: unknown }).field;
  return typeof field === "string" && field !== "" ? field : null;
}

async function call<T>(
  method: "GET" | "POST",
  path: string,
  body?: unknown,
  signal?: AbortSignal,
): Promise<T> {
  let resp: Response;
  const base = apiBase();
  const token = apiToken(base);
  const headers: Record<string, string> = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers["authorization"] = `Bearer ${token}`;
  try {
    resp = await fetch(base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if ((e as Error).name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the server at ${base}: ${(e as Error).message}`);
  }
  const text = await resp.text();
  if (resp.status === 401) {
    let requestId: string | null = null;
    try {
      requestId = (JSON.parse(text) as Partial<ErrorResponse>).requestId ?? null;
    } catch {
      // not the server's JSON: the message below says all there is to say
    }
    throw new ApiError(401, tokenMessage(token != null), requestId);
  }
  if (!resp.ok) {
    let err: Partial<ErrorResponse>;
    try {
      err = JSON.parse(text) as ErrorResponse;
    } catch {
      err = { message: text || resp.statusText };
    }
    throw new ApiError(
      resp.status,
      err.message ?? `HTTP ${resp.status}`,
      err.requestId ?? null,
      err.detail,
    );
  }
  return JSON.parse(text) as T;
}

export const api = {
  health: (signal?: AbortSignal) => call<HealthResponse>("GET", "/health", undefined, signal),
  modelInfo: (signal?: AbortSignal) => call<ModelInfo>("GET", "/model_info", undefined, signal),
  nodeTypes: (signal?: AbortSignal) =>
    call<NodeTypesResponse>("GET", "/node_types", undefined, signal),
  tokenize: (text: string, signal?: AbortSignal) =>
    call<TokenizeResponse>("POST", "/tokenize", { text }, signal),
  batchedTdb: (body: BatchedTdbRequest, signal?: AbortSignal) =>
    call<BatchedTdbResponse>("POST", "/batched_tdb", body, signal),
  batched: (body: BatchedRequest, signal?: AbortSignal) =>
    call<BatchedResponse>("POST", "/batched", body, signal),
  derivedScalars: (body: DerivedScalarsRequest, signal?: AbortSignal) =>
    call<DerivedScalarsResponse>("POST", "/derived_scalars", body, signal),
  derivedAttentionScalars: (body: DerivedAttentionScalarsRequest, signal?: AbortSignal) =>
    call<DerivedAttentionScalarsResponse>("POST", "/derived_attention_scalars", body, signal),
  datasetsMetadata: (signal?: AbortSignal) =>
    call<DatasetsMetadataResponse>("GET", "/neuron_datasets_metadata", undefined, signal),
  neuronRecord: (body: NeuronRecordRequest, signal?: AbortSignal) =>
    call<NeuronRecordResponse>("POST", "/neuron_record", body, signal),
  attentionHeadRecord: (body: AttentionHeadRecordRequest, signal?: AbortSignal) =>
    call<AttentionHeadRecordResponse>("POST", "/attention_head_record", body, signal),
  jobs: (signal?: AbortSignal) => call<JobsResponse>("GET", "/jobs", undefined, signal),
  existingExplanations: (body: ExplainRequest, signal?: AbortSignal) =>
    call<ExistingExplanationsResponse>("POST", "/existing_explanations", body, signal),
  explain: (body: ExplainRequest, signal?: AbortSignal) =>
    call<ExplainResponse>("POST", "/explain", body, signal),
  score: (body: ScoreRequest, signal?: AbortSignal) =>
    call<ScoreResponse>("POST", "/score", body, signal),
};
