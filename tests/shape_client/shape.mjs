// Reads one shape with the real @electric-sql/client and prints each message batch as a
// JSON line on stdout, so pytest can drive the official client against our server.
//
// argv[2]: JSON {url, params, offset?, handle?, subscribe, headers?, int8AsNumber?}
import { ShapeStream } from "@electric-sql/client";

const config = JSON.parse(process.argv[2]);

function emit(event) {
  const line = JSON.stringify(event, (_key, value) =>
    typeof value === "bigint" ? { $bigint: value.toString() } : value,
  );
  process.stdout.write(line + "\n");
}

const stream = new ShapeStream({
  url: config.url,
  params: config.params,
  offset: config.offset,
  handle: config.handle,
  subscribe: config.subscribe,
  headers: config.headers,
  // The web UI parses int8 as a JS number; the client's default is BigInt.
  parser: config.int8AsNumber ? { int8: (value) => Number(value) } : undefined,
  onError: (error) => {
    emit({ event: "error", message: String(error?.message ?? error), status: error?.status });
    process.exit(1);
  },
});

stream.subscribe(
  (messages) => {
    const upToDate = messages.some((m) => m.headers?.control === "up-to-date");
    emit({
      event: "messages",
      messages,
      handle: stream.shapeHandle,
      offset: stream.lastOffset,
      upToDate,
    });
    if (upToDate && !config.subscribe) process.exit(0);
  },
  (error) => {
    emit({ event: "error", message: String(error?.message ?? error), status: error?.status });
    process.exit(1);
  },
);
