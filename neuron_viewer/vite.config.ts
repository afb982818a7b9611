import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

declare const process: { env: Record<string, string | undefined> };

// The UI talks to the server it is served from; `npm run dev` proxies the API to a local server.
const api = process.env.TDB_API ?? "http://127.0.0.1:8000";
const apiPaths = [
  "/batched_tdb",
  "/batched",
  "/derived_scalars",
  "/derived_attention_scalars",
  "/model_info",
  "/node_types",
  "/tokenize",
  "/generate",
  "/health",
  "/neuron_datasets_metadata",
  "/neuron_record",
  "/attention_head_record",
  "/jobs",
  // The API's docs (their scripts are under /docs-assets/) and its OpenAPI document.
  "/docs",
  "/redoc",
  "/openapi.json",
];

export default defineConfig({
  plugins: [react()],
  build: { outDir: "dist", sourcemap: false, reportCompressedSize: true },
  server: { proxy: Object.fromEntries(apiPaths.map((p) => [p, api])) },
});
