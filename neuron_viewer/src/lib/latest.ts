// "The latest request wins": each new request aborts the previous one, and a response that
// arrives after a newer request started is dropped, so an older answer never overwrites a newer.
export class LatestOnly {
  private seq = 0;
  private controller: AbortController | null = null;

  /** Run `fn`; resolves with its value, or with `stale` if a newer call started meanwhile. */
  async run<T>(
    fn: (signal: AbortSignal) => Promise<T>,
  ): Promise<{ value?: T; error?: unknown; stale: boolean }> {
    this.controller?.abort();
    const controller = new AbortController();
    this.controller = controller;
    const mine = ++this.seq;
    try {
      const value = await fn(controller.signal);
      return { value, stale: mine !== this.seq };
    } catch (error) {
      return { error, stale: mine !== this.seq || (error as Error)?.name === "AbortError" };
    }
  }

  /** Abort the running call, if any: it resolves as stale. */
  cancel(): void {
    this.controller?.abort();
    this.controller = null;
    this.seq++;
  }
}
