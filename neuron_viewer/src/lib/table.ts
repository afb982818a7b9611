// The node table's logic: line up left and right sub-responses by node, diff them, sort, filter,
// keep the top k per column, export.
import type { MetricInfo, NodeIndex, NodeRow, NodeTypeInfo } from "../api/types";
import { rowExplanation } from "./explanations";
import { componentName, type NodeTypes } from "./nodes";

export const METRICS = [
  "activation",
  "writeMagnitude",
  "directEffect",
  "estimatedTotalEffect",
] as const;
export type Metric = (typeof METRICS)[number];
export const METRIC_LABELS: Record<Metric, string> = {
  activation: "Activation",
  writeMagnitude: "Write magnitude",
  directEffect: "Direct effect",
  estimatedTotalEffect: "Est. total effect",
};

export type Side = "left" | "diff" | "right";

export interface TableRow {
  key: string;
  node: NodeIndex;
  type: NodeTypeInfo;
  left: NodeRow | null;
  right: NodeRow | null;
}

/** Rows of both sides keyed by node, in the left side's order, then nodes only on the right. */
export function alignRows(types: NodeTypes, left: NodeRow[], right: NodeRow[] | null): TableRow[] {
  const byKey = new Map<string, TableRow>();
  const add = (r: NodeRow, side: "left" | "right") => {
    const key = types.key(r.node);
    const row = byKey.get(key) ?? {
      key,
      node: r.node,
      type: types.of(r.node),
      left: null,
      right: null,
    };
    row[side] = r;
    byKey.set(key, row);
  };
  for (const r of left) add(r, "left");
  for (const r of right ?? []) add(r, "right");
  return [...byKey.values()];
}

/** The metric field of a node row that the descriptions name `name` (write_magnitude). */
function metricOf(name: MetricInfo["name"]): Metric {
  return name.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()) as Metric;
}

/** Per column, whether it takes negative values: when it does for any node type among the rows
 * (the descriptions' `metrics[].signed`). Signed columns are coloured red and blue and keep a
 * bottom k too; Diff columns always are. */
export function signedColumns(rows: TableRow[]): Record<Metric, boolean> {
  const signed = Object.fromEntries(METRICS.map((m) => [m, false])) as Record<Metric, boolean>;
  for (const t of new Set(rows.map((r) => r.type)))
    for (const m of t.metrics) if (m.signed) signed[metricOf(m.name)] = true;
  return signed;
}

export function metricValue(row: TableRow, metric: Metric, side: Side): number | null {
  const l = row.left?.[metric] ?? null;
  const r = row.right?.[metric] ?? null;
  if (side === "left") return l;
  if (side === "right") return r;
  return l != null && r != null ? l - r : null;
}

export interface SortSpec {
  metric: Metric;
  side: Side;
  descending: boolean;
}

/** Sorted copy; missing values last whatever the direction. */
export function sortRows(rows: TableRow[], sort: SortSpec): TableRow[] {
  return [...rows].sort((a, b) => {
    const va = metricValue(a, sort.metric, sort.side);
    const vb = metricValue(b, sort.metric, sort.side);
    if (va == null && vb == null) return a.key.localeCompare(b.key);
    if (va == null) return 1;
    if (vb == null) return -1;
    return sort.descending ? vb - va : va - vb;
  });
}

export interface Filter {
  nodeTypes: Set<string>; // node type names (latents by side); empty: all
  layer: number | null;
}

export function filterRows(rows: TableRow[], f: Filter): TableRow[] {
  return rows.filter(
    (r) =>
      (f.nodeTypes.size === 0 || f.nodeTypes.has(r.type.name)) &&
      (f.layer == null || (r.node.layerIndex ?? 0) === f.layer),
  );
}

/** Rows at position 0 (their token, or for a head pair its attended token, is the first) whose
 * effect on D is negligible on every side: below `fraction` of the table's largest direct or
 * estimated total effect. The first token is an attention sink: its nodes have huge activations
 * and write magnitudes and next to no effect. */
export function sinkRows(rows: TableRow[], fraction = 0.01): Set<string> {
  const effects = (r: TableRow) =>
    (["directEffect", "estimatedTotalEffect"] as const).flatMap((m) =>
      (["left", "right"] as const).map((s) => Math.abs(metricValue(r, m, s) ?? 0)),
    );
  const top = Math.max(0, ...rows.flatMap(effects));
  const out = new Set<string>();
  for (const r of rows) {
    const atZero = r.node.tokenIndex === 0 || r.node.attendedTokenIndex === 0;
    if (atZero && Math.max(...effects(r)) < fraction * top) out.add(r.key);
  }
  return out;
}

/** The union over node types and columns (every metric on every side given) of the top k rows
 * of that type in that column, and the bottom k for signed columns (signedColumns of these rows)
 * and Diff columns. Ranked within each node type, as the server selects them
 * (`topAndBottomKForNodeTable`): latents or embeddings, whose magnitudes can be far smaller than
 * the heads', keep their own top k. */
export function topKPerColumn(rows: TableRow[], k: number, sides: Side[]): TableRow[] {
  const keep = new Set<string>();
  const signed = signedColumns(rows);
  const byType = new Map<string, TableRow[]>();
  for (const r of rows) byType.set(r.type.name, [...(byType.get(r.type.name) ?? []), r]);
  for (const group of byType.values()) {
    for (const side of sides) {
      for (const metric of METRICS) {
        const valued = group.filter((r) => metricValue(r, metric, side) != null);
        const sorted = sortRows(valued, { metric, side, descending: true });
        sorted.slice(0, k).forEach((r) => keep.add(r.key));
        if (signed[metric] || side === "diff") {
          sorted.slice(Math.max(k, sorted.length - k)).forEach((r) => keep.add(r.key));
        }
      }
    }
  }
  return rows.filter((r) => keep.has(r.key));
}

function csvCell(v: string | number | null): string {
  if (v == null) return "";
  const s = String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** writeMagnitude → write_magnitude: one naming style for every CSV column. */
function snake(name: string): string {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** CSV of the rows given (the table's visible rows, in their order): node fields, then every
 * metric for each side present, then the component's explanation and its score, all columns in
 * snake_case. */
export function toCsv(rows: TableRow[], tokens: string[], twoSides: boolean): string {
  const sides: Side[] = twoSides ? ["left", "diff", "right"] : ["left"];
  const header = [
    "node",
    "node_type",
    "layer",
    "token_index",
    "token",
    "component",
    "attended_token_index",
    "attended_token",
    ...sides.flatMap((s) => METRICS.map((m) => snake(m) + (twoSides ? `_${s}` : ""))),
    "explanation",
    "explanation_score",
  ];
  const lines = [header.join(",")];
  for (const r of rows) {
    const n = r.node;
    const explanation = rowExplanation(r);
    lines.push(
      [
        componentName(r.type, n.layerIndex ?? 0, n.componentIndex ?? 0),
        r.type.name,
        n.layerIndex ?? 0,
        n.tokenIndex,
        tokens[n.tokenIndex] ?? null,
        n.componentIndex ?? 0,
        n.attendedTokenIndex ?? null,
        n.attendedTokenIndex != null ? (tokens[n.attendedTokenIndex] ?? null) : null,
        ...sides.flatMap((s) => METRICS.map((m) => metricValue(r, m, s))),
        explanation?.text ?? null,
        explanation?.score ?? null,
      ]
        .map(csvCell)
        .join(","),
    );
  }
  return lines.join("\n") + "\n";
}

/** JSON of the table: the lined-up rows, their nodes as the server sent them. */
export function toJson(rows: TableRow[]): string {
  return JSON.stringify(
    rows.map(({ key, node, left, right }) => ({ key, node, left, right })),
    null,
    2,
  );
}
