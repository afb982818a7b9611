// Short names for the generated API types (src/api/schema.d.ts comes from the server's schema).
import type { components } from "./schema";

type S = components["schemas"];
export type NodeIndex = S["NodeIndexModel"];
export type NodeType = NodeIndex["nodeType"];
export type NodeAblation = S["NodeAblationModel"];
export type NodeToTrace = S["NodeToTraceModel"];
export type AttentionTraceType = NonNullable<NodeToTrace["attentionTraceType"]>;
export type TdbSubRequest = S["TdbSubRequest"];
export type BatchedTdbRequest = S["BatchedTdbRequest"];
export type BatchedTdbResponse = S["BatchedTdbResponse"];
export type TdbSubResponse = S["TdbSubResponse"];
export type NodeRow = S["NodeRow"];
export type ScoredToken = S["ScoredTokenModel"];
export type NodeTokenViews = S["NodeTokenViewsModel"];
export type ModelInfo = S["ModelInfo"];
export type TokenizeResponse = S["TokenizeResponse"];
export type DerivedScalarsRequest = S["DerivedScalarsRequest"];
export type DerivedScalarsResponse = S["DerivedScalarsResponse"];
export type DerivedAttentionScalarsResponse = S["DerivedAttentionScalarsResponse"];
export type BatchedRequest = S["BatchedRequest"];
export type BatchedResponse = S["BatchedResponse"];
export type ErrorResponse = S["ErrorResponse"];
export type HealthResponse = S["HealthResponse"];
