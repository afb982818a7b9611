// Node types and node identity. What a node type is called, its URL key, whether it has one node
// per token pair, which side its autoencoder is on and where the model has it all come from the
// server's descriptions (GET /node_types, docs/node-types.md); nothing here names a node type.
import type {
  AttentionTraceType,
  AutoencoderSide,
  NeuronRecordRequest,
  NodeIndex,
  NodeTypeInfo,
} from "../api/types";

export type { AutoencoderSide, NodeTypeInfo };

export const TRACE_TYPES: AttentionTraceType[] = ["query", "key", "query_and_key", "value"];

/** How messages name an autoencoder's side ("no MLP-side autoencoder is loaded"). */
export const SIDE_LABEL: Record<AutoencoderSide, string> = { mlp: "MLP", attention: "attention" };

/** Whether a node type's nodes are components of a layer (neurons, heads, latents), with a page
 * of their own, a name by layer and index, and something upstream to trace. The embedding is the
 * first write into the residual stream: none of these. */
export function isComponent(t: NodeTypeInfo): boolean {
  return t.writes !== "embedding";
}

/** "MLP neurons", "attention latents": a node type's label for many of them. */
export function plural(t: NodeTypeInfo): string {
  return `${t.label}s`;
}

/** The node type descriptions the server sent, in its order (the order of node tables), with
 * the lookups the UI needs. */
export class NodeTypes {
  readonly all: readonly NodeTypeInfo[];
  private readonly byName: Map<string, NodeTypeInfo>;
  private readonly byKey: Map<string, NodeTypeInfo>;

  constructor(descriptions: readonly NodeTypeInfo[]) {
    this.all = descriptions;
    this.byName = new Map(descriptions.map((t) => [t.name, t]));
    this.byKey = new Map(descriptions.map((t) => [t.key, t]));
  }

  /** The node types with a page: one component of a layer. */
  get components(): NodeTypeInfo[] {
    return this.all.filter(isComponent);
  }

  /** The autoencoder latent types, one per side. */
  get latents(): NodeTypeInfo[] {
    return this.all.filter((t) => t.autoencoderSide != null);
  }

  /** The autoencoder sides, in the order of their latent types. */
  get sides(): AutoencoderSide[] {
    return this.latents.map((t) => t.autoencoderSide as AutoencoderSide);
  }

  /** By the library's name ("mlp_neuron": a dataset family, a component page's path segment). */
  named(name: string): NodeTypeInfo | undefined {
    return this.byName.get(name);
  }

  /** A node's type: its wire nodeType, and its autoencoderSide where the wire name is shared. */
  of(n: Pick<NodeIndex, "nodeType" | "autoencoderSide">): NodeTypeInfo {
    const t = this.all.find(
      (t) =>
        t.nodeType === n.nodeType && (t.autoencoderSide ?? null) === (n.autoencoderSide ?? null),
    );
    if (!t) throw new Error(`no node type ${n.nodeType} ${n.autoencoderSide ?? ""}`.trim());
    return t;
  }

  /** "attn:23:13:4:1" — the type's key, layer, token, component[, attended token]: latents are
   * "mlp-latent:5:3:123" or "attn-latent:…". Stable and URL-safe. */
  key(n: NodeIndex): string {
    const base = `${this.of(n).key}:${n.layerIndex ?? 0}:${n.tokenIndex}:${n.componentIndex ?? 0}`;
    return n.attendedTokenIndex == null ? base : `${base}:${n.attendedTokenIndex}`;
  }

  /** The inverse of key; null for anything malformed. */
  parseKey(key: string): NodeIndex | null {
    const parts = key.split(":");
    if (parts.length < 4 || parts.length > 5) return null;
    const t = this.byKey.get(parts[0]);
    const nums = parts.slice(1).map((p) => (/^\d+$/.test(p) ? Number(p) : NaN));
    if (!t || nums.some((x) => Number.isNaN(x))) return null;
    if (nums.length === 4 && !t.perTokenPair) return null; // only pairs have an attended token
    return makeNode(t, nums[0], nums[1], nums[2], nums.length === 4 ? nums[3] : null);
  }

  same(a: NodeIndex, b: NodeIndex): boolean {
    return this.key(a) === this.key(b);
  }

  /** A short human name: "attn L23 H4", "mlp L5 #123", "mlp latent L5 #7", "embedding". */
  name(n: NodeIndex): string {
    return componentName(this.of(n), n.layerIndex ?? 0, n.componentIndex ?? 0);
  }

  /** The component with its token(s) spelled out: "mlp L5 #123 at ' Ottawa' (4)", "attn L23 H4
   * from ' to' (13) to ' Mary' (1)". */
  describe(n: NodeIndex, tokens: string[]): string {
    const at = (t: number) => `'${tokens[t] ?? "?"}' (${t})`;
    if (this.of(n).perTokenPair && n.attendedTokenIndex != null) {
      return `${this.name(n)} from ${at(n.tokenIndex)} to ${at(n.attendedTokenIndex)}`;
    }
    const whole = this.of(n).perTokenPair ? ", all keys" : "";
    return `${this.name(n)} at ${at(n.tokenIndex)}${whole}`;
  }
}

/** A component's name: heads (one node per token pair) are "H4", others "#123"; the embedding
 * is its short name alone. */
export function componentName(t: NodeTypeInfo, layer: number, component: number): string {
  if (!isComponent(t)) return t.shortName;
  return `${t.shortName} L${layer} ${t.perTokenPair ? "H" : "#"}${component}`;
}

/** The API's node of a type: latents carry their autoencoder's side, only token pairs an
 * attended token. */
export function makeNode(
  t: NodeTypeInfo,
  layerIndex: number,
  tokenIndex: number,
  componentIndex: number,
  attendedTokenIndex: number | null = null,
): NodeIndex {
  return {
    nodeType: t.nodeType,
    ...(t.autoencoderSide ? { autoencoderSide: t.autoencoderSide } : {}),
    layerIndex,
    tokenIndex,
    componentIndex,
    attendedTokenIndex: t.perTokenPair ? attendedTokenIndex : null,
  };
}

/** How the read and scalar endpoints (/neuron_record, /derived_scalars) name a component with one
 * node per token (a neuron or a latent). */
export function tokenComponent(t: NodeTypeInfo, layerIndex: number, componentIndex: number) {
  return {
    // Those endpoints' nodeType lists the per-token component types only.
    nodeType: t.nodeType as NonNullable<NeuronRecordRequest["nodeType"]>,
    autoencoderSide: t.autoencoderSide ?? null,
    layerIndex,
    componentIndex,
  };
}

/** Components of a type in a layer (neurons, heads, the latents of the layer's autoencoder);
 * null when unknown: no model, or none of that type in the layer. (`layers`: the layers holding
 * the type in the loaded model; for latents those with an autoencoder of their side.) */
export function componentWidth(t: NodeTypeInfo, layer: number): number | null {
  const i = t.layers?.indexOf(layer) ?? -1;
  return i < 0 ? null : (t.widths?.[i] ?? null);
}
