import { Fragment, useMemo, useState } from "react";
import type { AttentionTraceType, NodeIndex, NodeRow, ScoredToken } from "../api/types";
import { cellColor, maxAbs, textColor } from "../lib/colors";
import { componentName, nodeKind, TRACE_TYPES, type NodeKind } from "../lib/nodes";
import {
  filterRows,
  METRIC_LABELS,
  METRICS,
  metricValue,
  SIGNED,
  sortRows,
  topKPerColumn,
  type Metric,
  type Side,
  type SortSpec,
  type TableRow,
} from "../lib/table";
import { displayToken } from "../lib/tokens";
import { linkClick } from "../router";

export interface NodeActions {
  ablate: (node: NodeIndex) => void;
  trace: (node: NodeIndex, type: AttentionTraceType | null) => void;
  setDownstream?: (node: NodeIndex) => void; // when tracing through a head's value
}

const TYPE_LABELS: Record<NodeKind, string> = {
  embedding: "embeddings",
  mlp_neuron: "MLP neurons",
  attention_head: "attention heads",
  mlp_autoencoder_latent: "MLP latents",
  attention_autoencoder_latent: "attention latents",
};
const ALWAYS_LISTED: NodeKind[] = ["embedding", "mlp_neuron", "attention_head"];
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

export function nodeHref(modelName: string, node: NodeIndex, prompt: string): string {
  const index = node.componentIndex ?? 0;
  const q = new URLSearchParams({ prompt, token: String(node.tokenIndex) });
  if (node.attendedTokenIndex != null) q.set("attended", String(node.attendedTokenIndex));
  return `/${encodeURIComponent(modelName)}/${nodeKind(node)}/${node.layerIndex ?? 0}/${index}?${q}`;
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

function Details({ row }: { row: NodeRow | null }) {
  const v = row?.tokenViews;
  if (!v) return <p className="muted">No token-space views for this node.</p>;
  const head = row.node.nodeType === "attention_head";
  return (
    <div className="details" data-testid="node-details">
      <TokenList title="Upvoted output tokens" tokens={v.upvotedOutputTokens} />
      <TokenList title="Downvoted output tokens" tokens={v.downvotedOutputTokens} />
      <TokenList
        title={head ? "Input tokens that upvote the query side" : "Input tokens that upvote it"}
        tokens={v.upvotingInputTokens}
      />
      {head && (
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
  );
}

function Actions({ node, actions }: { node: NodeIndex; actions: NodeActions }) {
  const [open, setOpen] = useState(false);
  const items: [string, () => void][] = [["Ablate", () => actions.ablate(node)]];
  if (node.nodeType === "mlp_neuron" || node.nodeType === "autoencoder_latent")
    items.push(["Trace upstream", () => actions.trace(node, null)]);
  if (node.nodeType === "attention_head") {
    for (const t of TRACE_TYPES) items.push([TRACE_LABELS[t], () => actions.trace(node, t)]);
  }
  if (actions.setDownstream && node.nodeType !== "embedding") {
    items.push(["Use as downstream node", () => actions.setDownstream?.(node)]);
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
}) {
  const [sort, setSort] = useState<SortSpec>({
    metric: "directEffect",
    side: "left",
    descending: true,
  });
  const [types, setTypes] = useState<Set<string>>(new Set());
  const [layer, setLayer] = useState<string>("");
  const [k, setK] = useState<number>(10);
  const [expanded, setExpanded] = useState<Set<string>>(new Set());
  const sides: Side[] = useMemo(
    () => (props.twoSides ? ["left", "diff", "right"] : ["left"]),
    [props.twoSides],
  );

  // Latent kinds are listed when the table has latents (a debugger switch is on).
  const listed = useMemo(() => {
    const present = new Set(props.rows.map((r) => nodeKind(r.node)));
    return (Object.keys(TYPE_LABELS) as NodeKind[]).filter(
      (t) => ALWAYS_LISTED.includes(t) || present.has(t),
    );
  }, [props.rows]);

  const visible = useMemo(() => {
    // A filter on kinds no longer in the table (latents switched off) shows everything.
    const active = new Set([...types].filter((t) => listed.includes(t as NodeKind)));
    const filtered = filterRows(props.rows, {
      nodeTypes: active,
      layer: layer === "" ? null : Number(layer),
    });
    return sortRows(topKPerColumn(filtered, k, sides), sort);
  }, [props.rows, listed, types, layer, k, sort, sides]);

  const scales = useMemo(() => {
    const out: Record<string, number> = {};
    for (const m of METRICS)
      for (const s of sides) out[`${m}:${s}`] = maxAbs(visible.map((r) => metricValue(r, m, s)));
    return out;
  }, [visible, sides]);

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
          <label key={t}>
            <input
              type="checkbox"
              data-testid="node-type-filter"
              data-kind-label={TYPE_LABELS[t]}
              checked={!listed.some((l) => types.has(l)) || types.has(t)}
              onChange={(e) => {
                const shown = listed.filter((l) => types.has(l));
                const next = new Set<string>(shown.length === 0 ? listed : shown);
                if (e.target.checked) next.add(t);
                else next.delete(t);
                setTypes(listed.every((k) => next.has(k)) ? new Set() : next);
              }}
            />
            {TYPE_LABELS[t]}
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
        <span className="muted">{visible.length} nodes</span>
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
                  <tr data-node={r.key}>
                    <td>
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
                        href={nodeHref(props.modelName, r.node, props.prompt)}
                        onClick={linkClick}
                        className="node-link"
                      >
                        {componentName(r.node)}
                      </a>
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
                              background: cellColor(v, scale, SIGNED[m] || s === "diff"),
                              color: textColor(v, scale),
                            }}
                          >
                            {fmt(v)}
                          </td>
                        );
                      }),
                    )}
                    <td>
                      <Actions node={r.node} actions={props.actions} />
                    </td>
                  </tr>
                  {open && (
                    <tr className="details-row">
                      <td colSpan={3 + METRICS.length * sides.length + 1}>
                        <Details row={r.left ?? r.right} />
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
