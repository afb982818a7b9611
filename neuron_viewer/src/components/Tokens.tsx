import { cellColor, maxAbs, textColor } from "../lib/colors";
import { displayToken } from "../lib/tokens";

/** Tokens coloured by a value each (heat map), with the value and index on hover. */
export function TokenHeatmap(props: {
  tokens: string[];
  values: (number | null)[];
  scale?: number;
  signed?: boolean;
  onHover?: (i: number | null) => void;
  highlight?: Set<number>;
  testId?: string;
  /** the hover text of token i (default: index, token and value) */
  describe?: (i: number) => string;
}) {
  const scale = props.scale ?? maxAbs(props.values);
  return (
    <div className="tokens" data-testid={props.testId}>
      {props.tokens.map((t, i) => {
        const v = props.values[i];
        return (
          <span
            key={i}
            className={"token" + (props.highlight?.has(i) ? " highlight" : "")}
            style={{
              background: cellColor(v, scale, props.signed ?? true),
              color: textColor(v, scale),
            }}
            title={
              props.describe?.(i) ??
              `${i}: ${JSON.stringify(t)}${v != null ? ` = ${v.toFixed(4)}` : ""}`
            }
            onMouseEnter={() => props.onHover?.(i)}
            onMouseLeave={() => props.onHover?.(null)}
          >
            {displayToken(t)}
          </span>
        );
      })}
    </div>
  );
}

/** Token ids and strings with their index, as a compact table. */
export function TokenTable(props: {
  sides: { label: string; tokens: string[]; ids: number[] }[];
  differ: Set<number>;
}) {
  const n = Math.max(...props.sides.map((s) => s.tokens.length));
  return (
    <div className="scroll-x">
      <table className="token-table" data-testid="token-table">
        <thead>
          <tr>
            <th>#</th>
            {Array.from({ length: n }, (_, i) => (
              <th key={i} className={props.differ.has(i) ? "differ" : ""}>
                {i}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {props.sides.map((s) => (
            <tr key={s.label}>
              <th>{s.label}</th>
              {Array.from({ length: n }, (_, i) => (
                <td
                  key={i}
                  className={props.differ.has(i) ? "differ" : ""}
                  title={s.ids[i] != null ? `id ${s.ids[i]}` : ""}
                >
                  {s.tokens[i] != null ? displayToken(s.tokens[i]) : ""}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
