import { useEffect, useState } from "react";

export function download(name: string, text: string, type = "application/json"): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.click();
  URL.revokeObjectURL(url);
}

/** The request and response of a card as JSON, with copy and download, in a dialog over the
 * page (Escape or a click outside closes it). */
export function JsonInspector({ request, response }: { request: unknown; response: unknown }) {
  const [open, setOpen] = useState(false);
  const [which, setWhich] = useState<"request" | "response">("response");
  useEffect(() => {
    if (!open) return;
    const onKey = (e: KeyboardEvent) => e.key === "Escape" && setOpen(false);
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [open]);
  if (!open) {
    return (
      <button className="link" onClick={() => setOpen(true)}>
        JSON
      </button>
    );
  }
  const text = JSON.stringify(which === "request" ? request : response, null, 2);
  return (
    <>
      <button className="link" onClick={() => setOpen(false)}>
        JSON
      </button>
      <div className="modal-backdrop" onClick={() => setOpen(false)}>
        <div
          className="json-inspector"
          data-testid="json-inspector"
          role="dialog"
          aria-modal="true"
          aria-label="JSON"
          onClick={(e) => e.stopPropagation()}
        >
          <div className="row">
            <button
              className={which === "request" ? "active" : ""}
              onClick={() => setWhich("request")}
            >
              request
            </button>
            <button
              className={which === "response" ? "active" : ""}
              onClick={() => setWhich("response")}
            >
              response
            </button>
            <button onClick={() => navigator.clipboard?.writeText(text)}>copy</button>
            <button onClick={() => download(`${which}.json`, text)}>download</button>
            <button className="link" onClick={() => setOpen(false)}>
              close
            </button>
          </div>
          <pre>
            {text.length > 200_000
              ? text.slice(0, 200_000) + "\n… (truncated; download for all)"
              : text}
          </pre>
        </div>
      </div>
    </>
  );
}
