import { useEffect, useMemo, useRef, useState } from "react";
import { api, ApiError } from "../api/client";
import type { Explanation, NodeTypeInfo, ScoredExcerpt } from "../api/types";
import { maxAbs } from "../lib/colors";
import { onJobsChanged } from "../lib/events";
import {
  excerptLine,
  explanationNode,
  formatScore,
  methodLabel,
  type ExcerptLine,
} from "../lib/explanations";
import { formatNumber as fmt } from "../lib/histogram";
import { LatestOnly } from "../lib/latest";
import { Card } from "./Card";
import { TokenHeatmap } from "./Tokens";

const FEW = 5;

/** The stored explanations of a component (`tdb explain`), refetched when a job changes status. */
function useExisting(type: NodeTypeInfo, layer: number, index: number, dataset: string | null) {
  const [state, setState] = useState<{
    list: Explanation[] | null;
    error: string | null;
    /** No collated dataset holds the component (a 404). */
    missing: boolean;
    loading: boolean;
  }>({ list: null, error: null, missing: false, loading: true });
  const [reload, setReload] = useState(0);
  useEffect(() => onJobsChanged(() => setReload((r) => r + 1)), []);
  const latest = useRef(new LatestOnly());
  useEffect(() => {
    setState((s) => ({ ...s, loading: true }));
    latest.current
      .run((signal) =>
        api.existingExplanations(explanationNode(type, layer, index, dataset), signal),
      )
      .then((r) => {
        if (r.stale) return;
        setState({
          list: r.value?.explanations ?? null,
          error: r.value ? null : (r.error as Error).message,
          missing: r.error instanceof ApiError && r.error.status === 404,
          loading: false,
        });
      });
  }, [type, layer, index, dataset, reload]);
  return state;
}

function scoreName(e: Explanation): string {
  return e.rocAucScore != null ? "ROC AUC" : "correlation";
}

/** One explanation: its score, text and method. */
function ExplanationItem({ e, testId = "explanation" }: { e: Explanation; testId?: string }) {
  const others =
    `r² ${formatScore(e.rsquaredScore)}, absolute deviation explained ` +
    formatScore(e.absoluteDevExplainedScore);
  return (
    <li className="explanation" data-testid={testId}>
      <span
        className="explanation-score num"
        data-testid="explanation-score"
        title={`${scoreName(e)} of simulated and true activations on ${e.nScoredExcerpts} held-out excerpts (${others})`}
      >
        {formatScore(e.score)}
      </span>
      <div className="explanation-body">
        {e.explanation != null ? (
          <span className="explanation-text" data-testid="explanation-text">
            {e.explanation}
          </span>
        ) : (
          <span className="error">failed: {e.error}</span>
        )}
        <div className="muted" data-testid="explanation-method">
          {methodLabel(e.method)} · {scoreName(e)} on {e.nScoredExcerpts} held-out excerpts ·{" "}
          {others} · dataset {e.datasetName}
        </div>
      </div>
    </li>
  );
}

function ExcerptPair({ line, scales }: { line: ExcerptLine; scales: [number, number] }) {
  const describe = (i: number) =>
    `${i}: ${JSON.stringify(line.tokens[i])} true ${fmt(line.truth[i], 4)}, ` +
    `simulated ${fmt(line.simulated[i], 2)}`;
  return (
    <div className="scored-excerpt" data-testid="scored-excerpt" data-group={line.group}>
      <div className="muted scored-excerpt-head">
        {line.group === "top" ? "held-out top excerpt" : "random excerpt"} · r ={" "}
        <span className="num">{formatScore(line.correlation)}</span>
      </div>
      <div className="side-by-side">
        <TokenHeatmap
          tokens={line.tokens}
          values={line.truth}
          scale={scales[0]}
          testId="true-activations"
          describe={describe}
        />
        <TokenHeatmap
          tokens={line.tokens}
          values={line.simulated}
          scale={scales[1]}
          testId="simulated-activations"
          describe={describe}
        />
      </div>
    </div>
  );
}

/** The scored excerpts, true activations beside the simulated ones. */
function ScoredExcerpts({ excerpts, perPair }: { excerpts: ScoredExcerpt[]; perPair: boolean }) {
  const [showAll, setShowAll] = useState(false);
  const lines = useMemo(() => excerpts.map((e) => excerptLine(e, perPair)), [excerpts, perPair]);
  const scales: [number, number] = useMemo(
    () => [maxAbs(lines.flatMap((l) => l.truth)), maxAbs(lines.flatMap((l) => l.simulated))],
    [lines],
  );
  const top = lines.filter((l) => l.group === "top").length;
  const shown = showAll ? lines : lines.slice(0, FEW);
  return (
    <section data-testid="scored-excerpts">
      <h3 className="subhead">
        Simulated vs true activations ({lines.length} held-out excerpts: {top} top,{" "}
        {lines.length - top} random)
      </h3>
      <p className="muted">
        Left: the true activations{perPair ? " (each token's strongest pair as the key)" : ""},
        coloured by their max over these excerpts ({fmt(scales[0])}). Right: what the simulator
        predicts from the explanation alone, coloured by its max ({fmt(scales[1], 1)}). Hover a
        token for both values.
      </p>
      <div className="side-by-side side-by-side-head muted">
        <span>true</span>
        <span>simulated</span>
      </div>
      {shown.map((l, i) => (
        <ExcerptPair key={i} line={l} scales={scales} />
      ))}
      {lines.length > FEW && (
        <button onClick={() => setShowAll((s) => !s)} data-testid="scored-show-all">
          {showAll ? `show ${FEW}` : `show all ${lines.length}`}
        </button>
      )}
    </section>
  );
}

/** The node page's explanations card: what the datasets hold (best first), an Explain button
 * that runs the server's explainer now, a box that scores any explanation, and for a new or
 * scored one the simulated and true activations on the held-out excerpts it was scored on. */
export function Explanations(props: {
  type: NodeTypeInfo;
  layer: number;
  index: number;
  dataset: string | null;
}) {
  const { type, layer, index, dataset } = props;
  const existing = useExisting(type, layer, index, dataset);
  const [result, setResult] = useState<{
    kind: "explain" | "score";
    explanation: Explanation | null;
    error: string | null;
    loading: boolean;
  } | null>(null);
  const [text, setText] = useState("");
  const latest = useRef(new LatestOnly());
  const run = (kind: "explain" | "score") => {
    setResult({ kind, explanation: null, error: null, loading: true });
    const node = explanationNode(type, layer, index, dataset);
    latest.current
      .run(async (signal) =>
        kind === "explain"
          ? (await api.explain(node, signal)).explanations[0]
          : (await api.score({ ...node, explanation: text }, signal)).explanation,
      )
      .then((r) => {
        if (r.stale) return;
        setResult({
          kind,
          explanation: r.value ?? null,
          error: r.value ? null : (r.error as Error).message,
          loading: false,
        });
      });
  };
  const list = existing.list;
  const fresh = result?.explanation;
  return (
    <Card
      title="Explanations"
      loading={existing.loading || result?.loading}
      error={existing.missing ? null : (existing.error ?? result?.error)}
      testId="explanations"
      actions={
        <button
          className="primary"
          onClick={() => run("explain")}
          disabled={existing.missing || result?.loading}
          data-testid="explain-button"
          title="run the server's explainer (the no-LLM baseline) on this component's dataset excerpts and score it on held-out ones; nothing is stored"
        >
          Explain
        </button>
      }
    >
      {existing.missing && (
        <p className="muted" data-testid="no-explanations">
          No explanations: no collated dataset the server reads holds this {type.label}.
        </p>
      )}
      {list && list.length === 0 && (
        <p className="muted" data-testid="no-explanations">
          None stored for this {type.label} yet (<code>tdb explain STORE</code> writes them): press
          Explain to write one now.
        </p>
      )}
      {list && list.length > 0 && (
        <ul className="explanations" data-testid="stored-explanations">
          {list.map((e, i) => (
            <ExplanationItem key={i} e={e} />
          ))}
        </ul>
      )}
      {fresh && (
        <section data-testid="new-explanation" data-kind={result?.kind}>
          <h3 className="subhead">
            {result?.kind === "explain" ? "Written now (not stored)" : "Your explanation, scored"}
          </h3>
          <ul className="explanations">
            <ExplanationItem e={fresh} testId="explanation-now" />
          </ul>
          {fresh.scoredExcerpts && (
            <ScoredExcerpts excerpts={fresh.scoredExcerpts} perPair={type.perTokenPair} />
          )}
        </section>
      )}
      {!existing.missing && (
        <div className="row score-box">
          <input
            type="text"
            value={text}
            aria-label="an explanation to score"
            placeholder={'Score an explanation, e.g. tokens " the" (10); after " of" (4)'}
            onChange={(e) => setText(e.target.value)}
            onKeyDown={(e) => e.key === "Enter" && text.trim() && run("score")}
          />
          <button
            onClick={() => run("score")}
            disabled={!text.trim() || result?.loading}
            data-testid="score-button"
          >
            Score
          </button>
        </div>
      )}
    </Card>
  );
}
