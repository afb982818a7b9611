import { useMemo, useState } from "react";
import { axisFraction, binValues } from "../lib/histogram";

const W = 560;
const H = 140;
const PAD = { left: 44, right: 8, top: 8, bottom: 34 };

function fmt(x: number): string {
  const a = Math.abs(x);
  if (a !== 0 && (a < 0.01 || a >= 1000)) return x.toExponential(1);
  return x.toFixed(a < 1 ? 3 : 2);
}

/** Bars of a value distribution (SVG), with vertical markers (e.g. the quantile boundaries). */
export function Histogram(props: {
  values: number[];
  markers?: { value: number; label: string }[];
  bins?: number;
  testId?: string;
  caption?: string;
  /** the x axis's title (default "value") */
  xLabel?: string;
}) {
  const [log, setLog] = useState(true);
  const markers = props.markers ?? [];
  const h = useMemo(
    () =>
      binValues(
        props.values,
        props.bins ?? 50,
        (props.markers ?? []).map((m) => m.value),
      ),
    [props.values, props.bins, props.markers],
  );
  const [hover, setHover] = useState<number | null>(null);
  if (h.total === 0) return <p className="muted">No values to plot.</p>;
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const y = (c: number) => (log ? Math.log10(1 + c) : c);
  const top = Math.max(...h.counts.map(y)) || 1;
  const bw = plotW / h.counts.length;
  const x = (v: number) => PAD.left + axisFraction(h, v) * plotW;
  const zeroInside = h.edges[0] < 0 && h.edges[h.edges.length - 1] > 0;
  return (
    <div className="histogram" data-testid={props.testId}>
      <svg viewBox={`0 0 ${W} ${H}`} width="100%" style={{ maxWidth: W }} role="img">
        <title>{props.caption ?? "histogram"}</title>
        {h.counts.map((c, i) => {
          const bh = (y(c) / top) * plotH;
          return (
            <rect
              key={i}
              data-testid="histogram-bar"
              data-count={c}
              x={PAD.left + i * bw + 0.5}
              y={PAD.top + plotH - bh}
              width={Math.max(0.5, bw - 1)}
              height={bh}
              className={hover === i ? "bar hover" : "bar"}
              onMouseEnter={() => setHover(i)}
              onMouseLeave={() => setHover(null)}
            >
              <title>
                [{fmt(h.edges[i])}, {fmt(h.edges[i + 1])}): {c.toLocaleString()}
              </title>
            </rect>
          );
        })}
        <line
          x1={PAD.left}
          x2={W - PAD.right}
          y1={PAD.top + plotH}
          y2={PAD.top + plotH}
          className="axis"
        />
        <g data-testid="histogram-y-axis">
          <line x1={PAD.left} x2={PAD.left} y1={PAD.top} y2={PAD.top + plotH} className="axis" />
          <text x={PAD.left - 4} y={PAD.top + 8} className="tick" textAnchor="end">
            {Math.max(0, ...h.counts).toLocaleString()}
          </text>
          <text x={PAD.left - 4} y={PAD.top + plotH} className="tick" textAnchor="end">
            0
          </text>
          <text
            className="tick"
            textAnchor="middle"
            transform={`translate(10 ${PAD.top + plotH / 2}) rotate(-90)`}
          >
            {log ? "count (log)" : "count"}
          </text>
        </g>
        <text
          x={PAD.left + plotW / 2}
          y={H - 4}
          className="tick"
          textAnchor="middle"
          data-testid="histogram-x-label"
        >
          {props.xLabel ?? "value"}
        </text>
        {zeroInside && (
          <line x1={x(0)} x2={x(0)} y1={PAD.top} y2={PAD.top + plotH} className="zero" />
        )}
        {markers.map((m, i) => (
          <g key={i} data-testid="histogram-marker">
            <line
              x1={x(m.value)}
              x2={x(m.value)}
              y1={PAD.top}
              y2={PAD.top + plotH}
              className="marker"
            />
            <title>
              {m.label}: {fmt(m.value)}
            </title>
          </g>
        ))}
        <text x={PAD.left} y={PAD.top + plotH + 12} className="tick">
          {fmt(h.edges[0])}
        </text>
        <text x={W - PAD.right} y={PAD.top + plotH + 12} className="tick" textAnchor="end">
          {fmt(h.edges[h.edges.length - 1])}
        </text>
        {zeroInside && (
          <text x={x(0)} y={PAD.top + plotH + 12} className="tick" textAnchor="middle">
            0
          </text>
        )}
      </svg>
      <div className="row muted">
        <span>
          {hover != null
            ? `[${fmt(h.edges[hover])}, ${fmt(h.edges[hover + 1])}): ${h.counts[hover].toLocaleString()}`
            : `${h.total.toLocaleString()} values` + (props.caption ? ` · ${props.caption}` : "")}
        </span>
        <label>
          <input type="checkbox" checked={log} onChange={(e) => setLog(e.target.checked)} /> log
          counts
        </label>
      </div>
    </div>
  );
}
