import { useEffect, useState } from "react";
import type { ModelState } from "../App";
import { api } from "../api/client";
import type { DatasetInfo, ModelInfo } from "../api/types";
import { onJobsChanged } from "../lib/events";
import { formatLayers, parseJump } from "../lib/jump";
import {
  autoencoderLayers,
  COMPONENT_KINDS,
  componentWidth,
  kindLayers,
  latentSide,
  type ComponentKind,
} from "../lib/nodes";
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

const KIND_LABEL: Record<ComponentKind, string> = {
  mlp_neuron: "MLP neuron",
  attention_head: "attention head",
  mlp_autoencoder_latent: "MLP latent",
  attention_autoencoder_latent: "attention latent",
};

/** The model's autoencoders, one line per side: "MLP side: layers 0–29, 2,048 latents". */
function autoencoderSummary(info: ModelInfo): string[] {
  return (["mlp", "attention"] as const).flatMap((side) => {
    const mine = (info.autoencoders ?? []).filter((a) => a.autoencoderSide === side);
    if (!mine.length) return [];
    const widths = [...new Set(mine.map((a) => a.nLatents.toLocaleString()))].join(" / ");
    const layers = formatLayers(autoencoderLayers(info, side));
    return [`${side === "mlp" ? "MLP" : "attention"} side: layers ${layers}, ${widths} latents`];
  });
}

/** One collated dataset: what it holds, and a layer:index box that opens a component's page. */
function DatasetRow({
  ds,
  info,
  many,
}: {
  ds: DatasetInfo;
  info: ModelInfo | null;
  many: boolean;
}) {
  const kinds = COMPONENT_KINDS.filter((k) => ds.families.includes(k));
  const [kind, setKind] = useState<ComponentKind>(kinds[0] ?? "mlp_neuron");
  const [jump, setJump] = useState("");
  const [error, setError] = useState<string | null>(null);
  // The dataset's own model names the page; the loaded model's shape checks the range when it
  // is the same model.
  const modelName = ds.modelName ?? info?.name ?? null;
  const sameModel = info != null && modelName === info.name;
  const go = () => {
    if (!modelName) return setError("the dataset does not say which model it was collated for");
    const parsed = parseJump(jump, {
      nLayers: sameModel ? info.nLayers : null,
      layers: ds.layers ?? null,
      width: sameModel ? (layer) => componentWidth(info, kind, layer) : null,
    });
    if (typeof parsed === "string") return setError(parsed);
    const query = many ? `?dataset=${encodeURIComponent(ds.name)}` : "";
    navigate(`/${encodeURIComponent(modelName)}/${kind}/${parsed[0]}/${parsed[1]}${query}`);
  };
  return (
    <li className="dataset" data-testid="dataset" data-name={ds.name}>
      <div className="row">
        <strong data-testid="dataset-title">{ds.name}</strong>
        <span className="badge">{ds.kind}</span>
        {ds.status === "in_progress" && <span className="badge in-progress">in progress</span>}
        {!ds.available && <span className="badge">not written yet</span>}
      </div>
      <div className="muted" title={ds.location}>
        {[
          ds.modelName,
          ds.nTokens != null ? `${ds.nTokens.toLocaleString()} tokens` : null,
          ds.corpus ? `corpus ${ds.corpus}` : null,
          ds.layers ? `layers ${formatLayers(ds.layers)}` : null,
          ds.windowLength ? `${ds.windowLength}-token excerpts` : null,
          ds.families.join(", "),
        ]
          .filter(Boolean)
          .join(" · ")}
      </div>
      {!ds.available ? (
        <p className="muted">
          Not written yet: it is being collated (progress in the jobs panel at the top).
        </p>
      ) : kinds.length > 0 ? (
        <div className="row">
          <select
            value={kind}
            onChange={(e) => {
              setKind(e.target.value as ComponentKind);
              setError(null);
            }}
            aria-label={`component type in ${ds.name}`}
            data-testid="dataset-kind"
          >
            {kinds.map((k) => (
              <option key={k} value={k}>
                {KIND_LABEL[k]}
              </option>
            ))}
          </select>
          <input
            placeholder="layer:index, e.g. 1:42"
            value={jump}
            aria-label={`layer:index in ${ds.name}`}
            data-testid="dataset-jump"
            onChange={(e) => {
              setJump(e.target.value);
              setError(null);
            }}
            onKeyDown={(e) => e.key === "Enter" && go()}
          />
          <button onClick={go} data-testid="dataset-go">
            Open
          </button>
        </div>
      ) : (
        <p className="muted">No neurons or heads to browse ({ds.families.join(", ")}).</p>
      )}
      {error && (
        <p className="error" data-testid="dataset-jump-error">
          {error}
        </p>
      )}
    </li>
  );
}

function Datasets({ info }: { info: ModelInfo | null }) {
  const [state, setState] = useState<{ datasets: DatasetInfo[] | null; error: string | null }>({
    datasets: null,
    error: null,
  });
  const [reload, setReload] = useState(0);
  // A store being collated grows (and appears) as its job makes progress.
  useEffect(() => onJobsChanged(() => setReload((r) => r + 1), ["status", "progress"]), []);
  useEffect(() => {
    const controller = new AbortController();
    api
      .datasetsMetadata(controller.signal)
      .then((r) => setState({ datasets: r.datasets, error: null }))
      .catch(
        (e: Error) => e.name !== "AbortError" && setState({ datasets: null, error: e.message }),
      );
    return () => controller.abort();
  }, [reload]);
  const datasets = state.datasets;
  return (
    <section className="card" data-testid="datasets">
      <h2>Datasets</h2>
      {state.error && <p className="error">{state.error}</p>}
      {datasets && datasets.length === 0 && (
        <p className="muted">
          No collated datasets. Start the server with <code>--dataset PATH</code> (a store from{" "}
          <code>tdb collate</code> or a TDB JSON folder/URL) or <code>--auto-dataset</code>.
        </p>
      )}
      {datasets && datasets.length > 0 && (
        <ul className="datasets">
          {datasets.map((ds) => (
            <DatasetRow key={ds.name} ds={ds} info={info} many={datasets.length > 1} />
          ))}
        </ul>
      )}
    </section>
  );
}

export default function Home({ model }: { model: ModelState }) {
  const info = model.info;
  const [jump, setJump] = useState("");
  const [kind, setKind] = useState<ComponentKind>("mlp_neuron");
  const [jumpError, setJumpError] = useState<string | null>(null);
  // Latent kinds are offered when the server loaded autoencoders of that side.
  const kinds = COMPONENT_KINDS.filter((k) => {
    const side = latentSide(k);
    return side == null || autoencoderLayers(info, side).length > 0;
  });

  const go = () => {
    if (!info) return;
    const latents = latentSide(kind) != null;
    const parsed = parseJump(jump, {
      nLayers: info.nLayers,
      layers: latents ? kindLayers(info, kind) : null,
      layersHolder: "the loaded autoencoders",
      width: (layer) => componentWidth(info, kind, layer),
    });
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
              {autoencoderSummary(info).length > 0 && (
                <tr>
                  <th>autoencoders</th>
                  <td data-testid="model-autoencoders">
                    {autoencoderSummary(info).map((line) => (
                      <div key={line}>{line}</div>
                    ))}
                  </td>
                </tr>
              )}
            </tbody>
          </table>
        )}
      </section>
      <Datasets info={info} />
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
            {kinds.map((k) => (
              <option key={k} value={k}>
                {KIND_LABEL[k]}
              </option>
            ))}
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
