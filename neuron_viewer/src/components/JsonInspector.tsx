import { useState } from "react";

export function download(name: string, text: string, type = "application/json"): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.click();
  URL.revokeObjectURL(url);
}

/** The request and response of a card as JSON, with copy and download. */
export function JsonInspector({ request, response }: { request: unknown; response: unknown }) {
  const [open, setOpen] = useState(false);
  const [which, setWhich] = useState<"request" | "response">("response");
  if (!open) {
    return (
      <button className="link" onClick={() => setOpen(true)}>
        JSON
      </button>
    );
  }
  const text = JSON.stringify(which === "request" ? request : response, null, 2);
  return (
    <div className="json-inspector" data-testid="json-inspector">
      <div className="row">
        <button className={which === "request" ? "active" : ""} onClick={() => setWhich("request")}>
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
  );
}
