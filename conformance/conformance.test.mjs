// Runs the published Durable Streams server conformance suite (0.3.6) against
// an already-running server.
//
// Environment:
//   CONFORMANCE_BASE_URL        server base URL; the suite uses `${url}/v1/stream/...` (required)
//   CONFORMANCE_LONG_POLL_MS    the server's long-poll timeout in ms (default 500)
//   CONFORMANCE_SUBSCRIPTIONS   "1" to enable the 6 reserved `__ds` subscription tests
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.CONFORMANCE_BASE_URL;
if (!baseUrl) {
  throw new Error("CONFORMANCE_BASE_URL is required, e.g. http://127.0.0.1:4437");
}

runConformanceTests({
  baseUrl: baseUrl.replace(/\/+$/, ""),
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? "500"),
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS === "1",
});
