// Node identity and names: one key format used in URLs, tables and diffs.
import type { AttentionTraceType, NodeIndex, NodeType } from "../api/types";

export const NODE_TYPES: NodeType[] = ["embedding", "mlp_neuron", "attention_head"];
export const TRACE_TYPES: AttentionTraceType[] = ["query", "key", "query_and_key", "value"];

const SHORT: Record<string, string> = {
  embedding: "emb",
  mlp_neuron: "mlp",
  attention_head: "attn",
  autoencoder_latent: "latent",
};
const LONG: Record<string, NodeType> = Object.fromEntries(
  Object.entries(SHORT).map(([k, v]) => [v, k as NodeType]),
);

/** "attn:23:13:4:1" — type, layer, token, component[, attended token]. Stable and URL-safe. */
export function nodeKey(n: NodeIndex): string {
  const base = `${SHORT[n.nodeType]}:${n.layerIndex ?? 0}:${n.tokenIndex}:${n.componentIndex ?? 0}`;
  return n.attendedTokenIndex == null ? base : `${base}:${n.attendedTokenIndex}`;
}

/** The inverse of nodeKey; null for anything malformed. */
export function parseNodeKey(key: string): NodeIndex | null {
  const parts = key.split(":");
  if (parts.length < 4 || parts.length > 5) return null;
  const nodeType = LONG[parts[0]];
  const nums = parts.slice(1).map((p) => (/^\d+$/.test(p) ? Number(p) : NaN));
  if (!nodeType || nums.some((x) => Number.isNaN(x))) return null;
  const node: NodeIndex = {
    nodeType,
    layerIndex: nums[0],
    tokenIndex: nums[1],
    componentIndex: nums[2],
    attendedTokenIndex: nums.length === 4 ? nums[3] : null,
  };
  if (node.attendedTokenIndex != null && nodeType !== "attention_head") return null;
  return node;
}

/** A short human name: "attn L23 H4", "mlp L5 #123", "emb". */
export function componentName(n: NodeIndex): string {
  if (n.nodeType === "attention_head") return `attn L${n.layerIndex} H${n.componentIndex}`;
  if (n.nodeType === "mlp_neuron") return `mlp L${n.layerIndex} #${n.componentIndex}`;
  if (n.nodeType === "autoencoder_latent") return `latent L${n.layerIndex} #${n.componentIndex}`;
  return "emb";
}

/** The component with its token(s) spelled out: "mlp L5 #123 at ' Ottawa' (4)". */
export function describeNode(n: NodeIndex, tokens: string[]): string {
  const at = (t: number) => `'${tokens[t] ?? "?"}' (${t})`;
  if (n.nodeType === "attention_head" && n.attendedTokenIndex != null) {
    return `${componentName(n)} from ${at(n.tokenIndex)} to ${at(n.attendedTokenIndex)}`;
  }
  return `${componentName(n)} at ${at(n.tokenIndex)}`;
}

export function sameNode(a: NodeIndex, b: NodeIndex): boolean {
  return nodeKey(a) === nodeKey(b);
}
