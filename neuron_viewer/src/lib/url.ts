// The debugger's whole state lives in the URL, so an investigation can be shared or reloaded.
// Every field round-trips through URLSearchParams (which percent-encodes prompts safely). Nodes
// are written as their keys, which the node type descriptions define (nodes.ts).
import type { AttentionTraceType, NodeAblation, NodeIndex } from "../api/types";
import { TRACE_TYPES, type AutoencoderSide, type NodeTypes } from "./nodes";

export interface Trace {
  node: NodeIndex;
  attentionTraceType: AttentionTraceType | null;
  downstream: NodeIndex | null; // only with attentionTraceType "value"
  /** How a downstream head pair is traced (query, key or query_and_key); null for the others. */
  downstreamType?: AttentionTraceType | null;
}

export interface DebuggerState {
  prompt: string;
  targets: string[];
  distractors: string[];
  secondPrompt: string | null; // a second prompt shown side by side
  ablations: NodeAblation[];
  trace: Trace | null;
  /** The traces that led to this one, oldest first (the breadcrumb: loss › node › upstream …). */
  trail: Trace[];
  topK: number;
  /** Sides whose layers show autoencoder latents instead of neurons / heads. */
  latents: AutoencoderSide[];
}

export const DEFAULT_STATE: DebuggerState = {
  prompt: "",
  targets: [],
  distractors: [],
  secondPrompt: null,
  ablations: [],
  trace: null,
  trail: [],
  topK: 10,
  latents: [],
};

export function stateToParams(types: NodeTypes, s: DebuggerState): URLSearchParams {
  const p = new URLSearchParams();
  if (s.prompt) p.set("prompt", s.prompt);
  for (const t of s.targets) p.append("target", t);
  for (const d of s.distractors) p.append("distractor", d);
  if (s.secondPrompt != null) p.set("prompt2", s.secondPrompt);
  for (const a of s.ablations) {
    p.append("ablate", a.value ? `${types.key(a.node)}=${a.value}` : types.key(a.node));
  }
  if (s.trace) {
    p.set("trace", traceString(types, s.trace));
    for (const t of s.trail) p.append("trail", traceString(types, t));
  }
  if (s.topK !== DEFAULT_STATE.topK) p.set("k", String(s.topK));
  for (const side of types.sides) if (s.latents.includes(side)) p.append("latents", side);
  return p;
}

/** A trace as the URL writes it: `key[@type][>downstreamKey[@type]]`. */
export function traceString(types: NodeTypes, t: Trace): string {
  let v = types.key(t.node);
  if (t.attentionTraceType) v += `@${t.attentionTraceType}`;
  if (t.downstream) {
    v += `>${types.key(t.downstream)}`;
    if (t.downstreamType) v += `@${t.downstreamType}`;
  }
  return v;
}

function parseAblation(types: NodeTypes, v: string): NodeAblation | null {
  const [key, value] = v.split("=");
  const node = types.parseKey(key);
  if (!node) return null;
  const num = value === undefined ? 0 : Number(value);
  return Number.isFinite(num) ? { node, value: num } : null;
}

function parseTrace(types: NodeTypes, v: string): Trace | null {
  const [head, down] = v.split(">");
  const [key, type] = head.split("@");
  const node = types.parseKey(key);
  if (!node) return null;
  const attentionTraceType = TRACE_TYPES.includes(type as AttentionTraceType)
    ? (type as AttentionTraceType)
    : null;
  const [downKey, downType] = (down ?? "").split("@");
  const downstream = downKey ? types.parseKey(downKey) : null;
  const downstreamType =
    downstream && TRACE_TYPES.includes(downType as AttentionTraceType)
      ? (downType as AttentionTraceType)
      : null;
  return { node, attentionTraceType, downstream, ...(downstreamType ? { downstreamType } : {}) };
}

/** Parse a URL query; malformed parts are dropped, never thrown. */
export function paramsToState(types: NodeTypes, p: URLSearchParams): DebuggerState {
  const k = Number(p.get("k") ?? DEFAULT_STATE.topK);
  return {
    prompt: p.get("prompt") ?? "",
    targets: p.getAll("target"),
    distractors: p.getAll("distractor"),
    secondPrompt: p.has("prompt2") ? (p.get("prompt2") ?? "") : null,
    ablations: p
      .getAll("ablate")
      .map((v) => parseAblation(types, v))
      .filter((a): a is NodeAblation => a !== null),
    trace: p.has("trace") ? parseTrace(types, p.get("trace") ?? "") : null,
    trail: p.has("trace")
      ? p
          .getAll("trail")
          .map((v) => parseTrace(types, v))
          .filter((t): t is Trace => t !== null)
      : [],
    topK: Number.isInteger(k) && k >= 1 && k <= 1000 ? k : DEFAULT_STATE.topK,
    latents: types.sides.filter((side) => p.getAll("latents").includes(side)),
  };
}
