// Clicking a destination row follows it in the live tail, and clicking another row moves the tail there (the page
// keeps one tail subscription, not one per click). Usage: node console_click_tail_check.js <console-url> <queue-a>
// <queue-b>; each queue holds one message whose body is "backlog of <queue>".
'use strict';
const { launch, main, pageState } = require('./launch');

main(async () => {
  const [url, queueA, queueB] = process.argv.slice(2);
  const browser = await launch();
  const report = { errors: [] };
  let page;
  try {
    page = await browser.newPage();
    page.setDefaultTimeout(5000);
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    await page.goto(url);
    await page.waitForFunction(() => document.querySelector('#stomp-state').textContent.includes('connected ('));
    const row = (name) => '#destinations tbody tr[data-name="' + name + '"]';
    const following = (name) => page.waitForFunction((n) => document.querySelector('#tail-state').textContent === 'following ' + n, name);
    const tailShows = (text) => page.waitForFunction((t) => document.querySelector('#tail-list').textContent.includes(t), text);

    await page.click(row(queueA));
    await following(queueA);
    await tailShows('backlog of ' + queueA); // a queue tail consumes: the backlog arrives at once
    report.followedA = true;

    await page.click(row(queueB));
    await following(queueB);
    await tailShows('backlog of ' + queueB);
    const body = 'published after the click ' + Date.now();
    const published = await page.evaluate(async ([q, b]) => (await fetch('/destinations' + q, {
      method: 'POST', body: b, headers: { 'Content-Type': 'text/plain' } })).status, [queueB, body]);
    report.publishStatus = published;
    await tailShows(body);
    report.tailText = await page.textContent('#tail-list');
    report.publishForm = await page.inputValue('#pub-destination');
    report.stopEnabled = await page.isEnabled('#tail-stop');
    // The gateway's view: the page's WebSocket session subscribes to queue B only (A's tail was stopped).
    report.pageSubscriptions = await page.evaluate(async () => {
      const overview = await (await fetch('/console/api/overview')).json();
      const ws = new Set(overview.connections.filter((c) => c.kind === 'websocket').map((c) => c.id));
      return overview.subscriptions.filter((s) => ws.has(s.session)).map((s) => s.destination);
    });
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    report.state = await pageState(page, ['#stomp-state', '#poll-state', '#tail-state', '#tail-list']);
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
