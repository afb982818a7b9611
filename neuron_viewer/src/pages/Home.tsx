import { useEffect, useState } from "react";
import type { ModelState } from "../App";
import { api } from "../api/client";
import type { DatasetInfo, ModelInfo } from "../api/types";
import { onJobsChanged } from "../lib/events";
import { formatLayers, parseJump } from "../lib/jump";
import { componentWidth, SIDE_LABEL, type NodeTypes } from "../lib/nodes";
import { useNodeTypes } from "../nodeTypes";
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

/** The loaded autoencoders, one line per side: "MLP side: layers 0–29, 2,048 latents". */
function autoencoderSummary(types: NodeTypes): string[] {
  return types.latents.flatMap((t) => {
    if (!t.layers?.length || !t.autoencoderSide) return [];
    const widths = [...new Set((t.widths ?? []).map((w) => w.toLocaleString()))].join(" / ");
    return [
      `${SIDE_LABEL[t.autoencoderSide]} side: layers ${formatLayers(t.layers)}, ${widths} latents`,
    ];
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
  const types = useNodeTypes();
  const kinds = types.components.filter((t) => ds.families.includes(t.name));
  const [kindName, setKindName] = useState<string | null>(null);
  const kind = kinds.find((t) => t.name === kindName) ?? kinds[0];
  const [jump, setJump] = useState("");
  const [error, setError] = useState<string | null>(null);
  // The dataset's own model names the page; the loaded model's shape checks the range when it
  // is the same model.
  const modelName = ds.modelName ?? info?.name ?? null;
  const sameModel = info != null && modelName === info.name;
  const go = () => {
    if (!modelName) return setError("the dataset does not say which model it was collated for");
    if (!kind) return;
    const parsed = parseJump(jump, {
      nLayers: sameModel ? info.nLayers : null,
      layers: ds.layers ?? null,
      width: sameModel ? (layer) => componentWidth(kind, layer) : null,
    });
    if (typeof parsed === "string") return setError(parsed);
    const query = many ? `?dataset=${encodeURIComponent(ds.name)}` : "";
    navigate(`/${encodeURIComponent(modelName)}/${kind.name}/${parsed[0]}/${parsed[1]}${query}`);
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
      ) : kind ? (
        <div className="row">
          <select
            value={kind.name}
            onChange={(e) => {
              setKindName(e.target.value);
              setError(null);
            }}
            aria-label={`component type in ${ds.name}`}
            data-testid="dataset-kind"
          >
            {kinds.map((t) => (
              <option key={t.name} value={t.name}>
                {t.label}
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
  const types = useNodeTypes();
  const [jump, setJump] = useState("");
  const [kindName, setKindName] = useState<string | null>(null);
  const [jumpError, setJumpError] = useState<string | null>(null);
  useEffect(() => {
    document.title = "Transformer debugger";
  }, []);
  // The component types the model has (latents: when the server loaded autoencoders of their
  // side; without a model, none).
  const kinds = types.components.filter((t) =>
    t.layers ? t.layers.length > 0 : t.autoencoderSide == null,
  );
  const kind = kinds.find((t) => t.name === kindName) ?? kinds[0];

  const go = () => {
    if (!info || !kind) return;
    const parsed = parseJump(jump, {
      nLayers: info.nLayers,
      // Latents are in the layers holding an autoencoder of their side.
      layers: kind.autoencoderSide ? (kind.layers ?? null) : null,
      layersHolder: "the loaded autoencoders",
      width: (layer) => componentWidth(kind, layer),
    });
    if (typeof parsed === "string") setJumpError(parsed);
    else navigate(`/${encodeURIComponent(info.name)}/${kind.name}/${parsed[0]}/${parsed[1]}`);
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
              {autoencoderSummary(types).length > 0 && (
                <tr>
                  <th>autoencoders</th>
                  <td data-testid="model-autoencoders">
                    {autoencoderSummary(types).map((line) => (
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
        <p className="muted" data-testid="home-terms">
          <strong>D</strong>, the direction of interest, is the logit of the target tokens minus
          that of the distractors (or, when tracing, the traced node&apos;s pre-activation); the
          node table ranks components by how they move it. <strong>Activation</strong> is a
          node&apos;s value (a head&apos;s attention probability), <strong>write magnitude</strong>{" "}
          the size of what it adds to the residual stream, <strong>direct effect</strong> what that
          write adds to D through no later layer, and <strong>estimated total effect</strong>{" "}
          activation × gradient of D, every later path included.
        </p>
        <ul>
          {EXAMPLES.map((ex) => (
            <li key={ex.label}>
              <a
                href={`/debugger?${stateToParams(types, { ...DEFAULT_STATE, prompt: ex.prompt, targets: ex.targets, distractors: ex.distractors })}`}
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
            value={kind?.name}
            onChange={(e) => setKindName(e.target.value)}
            aria-label="component type"
          >
            {kinds.map((t) => (
              <option key={t.name} value={t.name}>
                {t.label}
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
