// A user's TypeScript client: types generated from openapi/openapi.json by openapi-typescript (schema.d.ts, written
// next to this file by the test), calls made with openapi-fetch. The test type-checks this file with tsc --strict,
// so a change to the document that breaks this code fails there, then runs it against a live gateway.
// Usage: node client_check.js <gateway base URL>. The last stdout line is a JSON report.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type QueuedMessage = components["schemas"]["QueuedMessage"];

const baseUrl = process.argv[2];
const client = createClient<paths>({ baseUrl });
const queue = { kind: "queue", name: "ts/eu.orders" } as const; // a '/' in a name travels as %2F
const destination = "/destinations/{kind}/{name}" as const;
// openapi-fetch serializes every body as JSON unless told otherwise: text and bytes go as they are.
const asIs = (body: unknown) => body as BodyInit;

async function main(): Promise<Record<string, unknown>> {
  const health = await client.GET("/health");

  // Text, raw: Content-Type becomes the message's content-type; STOMP headers travel as X-Stomp-*.
  const text = await client.POST(destination, {
    params: { path: queue },
    body: "from typescript",
    bodySerializer: asIs,
    headers: { "Content-Type": "text/plain", "X-Stomp-priority": "8", "X-Stomp-app": "ts" },
  });
  // JSON, raw.
  const json = await client.POST(destination, {
    params: { path: queue },
    body: { order: 7, lines: [1, 2] },
    headers: { "Content-Type": "application/json" },
  });
  // Bytes, raw. (openapi-typescript types `format: binary` as string; fetch sends the Uint8Array unchanged.)
  const bytes = await client.POST(destination, {
    params: { path: queue },
    body: new Uint8Array([0, 255, 114, 97, 119]) as unknown as string,
    bodySerializer: asIs,
    headers: { "Content-Type": "application/octet-stream" },
  });
  // The envelope: headers and body in one JSON document.
  const envelope = await client.POST(destination, {
    params: { path: queue },
    body: { headers: { app: "ts-envelope" }, body: "/wE=", body_encoding: "base64" },
    headers: { "Content-Type": "application/vnd.stompgate.envelope+json" },
  });

  const listed = await client.GET("/destinations");
  const one = await client.GET(destination, { params: { path: queue } });
  const peek = await client.GET("/messages/{kind}/{name}", { params: { path: queue, query: { limit: 10 } } });
  const selected = await client.GET("/messages/{kind}/{name}", {
    params: { path: queue, query: { selector: "app = 'ts'" } },
  });
  const unknown = await client.GET(destination, { params: { path: { kind: "topic", name: "ts/never.used" } } });

  const summary = (m: QueuedMessage) => ({
    body: m.body,
    encoding: m.body_encoding,
    contentType: m.headers["content-type"] ?? null,
    priority: m.priority,
  });
  return {
    ok: true,
    health: health.data?.status ?? null,
    published: [text, json, bytes, envelope].map((r) => r.response.status),
    publishedTo: text.data?.destination ?? null,
    textMessageId: text.data?.message_id ?? null,
    listed: (listed.data ?? []).map((d) => d.destination),
    depth: one.data?.depth ?? null,
    messages: (peek.data ?? []).map(summary),
    firstMessageId: peek.data?.[0]?.message_id ?? null,
    selected: (selected.data ?? []).map((m) => m.body),
    unknownStatus: unknown.response.status,
    unknownType: unknown.error?.type ?? null,
    unknownContentType: unknown.response.headers.get("content-type"),
  };
}

main().then(
  (report) => console.log(JSON.stringify(report)),
  (error: unknown) => {
    console.log(JSON.stringify({ ok: false, error: String(error) }));
    process.exitCode = 1;
  },
);
