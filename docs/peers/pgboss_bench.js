// The gateway's queue workload done with pg-boss (Node job queue on PostgreSQL), for docs/benchmarks.md. Not part of
// stompgate: run it where `npm install pg-boss` was run (NODE_PATH may point at that node_modules).
//
// Producers insert 256-byte payloads in batches (boss.insert: one INSERT each); consumers are boss.work() workers
// fetching --batch jobs per fetch and completing them when the handler returns. pg-boss workers poll (at most once per
// pollingIntervalSeconds, at least 0.5 s) rather than being woken, so the batch size bounds a worker's throughput.
// Reported: jobs/s from the first insert to the last job handled, like `stompgate bench`'s msgs/s.
//
//   node docs/peers/pgboss_bench.js postgresql://postgres@127.0.0.1:5432/peer 50000 100
'use strict';
const PgBoss = require('pg-boss');

async function main () {
  const [dsn, messagesArg = '50000', batchArg = '100'] = process.argv.slice(2);
  const messages = Number(messagesArg);
  const batchSize = Number(batchArg);
  const producers = 2;
  const consumers = 2;
  const insertBatch = 64;
  const boss = new PgBoss({ connectionString: dsn, max: 8 });
  boss.on('error', (error) => console.error(error));
  await boss.start();
  const queue = 'bench-' + Date.now();
  await boss.createQueue(queue);

  let handled = 0;
  let resolveDone;
  const done = new Promise((resolve) => { resolveDone = resolve; });
  for (let i = 0; i < consumers; i++) {
    await boss.work(queue, { batchSize, pollingIntervalSeconds: 0.5 }, async (jobs) => {
      handled += jobs.length;
      if (handled >= messages) resolveDone();
    });
  }

  const payload = 'x'.repeat(256);
  const started = process.hrtime.bigint();
  async function produce (count) {
    for (let sent = 0; sent < count; sent += insertBatch) {
      const n = Math.min(insertBatch, count - sent);
      await boss.insert(Array.from({ length: n }, () => ({ name: queue, data: { payload } })));
    }
  }
  const share = Math.floor(messages / producers);
  await Promise.all(Array.from({ length: producers }, (_, i) => produce(share + (i < messages % producers ? 1 : 0))));
  const enqueued = process.hrtime.bigint();
  await done;
  const finished = process.hrtime.bigint();
  const seconds = (a, b) => Number(b - a) / 1e9;
  console.log(JSON.stringify({
    tool: 'pg-boss', messages, producers, consumers, insert_batch: insertBatch, fetch_batch: batchSize,
    jobs_per_s: Math.round(messages / seconds(started, finished) * 10) / 10,
    enqueue_per_s: Math.round(messages / seconds(started, enqueued) * 10) / 10,
    elapsed_s: Math.round(seconds(started, finished) * 100) / 100
  }));
  await boss.stop({ graceful: false, wait: false });
  process.exit(0);
}

main().catch((error) => { console.error(error); process.exit(1); });
