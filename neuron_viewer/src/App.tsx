import { Component, lazy, Suspense, useEffect, useState, type ReactNode } from "react";
import { api, ApiError } from "./api/client";
import type { ModelInfo } from "./api/types";
import { JobsIndicator } from "./components/Jobs";
import { TokenPrompt } from "./components/TokenPrompt";
import { NodeTypes } from "./lib/nodes";
import { NodeTypesContext } from "./nodeTypes";
import Home from "./pages/Home";
import { linkClick, useLocation } from "./router";

// The debugger and node pages load on demand, keeping the initial bundle small.
const Debugger = lazy(() => import("./pages/Debugger"));
const NodePage = lazy(() => import("./pages/NodePage"));

/** A page that failed to load its code (the server went away: "Failed to fetch dynamically
 * imported module") or threw while rendering: a message and a reload button instead of a blank
 * page; the header stays. Keyed by the path, so moving to another page starts afresh. */
class PageBoundary extends Component<{ children: ReactNode }, { error: Error | null }> {
  state: { error: Error | null } = { error: null };
  static getDerivedStateFromError(error: Error) {
    return { error };
  }
  render() {
    const { error } = this.state;
    if (!error) return this.props.children;
    const chunk = /dynamically imported module|Importing a module script failed/i.test(
      error.message,
    );
    return (
      <div className="error" role="alert" data-testid="page-error">
        <p>
          {chunk
            ? "This page could not be loaded: the server did not send its code (is it still running?)."
            : "This page failed while showing its content."}{" "}
          <span className="muted">({error.message})</span>
        </p>
        <button onClick={() => window.location.reload()}>Reload</button>
      </div>
    );
  }
}

export type ModelState = { info: ModelInfo | null; error: string | null };

/** A 401: this server wants an access token the page lacks (or has wrong). */
function isUnauthorized(e: Error | null): e is ApiError {
  return e instanceof ApiError && e.status === 401;
}

export default function App() {
  const { pathname } = useLocation();
  const [model, setModel] = useState<ModelState>({ info: null, error: null });
  const [nodeTypes, setNodeTypes] = useState<{ types: NodeTypes | null; error: Error | null }>({
    types: null,
    error: null,
  });
  useEffect(() => {
    api
      .modelInfo()
      .then((info) => setModel({ info, error: null }))
      .catch((e: Error) =>
        setModel({ info: null, error: isUnauthorized(e) ? "access token needed" : e.message }),
      );
    // Answered with or without a model (the offline dataset viewer): every page needs them.
    api
      .nodeTypes()
      .then((r) => setNodeTypes({ types: new NodeTypes(r.nodeTypes), error: null }))
      .catch((e: Error) => setNodeTypes({ types: null, error: e }));
  }, []);

  const parts = pathname.split("/").filter(Boolean).map(decodeURIComponent);
  let page;
  if (pathname === "/" || pathname === "") page = <Home model={model} />;
  else if (parts[0] === "debugger") page = <Debugger model={model} />;
  else if (parts.length === 4) {
    page = (
      <NodePage
        model={model}
        modelName={parts[0]}
        nodeType={parts[1]}
        layer={parts[2]}
        index={parts[3]}
      />
    );
  } else page = <p className="error">No page at {pathname}.</p>;
  if (!nodeTypes.types)
    page = isUnauthorized(nodeTypes.error) ? (
      <TokenPrompt message={nodeTypes.error.message} />
    ) : nodeTypes.error ? (
      <p className="error">{nodeTypes.error.message}</p>
    ) : (
      <p className="loading">Loading…</p>
    );

  return (
    <div className="app">
      <header className="topbar">
        <a href="/" onClick={linkClick} className="brand">
          Transformer debugger
        </a>
        <nav>
          <a href="/debugger" onClick={linkClick}>
            Debugger
          </a>
        </nav>
        <JobsIndicator />
        <span className="model-name" data-testid="model-name">
          {model.info
            ? `${model.info.name} · ${model.info.device}`
            : (model.error ?? "connecting…")}
        </span>
      </header>
      <main>
        <NodeTypesContext.Provider value={nodeTypes.types}>
          <PageBoundary key={pathname}>
            <Suspense fallback={<p className="loading">Loading…</p>}>{page}</Suspense>
          </PageBoundary>
        </NodeTypesContext.Provider>
      </main>
    </div>
  );
}
