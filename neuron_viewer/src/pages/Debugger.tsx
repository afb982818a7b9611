import { useEffect, useMemo, useRef, useState } from "react";
import type { ModelState } from "../App";
import { api } from "../api/client";
import type {
  AttentionTraceType,
  BatchedTdbResponse,
  NodeIndex,
  TdbSubRequest,
  TdbSubResponse,
} from "../api/types";
import { Card } from "../components/Card";
import { download, JsonInspector } from "../components/JsonInspector";
import { NodeTable } from "../components/NodeTable";
import { TokenHeatmap, TokenTable } from "../components/Tokens";
import { errorSide } from "../lib/errors";
import { LatestOnly } from "../lib/latest";
import { formatLayers } from "../lib/jump";
import {
  plural,
  SIDE_LABEL,
  tokenComponent,
  type AutoencoderSide,
  type NodeTypes,
} from "../lib/nodes";
import { alignRows, toCsv, toJson, type TableRow } from "../lib/table";
import { differingPositions, displayToken, tokenWarnings, typedToken } from "../lib/tokens";
import { paramsToState, stateToParams, type DebuggerState, type Trace } from "../lib/url";
import { useNodeTypes } from "../nodeTypes";
import { navigate, useLocation } from "../router";

interface Sides {
  requests: TdbSubRequest[];
  right: "prompt2" | "baseline" | null;
}

/** The sub-requests for a state: left; right = second prompt, or the unablated baseline. */
export function buildRequest(s: DebuggerState): Sides {
  const trace = s.trace;
  const base = (prompt: string, withAblations: boolean): TdbSubRequest => ({
    prompt,
    targetTokens: s.targets,
    distractorTokens: s.distractors,
    lossFn: s.targets.length ? "logit_diff" : "zero",
    topAndBottomKForNodeTable: s.topK,
    componentTypeForMlp: s.latents.includes("mlp") ? "autoencoder_latent" : "neuron",
    componentTypeForAttention: s.latents.includes("attention")
      ? "autoencoder_latent"
      : "attention_head",
    nodeAblations: withAblations ? s.ablations : [],
    upstreamNodeToTrace: trace
      ? { node: trace.node, attentionTraceType: trace.attentionTraceType }
      : null,
    downstreamNodeToTrace: trace?.downstream
      ? { node: trace.downstream, attentionTraceType: trace.downstreamType ?? null }
      : null,
  });
  const requests = [base(s.prompt, true)];
  if (s.secondPrompt != null && s.secondPrompt !== "") {
    requests.push(base(s.secondPrompt, true));
    return { requests, right: "prompt2" };
  }
  if (s.ablations.length) {
    requests.push(base(s.prompt, false));
    return { requests, right: "baseline" };
  }
  return { requests, right: null };
}

function useTokenize(text: string): { tokens: string[]; ids: number[] } | null {
  const [out, setOut] = useState<{ tokens: string[]; ids: number[] } | null>(null);
  const latest = useRef(new LatestOnly());
  useEffect(() => {
    if (!text) {
      latest.current.run(async () => null); // cancel any pending tokenization
      return;
    }
    const timer = setTimeout(async () => {
      const r = await latest.current.run((signal) => api.tokenize(text, signal));
      if (!r.stale && r.value) setOut({ tokens: r.value.tokenStrings, ids: r.value.tokenIds });
    }, 200);
    return () => clearTimeout(timer);
  }, [text]);
  return text ? out : null;
}

function TokenInput(props: {
  label: string;
  tokens: string[];
  onChange: (t: string[]) => void;
  testId: string;
}) {
  const [draft, setDraft] = useState("");
  const add = () => {
    if (!draft) return;
    // The glyphs the page shows for whitespace ("·Paris", "␣Paris") are read as the whitespace.
    props.onChange([...props.tokens, typedToken(draft)]);
    setDraft("");
  };
  return (
    <div className="token-input" data-testid={props.testId}>
      <span className="label">{props.label}</span>
      {props.tokens.map((t, i) => (
        <TokenChip
          key={`${t}:${i}`}
          token={t}
          onRemove={() => props.onChange(props.tokens.filter((_, j) => j !== i))}
        />
      ))}
      <input
        value={draft}
        placeholder="add a token, e.g. ␣Paris"
        aria-label={`add ${props.label}`}
        onChange={(e) => setDraft(e.target.value)}
        onKeyDown={(e) => {
          if (e.key === "Enter" && !(e.ctrlKey || e.metaKey)) {
            e.preventDefault();
            add();
          }
        }}
        onBlur={add}
      />
    </div>
  );
}

function TokenChip({ token, onRemove }: { token: string; onRemove: () => void }) {
  const tok = useTokenize(token);
  const warnings = tokenWarnings(token, tok ? tok.ids : null);
  return (
    <span className={"chip" + (warnings.length ? " warn" : "")} title={warnings.join("; ")}>
      <code>{displayToken(token)}</code>
      {warnings.length > 0 && <span className="warning-text"> ⚠ {warnings.join("; ")}</span>}
      <button aria-label={`remove ${token}`} onClick={onRemove}>
        ×
      </button>
    </span>
  );
}

function same(types: NodeTypes, a: DebuggerState, b: DebuggerState): boolean {
  return stateToParams(types, a).toString() === stateToParams(types, b).toString();
}

export default function Debugger({ model }: { model: ModelState }) {
  const types = useNodeTypes();
  const { search } = useLocation();
  const state = useMemo(() => paramsToState(types, new URLSearchParams(search)), [types, search]);
  const [draft, setDraft] = useState<DebuggerState>(state);
  const [result, setResult] = useState<{
    request: Sides;
    response: BatchedTdbResponse;
    query: string;
    state: DebuggerState; // the state these results are of (the URL's may have moved on)
  } | null>(null);
  // Bumped by a submit of the state already in the URL: it runs again (a retry after an error).
  const [runs, setRuns] = useState(0);
  const [cancelled, setCancelled] = useState(false);
  const [visibleRows, setVisibleRows] = useState<TableRow[]>([]);
  const [loading, setLoading] = useState(false);
  const [error, setError] = useState<{ message: string; side: "left" | "right" | "both" } | null>(
    null,
  );
  const latest = useRef(new LatestOnly());
  const promptTokens = useTokenize(draft.prompt);
  const prompt2Tokens = useTokenize(draft.secondPrompt ?? "");

  useEffect(() => {
    const what = state.trace ? ` · tracing ${types.name(state.trace.node)}` : "";
    const prompt = state.prompt.length > 40 ? `${state.prompt.slice(0, 40)}…` : state.prompt;
    document.title = `Debugger${prompt ? ` · “${prompt}”` : ""}${what} · Transformer debugger`;
  }, [types, state]);

  // The URL is the source of truth: when it changes (submit, back/forward, reload), adopt it.
  useEffect(() => setDraft(state), [state]);

  useEffect(() => {
    if (!state.prompt) {
      setResult(null);
      return;
    }
    const request = buildRequest(state);
    setLoading(true);
    setCancelled(false);
    latest.current
      .run((signal) => api.batchedTdb({ subRequests: request.requests }, signal))
      .then((r) => {
        if (r.stale) return;
        setLoading(false);
        if (r.value) {
          setResult({
            request,
            response: r.value,
            query: stateToParams(types, state).toString(),
            state,
          });
          setError(null);
        } else {
          const message = r.error instanceof Error ? r.error.message : String(r.error);
          setError({ message, side: errorSide(r.error) });
        }
      });
  }, [types, state, runs]);

  const commit = (next: DebuggerState) => {
    if (!same(types, next, state)) navigate(`/debugger?${stateToParams(types, next)}`);
  };
  // Submit always runs: the state of the URL again when the draft is that state.
  const submit = () => (same(types, draft, state) ? setRuns((n) => n + 1) : commit(draft));
  const query = stateToParams(types, state).toString();
  const stale = result != null && !loading && result.query !== query;

  const left = result?.response.subResponses[0] ?? null;
  const right = result?.response.subResponses[1] ?? null;
  const rightLabel = result?.request.right === "baseline" ? "Baseline (no ablations)" : "Right";
  // With a baseline, the left side is the ablated run: named so, not "Left".
  const leftLabel = result?.request.right === "baseline" ? "Ablated" : "Left";
  const rows = useMemo(
    () => (left ? alignRows(types, left.nodeTable, right?.nodeTable ?? null) : []),
    [types, left, right],
  );
  const tokens = left?.tokenStrings ?? [];
  const shown = result?.state ?? state; // what the results on screen were asked with
  const modelName = model.info?.name ?? "model";

  const actions = {
    ablate: (node: NodeIndex) => {
      if (state.ablations.some((a) => types.same(a.node, node))) return;
      commit({ ...state, ablations: [...state.ablations, { node, value: 0 }] });
    },
    trace: (node: NodeIndex, type: AttentionTraceType | null) =>
      commit({
        ...state,
        trace: { node, attentionTraceType: type, downstream: null },
        trail: state.trace ? [...state.trail, state.trace] : [],
      }),
    // While tracing a node through its pre-activation, the heads of its upstream table can be
    // traced through their value into it: the only rows where a downstream node is valid (it must
    // write later than the head; a value trace's own rows are all upstream of its head).
    traceValueInto:
      state.trace && state.trace.attentionTraceType !== "value" && shown.trace
        ? {
            name: types.name(state.trace.node),
            run: (node: NodeIndex) => {
              const into = state.trace as Trace;
              commit({
                ...state,
                trace: {
                  node,
                  attentionTraceType: "value",
                  downstream: into.node,
                  downstreamType: into.attentionTraceType,
                },
                trail: [...state.trail, into],
              });
            },
          }
        : undefined,
  };

  return (
    <div className="debugger">
      <Card title="Prompt" testId="prompt-card">
        <div className={draft.secondPrompt != null ? "two-col" : ""}>
          <div>
            <textarea
              value={draft.prompt}
              rows={3}
              placeholder="Type a prompt, then Submit (Ctrl/Cmd+Enter)"
              aria-label="prompt"
              onChange={(e) => setDraft({ ...draft, prompt: e.target.value })}
              onKeyDown={(e) => {
                if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit();
              }}
            />
            {promptTokens && <LiveTokens tokens={promptTokens.tokens} testId="live-tokens" />}
          </div>
          {draft.secondPrompt != null && (
            <div>
              <textarea
                value={draft.secondPrompt}
                rows={3}
                placeholder="Second prompt (shown as Right)"
                aria-label="second prompt"
                onChange={(e) => setDraft({ ...draft, secondPrompt: e.target.value })}
                onKeyDown={(e) => {
                  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit();
                }}
              />
              {prompt2Tokens && <LiveTokens tokens={prompt2Tokens.tokens} testId="live-tokens-2" />}
            </div>
          )}
        </div>
        <TokenInput
          label="Targets"
          tokens={draft.targets}
          onChange={(t) => setDraft({ ...draft, targets: t })}
          testId="targets"
        />
        <TokenInput
          label="Distractors"
          tokens={draft.distractors}
          onChange={(t) => setDraft({ ...draft, distractors: t })}
          testId="distractors"
        />
        <div className="row">
          <button className="primary" onClick={submit} disabled={!draft.prompt}>
            Submit
          </button>
          {loading && (
            <Running
              onCancel={() => {
                latest.current.cancel();
                setLoading(false);
                setCancelled(true);
              }}
            />
          )}
          <button
            onClick={() =>
              setDraft({ ...draft, targets: draft.distractors, distractors: draft.targets })
            }
          >
            Swap targets and distractors
          </button>
          {draft.secondPrompt == null ? (
            <button onClick={() => setDraft({ ...draft, secondPrompt: draft.prompt })}>
              Add second prompt
            </button>
          ) : (
            <button onClick={() => setDraft({ ...draft, secondPrompt: null })}>
              Remove second prompt
            </button>
          )}
          <LatentSwitches
            model={model}
            latents={draft.latents}
            onChange={(latents) => {
              setDraft({ ...draft, latents });
              if (state.prompt) commit({ ...state, latents });
            }}
          />
          <label>
            top k
            <input
              className="narrow"
              type="number"
              min={1}
              max={1000}
              value={draft.topK}
              aria-label="top k"
              onChange={(e) =>
                setDraft({
                  ...draft,
                  topK: Math.max(1, Math.min(1000, Number(e.target.value) || 1)),
                })
              }
            />
          </label>
        </div>
      </Card>

      {(state.ablations.length > 0 || state.trace) && (
        <div className="two-col">
          {state.ablations.length > 0 && (
            <Card title="Ablations" testId="ablations">
              <table className="small">
                <thead>
                  <tr>
                    <th>node</th>
                    <th>value</th>
                    <th />
                  </tr>
                </thead>
                <tbody>
                  {state.ablations.map((a, i) => (
                    <tr key={types.key(a.node)}>
                      <td>{types.describe(a.node, tokens)}</td>
                      <td className="num">
                        <input
                          className="narrow"
                          type="number"
                          step="any"
                          key={`${types.key(a.node)}=${a.value ?? 0}`}
                          defaultValue={a.value ?? 0}
                          aria-label={`value of ${types.name(a.node)}`}
                          title="the value written in place of the node's activation (Enter to apply)"
                          onKeyDown={(e) => {
                            if (e.key === "Enter") e.currentTarget.blur();
                          }}
                          onBlur={(e) => {
                            const value = Number(e.currentTarget.value);
                            if (!Number.isFinite(value) || value === (a.value ?? 0)) return;
                            commit({
                              ...state,
                              ablations: state.ablations.map((x, j) =>
                                j === i ? { ...x, value } : x,
                              ),
                            });
                          }}
                        />
                      </td>
                      <td>
                        <MeanButton
                          node={a.node}
                          onMean={(value) =>
                            commit({
                              ...state,
                              ablations: state.ablations.map((x, j) =>
                                j === i ? { ...x, value } : x,
                              ),
                            })
                          }
                        />{" "}
                        <button
                          onClick={() =>
                            commit({
                              ...state,
                              ablations: state.ablations.filter((_, j) => j !== i),
                            })
                          }
                        >
                          remove
                        </button>
                      </td>
                    </tr>
                  ))}
                </tbody>
              </table>
              <button onClick={() => commit({ ...state, ablations: [] })}>clear all</button>
            </Card>
          )}
          {state.trace && (
            <Card title="Trace" testId="trace">
              <p className="trace-sentence" data-testid="trace-sentence">
                {left?.traceDescription ??
                  `What caused ${types.describe(state.trace.node, tokens)}?`}
              </p>
              {state.trace.attentionTraceType === "value" && (
                <p className="muted" data-testid="trace-downstream">
                  {state.trace.downstream
                    ? `Downstream node: ${types.describe(state.trace.downstream, tokens)}`
                    : "Through the value to the loss. To measure it against a later node " +
                      "instead, trace that node, then pick “Trace value into …” on this head's row."}
                </p>
              )}
              <Breadcrumb
                trail={state.trail}
                trace={state.trace}
                onPick={(i) =>
                  commit(
                    i < 0
                      ? { ...state, trace: null, trail: [] }
                      : { ...state, trace: state.trail[i], trail: state.trail.slice(0, i) },
                  )
                }
              />
              <button onClick={() => commit({ ...state, trace: null, trail: [] })}>
                clear trace
              </button>
            </Card>
          )}
        </div>
      )}

      {cancelled && (
        <p className="note" data-testid="cancelled">
          Cancelled. Submit runs it again.
        </p>
      )}
      {error && (
        <p className="error" role="alert" data-testid={`error-${error.side}`}>
          {error.side === "both" ? "" : error.side === "left" ? "Left: " : `${rightLabel}: `}
          {error.message}
        </p>
      )}

      {left && result && (
        <div
          data-testid="results"
          data-query={result.query}
          data-loading={loading ? "true" : "false"}
          className={stale ? "stale" : ""}
        >
          {stale && (
            <p className="stale-note" data-testid="stale-results">
              Showing the results of the previous request
              {error ? " (the request above failed)" : ""}: {describeState(types, result.state)}.
            </p>
          )}
          <div className="two-col">
            <Card
              title="Direction of interest"
              loading={loading}
              testId="summary"
              actions={
                <JsonInspector
                  request={{ subRequests: result.request.requests }}
                  response={result.response}
                />
              }
            >
              <Summary
                left={left}
                right={right}
                leftLabel={leftLabel}
                rightLabel={rightLabel}
                state={shown}
              />
              <h3 className="subhead">Token effects (estimated total effect per token)</h3>
              <div data-testid="heatmaps">
                <Heatmaps left={left} right={right} leftLabel={leftLabel} rightLabel={rightLabel} />
              </div>
            </Card>
            <Card title="Next-token candidates" loading={loading} testId="candidates">
              <Candidates side={left} label={right ? leftLabel : ""} />
              {right && <Candidates side={right} label={rightLabel} />}
            </Card>
          </div>
          <Card title="Tokens" loading={loading}>
            <TokenTable
              sides={[
                {
                  label: right ? leftLabel : "",
                  tokens: left.tokenStrings,
                  ids: left.tokenIds,
                },
                ...(right && result.request.right === "prompt2"
                  ? [{ label: "Right", tokens: right.tokenStrings, ids: right.tokenIds }]
                  : []),
              ]}
              differ={
                right && result.request.right === "prompt2"
                  ? differingPositions(left.tokenStrings, right.tokenStrings)
                  : new Set()
              }
            />
          </Card>

          <Card
            title="Nodes"
            loading={loading}
            testId="nodes-card"
            actions={
              <>
                <button
                  title="the rows shown, in the order shown"
                  onClick={() =>
                    download("nodes.csv", toCsv(visibleRows, tokens, right != null), "text/csv")
                  }
                >
                  CSV
                </button>
                <button
                  title="the rows shown, in the order shown"
                  onClick={() => download("nodes.json", toJson(visibleRows))}
                >
                  JSON
                </button>
              </>
            }
          >
            <NodeTable
              rows={rows}
              tokens={tokens}
              twoSides={right != null}
              modelName={modelName}
              prompt={shown.prompt}
              actions={actions}
              topK={shown.topK}
              onVisible={setVisibleRows}
              isAblated={(r) =>
                shown.ablations.some(
                  (a) =>
                    types.same(a.node, r.node) ||
                    (a.node.attendedTokenIndex == null &&
                      r.type.perTokenPair &&
                      types.same(a.node, { ...r.node, attendedTokenIndex: null })),
                )
              }
            />
          </Card>
        </div>
      )}
      {loading && !left && <p className="loading">Running the model…</p>}
    </div>
  );
}

/** Mean ablation: sets an ablated neuron's or latent's value to its mean activation over its
 * collated dataset (the record's statistics); says why when no dataset holds it. Not offered for
 * heads (their datasets record the write magnitude, not the attention an ablation sets). */
function MeanButton({ node, onMean }: { node: NodeIndex; onMean: (value: number) => void }) {
  const types = useNodeTypes();
  const type = types.of(node);
  const [error, setError] = useState<string | null>(null);
  if (type.perTokenPair || type.datasetMetric !== "activation" || node.layerIndex == null)
    return null;
  return (
    <>
      <button
        title="set the value to the component's mean activation over its collated dataset"
        onClick={() => {
          setError(null);
          api
            .neuronRecord(tokenComponent(type, node.layerIndex ?? 0, node.componentIndex ?? 0))
            .then((r) =>
              r.mean != null && Number.isFinite(r.mean)
                ? onMean(Number(r.mean.toPrecision(6)))
                : setError("its dataset has no mean"),
            )
            .catch((e: Error) => setError(e.message));
        }}
      >
        dataset mean
      </button>
      {error && (
        <span className="warning-text" data-testid="mean-error">
          {" "}
          {error}
        </span>
      )}
    </>
  );
}

const PREVIEW = 48; // tokens of a long prompt shown before "show all"

/** The live tokenization of a prompt, its count, and for a long prompt its first and last
 * tokens until "show all". */
function LiveTokens({ tokens, testId }: { tokens: string[]; testId: string }) {
  const [all, setAll] = useState(false);
  const long = tokens.length > PREVIEW * 2;
  const shown =
    long && !all ? [...tokens.slice(0, PREVIEW), "…", ...tokens.slice(-PREVIEW)] : tokens;
  return (
    <div className="live-tokens" data-testid={testId}>
      <TokenHeatmap
        tokens={shown}
        values={[]}
        describe={(i) => {
          const index = long && !all && i > PREVIEW ? tokens.length - (shown.length - i) : i;
          return long && !all && i === PREVIEW
            ? `${tokens.length - 2 * PREVIEW} tokens not shown`
            : `${index}: ${JSON.stringify(tokens[index])}`;
        }}
      />
      <span className="muted">{tokens.length} tokens</span>{" "}
      {long && (
        <button className="link" onClick={() => setAll(!all)}>
          {all ? "show fewer" : `show all ${tokens.length}`}
        </button>
      )}
    </div>
  );
}

/** While a request runs: the seconds elapsed and a Cancel button (the server stops the work of an
 * abandoned request). */
function Running({ onCancel }: { onCancel: () => void }) {
  const [start] = useState(() => Date.now());
  const [now, setNow] = useState(start);
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 500);
    return () => clearInterval(timer);
  }, []);
  return (
    <span className="running" data-testid="running">
      <span className="spinner" aria-hidden="true" /> running {Math.round((now - start) / 1000)} s{" "}
      <button onClick={onCancel}>Cancel</button>
    </span>
  );
}

/** "Use autoencoder latents", one switch per latent type: enabled for a side when the server
 * loaded autoencoders of that side (tdb serve --autoencoder); switching re-runs the request. */
function LatentSwitches(props: {
  model: ModelState;
  latents: AutoencoderSide[];
  onChange: (latents: AutoencoderSide[]) => void;
}) {
  const types = useNodeTypes();
  const sides = types.sides;
  return (
    <span className="latent-switches" data-testid="latent-switches">
      {types.latents.map((t) => {
        const side = t.autoencoderSide as AutoencoderSide;
        const layers = t.layers ?? [];
        const on = props.latents.includes(side);
        const title = layers.length
          ? `replace ${SIDE_LABEL[side]} components by autoencoder latents in layers ${formatLayers(layers)}`
          : `no ${SIDE_LABEL[side]}-side autoencoders loaded (start the server with --autoencoder PATH)`;
        return (
          <label key={side} title={title} className={layers.length ? "" : "muted"}>
            <input
              type="checkbox"
              checked={on}
              disabled={!layers.length && !on}
              data-testid={`latents-${side}`}
              onChange={(e) =>
                props.onChange(
                  e.target.checked
                    ? sides.filter((s) => s === side || props.latents.includes(s))
                    : props.latents.filter((s) => s !== side),
                )
              }
            />
            {plural(t)}
            {layers.length > 0 && layers.length < (props.model.info?.nLayers ?? 0) && (
              <span className="muted"> (layers {formatLayers(layers)})</span>
            )}
          </label>
        );
      })}
    </span>
  );
}

function Summary(props: {
  left: TdbSubResponse;
  right: TdbSubResponse | null;
  leftLabel: string;
  rightLabel: string;
  state: DebuggerState;
}) {
  const { left, right } = props;
  const types = useNodeTypes();
  const what = directionText(types, props.state, left.tokenStrings);
  return (
    <div data-testid="direction-values">
      <p className="muted" data-testid="d-caption">
        D = {what}
      </p>
      <table className="small">
        <tbody>
          <tr>
            <th>{right ? props.leftLabel : "D"}</th>
            <td className="num" data-testid="d-left">
              {left.directionValue.toFixed(4)}
            </td>
          </tr>
          {right && (
            <>
              <tr>
                <th>{props.rightLabel}</th>
                <td className="num" data-testid="d-right">
                  {right.directionValue.toFixed(4)}
                </td>
              </tr>
              <tr>
                <th>Diff</th>
                <td className="num" data-testid="d-diff">
                  {(left.directionValue - right.directionValue).toFixed(4)}
                </td>
              </tr>
            </>
          )}
        </tbody>
      </table>
    </div>
  );
}

/** A trace in a few words: "mlp L5 #3", "attn L3 H1 (query)", "attn L3 H1 (value → mlp L5 #3)". */
function traceLabel(types: NodeTypes, t: Trace): string {
  const how = t.attentionTraceType?.replace(/_/g, " ");
  const into = t.downstream ? ` → ${types.name(t.downstream)}` : "";
  return types.name(t.node) + (how ? ` (${how}${into})` : "");
}

/** The chain of traces that led here, each a link back to it; "loss" clears the trace. */
function Breadcrumb(props: { trail: Trace[]; trace: Trace; onPick: (i: number) => void }) {
  const types = useNodeTypes();
  return (
    <nav className="breadcrumb" aria-label="trace history" data-testid="trace-breadcrumb">
      <button className="link" onClick={() => props.onPick(-1)}>
        loss
      </button>
      {props.trail.map((t, i) => (
        <span key={i}>
          {" › "}
          <button className="link" onClick={() => props.onPick(i)}>
            {traceLabel(types, t)}
          </button>
        </span>
      ))}
      {" › "}
      <strong aria-current="step">{traceLabel(types, props.trace)}</strong>
    </nav>
  );
}

/** The loss in words: logit(targets) − logit(distractors). */
function lossText(s: DebuggerState): string {
  if (!s.targets.length) return "none (no targets)";
  const mean = (t: string[]) => (t.length > 1 ? `mean logit(${t.join(", ")})` : `logit(${t[0]})`);
  return mean(s.targets) + (s.distractors.length ? ` − ${mean(s.distractors)}` : "");
}

/** What D is for a state: the loss; a traced node's pre-activation; or, through a head's value,
 * the head pair's direct effect on the loss or on a downstream node's pre-activation. */
export function directionText(types: NodeTypes, s: DebuggerState, tokens: string[]): string {
  const trace = s.trace;
  if (!trace) return lossText(s);
  const node = types.describe(trace.node, tokens);
  if (trace.attentionTraceType === "value") {
    const onto = trace.downstream
      ? `the pre-activation of ${types.describe(trace.downstream, tokens)}`
      : lossText(s);
    return `the direct effect of ${node} through its value on ${onto}`;
  }
  const via = trace.attentionTraceType
    ? ` (its attention logit, through the ${trace.attentionTraceType.replace(/_/g, " ")})`
    : "";
  return `the pre-activation of ${node}${via}`;
}

/** A state in a few words, for the note over stale results. */
function describeState(types: NodeTypes, s: DebuggerState): string {
  const short = (t: string) => (t.length > 40 ? `${t.slice(0, 40)}…` : t);
  const parts = [`“${short(s.prompt)}”`];
  if (s.targets.length) parts.push(`D = ${lossText(s)}`);
  if (s.trace) parts.push(`tracing ${types.name(s.trace.node)}`);
  if (s.ablations.length) parts.push(`${s.ablations.length} ablated`);
  if (s.secondPrompt) parts.push(`second prompt “${short(s.secondPrompt)}”`);
  return parts.join(", ");
}

function Candidates({ side, label }: { side: TdbSubResponse; label: string }) {
  const ref = side.targetTokens[0]?.score ?? null;
  const pinned = [
    ...side.targetTokens.map((t) => ({ ...t, kind: "target" })),
    ...side.distractorTokens.map((t) => ({ ...t, kind: "distractor" })),
  ];
  const rows = [...pinned, ...side.topOutputTokens.slice(0, 10).map((t) => ({ ...t, kind: "" }))];
  return (
    <div className="candidates">
      {label && <h3>{label}</h3>}
      <table className="small">
        <thead>
          <tr>
            <th>token</th>
            <th>p</th>
            <th>logit</th>
            {ref != null && <th>vs first target</th>}
          </tr>
        </thead>
        <tbody>
          {rows.map((t, i) => (
            <tr key={i} className={t.kind}>
              <td>
                <code>{displayToken(t.text)}</code>{" "}
                {t.kind && <span className="muted">{t.kind}</span>}
              </td>
              <td className="num">{t.probability != null ? t.probability.toFixed(3) : ""}</td>
              <td className="num">{t.score.toFixed(2)}</td>
              {ref != null && <td className="num">{(t.score - ref).toFixed(2)}</td>}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** One heat map per node type in the table's token sums, keyed by the type's name; token pairs
 * have two, by query token (`…_attended_from`) and by key token (`…_attended_to`). With two sides,
 * each type has three rows: left, Diff (left − right, token by token where both have the token)
 * and right, each on its own scale. */
function Heatmaps(props: {
  left: TdbSubResponse;
  right: TdbSubResponse | null;
  leftLabel: string;
  rightLabel: string;
}) {
  const { left, right } = props;
  const types = useNodeTypes();
  const maps: [string, string][] = types.all.flatMap((t) => {
    const label = plural(t).charAt(0).toUpperCase() + plural(t).slice(1);
    return t.perTokenPair
      ? [
          [`${t.name}_attended_from`, `${label} (attended from)`],
          [`${t.name}_attended_to`, `${label} (attended to)`],
        ]
      : [[t.name, label]];
  });
  return (
    <div className="heatmaps">
      <p className="muted legend" data-testid="heatmap-legend">
        <span className="swatch pos" /> raises D <span className="swatch neg" /> lowers D · each row
        on its own scale (its largest magnitude fully coloured); hover a token for its value
      </p>
      {maps.map(([key, label]) => {
        const l = left.tokenSums[key]?.estimatedTotalEffect;
        const r = right?.tokenSums[key]?.estimatedTotalEffect;
        if (!l && !r) return null;
        if (!right) {
          return (
            <div key={key} className="heatmap-row" data-type={key} data-side="left">
              <span className="label">{label}</span>
              <TokenHeatmap tokens={left.tokenStrings} values={l ?? []} />
            </div>
          );
        }
        const n = Math.max(left.tokenStrings.length, right.tokenStrings.length);
        const diff = Array.from({ length: n }, (_, i) =>
          l?.[i] != null && r?.[i] != null ? l[i] - r[i] : null,
        );
        const diffTokens = Array.from(
          { length: n },
          (_, i) => left.tokenStrings[i] ?? right.tokenStrings[i] ?? "",
        );
        return (
          <div key={key} className="heatmap-group" data-type={key}>
            <span className="label">{label}</span>
            {(
              [
                ["left", props.leftLabel, left.tokenStrings, l ?? []],
                ["diff", "Diff", diffTokens, diff],
                ["right", props.rightLabel, right.tokenStrings, r ?? []],
              ] as const
            ).map(([side, sideLabel, tokens, values]) => (
              <div key={side} className="heatmap-row" data-side={side}>
                <span className="label sub">{sideLabel}</span>
                <TokenHeatmap tokens={[...tokens]} values={[...values]} />
              </div>
            ))}
          </div>
        );
      })}
    </div>
  );
}
