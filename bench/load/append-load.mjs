// Keep-alive HTTP load generator for bench/streams_bench.py.
//
// A Python client on a 2-core box saturates before the server does, so the request loops
// that need raw request rate live here. Each connection is one undici Client (one socket,
// no pipelining) running a sequential request loop.
//
// Modes:
//   append  POST fixed-size bodies to one stream (--url) for --warmup-s + --duration-s,
//           optionally with idempotent-producer headers (--producer).
//   create  PUT --count new streams named <--url>-<i> (tiny body), as fast as possible.
//   catchup --connections clients read the whole stream at --url from offset -1 at once,
//           following Stream-Next-Offset until Stream-Up-To-Date; --rounds times, after one
//           untimed round, in --threads worker threads. Each read should come to
//           --expected-bytes.
//
// Output (stdout, one JSON object per line):
//   {"event":"measure-start","cpu_s":..}  warm-up over, the measured window begins
//   {"event":"measure-end","cpu_s":..}    measured window over (cpu_s: this process's CPU)
//   {"event":"result", ...}     summary (counts, ops/s, latency percentiles in ms)
import { parseArgs } from "node:util"
import { performance } from "node:perf_hooks"
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads"
import { Client } from "undici"

const { values } = parseArgs({
  options: {
    mode: { type: "string", default: "append" },
    url: { type: "string" },
    connections: { type: "string", default: "1" },
    "duration-s": { type: "string", default: "10" },
    "warmup-s": { type: "string", default: "1" },
    "body-bytes": { type: "string", default: "256" },
    "content-type": { type: "string", default: "application/json" },
    producer: { type: "boolean", default: false },
    "producer-prefix": { type: "string", default: "bench" },
    count: { type: "string", default: "1000" },
    rounds: { type: "string", default: "10" },
    "expected-bytes": { type: "string", default: "0" },
    threads: { type: "string", default: "2" },
    "timeout-s": { type: "string", default: "600" },
  },
})

if (!values.url) {
  console.error("--url is required")
  process.exit(2)
}

const target = new URL(values.url)
const connections = Number(values.connections)
const contentType = values["content-type"]

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n")
}

/** Marker line; carries this process's CPU time so the bench can tell if we were the limit. */
function mark(event) {
  const { user, system } = process.cpuUsage()
  emit({ event, cpu_s: (user + system) / 1e6 })
}

/** A JSON object body of exactly `size` bytes (a single message in JSON mode). */
function jsonBody(size) {
  const head = `{"k":"`
  const tail = `"}`
  return Buffer.from(head + "x".repeat(Math.max(0, size - head.length - tail.length)) + tail)
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return sorted[rank]
}

function summarize(latencies) {
  const sorted = Float64Array.from(latencies).sort()
  let sum = 0
  for (const v of sorted) sum += v
  return {
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted.length ? sorted[sorted.length - 1] : null,
    mean: sorted.length ? sum / sorted.length : null,
  }
}

function newClient() {
  return new Client(target.origin, {
    pipelining: 1,
    keepAliveTimeout: 60_000,
    keepAliveMaxTimeout: 600_000,
  })
}

async function runAppend() {
  const warmupMs = Number(values["warmup-s"]) * 1000
  const durationMs = Number(values["duration-s"]) * 1000
  const body = contentType.startsWith("application/json")
    ? jsonBody(Number(values["body-bytes"]))
    : Buffer.alloc(Number(values["body-bytes"]), 0x61)
  const start = performance.now()
  const measureFrom = start + warmupMs
  const stopAt = measureFrom + durationMs
  const statusCounts = {}
  let errors = 0
  let ok = 0
  const latencies = []

  setTimeout(() => mark("measure-start"), warmupMs)
  const clients = Array.from({ length: connections }, newClient)

  async function loop(index) {
    const client = clients[index]
    const producerId = `${values["producer-prefix"]}-${index}`
    let seq = 0
    for (;;) {
      const t0 = performance.now()
      if (t0 >= stopAt) return
      const headers = { "content-type": contentType }
      if (values.producer) {
        headers["producer-id"] = producerId
        headers["producer-epoch"] = "0"
        headers["producer-seq"] = String(seq)
      }
      let status = 0
      try {
        const res = await client.request({ path: target.pathname, method: "POST", headers, body })
        status = res.statusCode
        await res.body.dump()
      } catch (err) {
        errors += 1
        statusCounts.error = (statusCounts.error ?? 0) + 1
        if (errors <= 3) console.error(`request failed: ${err}`)
        await new Promise((r) => setTimeout(r, 10))
        continue
      }
      seq += 1
      const t1 = performance.now()
      if (t0 < measureFrom || t1 > stopAt) continue
      statusCounts[status] = (statusCounts[status] ?? 0) + 1
      // A producer append is accepted with 200; 204 would mean "duplicate" and is an error here.
      const expected = values.producer ? 200 : 204
      if (status === expected) {
        ok += 1
        latencies.push(t1 - t0)
      } else {
        errors += 1
      }
    }
  }

  await Promise.all(clients.map((_, i) => loop(i)))
  mark("measure-end")
  await Promise.all(clients.map((c) => c.close()))
  const seconds = durationMs / 1000
  return {
    mode: "append",
    connections,
    producer: values.producer,
    duration_s: seconds,
    warmup_s: warmupMs / 1000,
    ok,
    errors,
    status_counts: statusCounts,
    ops_per_s: ok / seconds,
    latency_ms: summarize(latencies),
  }
}

async function runCreate() {
  const count = Number(values.count)
  const deadline = performance.now() + Number(values["timeout-s"]) * 1000
  const clients = Array.from({ length: connections }, newClient)
  const statusCounts = {}
  const latencies = []
  let next = 0
  let ok = 0
  let errors = 0

  mark("measure-start")
  const start = performance.now()

  async function loop(index) {
    const client = clients[index]
    for (;;) {
      const i = next++
      if (i >= count || performance.now() >= deadline) return
      const t0 = performance.now()
      try {
        const res = await client.request({
          path: `${target.pathname}-${i}`,
          method: "PUT",
          headers: { "content-type": "text/plain" },
          body: "x",
        })
        await res.body.dump()
        statusCounts[res.statusCode] = (statusCounts[res.statusCode] ?? 0) + 1
        if (res.statusCode === 201) {
          ok += 1
          latencies.push(performance.now() - t0)
        } else {
          errors += 1
        }
      } catch (err) {
        errors += 1
        statusCounts.error = (statusCounts.error ?? 0) + 1
        if (errors <= 3) console.error(`request failed: ${err}`)
      }
    }
  }

  await Promise.all(clients.map((_, i) => loop(i)))
  const seconds = (performance.now() - start) / 1000
  mark("measure-end")
  await Promise.all(clients.map((c) => c.close()))
  return {
    mode: "create",
    connections,
    requested: count,
    ok,
    errors,
    status_counts: statusCounts,
    elapsed_s: seconds,
    ops_per_s: ok / seconds,
    latency_ms: summarize(latencies),
  }
}

/** One client's whole catch-up read: {ms, bytes, requests}, or throws. */
async function readAll(client) {
  const t0 = performance.now()
  let offset = "-1"
  let bytes = 0
  let requests = 0
  for (;;) {
    const res = await client.request({
      path: `${target.pathname}?offset=${encodeURIComponent(offset)}`,
      method: "GET",
      headers: { "accept-encoding": "identity" },
    })
    requests += 1
    // Count the bytes as they arrive; keeping them is not part of the measurement.
    for await (const chunk of res.body) bytes += chunk.length
    if (res.statusCode !== 200) throw new Error(`catch-up GET -> ${res.statusCode}`)
    const next = res.headers["stream-next-offset"]
    if (res.headers["stream-up-to-date"] === "true" || !next) break
    offset = next
  }
  return { ms: performance.now() - t0, bytes, requests }
}

// The catch-up readers run in --threads worker threads (the connections split among them):
// one thread reading 50 x 2 MB responses is slower than either server sends them.
async function runCatchup() {
  const rounds = Number(values.rounds)
  const threads = Math.max(1, Math.min(Number(values.threads), connections))
  const workers = Array.from({ length: threads }, (_, t) => {
    const share = Math.floor(connections / threads) + (t < connections % threads ? 1 : 0)
    return new Worker(new URL(import.meta.url), {
      workerData: { url: values.url, connections: share },
      argv: process.argv.slice(2),
    })
  })
  // Every thread reads once per round; resolves with all their reads.
  function round() {
    return Promise.all(
      workers.map(
        (worker) =>
          new Promise((resolve, reject) => {
            worker.once("error", reject)
            worker.once("message", (reads) => {
              worker.off("error", reject)
              resolve(reads)
            })
            worker.postMessage("read")
          }),
      ),
    ).then((perThread) => perThread.flat())
  }
  const expected = Number(values["expected-bytes"])
  const latencies = []
  const requestCounts = new Set()
  let bytes = 0
  let incomplete = 0
  let wallMs = 0
  // The untimed round opens every connection and warms both sides.
  await round()
  mark("measure-start")
  for (let r = 0; r < rounds; r++) {
    const start = performance.now()
    const reads = await round()
    wallMs += performance.now() - start
    for (const read of reads) {
      latencies.push(read.ms)
      bytes += read.bytes
      requestCounts.add(read.requests)
      if (expected && read.bytes !== expected) incomplete += 1
    }
  }
  mark("measure-end")
  await Promise.all(workers.map((w) => w.terminate()))
  return {
    mode: "catchup",
    connections,
    threads,
    rounds,
    bytes,
    wall_s: wallMs / 1000,
    mb_per_s: bytes / (wallMs / 1000) / 1e6,
    incomplete,
    requests_per_client: [...requestCounts].sort((a, b) => a - b),
    latency_ms: summarize(latencies),
  }
}

/** A catch-up worker thread: on each "read", its clients read the stream at once. */
function serveCatchupReads() {
  const clients = Array.from({ length: workerData.connections }, newClient)
  parentPort.on("message", async () => {
    parentPort.postMessage(await Promise.all(clients.map(readAll)))
  })
}

const hardStop = setTimeout(() => {
  console.error("load generator exceeded its time limit")
  process.exit(3)
}, Number(values["timeout-s"]) * 1000 + 30_000)
hardStop.unref()

if (!isMainThread) {
  serveCatchupReads()
} else {
  await main()
}

async function main() {
  const runners = { append: runAppend, create: runCreate, catchup: runCatchup }
  if (!(values.mode in runners)) {
    console.error(`unknown --mode ${values.mode}`)
    process.exit(2)
  }
  const result = await runners[values.mode]()
  emit({ event: "result", ...result })
}
