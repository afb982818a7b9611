// Background jobs (GET /jobs): when to keep polling, and how to show progress.
import type { Job } from "../api/types";

export const ACTIVE_STATUSES: ReadonlySet<Job["status"]> = new Set(["queued", "running"]);

/** Poll while any job is queued or running; stop once none is. */
export function anyActive(jobs: Job[]): boolean {
  return jobs.some((j) => ACTIVE_STATUSES.has(j.status));
}

/** Progress in [0, 1], or null when the total is unknown. Done jobs are complete. */
export function jobFraction(job: Job): number | null {
  if (job.status === "done") return 1;
  if (!job.totalTokens) return null;
  return Math.min(1, Math.max(0, job.tokens / job.totalTokens));
}

/** 75 → "1m 15s"; 3725 → "1h 02m"; null → "–". */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** A key that changes when any job's status changes (to refresh what depends on finished jobs). */
export function statusKey(jobs: Job[]): string {
  return jobs.map((j) => `${j.id}=${j.status}`).join(",");
}

/** A key that changes when any job makes progress. */
export function progressKey(jobs: Job[]): string {
  return jobs.map((j) => `${j.id}=${j.tokens}`).join(",");
}
