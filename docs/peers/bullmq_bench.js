// The gateway's queue workload done with BullMQ (Node job queue on Redis: Lua scripts, the most used Redis queue),
// for docs/benchmarks.md. Not part of stompgate: run it where `npm install bullmq` was run (NODE_PATH may point at
// that node_modules).
//
// Producers add 256-byte payloads in batches (queue.addBulk of 64, like the bench's SEND chunk); consumers are
// Workers, each with `concurrency` jobs in hand at once (comparable to a STOMP prefetch-count), completing each job
// when its handler returns (BullMQ's moveToFinished script, which also fetches the next job). Completed jobs are
// removed (removeOnComplete), as the gateway deletes a message on its ACK. Reported: jobs/s from the first add to the
// last completion, like `stompgate bench`'s msgs/s, and jobs lost (never handled) or handled twice, by (producer, seq).
// The queue is obliterated afterwards.
//
//   node docs/peers/bullmq_bench.js redis://127.0.0.1:6379/0 50000 100
'use strict';
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

async function main () {
  const [url, messagesArg = '50000', concurrencyArg = '100'] = process.argv.slice(2);
  const messages = Number(messagesArg);
  const concurrency = Number(concurrencyArg);
  const producers = 2;
  const consumers = 2;
  const addBatch = 64;
  const parsed = new URL(url);
  const connection = {
    host: parsed.hostname,
    port: Number(parsed.port || 6379),
    db: Number(parsed.pathname.slice(1) || 0),
    maxRetriesPerRequest: null // BullMQ requires it for workers (blocking commands)
  };
  const name = 'bench-' + Date.now();
  const queue = new Queue(name, { connection });

  const seen = new Set();
  let handled = 0;
  let duplicated = 0;
  let completed = 0;
  let resolveDone;
  const done = new Promise((resolve) => { resolveDone = resolve; });
  const workers = [];
  for (let i = 0; i < consumers; i++) {
    const worker = new Worker(name, async (job) => {
      const key = job.data.p * 4294967296 + job.data.s;
      handled++;
      if (seen.has(key)) duplicated++;
      else seen.add(key);
    }, { connection, concurrency });
    worker.on('completed', () => {
      completed++;
      if (completed >= messages) resolveDone();
    });
    worker.on('error', (error) => console.error(error));
    workers.push(worker);
  }
  await Promise.all(workers.map((w) => w.waitUntilReady()));

  const payload = 'x'.repeat(256);
  const started = process.hrtime.bigint();
  async function produce (p, count) {
    for (let sent = 0; sent < count; sent += addBatch) {
      const n = Math.min(addBatch, count - sent);
      await queue.addBulk(Array.from({ length: n }, (_, i) => ({
        name: 'm', data: { p, s: sent + i, payload }, opts: { removeOnComplete: true }
      })));
    }
  }
  const share = Math.floor(messages / producers);
  await Promise.all(Array.from({ length: producers }, (_, i) => produce(i, share + (i < messages % producers ? 1 : 0))));
  const enqueued = process.hrtime.bigint();
  let timedOut = false;
  const limit = new Promise((resolve) => setTimeout(() => { timedOut = true; resolve(); }, 120000).unref());
  await Promise.race([done, limit]);
  const finished = process.hrtime.bigint();
  const seconds = (a, b) => Number(b - a) / 1e9;
  const probe = new IORedis(connection);
  const info = await probe.info('server');
  probe.disconnect();
  console.log(JSON.stringify({
    tool: 'bullmq', version: require('bullmq/package.json').version,
    redis: (info.match(/redis_version:(\S+)/) || [])[1], messages, producers, consumers, add_batch: addBatch, concurrency,
    jobs_per_s: Math.round(completed / seconds(started, finished) * 10) / 10,
    enqueue_per_s: Math.round(messages / seconds(started, enqueued) * 10) / 10,
    elapsed_s: Math.round(seconds(started, finished) * 100) / 100,
    completed, handled, lost: messages - seen.size, duplicated, timed_out: timedOut
  }));
  await Promise.all(workers.map((w) => w.close(true)));
  await queue.obliterate({ force: true });
  await queue.close();
  process.exit(seen.size === messages && duplicated === 0 ? 0 : 1);
}

main().catch((error) => { console.error(error); process.exit(1); });
