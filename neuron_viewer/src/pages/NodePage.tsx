import { useEffect, useRef, useState } from "react";
import type { ModelState } from "../App";
import { api, ApiError } from "../api/client";
import type {
  BatchedResponse,
  DerivedAttentionScalarsResponse,
  DerivedScalarsResponse,
  NodeIndex,
  NodeTypeInfo,
} from "../api/types";
import { Card } from "../components/Card";
import { DatasetExamples } from "../components/DatasetExamples";
import { Explanations } from "../components/Explanations";
import { TokenHeatmap } from "../components/Tokens";
import { maxAbs } from "../lib/colors";
import { LatestOnly } from "../lib/latest";
import { formatLayers } from "../lib/jump";
import {
  componentName,
  componentWidth,
  isComponent,
  makeNode,
  SIDE_LABEL,
  tokenComponent,
} from "../lib/nodes";
import { displayToken } from "../lib/tokens";
import { useNodeTypes } from "../nodeTypes";
import { navigate, useLocation } from "../router";

/** Per-token activations (neurons, latents) or per token pair (heads). */
type Activations =
  | { kind: "per_token"; data: DerivedScalarsResponse; metric: string }
  | { kind: "attention_head"; data: DerivedAttentionScalarsResponse; metric: string };

async function rawOrNormalized(
  type: NodeTypeInfo,
  layer: number,
  index: number,
  prompt: string,
  dataset: string | null,
  normalize: boolean,
  signal: AbortSignal,
): Promise<Activations> {
  const norm = normalize
    ? { normalizeByDatasetMax: true, datasetName: dataset ?? undefined }
    : { normalizeByDatasetMax: false };
  if (type.perTokenPair) {
    // Scaled by the dataset max, the quantity shown is the one the dataset records (a head's
    // write magnitude), never the attention probability on another quantity's scale.
    const metric = normalize ? (type.datasetMetric ?? "activation") : "activation";
    const data = await api.derivedAttentionScalars(
      { prompt, layerIndex: layer, headIndex: index, metric, ...norm },
      signal,
    );
    return { kind: "attention_head", data, metric };
  }
  const data = await api.derivedScalars(
    {
      prompt,
      ...tokenComponent(type, layer, index),
      ...norm,
    },
    signal,
  );
  return { kind: "per_token", data, metric: "activation" };
}

/** A prompt's activations scaled by the component's dataset max (so they are coloured like the
 * dataset examples), or the raw values when no dataset holds the component (a 404). */
async function activations(
  type: NodeTypeInfo,
  layer: number,
  index: number,
  prompt: string,
  dataset: string | null,
  signal: AbortSignal,
): Promise<Activations> {
  try {
    return await rawOrNormalized(type, layer, index, prompt, dataset, true, signal);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
    return rawOrNormalized(type, layer, index, prompt, dataset, false, signal);
  }
}

/** The quantity shown, in words: a head's activation is its attention probability. */
function quantity(acts: Activations): string {
  if (acts.kind === "attention_head")
    return acts.metric === "activation" ? "attention probability" : acts.metric.replace(/_/g, " ");
  return "activation";
}

function ScaleNote({ datasetMax, what }: { datasetMax: number | null | undefined; what: string }) {
  return (
    <span className="muted" data-testid="activation-scale">
      {datasetMax
        ? `colour: ${what}, scaled by its dataset max ${datasetMax.toPrecision(3)}`
        : `colour: ${what}, scaled by this prompt's max (no dataset holds this component)`}
    </span>
  );
}

/** A prompt's activations: per token for neurons; for heads, hover a token to see its attention. */
function ActivationView({ acts }: { acts: Activations }) {
  const [hover, setHover] = useState<number | null>(null);
  if (acts.kind === "per_token") {
    const v = acts.data.values;
    const top = v.reduce((b, x, i) => (x > v[b] ? i : b), 0);
    return (
      <div data-testid="activations">
        <TokenHeatmap
          tokens={acts.data.tokenStrings}
          values={v}
          scale={acts.data.datasetMax ?? undefined}
          onHover={setHover}
        />
        <p className="muted">
          max {v[top]?.toFixed(3)} at {displayToken(acts.data.tokenStrings[top] ?? "")} ({top})
          {hover != null && ` · token ${hover}: ${v[hover]?.toFixed(4)}`}
          {hover != null &&
            acts.data.normalizedValues &&
            ` (${acts.data.normalizedValues[hover]?.toFixed(2)} of the dataset max)`}{" "}
          · <ScaleNote datasetMax={acts.data.datasetMax} what={quantity(acts)} />
        </p>
      </div>
    );
  }
  const rows = acts.data.values;
  const n = rows.length;
  // Hovering token q shows what it attends to (its row); otherwise each token's strongest pair.
  const values =
    hover == null
      ? acts.data.maxOut
      : Array.from({ length: n }, (_, k) => (k <= hover ? rows[hover][k] : k === hover ? 0 : null));
  return (
    <div data-testid="activations">
      <TokenHeatmap
        tokens={acts.data.tokenStrings}
        values={values}
        scale={acts.data.datasetMax ?? maxAbs(rows.flat())}
        onHover={setHover}
        highlight={hover != null ? new Set([hover]) : undefined}
      />
      <p className="muted">
        {hover == null
          ? `each query token's strongest pair; hover a token to see its pairs`
          : `token ${hover}'s pairs with the tokens it attends to`}
        {" · max "}
        <span data-testid="pair-max">{maxAbs(rows.flat()).toPrecision(3)}</span> ·{" "}
        <ScaleNote datasetMax={acts.data.datasetMax} what={quantity(acts)} />
      </p>
    </div>
  );
}

function useActivations(
  type: NodeTypeInfo,
  layer: number,
  index: number,
  prompt: string,
  dataset: string | null,
) {
  const [state, setState] = useState<{
    acts: Activations | null;
    error: string | null;
    loading: boolean;
  }>({ acts: null, error: null, loading: false });
  const latest = useRef(new LatestOnly());
  useEffect(() => {
    if (!prompt) return;
    setState((s) => ({ ...s, loading: true }));
    latest.current
      .run((signal) => activations(type, layer, index, prompt, dataset, signal))
      .then((r) => {
        if (r.stale) return;
        setState({
          acts: r.value ?? null,
          error: r.value ? null : (r.error as Error).message,
          loading: false,
        });
      });
  }, [type, layer, index, prompt, dataset]);
  return state;
}

export default function NodePage(props: {
  model: ModelState;
  modelName: string;
  nodeType: string;
  layer: string;
  index: string;
}) {
  const type = useNodeTypes().named(props.nodeType);
  const layer = Number(props.layer);
  const index = Number(props.index);
  const valid =
    type != null &&
    isComponent(type) &&
    Number.isInteger(layer) &&
    Number.isInteger(index) &&
    layer >= 0 &&
    index >= 0;
  if (!valid)
    return (
      <p className="error">
        Not a component: {props.nodeType}/{props.layer}/{props.index}
      </p>
    );
  return (
    <ComponentPage
      model={props.model}
      modelName={props.modelName}
      type={type}
      layer={layer}
      index={index}
    />
  );
}

/** One neuron, head or latent: `index` of `layer`, both whole numbers. */
function ComponentPage(props: {
  model: ModelState;
  modelName: string;
  type: NodeTypeInfo;
  layer: number;
  index: number;
}) {
  const { type, layer, index } = props;
  const { search } = useLocation();
  const params = new URLSearchParams(search);
  const prompt = params.get("prompt") ?? "";
  const token = Number(params.get("token") ?? 0);
  const attended = params.get("attended");
  const dataset = params.get("dataset");
  const info = props.model.info;
  const nLayers = info?.nLayers ?? 0;
  // Layers holding this type in the loaded model (for latents: those with an autoencoder of its
  // side), and the components of each; without a model, unknown and not checked.
  const layers = type.layers ?? null;
  const width = componentWidth(type, layer) ?? 0;
  const inRange = layers == null || (layers.includes(layer) && index < width);
  const prevLayer = layers?.filter((l) => l < layer).at(-1) ?? null;
  const nextLayer = layers?.find((l) => l > layer) ?? null;

  const go = (l: number | null, i: number) => {
    if (l == null || i < 0 || i >= (componentWidth(type, l) ?? 0)) return;
    navigate(`/${encodeURIComponent(props.modelName)}/${type.name}/${l}/${i}${search}`, {
      replace: true,
    });
  };
  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      const t = e.target as HTMLElement;
      if (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable) return; // typing
      if (e.key === "ArrowLeft") go(layer, index - 1);
      else if (e.key === "ArrowRight") go(layer, index + 1);
      else if (e.key === "ArrowUp") go(prevLayer, index);
      else if (e.key === "ArrowDown") go(nextLayer, index);
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  });

  const [ownText, setOwnText] = useState("");
  const [ownSubmitted, setOwnSubmitted] = useState("");
  const interest = useActivations(type, layer, index, inRange ? prompt : "", dataset);
  const own = useActivations(type, layer, index, inRange ? ownSubmitted : "", dataset);

  const [lens, setLens] = useState<{ data: BatchedResponse | null; error: string | null }>({
    data: null,
    error: null,
  });
  useEffect(() => {
    if (!inRange || !info) return;
    const node: NodeIndex = makeNode(
      type,
      layer,
      prompt ? token : 0,
      index,
      attended != null ? Number(attended) : 0,
    );
    const controller = new AbortController();
    api
      .batched(
        {
          subRequests: [
            {
              inferenceRequestSpec: { prompt: prompt || (info.bosToken ?? " the"), lossFn: "zero" },
              processingRequestSpecByName: {
                views: { specType: "scored_tokens", nodes: [node], k: 15 },
              },
            },
          ],
        },
        controller.signal,
      )
      .then((data) => setLens({ data, error: null }))
      .catch((e: Error) => e.name !== "AbortError" && setLens({ data: null, error: e.message }));
    return () => controller.abort();
  }, [inRange, info, type, layer, index, prompt, token, attended]);

  const name = componentName(type, layer, index);
  useEffect(() => {
    document.title = `${name} · ${props.modelName} · Transformer debugger`;
  }, [name, props.modelName]);
  if (!inRange) {
    const side = type.autoencoderSide;
    // In a layer without this type, the width of its others (neurons and heads: the same in
    // every layer).
    const perLayer = componentWidth(type, layer) ?? type.widths?.[0] ?? 0;
    return (
      <p className="error">
        {name} is out of range for {info?.name}
        {side && !layers?.includes(layer)
          ? `: no ${SIDE_LABEL[side]}-side autoencoder is loaded for layer ${layer}` +
            (layers?.length
              ? ` (layers ${formatLayers(layers)})`
              : " (start the server with --autoencoder PATH)")
          : ` (${nLayers} layers, ${perLayer} per layer)`}
        .
      </p>
    );
  }
  const views = lens.data?.subResponses[0]?.processingResultsByName.views?.tokenViews?.[0];

  return (
    <div className="node-page">
      <div className="row node-nav">
        <h1 data-testid="node-title">{name}</h1>
        <button
          onClick={() => go(layer, index - 1)}
          disabled={index === 0}
          aria-label="previous component"
        >
          ← prev
        </button>
        <button
          onClick={() => go(layer, index + 1)}
          disabled={index >= width - 1}
          aria-label="next component"
        >
          next →
        </button>
        <button
          onClick={() => go(prevLayer, index)}
          disabled={prevLayer == null}
          aria-label="previous layer"
        >
          ↑ layer
        </button>
        <button
          onClick={() => go(nextLayer, index)}
          disabled={nextLayer == null}
          aria-label="next layer"
        >
          ↓ layer
        </button>
        <span className="muted">arrow keys move too</span>
      </div>
      {prompt && (
        <Card
          title="Prompt of interest"
          loading={interest.loading}
          error={interest.error}
          testId="prompt-of-interest"
        >
          {interest.acts && <ActivationView acts={interest.acts} />}
        </Card>
      )}
      <Explanations
        key={`${type.name}/${layer}/${index}`}
        type={type}
        layer={layer}
        index={index}
        dataset={dataset}
      />
      <DatasetExamples type={type} layer={layer} index={index} dataset={dataset} />
      <Card title="Token space" error={lens.error} testId="logit-lens">
        {views && (
          <div className="details">
            {[
              ["Upvoted output tokens", views.upvotedOutputTokens],
              ["Downvoted output tokens", views.downvotedOutputTokens],
              [
                type.perTokenPair
                  ? "Input tokens that upvote the query side"
                  : "Input tokens that upvote it",
                views.upvotingInputTokens,
              ],
              ...(type.perTokenPair
                ? [["Input tokens that upvote the key side", views.upvotingKeyTokens] as const]
                : []),
            ].map(([title, list]) => (
              <div className="token-list" key={title as string}>
                <h4>{title as string}</h4>
                <ol>
                  {(list as { text: string; score: number }[]).map((t, i) => (
                    <li key={i}>
                      <code>{displayToken(t.text)}</code>{" "}
                      <span className="num">{t.score.toFixed(2)}</span>
                    </li>
                  ))}
                </ol>
              </div>
            ))}
          </div>
        )}
      </Card>
      <Card
        title="Activations on your own text"
        loading={own.loading}
        error={own.error}
        testId="own-text"
      >
        <textarea
          value={ownText}
          rows={3}
          aria-label="your text"
          placeholder="Type text, then Run (Ctrl/Cmd+Enter)"
          onChange={(e) => setOwnText(e.target.value)}
          onKeyDown={(e) =>
            e.key === "Enter" && (e.ctrlKey || e.metaKey) && setOwnSubmitted(ownText)
          }
        />
        <div className="row">
          <button className="primary" onClick={() => setOwnSubmitted(ownText)} disabled={!ownText}>
            Run
          </button>
        </div>
        {own.acts && ownSubmitted && <ActivationView acts={own.acts} />}
      </Card>
    </div>
  );
}
