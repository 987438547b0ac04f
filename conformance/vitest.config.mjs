// Vitest config for the Durable Streams conformance run.
//
// The suite is black-box HTTP: it needs a running server, whose base URL is
// given in CONFORMANCE_BASE_URL (streams live under `${baseUrl}/v1/stream/`).
// tests/test_conformance.py starts our server and runs this; see README.md.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    root: fileURLToPath(new URL(".", import.meta.url)),
    include: ["conformance.test.mjs"],
  },
});
