import { describe, expect, it } from "vitest";
import type { Job } from "../api/types";
import { anyActive, formatDuration, jobFraction, progressKey, statusKey } from "./jobs";

function job(over: Partial<Job>): Job {
  return {
    id: "collate-default",
    kind: "collate",
    description: "collate",
    status: "running",
    output: "/tmp/x.sqlite",
    tokens: 0,
    log: [],
    ...over,
  };
}

describe("jobs", () => {
  it("polls while a job is queued or running, not after", () => {
    expect(anyActive([])).toBe(false);
    expect(anyActive([job({ status: "queued" })])).toBe(true);
    expect(anyActive([job({ status: "done" }), job({ status: "running" })])).toBe(true);
    expect(anyActive([job({ status: "done" }), job({ status: "failed" })])).toBe(false);
    expect(anyActive([job({ status: "stopped" })])).toBe(false);
  });

  it("computes progress from tokens and the total", () => {
    expect(jobFraction(job({ tokens: 2048, totalTokens: 8192 }))).toBe(0.25);
    expect(jobFraction(job({ tokens: 10, totalTokens: null }))).toBeNull();
    expect(jobFraction(job({ status: "done", tokens: 0 }))).toBe(1);
    expect(jobFraction(job({ tokens: 9000, totalTokens: 8192 }))).toBe(1);
  });

  it("formats durations", () => {
    expect(formatDuration(null)).toBe("–");
    expect(formatDuration(4.4)).toBe("4s");
    expect(formatDuration(75)).toBe("1m 15s");
    expect(formatDuration(3725)).toBe("1h 02m");
  });

  it("keys the jobs' statuses", () => {
    expect(statusKey([job({}), job({ id: "b", status: "done" })])).toBe(
      "collate-default=running,b=done",
    );
    expect(progressKey([job({ tokens: 2048 })])).toBe("collate-default=2048");
  });
});
