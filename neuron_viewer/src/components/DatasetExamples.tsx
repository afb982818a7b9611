import { useEffect, useMemo, useRef, useState } from "react";
import { api, ApiError } from "../api/client";
import type {
  ActivationRecord,
  AttentionHeadRecordResponse,
  NeuronRecordResponse,
  NodeTypeInfo,
  PairActivationRecord,
} from "../api/types";
import { onJobsChanged } from "../lib/events";
import { formatNumber as fmt, quantileBinLabels } from "../lib/histogram";
import { LatestOnly } from "../lib/latest";
import { tokenComponent } from "../lib/nodes";
import { attendedFrom, attendsTo, tokensForPairs } from "../lib/pairs";
import { displayToken } from "../lib/tokens";
import { Card } from "./Card";
import { Histogram } from "./Histogram";
import { TokenHeatmap } from "./Tokens";

/** Per-token records (neurons, latents) or per-token-pair ones (heads). */
type RecordData =
  | { kind: "per_token"; data: NeuronRecordResponse }
  | { kind: "attention_head"; data: AttentionHeadRecordResponse };
/** Head excerpts coloured by how much each token is read (in) or reads (out). */
type HeadMode = "in" | "out";

const FEW = 5;

async function fetchRecord(
  type: NodeTypeInfo,
  layer: number,
  index: number,
  dataset: string | null,
  signal: AbortSignal,
): Promise<RecordData> {
  const datasetName = dataset ?? undefined;
  if (type.perTokenPair) {
    const data = await api.attentionHeadRecord(
      { datasetName, layerIndex: layer, headIndex: index },
      signal,
    );
    return { kind: "attention_head", data };
  }
  const data = await api.neuronRecord(
    {
      datasetName,
      ...tokenComponent(type, layer, index),
    },
    signal,
  );
  return { kind: "per_token", data };
}

/** The component's record, refetched when a background job changes status (a dataset done). */
function useRecord(type: NodeTypeInfo, layer: number, index: number, dataset: string | null) {
  const [state, setState] = useState<{
    record: RecordData | null;
    error: string | null;
    /** No collated dataset holds the component (a 404): not an error, a fact to explain. */
    missing: boolean;
    loading: boolean;
  }>({ record: null, error: null, missing: false, loading: true });
  const [reload, setReload] = useState(0);
  useEffect(() => onJobsChanged(() => setReload((r) => r + 1)), []);
  const latest = useRef(new LatestOnly());
  useEffect(() => {
    setState((s) => ({ ...s, loading: true }));
    latest.current
      .run((signal) => fetchRecord(type, layer, index, dataset, signal))
      .then((r) => {
        if (r.stale) return;
        setState({
          record: r.value ?? null,
          error: r.value ? null : (r.error as Error).message,
          missing: r.error instanceof ApiError && r.error.status === 404,
          loading: false,
        });
      });
  }, [type, layer, index, dataset, reload]);
  return state;
}

function argmax(values: number[]): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function NeuronExcerpt({ record }: { record: ActivationRecord }) {
  const top = argmax(record.activations);
  return (
    <div className="excerpt" data-testid="excerpt">
      <span className="excerpt-max num" title="the excerpt's max activation">
        {fmt(record.activations[top])}
      </span>
      <TokenHeatmap
        tokens={record.tokens}
        values={record.normalizedActivations}
        scale={1}
        testId="excerpt-tokens"
        describe={(i) =>
          `${i}: ${JSON.stringify(record.tokens[i])} = ${fmt(record.activations[i], 4)} ` +
          `(${fmt(record.normalizedActivations[i], 2)} of the dataset max)`
        }
      />
    </div>
  );
}

/** The strongest few pairs of a hovered token, as text. */
function strongest(tokens: string[], values: (number | null)[], k = 3): string {
  return values
    .map((v, i) => [v, i] as const)
    .filter((p): p is readonly [number, number] => p[0] != null)
    .sort((a, b) => b[0] - a[0])
    .slice(0, k)
    .map(([v, i]) => `${displayToken(tokens[i] ?? "")} (${i}) ${fmt(v, 2)}`)
    .join(", ");
}

function HeadExcerpt({ record, mode }: { record: PairActivationRecord; mode: HeadMode }) {
  const [hover, setHover] = useState<number | null>(null);
  const n = record.tokens.length;
  const valid = tokensForPairs(record.activations.length) === n;
  const summary =
    mode === "in" ? record.normalizedSummaries.maxIn : record.normalizedSummaries.maxOut;
  const raw = mode === "in" ? record.summaries.maxIn : record.summaries.maxOut;
  const pairsOf = (t: number, values: number[]) =>
    mode === "in" ? attendedFrom(values, n, t) : attendsTo(values, n, t);
  const values = hover == null || !valid ? summary : pairsOf(hover, record.normalizedActivations);
  const hoverRaw = hover == null || !valid ? null : pairsOf(hover, record.activations);
  const top = argmax(record.summaries.maxOut);
  return (
    <div className="excerpt" data-testid="excerpt">
      <span className="excerpt-max num" title="the excerpt's strongest pair">
        {fmt(record.summaries.maxOut[top])}
      </span>
      <div className="excerpt-body">
        <TokenHeatmap
          tokens={record.tokens}
          values={values}
          scale={1}
          testId="excerpt-tokens"
          onHover={setHover}
          highlight={hover != null ? new Set([hover]) : undefined}
          describe={(i) =>
            hoverRaw
              ? `${i}: ${JSON.stringify(record.tokens[i])} pair = ${fmt(hoverRaw[i], 4)}`
              : `${i}: ${JSON.stringify(record.tokens[i])} max ${mode} = ${fmt(raw[i], 4)}`
          }
        />
        {hover != null && hoverRaw && (
          <p className="muted pair-caption" data-testid="pair-caption">
            {displayToken(record.tokens[hover] ?? "")} ({hover}){" "}
            {mode === "out" ? "attends to" : "is attended from by"}:{" "}
            {strongest(record.tokens, hoverRaw) || "nothing"}
          </p>
        )}
      </div>
    </div>
  );
}

function Excerpts(props: {
  record: RecordData;
  list: (ActivationRecord | PairActivationRecord)[];
  showAll: boolean;
  mode: HeadMode;
}) {
  const shown = props.showAll ? props.list : props.list.slice(0, FEW);
  if (props.list.length === 0) return <p className="muted">None.</p>;
  return (
    <div className="excerpts">
      {shown.map((r, i) =>
        props.record.kind === "attention_head" ? (
          <HeadExcerpt key={i} record={r as PairActivationRecord} mode={props.mode} />
        ) : (
          <NeuronExcerpt key={i} record={r} />
        ),
      )}
      {!props.showAll && props.list.length > FEW && (
        <p className="muted">… {props.list.length - FEW} more (show all)</p>
      )}
    </div>
  );
}

function StatsLine({ record }: { record: RecordData }) {
  const d = record.data;
  const ds = d.dataset;
  return (
    <p className="stats-line" data-testid="dataset-stats">
      <span>
        max <strong className="num">{fmt(d.maxActivation)}</strong>
      </span>
      <span>
        mean <span className="num">{fmt(d.mean)}</span>
      </span>
      {d.variance != null && (
        <span>
          sd <span className="num">{fmt(Math.sqrt(d.variance))}</span>
        </span>
      )}
      {d.fractionActive != null && (
        <span>
          active <span className="num">{(d.fractionActive * 100).toFixed(1)}%</span>
        </span>
      )}
      {d.dead && (
        <span className="badge dead" data-testid="dead-badge">
          dead
        </span>
      )}
      <span className="muted" title={ds.location}>
        dataset <strong data-testid="dataset-name">{ds.name}</strong>
        {ds.nTokens != null && ` · ${ds.nTokens.toLocaleString()} tokens`}
        {ds.corpus && ` · ${ds.corpus}`}
      </span>
      {ds.status === "in_progress" && (
        <span className="badge in-progress" data-testid="in-progress-badge">
          in progress
        </span>
      )}
    </p>
  );
}

/** The excerpts' values are stored at float16 precision, the statistics at float32: say so
 * where the top excerpt's shown value and the shown max differ. */
function PrecisionNote({ record }: { record: RecordData }) {
  const d = record.data;
  const top = d.mostPositiveActivationRecords[0];
  if (!top || d.maxActivation == null) return null;
  const excerptMax =
    record.kind === "attention_head"
      ? Math.max(...(top as PairActivationRecord).summaries.maxOut)
      : Math.max(...top.activations);
  if (fmt(excerptMax) === fmt(d.maxActivation)) return null;
  return (
    <p className="muted" data-testid="precision-note">
      The top excerpt shows {fmt(excerptMax)}, the statistics max {fmt(d.maxActivation)}: excerpt
      values are stored at float16 precision (about 3 significant digits), the statistics at full
      precision.
    </p>
  );
}

/** Why there are no examples, and how to get some: the server's message (which datasets it
 * reads and what they hold) and the commands that collate one. */
function NoDataset({ type, message }: { type: NodeTypeInfo; message: string }) {
  const latent = type.autoencoderSide != null;
  return (
    <div className="note" role="status" data-testid="no-dataset">
      <p>
        No dataset examples: no collated dataset the server reads holds this {type.label}.{" "}
        <span className="muted">({message})</span>
      </p>
      <p className="muted">
        To get some, collate one and start the server with it:{" "}
        <code>
          tdb collate --model MODEL{latent ? " --autoencoder PATH" : ""} --out FILE.sqlite
        </code>
        , then <code>tdb serve … --dataset FILE.sqlite</code>
        {latent ? "" : " (or start it with --auto-dataset)"}.
      </p>
    </div>
  );
}

/** All activations of the random sample (for heads all token pairs), for the histogram. */
function sampleValues(record: RecordData): number[] {
  const out: number[] = [];
  for (const r of record.data.randomSample) for (const v of r.activations) out.push(v);
  return out;
}

/** The node page's dataset card: statistics, top / random / by-quantile excerpts, histogram. */
export function DatasetExamples(props: {
  type: NodeTypeInfo;
  layer: number;
  index: number;
  dataset: string | null;
}) {
  const { record, error, missing, loading } = useRecord(
    props.type,
    props.layer,
    props.index,
    props.dataset,
  );
  const [showAll, setShowAll] = useState(false);
  const [mode, setMode] = useState<HeadMode>("in");
  const values = useMemo(() => (record ? sampleValues(record) : []), [record]);
  const markers = useMemo(
    () =>
      (record?.data.quantileBoundaries ?? []).map((v, i) => ({
        value: v,
        label: `by-quantile bin boundary ${i + 1}`,
      })),
    [record],
  );
  const current = record && !error ? record : null;
  const d = current?.data;
  const byQuantile = d?.randomSampleByQuantile ?? null;
  const binLabels = byQuantile
    ? quantileBinLabels(d?.quantileBoundaries ?? [], byQuantile.length)
    : [];
  return (
    <Card
      title="Dataset examples"
      loading={loading}
      error={missing ? null : error}
      testId="dataset-examples"
      actions={
        current && (
          <>
            {current.kind === "attention_head" && (
              <span className="toggle" role="group" aria-label="colour tokens by">
                <button
                  className={mode === "in" ? "active" : ""}
                  aria-pressed={mode === "in"}
                  data-testid="head-mode-in"
                  onClick={() => setMode("in")}
                  title="colour each token by the strongest attention it receives (max in)"
                >
                  attended to
                </button>
                <button
                  className={mode === "out" ? "active" : ""}
                  aria-pressed={mode === "out"}
                  data-testid="head-mode-out"
                  onClick={() => setMode("out")}
                  title="colour each token by its strongest attention as the query (max out)"
                >
                  attended from
                </button>
              </span>
            )}
            <button
              onClick={() => setShowAll((s) => !s)}
              aria-pressed={showAll}
              data-testid="show-all"
            >
              {showAll ? `show ${FEW}` : "show all"}
            </button>
          </>
        )
      }
    >
      {missing && error && <NoDataset type={props.type} message={error} />}
      {current && d && (
        <div data-kind={current.kind}>
          <StatsLine record={current} />
          {current.kind === "attention_head" && (
            <p className="muted">
              {mode === "in"
                ? "Colour: how strongly each token is attended to (its strongest pair as the key). Hover a token to see which later tokens attend to it."
                : "Colour: how strongly each token attends (its strongest pair as the query). Hover a token to see what it attends to."}
            </p>
          )}
          <section data-testid="top-examples">
            <h3 className="subhead">
              Top activating ({d.mostPositiveActivationRecords.length} excerpts)
            </h3>
            <PrecisionNote record={current} />
            <Excerpts
              record={current}
              list={d.mostPositiveActivationRecords}
              showAll={showAll}
              mode={mode}
            />
          </section>
          <section data-testid="activation-histogram-section">
            <h3 className="subhead">Activation histogram</h3>
            <Histogram
              values={values}
              markers={markers}
              testId="activation-histogram"
              xLabel={
                current.kind === "attention_head"
                  ? `${props.type.datasetMetric?.replace(/_/g, " ") ?? "activation"} of a token pair`
                  : "activation of a token"
              }
              caption={
                `${current.kind === "attention_head" ? "token pairs" : "tokens"} of the ` +
                `${d.randomSample.length} random excerpts; lines: the by-quantile bin ` +
                `boundaries (of the excerpt max)`
              }
            />
          </section>
          <section data-testid="random-examples">
            <h3 className="subhead">Random sample ({d.randomSample.length} excerpts)</h3>
            <Excerpts record={current} list={d.randomSample} showAll={showAll} mode={mode} />
          </section>
          {byQuantile && (
            <details className="quantile-examples" data-testid="quantile-examples">
              <summary className="subhead">
                Random sample by quantile of the excerpt max ({byQuantile.length} bins,{" "}
                {byQuantile.reduce((a, g) => a + g.length, 0)} excerpts)
              </summary>
              {byQuantile.some((g) => g.length === 0) && (
                <p className="muted" data-testid="empty-bins">
                  Not listed, holding no excerpt of the sample:{" "}
                  {byQuantile
                    .map((g, i) => (g.length === 0 ? binLabels[i] : null))
                    .filter((l) => l != null)
                    .join("; ")}
                  .
                </p>
              )}
              {byQuantile
                .map((group, i) => ({ group, i }))
                .filter(({ group }) => group.length > 0)
                .reverse()
                .map(({ group, i }) => (
                  <div key={i} className="quantile-bin" data-testid="quantile-bin">
                    <h4>
                      {binLabels[i]} <span className="muted">({group.length})</span>
                    </h4>
                    <Excerpts record={current} list={group} showAll={showAll} mode={mode} />
                  </div>
                ))}
            </details>
          )}
        </div>
      )}
    </Card>
  );
}
