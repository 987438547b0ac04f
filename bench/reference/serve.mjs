// Launch the pinned reference Durable Streams server (@durable-streams/server) for the
// benchmark. In-memory by default; file-backed (LMDB + append-only logs) with --data-dir.
//
//   node serve.mjs --port 4437 [--host 127.0.0.1] [--long-poll-timeout-ms 30000] [--data-dir DIR]
//
// Prints "Durable Streams reference server running at <url>" once listening and stops
// cleanly on SIGTERM / SIGINT.
import { parseArgs } from "node:util"
import { DurableStreamTestServer } from "@durable-streams/server"

const { values } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "4437" },
    "long-poll-timeout-ms": { type: "string", default: "30000" },
    "data-dir": { type: "string" },
  },
})

const server = new DurableStreamTestServer({
  host: values.host,
  port: Number(values.port),
  longPollTimeout: Number(values["long-poll-timeout-ms"]),
  dataDir: values["data-dir"],
})

const url = await server.start()
const mode = values["data-dir"] ? `file-backed (${values["data-dir"]})` : "in-memory"
console.log(`Durable Streams reference server running at ${url} [${mode}]`)

let stopping = false
async function shutdown() {
  if (stopping) return
  stopping = true
  // A stuck SSE connection must not keep the process alive forever.
  setTimeout(() => process.exit(1), 5000).unref()
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", shutdown)
process.on("SIGINT", shutdown)
