// Explanations as the UI shows them: a node-table row's explanation and its hover text, scores and
// methods in words, and the scored excerpts' true and simulated activations per token.
import type { ExplainRequest, ExplanationMethod, NodeTypeInfo, ScoredExcerpt } from "../api/types";
import { attendedFrom, tokensForPairs } from "./pairs";
import type { TableRow } from "./table";

/** How the explanation routes name a component (a neuron, head or latent) of a dataset. */
export function explanationNode(
  t: NodeTypeInfo,
  layerIndex: number,
  componentIndex: number,
  datasetName: string | null = null,
): ExplainRequest {
  return {
    nodeType: t.nodeType as NonNullable<ExplainRequest["nodeType"]>,
    autoencoderSide: t.autoencoderSide ?? null,
    layerIndex,
    componentIndex,
    ...(datasetName != null ? { datasetName } : {}),
  };
}

/** A score to 2 decimals; "no score" where it is undefined (null: never active, or constant
 * predictions). */
export function formatScore(score: number | null | undefined): string {
  return score == null || !Number.isFinite(score) ? "no score" : score.toFixed(2);
}

/** The explanation of a node-table row's component (the same on both sides), or null. */
export function rowExplanation(row: TableRow): { text: string; score: number | null } | null {
  const r = row.left?.explanation != null ? row.left : row.right;
  const text = r?.explanation;
  return text == null ? null : { text, score: r?.explanationScore ?? null };
}

/** The hover text of an explanation: the whole text and its score. */
export function explanationTitle(text: string, score: number | null | undefined): string {
  return `${text}\nscore ${formatScore(score)} (simulated vs true activations on held-out excerpts)`;
}

/** What an explanation was made with, in words ("explainer baseline · simulator baseline"). */
export function methodLabel(method: ExplanationMethod): string {
  const parts = [`explainer ${method.explainer}`, `simulator ${method.simulator}`];
  if (method.model) parts.push(`model ${method.model}`);
  parts.push(`prompt ${method.promptVersion}`);
  return parts.join(" · ");
}

/** Pearson correlation of two equally long lists; null where undefined (fewer than two values,
 * or either constant). */
export function correlation(a: number[], b: number[]): number | null {
  const n = Math.min(a.length, b.length);
  if (n < 2) return null;
  let ma = 0;
  let mb = 0;
  for (let i = 0; i < n; i++) {
    ma += a[i];
    mb += b[i];
  }
  ma /= n;
  mb /= n;
  let ab = 0;
  let aa = 0;
  let bb = 0;
  let sa = 0;
  let sb = 0;
  for (let i = 0; i < n; i++) {
    ab += (a[i] - ma) * (b[i] - mb);
    aa += (a[i] - ma) ** 2;
    bb += (b[i] - mb) ** 2;
    sa += a[i] ** 2;
    sb += b[i] ** 2;
  }
  // Relative thresholds: float noise in a constant list is no signal.
  if (aa <= 1e-12 * Math.max(sa, 1e-30) || bb <= 1e-12 * Math.max(sb, 1e-30)) return null;
  return Math.max(-1, Math.min(1, ab / Math.sqrt(aa * bb)));
}

/** Per token, the largest of a head excerpt's pair values in which that token is attended to
 * (the key): how a head's pairs are summarized on one line of tokens. */
function perKeyMax(pairs: number[], n: number): number[] {
  return Array.from({ length: n }, (_, k) =>
    Math.max(...attendedFrom(pairs, n, k).filter((v): v is number => v != null)),
  );
}

/** A scored excerpt as one line of tokens: the true and the simulated value of each token (for
 * heads, the strongest pair the token is attended to in), and their correlation over the
 * excerpt's values (heads: over all pairs). */
export interface ExcerptLine {
  tokens: string[];
  truth: number[];
  simulated: number[];
  correlation: number | null;
  group: ScoredExcerpt["group"];
}

export function excerptLine(excerpt: ScoredExcerpt, perPair: boolean): ExcerptLine {
  const { tokens, activations, simulatedActivations, group } = excerpt;
  const n = tokens.length;
  const summarize = perPair && tokensForPairs(activations.length) === n;
  return {
    tokens,
    truth: summarize ? perKeyMax(activations, n) : activations,
    simulated: summarize ? perKeyMax(simulatedActivations, n) : simulatedActivations,
    correlation: correlation(activations, simulatedActivations),
    group,
  };
}
