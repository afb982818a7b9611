import { useState, type FormEvent } from "react";
import { setApiToken } from "../api/client";

/** Shown instead of a page when the server answers 401: it was started with an access token
 * (--auth-token) that this page does not have. Entering it here is the same as opening the page
 * with `?access_token=...`. */
export function TokenPrompt({ message }: { message: string }) {
  const [token, setToken] = useState("");
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (!token.trim()) return;
    setApiToken(token.trim());
    window.location.reload();
  };
  return (
    <section className="card" data-testid="token-required">
      <h2>Access token required</h2>
      <p className="error">{message}</p>
      <p>Or enter it here (it is remembered in this browser for this server):</p>
      <form className="row" onSubmit={submit}>
        <input
          type="password"
          autoComplete="off"
          placeholder="access token"
          aria-label="access token"
          value={token}
          onChange={(e) => setToken(e.target.value)}
        />
        <button type="submit">Use token</button>
      </form>
    </section>
  );
}
