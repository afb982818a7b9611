import { describe, expect, it } from "vitest";
import { ApiError } from "../api/client";
import { errorSide } from "./errors";

const error = (detail: unknown, message = "the server's message") =>
  new ApiError(400, message, "abc123", detail);

describe("errorSide", () => {
  it("reads the side from the field the server names in detail.field", () => {
    const field = "subRequests[1].nodeAblations[0].node.layerIndex";
    expect(errorSide(error({ field, kind: "invalid" }))).toBe("right");
    expect(errorSide(error({ field: "subRequests[0].targetTokens[0]", kind: "invalid" }))).toBe(
      "left",
    );
    expect(errorSide(error({ field: "subRequests", kind: "too_large" }))).toBe("both");
  });

  it("takes the first field of a schema violation's list", () => {
    const detail = [
      { field: "subRequests[2].topAndBottomKForNodeTable", message: "too big", type: "x" },
      { field: "subRequests[0].prompt", message: "missing", type: "y" },
    ];
    expect(error(detail).field).toBe("subRequests[2].topAndBottomKForNodeTable");
    expect(errorSide(error(detail))).toBe("right");
  });

  it("does not parse the message: without a field the error is both sides'", () => {
    expect(errorSide(error(null, "subRequests[1].prompt: too long"))).toBe("both");
    expect(errorSide(new Error("subRequests[0].prompt: too long"))).toBe("both");
    expect(errorSide(new ApiError(0, "cannot reach the server at http://x"))).toBe("both");
  });
});
