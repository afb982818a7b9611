import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import App from "./App";
import { rememberToken } from "./api/client";
import "./styles.css";

// `?access_token=...` (a server started with --auth-token): before anything reads the URL.
rememberToken();

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
