import { Fragment, useEffect, useMemo, useState } from "react";
import type { AttentionTraceType, NodeIndex, NodeRow, ScoredToken } from "../api/types";
import { cellColor, maxAbs, textColor } from "../lib/colors";
import { explanationTitle, formatScore, rowExplanation } from "../lib/explanations";
import { componentName, plural, TRACE_TYPES } from "../lib/nodes";
import {
  filterRows,
  METRIC_LABELS,
  METRICS,
  metricValue,
  signedColumns,
  sinkRows,
  sortRows,
  topKPerColumn,
  type Metric,
  type Side,
  type SortSpec,
  type TableRow,
} from "../lib/table";
import { displayToken } from "../lib/tokens";
import { useNodeTypes } from "../nodeTypes";
import { linkClick } from "../router";

export interface NodeActions {
  ablate: (node: NodeIndex) => void;
  trace: (node: NodeIndex, type: AttentionTraceType | null) => void;
  /** While tracing a node through its pre-activation: trace a head of its upstream table
   * through the head's value into that node (`name`), the downstream node. */
  traceValueInto?: { name: string; run: (node: NodeIndex) => void };
}

const TRACE_LABELS: Record<AttentionTraceType, string> = {
  query: "Trace query",
  key: "Trace key",
  query_and_key: "Trace query and key",
  value: "Trace through value",
};

function fmt(v: number | null): string {
  if (v == null) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(3);
}

/** A row's component page, with the prompt and token(s) passed along. */
export function nodeHref(modelName: string, row: TableRow, prompt: string): string {
  const node = row.node;
  const index = node.componentIndex ?? 0;
  const q = new URLSearchParams({ prompt, token: String(node.tokenIndex) });
  if (node.attendedTokenIndex != null) q.set("attended", String(node.attendedTokenIndex));
  return `/${encodeURIComponent(modelName)}/${row.type.name}/${node.layerIndex ?? 0}/${index}?${q}`;
}

function TokenList({ title, tokens }: { title: string; tokens: ScoredToken[] }) {
  if (!tokens.length) return null;
  return (
    <div className="token-list">
      <h4>{title}</h4>
      <ol>
        {tokens.map((t, i) => (
          <li key={i}>
            <code>{displayToken(t.text)}</code> <span className="num">{t.score.toFixed(2)}</span>
          </li>
        ))}
      </ol>
    </div>
  );
}

/** A node-table cell: the component's explanation, cut to one line; all of it and the score on
 * hover. Empty when its datasets hold none. */
function ExplanationCell({ row }: { row: TableRow }) {
  const e = rowExplanation(row);
  return (
    <td
      className="explanation-cell"
      data-testid="node-explanation"
      title={e ? explanationTitle(e.text, e.score) : undefined}
    >
      {e && (
        <>
          <span className="explanation-text">{e.text}</span>{" "}
          <span className="num muted">{formatScore(e.score)}</span>
        </>
      )}
    </td>
  );
}

/** A node's explanation and token-space views; those of a token pair (a head) have a query and a
 * key side. */
function Details({ row, pairs }: { row: NodeRow | null; pairs: boolean }) {
  const v = row?.tokenViews;
  const explanation = row?.explanation != null && (
    <p data-testid="details-explanation">
      Explanation: {row.explanation}{" "}
      <span className="muted">(score {formatScore(row.explanationScore)})</span>
    </p>
  );
  if (!v)
    return (
      <>
        {explanation}
        <p className="muted">No token-space views for this node.</p>
      </>
    );
  return (
    <>
      {explanation}
      <div className="details" data-testid="node-details">
        <TokenList title="Upvoted output tokens" tokens={v.upvotedOutputTokens} />
        <TokenList title="Downvoted output tokens" tokens={v.downvotedOutputTokens} />
        <TokenList
          title={pairs ? "Input tokens that upvote the query side" : "Input tokens that upvote it"}
          tokens={v.upvotingInputTokens}
        />
        {pairs && (
          <TokenList title="Input tokens that upvote the key side" tokens={v.upvotingKeyTokens} />
        )}
        {(v.tokenPairAttributions ?? []).length > 0 && (
          <TokenList
            title="Key tokens its input came from"
            tokens={(v.tokenPairAttributions ?? []).map((t) => ({
              ...t,
              text: `${t.text} (${t.keyTokenIndex})`,
            }))}
          />
        )}
      </div>
    </>
  );
}

function Actions({ row, actions }: { row: TableRow; actions: NodeActions }) {
  const [open, setOpen] = useState(false);
  const node = row.node;
  const items: [string, () => void][] = [["Ablate", () => actions.ablate(node)]];
  if (row.type.perTokenPair) {
    // The whole query row: every key position this token attends to.
    items.push([
      "Ablate whole head (all keys)",
      () => actions.ablate({ ...node, attendedTokenIndex: null }),
    ]);
  }
  // A head pair is traced through its query, key or value; other components upstream.
  if (row.type.perTokenPair) {
    for (const t of TRACE_TYPES) items.push([TRACE_LABELS[t], () => actions.trace(node, t)]);
  } else if (row.type.traceable) items.push(["Trace upstream", () => actions.trace(node, null)]);
  const into = actions.traceValueInto;
  if (into && row.type.perTokenPair) {
    items.push([`Trace value into ${into.name}`, () => into.run(node)]);
  }
  return (
    <div
      className="actions"
      onBlur={(e) => !e.currentTarget.contains(e.relatedTarget) && setOpen(false)}
    >
      <button
        aria-label="actions"
        aria-haspopup="menu"
        aria-expanded={open}
        onClick={() => setOpen(!open)}
      >
        ⋯
      </button>
      {open && (
        <div className="menu" role="menu">
          {items.map(([label, fn]) => (
            <button
              key={label}
              role="menuitem"
              onClick={() => {
                setOpen(false);
                fn();
              }}
            >
              {label}
            </button>
          ))}
        </div>
      )}
    </div>
  );
}

export function NodeTable(props: {
  rows: TableRow[];
  tokens: string[];
  twoSides: boolean;
  modelName: string;
  prompt: string;
  actions: NodeActions;
  /** The request's top k: the table's own top k starts there (and follows it). */
  topK: number;
  /** Whether a row's node is ablated on the left side (marked in the table). */
  isAblated?: (row: TableRow) => boolean;
  /** Told the rows shown, in their order, whenever they change (the exports follow them). */
  onVisible?: (rows: TableRow[]) => void;
}) {
  const types = useNodeTypes();
  const [sort, setSort] = useState<SortSpec>({
    metric: "directEffect",
    side: "left",
    descending: true,
  });
  const [shownTypes, setShownTypes] = useState<Set<string>>(new Set());
  const [layer, setLayer] = useState<string>("");
  const [k, setK] = useState<number>(props.topK);
  const [requestK, setRequestK] = useState(props.topK);
  if (requestK !== props.topK) {
    // A new request's top k (adjusting state while rendering, as React recommends).
    setRequestK(props.topK);
    setK(props.topK);
  }
  const [expanded, setExpanded] = useState<Set<string>>(new Set());
  // On by default: in causal models the first token is an attention sink whose nodes crowd the
  // table with huge activations and no effect.
  const [hideSink, setHideSink] = useState(true);
  const sink = useMemo(() => sinkRows(props.rows), [props.rows]);
  const sides: Side[] = useMemo(
    () => (props.twoSides ? ["left", "diff", "right"] : ["left"]),
    [props.twoSides],
  );

  // Types that replace others (latents) are listed when the table has them (a debugger switch
  // is on); the others always are.
  const listed = useMemo(() => {
    const present = new Set(props.rows.map((r) => r.type));
    return types.all.filter((t) => t.replaces == null || present.has(t));
  }, [types, props.rows]);
  const listedNames = useMemo(() => listed.map((t) => t.name), [listed]);

  const visible = useMemo(() => {
    // A filter on types no longer in the table (latents switched off) shows everything.
    const active = new Set([...shownTypes].filter((t) => listedNames.includes(t)));
    const filtered = filterRows(props.rows, {
      nodeTypes: active,
      layer: layer === "" ? null : Number(layer),
    }).filter((r) => !(hideSink && sink.has(r.key)));
    return sortRows(topKPerColumn(filtered, k, sides), sort);
  }, [props.rows, listedNames, shownTypes, layer, k, sort, sides, hideSink, sink]);

  const { onVisible } = props;
  useEffect(() => onVisible?.(visible), [onVisible, visible]);

  const scales = useMemo(() => {
    const out: Record<string, number> = {};
    for (const m of METRICS)
      for (const s of sides) out[`${m}:${s}`] = maxAbs(visible.map((r) => metricValue(r, m, s)));
    return out;
  }, [visible, sides]);
  const signed = useMemo(() => signedColumns(visible), [visible]);

  const clickHeader = (metric: Metric, side: Side) =>
    setSort((cur) =>
      cur.metric === metric && cur.side === side
        ? { ...cur, descending: !cur.descending }
        : { metric, side, descending: true },
    );
  const tok = (i: number | null | undefined) =>
    i == null ? "" : `${displayToken(props.tokens[i] ?? "?")} (${i})`;

  return (
    <div>
      <div className="row controls">
        {listed.map((t) => (
          <label key={t.name}>
            <input
              type="checkbox"
              data-testid="node-type-filter"
              data-kind-label={plural(t)}
              checked={!listedNames.some((l) => shownTypes.has(l)) || shownTypes.has(t.name)}
              onChange={(e) => {
                const shown = listedNames.filter((l) => shownTypes.has(l));
                const next = new Set<string>(shown.length === 0 ? listedNames : shown);
                if (e.target.checked) next.add(t.name);
                else next.delete(t.name);
                setShownTypes(listedNames.every((l) => next.has(l)) ? new Set() : next);
              }}
            />
            {plural(t)}
          </label>
        ))}
        <label>
          layer
          <input
            className="narrow"
            type="number"
            min={0}
            value={layer}
            onChange={(e) => setLayer(e.target.value)}
            aria-label="filter by layer"
          />
        </label>
        <label>
          top k per column
          <input
            className="narrow"
            type="number"
            min={1}
            max={1000}
            value={k}
            onChange={(e) => setK(Math.max(1, Number(e.target.value) || 1))}
            aria-label="top k per column"
          />
        </label>
        <label title="rows at the first token (an attention sink) with under 1% of the table's largest effect on D">
          <input
            type="checkbox"
            checked={hideSink}
            onChange={(e) => setHideSink(e.target.checked)}
            data-testid="hide-sink"
          />
          hide position-0 rows without effect ({sink.size})
        </label>
        <span className="muted" data-testid="nodes-shown">
          {visible.length} nodes
        </span>
      </div>
      <div className="scroll-x">
        <table className="node-table" data-testid="node-table">
          <thead>
            <tr>
              <th rowSpan={props.twoSides ? 2 : 1}>Node</th>
              <th rowSpan={props.twoSides ? 2 : 1}>Token</th>
              <th rowSpan={props.twoSides ? 2 : 1}>Attended to</th>
              {METRICS.map((m) =>
                props.twoSides ? (
                  <th key={m} colSpan={3}>
                    {METRIC_LABELS[m]}
                  </th>
                ) : (
                  <th
                    key={m}
                    className="sortable"
                    onClick={() => clickHeader(m, "left")}
                    data-metric={m}
                  >
                    {METRIC_LABELS[m]}
                    {sort.metric === m ? (sort.descending ? " ▼" : " ▲") : ""}
                  </th>
                ),
              )}
              <th rowSpan={props.twoSides ? 2 : 1} title="the component's best stored explanation">
                Explanation
              </th>
              <th rowSpan={props.twoSides ? 2 : 1} />
            </tr>
            {props.twoSides && (
              <tr>
                {METRICS.map((m) =>
                  sides.map((s) => (
                    <th
                      key={`${m}:${s}`}
                      className="sortable sub"
                      onClick={() => clickHeader(m, s)}
                      data-metric={m}
                      data-side={s}
                    >
                      {s === "left" ? "Left" : s === "diff" ? "Diff" : "Right"}
                      {sort.metric === m && sort.side === s ? (sort.descending ? " ▼" : " ▲") : ""}
                    </th>
                  )),
                )}
              </tr>
            )}
          </thead>
          <tbody>
            {visible.map((r) => {
              const open = expanded.has(r.key);
              return (
                <Fragment key={r.key}>
                  <tr
                    data-node={r.key}
                    className={props.isAblated?.(r) ? "ablated" : undefined}
                    data-ablated={props.isAblated?.(r) ? "true" : undefined}
                  >
                    <td className="node-cell">
                      <button
                        className="expander"
                        aria-label={open ? "collapse" : "expand"}
                        onClick={() => {
                          const next = new Set(expanded);
                          if (open) next.delete(r.key);
                          else next.add(r.key);
                          setExpanded(next);
                        }}
                      >
                        {open ? "▾" : "▸"}
                      </button>{" "}
                      <a
                        href={nodeHref(props.modelName, r, props.prompt)}
                        onClick={linkClick}
                        className="node-link"
                      >
                        {componentName(r.type, r.node.layerIndex ?? 0, r.node.componentIndex ?? 0)}
                      </a>
                      {props.isAblated?.(r) && (
                        <span className="badge ablated-badge" title="ablated on the left side">
                          ablated
                        </span>
                      )}
                    </td>
                    <td className="tok">{tok(r.node.tokenIndex)}</td>
                    <td className="tok">{tok(r.node.attendedTokenIndex)}</td>
                    {METRICS.map((m) =>
                      sides.map((s) => {
                        const v = metricValue(r, m, s);
                        const scale = scales[`${m}:${s}`];
                        return (
                          <td
                            key={`${m}:${s}`}
                            className="num"
                            data-metric={m}
                            data-side={s}
                            style={{
                              background: cellColor(v, scale, signed[m] || s === "diff"),
                              color: textColor(v, scale),
                            }}
                          >
                            {fmt(v)}
                          </td>
                        );
                      }),
                    )}
                    <ExplanationCell row={r} />
                    <td>
                      <Actions row={r} actions={props.actions} />
                    </td>
                  </tr>
                  {open && (
                    <tr className="details-row">
                      <td colSpan={3 + METRICS.length * sides.length + 2}>
                        <Details row={r.left ?? r.right} pairs={r.type.perTokenPair} />
                      </td>
                    </tr>
                  )}
                </Fragment>
              );
            })}
          </tbody>
        </table>
      </div>
    </div>
  );
}
