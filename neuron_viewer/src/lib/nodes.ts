// Node identity and names: one key format used in URLs, tables and diffs.
import type { AttentionTraceType, ModelInfo, NodeIndex } from "../api/types";

export const TRACE_TYPES: AttentionTraceType[] = ["query", "key", "query_and_key", "value"];

export type AutoencoderSide = "mlp" | "attention";
/** What a node is, with latents told apart by their autoencoder's side. These are the
 * library's node type names, the collated datasets' family names and the node pages' paths. */
export type NodeKind =
  | "embedding"
  | "mlp_neuron"
  | "attention_head"
  | "mlp_autoencoder_latent"
  | "attention_autoencoder_latent";
/** The kinds with a node page: one component of a layer. */
export type ComponentKind = Exclude<NodeKind, "embedding">;
export const COMPONENT_KINDS: ComponentKind[] = [
  "mlp_neuron",
  "attention_head",
  "mlp_autoencoder_latent",
  "attention_autoencoder_latent",
];
export const LATENT_KIND: Record<AutoencoderSide, ComponentKind> = {
  mlp: "mlp_autoencoder_latent",
  attention: "attention_autoencoder_latent",
};

const SHORT: Record<NodeKind, string> = {
  embedding: "emb",
  mlp_neuron: "mlp",
  attention_head: "attn",
  mlp_autoencoder_latent: "mlp-latent",
  attention_autoencoder_latent: "attn-latent",
};
const LONG: Record<string, NodeKind> = Object.fromEntries(
  Object.entries(SHORT).map(([k, v]) => [v, k as NodeKind]),
);

/** The side of a latent kind's autoencoder; null for neurons, heads and embeddings. */
export function latentSide(kind: NodeKind): AutoencoderSide | null {
  if (kind === "mlp_autoencoder_latent") return "mlp";
  if (kind === "attention_autoencoder_latent") return "attention";
  return null;
}

export function nodeKind(n: NodeIndex): NodeKind {
  if (n.nodeType === "autoencoder_latent") return LATENT_KIND[n.autoencoderSide ?? "mlp"];
  return n.nodeType;
}

/** The API's node for a kind: latents are nodeType autoencoder_latent with their side. */
export function makeNode(
  kind: NodeKind,
  layerIndex: number,
  tokenIndex: number,
  componentIndex: number,
  attendedTokenIndex: number | null = null,
): NodeIndex {
  const side = latentSide(kind);
  const node: NodeIndex = side
    ? { nodeType: "autoencoder_latent", autoencoderSide: side, layerIndex, tokenIndex }
    : { nodeType: kind as NodeIndex["nodeType"], layerIndex, tokenIndex };
  node.componentIndex = componentIndex;
  node.attendedTokenIndex = kind === "attention_head" ? attendedTokenIndex : null;
  return node;
}

/** How the read and scalar endpoints name a per-token component (a neuron or a latent). */
export function tokenComponent(kind: NodeKind, layerIndex: number, componentIndex: number) {
  const side = latentSide(kind);
  return {
    nodeType: side ? ("autoencoder_latent" as const) : ("mlp_neuron" as const),
    autoencoderSide: side,
    layerIndex,
    componentIndex,
  };
}

/** "attn:23:13:4:1" — kind, layer, token, component[, attended token]; latents are
 * "mlp-latent:5:3:123" or "attn-latent:…". Stable and URL-safe. */
export function nodeKey(n: NodeIndex): string {
  const base = `${SHORT[nodeKind(n)]}:${n.layerIndex ?? 0}:${n.tokenIndex}:${n.componentIndex ?? 0}`;
  return n.attendedTokenIndex == null ? base : `${base}:${n.attendedTokenIndex}`;
}

/** The inverse of nodeKey; null for anything malformed. */
export function parseNodeKey(key: string): NodeIndex | null {
  const parts = key.split(":");
  if (parts.length < 4 || parts.length > 5) return null;
  const kind = LONG[parts[0]];
  const nums = parts.slice(1).map((p) => (/^\d+$/.test(p) ? Number(p) : NaN));
  if (!kind || nums.some((x) => Number.isNaN(x))) return null;
  if (nums.length === 4 && kind !== "attention_head") return null;
  return makeNode(kind, nums[0], nums[1], nums[2], nums.length === 4 ? nums[3] : null);
}

/** A short human name: "attn L23 H4", "mlp L5 #123", "mlp latent L5 #7", "emb". */
export function componentName(n: NodeIndex): string {
  const kind = nodeKind(n);
  if (kind === "attention_head") return `attn L${n.layerIndex} H${n.componentIndex}`;
  if (kind === "mlp_neuron") return `mlp L${n.layerIndex} #${n.componentIndex}`;
  if (kind === "mlp_autoencoder_latent") return `mlp latent L${n.layerIndex} #${n.componentIndex}`;
  if (kind === "attention_autoencoder_latent")
    return `attn latent L${n.layerIndex} #${n.componentIndex}`;
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

/** Layers whose `side` autoencoder the server loaded, ascending. */
export function autoencoderLayers(info: ModelInfo | null, side: AutoencoderSide): number[] {
  return (info?.autoencoders ?? [])
    .filter((a) => a.autoencoderSide === side)
    .map((a) => a.layerIndex)
    .sort((a, b) => a - b);
}

/** The layers a kind has components in (null: unknown, no model loaded). */
export function kindLayers(info: ModelInfo | null, kind: ComponentKind): number[] | null {
  if (!info) return null;
  const side = latentSide(kind);
  if (side) return autoencoderLayers(info, side);
  return Array.from({ length: info.nLayers }, (_, i) => i);
}

/** Components of a kind in a layer: neurons, heads or the layer's autoencoder's latents (null:
 * unknown — no model, or no autoencoder of that side at that layer). */
export function componentWidth(
  info: ModelInfo | null,
  kind: ComponentKind,
  layer: number,
): number | null {
  if (!info) return null;
  const side = latentSide(kind);
  if (side) {
    const ae = info.autoencoders?.find((a) => a.autoencoderSide === side && a.layerIndex === layer);
    return ae ? ae.nLatents : null;
  }
  return kind === "mlp_neuron" ? info.dMlp : info.nHeads;
}
