import { describe, expect, it } from "vitest";
import { LatestOnly } from "./latest";

const later = <T>(ms: number, v: T, signal?: AbortSignal) =>
  new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => resolve(v), ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(Object.assign(new Error("aborted"), { name: "AbortError" }));
    });
  });

describe("latest request wins", () => {
  it("marks an older response stale when a newer request started, even if it arrives later", async () => {
    const latest = new LatestOnly();
    const slow = latest.run(() => later(50, "old")); // ignores the abort signal on purpose
    const fast = latest.run((s) => later(5, "new", s));
    const [a, b] = await Promise.all([slow, fast]);
    expect(a.stale).toBe(true);
    expect(b).toEqual({ value: "new", stale: false });
  });

  it("aborts the previous request", async () => {
    const latest = new LatestOnly();
    const first = latest.run((s) => later(50, 1, s));
    await latest.run((s) => later(1, 2, s));
    expect((await first).stale).toBe(true);
  });

  it("cancels the running request: it resolves as stale", async () => {
    const latest = new LatestOnly();
    const running = latest.run((s) => later(50, 1, s));
    latest.cancel();
    expect((await running).stale).toBe(true);
  });
});
