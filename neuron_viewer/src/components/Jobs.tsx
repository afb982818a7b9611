import { useEffect, useRef, useState } from "react";
import { api, ApiError } from "../api/client";
import type { Job } from "../api/types";
import { notifyJobsChanged } from "../lib/events";
import { anyActive, formatDuration, jobFraction, progressKey, statusKey } from "../lib/jobs";

const POLL_MS = 3000;

/** GET /jobs once, then every 3 s while any job is queued or running; changes are announced
 * (lib/events) so views of a dataset being built refresh. */
function useJobs(): { jobs: Job[]; error: string | null } {
  const [state, setState] = useState<{ jobs: Job[]; error: string | null }>({
    jobs: [],
    error: null,
  });
  const last = useRef<{ status: string; progress: string } | null>(null);
  useEffect(() => {
    let timer: number | undefined;
    let stopped = false;
    const controller = new AbortController();
    const poll = () => {
      api
        .jobs(controller.signal)
        .then((r) => {
          if (stopped) return;
          setState({ jobs: r.jobs, error: null });
          const keys = { status: statusKey(r.jobs), progress: progressKey(r.jobs) };
          if (last.current && keys.status !== last.current.status) notifyJobsChanged("status");
          else if (last.current && keys.progress !== last.current.progress)
            notifyJobsChanged("progress");
          last.current = keys;
          if (anyActive(r.jobs)) timer = window.setTimeout(poll, POLL_MS);
        })
        .catch((e: Error) => {
          // An old server without /jobs (404) has no jobs to show, and without the access token
          // (401) none are shown until the page has it; anything else is retried.
          if (stopped || e.name === "AbortError") return;
          setState((s) => ({ ...s, error: e.message }));
          if (!(e instanceof ApiError && (e.status === 404 || e.status === 401)))
            timer = window.setTimeout(poll, POLL_MS);
        });
    };
    poll();
    return () => {
      stopped = true;
      controller.abort();
      window.clearTimeout(timer);
    };
  }, []);
  return state;
}

function ProgressBar({ fraction }: { fraction: number | null }) {
  return (
    <div
      className={"progress" + (fraction == null ? " indeterminate" : "")}
      role="progressbar"
      aria-valuemin={0}
      aria-valuemax={100}
      aria-valuenow={fraction == null ? undefined : Math.round(fraction * 100)}
    >
      <div style={{ width: `${(fraction ?? 0) * 100}%` }} />
    </div>
  );
}

function JobRow({ job }: { job: Job }) {
  const fraction = jobFraction(job);
  const unit = job.unit ?? "tokens"; // what tokens/totalTokens count (absent: tokens)
  const failed = job.status === "failed" || job.status === "stopped";
  return (
    <li className="job" data-testid="job" data-status={job.status} data-job-id={job.id}>
      <div className="row job-head">
        <strong>{job.description}</strong>
        <span className={`badge status-${job.status}`} data-testid="job-status">
          {job.status}
        </span>
      </div>
      <ProgressBar fraction={fraction} />
      <div className="job-stats muted" data-testid="job-progress">
        <span data-testid="job-tokens">
          {job.tokens.toLocaleString()}
          {job.totalTokens ? ` / ${job.totalTokens.toLocaleString()}` : ""} {unit}
          {fraction != null && ` (${(fraction * 100).toFixed(1)}%)`}
        </span>
        {job.tokensPerSecond != null && job.status === "running" && (
          <span>
            {Math.round(job.tokensPerSecond).toLocaleString()}{" "}
            {unit === "tokens" ? "tok/s" : `${unit}/s`}
          </span>
        )}
        {job.status === "running" && <span>ETA {formatDuration(job.etaSeconds)}</span>}
        {job.finishedAt && <span>finished {new Date(job.finishedAt).toLocaleTimeString()}</span>}
      </div>
      <div className="muted job-output" title={job.output}>
        → {job.output}
      </div>
      {failed && job.message && (
        <p className="error" role="alert">
          {job.message}
        </p>
      )}
      {failed && job.log.length > 0 && (
        <pre className="job-log" data-testid="job-log">
          {job.log.join("\n")}
        </pre>
      )}
    </li>
  );
}

/** The header's jobs indicator (hidden without jobs), expanding into the list of jobs. */
export function JobsIndicator() {
  const { jobs } = useJobs();
  const [open, setOpen] = useState(false);
  if (jobs.length === 0) return null;
  const running = jobs.filter((j) => j.status === "running" || j.status === "queued");
  const failed = jobs.filter((j) => j.status === "failed");
  const first = running[0];
  const fraction = first ? jobFraction(first) : null;
  const label = running.length
    ? `${running.length} job${running.length > 1 ? "s" : ""} running` +
      (fraction != null ? ` · ${Math.floor(fraction * 100)}%` : "")
    : failed.length
      ? `${failed.length} job${failed.length > 1 ? "s" : ""} failed`
      : `${jobs.length} job${jobs.length > 1 ? "s" : ""} done`;
  return (
    <div className="jobs">
      <button
        className={"jobs-indicator" + (failed.length ? " failed" : running.length ? " busy" : "")}
        data-testid="jobs-indicator"
        aria-expanded={open}
        onClick={() => setOpen((o) => !o)}
      >
        {running.length > 0 && <span className="spinner" aria-hidden="true" />}
        {label}
      </button>
      {open && (
        <div className="jobs-panel" data-testid="jobs-panel" role="region" aria-label="jobs">
          <div className="row">
            <strong>Background jobs</strong>
            <button className="link close" onClick={() => setOpen(false)} aria-label="close jobs">
              ×
            </button>
          </div>
          <ul>
            {jobs.map((j) => (
              <JobRow key={j.id} job={j} />
            ))}
          </ul>
        </div>
      )}
    </div>
  );
}
