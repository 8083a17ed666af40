// Clicking a topic's row follows it in the live tail, and clicking another topic moves the tail there (the page keeps
// one tail subscription, not one per click). Clicking a queue's row fills in the forms but takes none of its messages.
// Usage: node console_click_tail_check.js <console-url> <topic-a> <topic-b> <queue>; the queue holds one message.
'use strict';
const { launch, main, pageState } = require('./launch');

main(async () => {
  const [url, topicA, topicB, queue] = process.argv.slice(2);
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

    await page.click(row(topicA));
    await following(topicA);
    report.followedA = true;

    await page.click(row(topicB));
    await following(topicB);
    const body = 'published after the click ' + Date.now();
    const published = await page.evaluate(async ([t, b]) => (await fetch('/destinations' + t, {
      method: 'POST', body: b, headers: { 'Content-Type': 'text/plain' } })).status, [topicB, body]);
    report.publishStatus = published;
    await tailShows(body);

    await page.click(row(queue));
    await page.waitForFunction((q) => document.querySelector('#pub-destination').value === q, queue);
    report.tailStateAfterQueueClick = await page.textContent('#tail-state');
    report.queueNoteShown = await page.isVisible('#tail-queue-note');
    report.tailText = await page.textContent('#tail-list');
    report.publishForm = await page.inputValue('#pub-destination');
    report.tailForm = await page.inputValue('#tail-destination');
    report.stopEnabled = await page.isEnabled('#tail-stop');
    // The gateway's view: the page's WebSocket session subscribes to topic B only (A's tail was stopped, and the
    // queue's click subscribed to nothing), and the queue still holds its message.
    report.pageSubscriptions = await page.evaluate(async () => {
      const overview = await (await fetch('/console/api/overview')).json();
      const ws = new Set(overview.connections.filter((c) => c.kind === 'websocket').map((c) => c.id));
      return overview.subscriptions.filter((s) => ws.has(s.session)).map((s) => s.destination);
    });
    report.queueDepth = await page.evaluate(async (q) => (await (await fetch('/destinations' + q)).json()).depth, queue);
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
