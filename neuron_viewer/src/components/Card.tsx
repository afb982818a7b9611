import type { ReactNode } from "react";

/** A titled panel with its own loading and error state. */
export function Card(props: {
  title: string;
  loading?: boolean;
  error?: string | null;
  actions?: ReactNode;
  children?: ReactNode;
  testId?: string;
}) {
  return (
    <section
      className="card"
      data-testid={props.testId}
      aria-busy={props.loading ? "true" : "false"}
    >
      <div className="card-head">
        <h2>{props.title}</h2>
        {props.loading && <span className="spinner" aria-label="loading" />}
        <div className="card-actions">{props.actions}</div>
      </div>
      {props.error && (
        <p className="error" role="alert">
          {props.error}
        </p>
      )}
      {props.children}
    </section>
  );
}
