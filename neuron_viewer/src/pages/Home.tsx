import { useState } from "react";
import type { ModelState } from "../App";
import { linkClick, navigate } from "../router";
import { stateToParams, DEFAULT_STATE } from "../lib/url";

const EXAMPLES = [
  {
    label: "Indirect object: Mary vs John",
    prompt: "When Mary and John went to the store, John gave a drink to",
    targets: [" Mary"],
    distractors: [" John"],
  },
  {
    label: "Capital: Paris vs London",
    prompt: "The capital of France is",
    targets: [" Paris"],
    distractors: [" London"],
  },
];

/** Parse "layer:index" for the jump box; an error message instead of throwing. */
export function parseJump(text: string, nLayers: number, width: number): [number, number] | string {
  const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(text);
  if (!m) return "use the form layer:index, e.g. 5:123";
  const [layer, index] = [Number(m[1]), Number(m[2])];
  if (layer >= nLayers) return `layer ${layer} is out of range (0–${nLayers - 1})`;
  if (index >= width) return `index ${index} is out of range (0–${width - 1})`;
  return [layer, index];
}

export default function Home({ model }: { model: ModelState }) {
  const info = model.info;
  const [jump, setJump] = useState("");
  const [kind, setKind] = useState<"mlp_neuron" | "attention_head">("mlp_neuron");
  const [jumpError, setJumpError] = useState<string | null>(null);

  const go = () => {
    if (!info) return;
    const width = kind === "mlp_neuron" ? info.dMlp : info.nHeads;
    const parsed = parseJump(jump, info.nLayers, width);
    if (typeof parsed === "string") setJumpError(parsed);
    else navigate(`/${encodeURIComponent(info.name)}/${kind}/${parsed[0]}/${parsed[1]}`);
  };

  return (
    <div className="home">
      <section className="card">
        <h2>Model</h2>
        {model.error && <p className="error">{model.error}</p>}
        {info && (
          <table className="kv" data-testid="model-info">
            <tbody>
              <tr>
                <th>name</th>
                <td>{info.name}</td>
              </tr>
              <tr>
                <th>architecture</th>
                <td>{info.architecture}</td>
              </tr>
              <tr>
                <th>layers</th>
                <td>{info.nLayers}</td>
              </tr>
              <tr>
                <th>heads (key/value)</th>
                <td>
                  {info.nHeads} ({info.nKvHeads})
                </td>
              </tr>
              <tr>
                <th>width / MLP</th>
                <td>
                  {info.dModel} / {info.dMlp}
                </td>
              </tr>
              <tr>
                <th>vocabulary</th>
                <td>{info.vocabSize}</td>
              </tr>
              <tr>
                <th>max prompt</th>
                <td>{info.maxPromptTokens} tokens</td>
              </tr>
              <tr>
                <th>device</th>
                <td>
                  {info.device}, {info.dtype}
                </td>
              </tr>
            </tbody>
          </table>
        )}
      </section>
      <section className="card">
        <h2>Debug a prompt</h2>
        <p>
          <a href="/debugger" onClick={linkClick}>
            Open the debugger
          </a>{" "}
          or start from an example:
        </p>
        <ul>
          {EXAMPLES.map((ex) => (
            <li key={ex.label}>
              <a
                href={`/debugger?${stateToParams({ ...DEFAULT_STATE, prompt: ex.prompt, targets: ex.targets, distractors: ex.distractors })}`}
                onClick={linkClick}
              >
                {ex.label}
              </a>
            </li>
          ))}
        </ul>
      </section>
      <section className="card">
        <h2>Browse components</h2>
        <div className="row">
          <select
            value={kind}
            onChange={(e) => setKind(e.target.value as typeof kind)}
            aria-label="component type"
          >
            <option value="mlp_neuron">MLP neuron</option>
            <option value="attention_head">attention head</option>
          </select>
          <input
            placeholder="layer:index, e.g. 5:123"
            value={jump}
            aria-label="layer:index"
            onChange={(e) => {
              setJump(e.target.value);
              setJumpError(null);
            }}
            onKeyDown={(e) => e.key === "Enter" && go()}
          />
          <button onClick={go} disabled={!info}>
            Go
          </button>
        </div>
        {jumpError && <p className="error">{jumpError}</p>}
      </section>
    </div>
  );
}
