// Which side of the debugger a server error belongs to.
import { ApiError } from "../api/client";

/** From the field the server names in `detail.field` ("subRequests[1].nodeAblations[0]…"):
 * sub-request 0 is the left side, any other the right; "both" when no sub-request is named. */
export function errorSide(error: unknown): "left" | "right" | "both" {
  const field = error instanceof ApiError ? error.field : null;
  const m = field ? /^subRequests\[(\d+)\]/.exec(field) : null;
  if (!m) return "both";
  return m[1] === "0" ? "left" : "right";
}
