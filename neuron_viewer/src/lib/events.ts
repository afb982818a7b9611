// App-wide notifications between components that share no parent state.
const target = new EventTarget();

/** What changed about the background jobs: a job's status (e.g. a dataset finished collating),
 * or only its progress (a store being written grew). */
export type JobsChange = "status" | "progress";

export function notifyJobsChanged(change: JobsChange): void {
  target.dispatchEvent(new CustomEvent<JobsChange>("jobs-changed", { detail: change }));
}

/** Listen to job changes of the given kinds (default: status changes only). */
export function onJobsChanged(listener: () => void, kinds: JobsChange[] = ["status"]): () => void {
  const handler = (e: Event) => {
    if (kinds.includes((e as CustomEvent<JobsChange>).detail)) listener();
  };
  target.addEventListener("jobs-changed", handler);
  return () => target.removeEventListener("jobs-changed", handler);
}
