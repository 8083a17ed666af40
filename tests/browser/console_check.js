// Loads the console in headless Chromium, follows a topic, publishes through the page's form, and checks that
// the tail shows the message and the counters move. Usage: node console_check.js <console-url>
// (console_scene.js takes the picture for docs/console.png.)
'use strict';
const { launch, main } = require('./launch');

main(async () => {
  const [url] = process.argv.slice(2);
  const browser = await launch();
  const report = { errors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1360, height: 1100 } });
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    page.on('console', (m) => {
      // A 404 from GET /destinations only means the REST API is not there: the page falls back to its own route.
      const expected = /\/destinations$/.test(m.location().url || '') && /404/.test(m.text());
      if (m.type() === 'error' && !expected) report.errors.push('console: ' + m.text() + ' ' + (m.location().url || ''));
    });
    await page.goto(url);
    await page.waitForFunction(() => document.querySelector('#stomp-state').textContent.includes('connected ('), null, { timeout: 5000 });
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live', null, { timeout: 5000 });
    const count = (sel) => page.$eval(sel, (el) => Number(el.textContent));
    report.publishedBefore = await count('#total-published');

    const topic = '/topic/console-check';
    await page.fill('#tail-destination', topic);
    await page.click('#tail-follow');
    await page.waitForFunction((t) => document.querySelector('#tail-state').textContent === 'following ' + t, topic);

    const body = 'hello console ' + Date.now();
    await page.fill('#pub-destination', topic);
    await page.fill('#pub-headers', 'content-type:text/plain\ncolour:blue');
    await page.fill('#pub-body', body);
    await page.click('#pub-submit');
    await page.waitForFunction(() => /^stored/.test(document.querySelector('#pub-result').textContent), null, { timeout: 5000 });
    report.publishResult = await page.textContent('#pub-result');
    await page.waitForFunction((b) => document.querySelector('#tail-list').textContent.includes(b), body, { timeout: 5000 });
    report.tailShows = true;
    report.tailText = await page.textContent('#tail-list li');

    // A few queue messages with no consumer, so the depth chart and table have something to show.
    await page.fill('#pub-destination', '/queue/console-orders');
    await page.fill('#pub-headers', '');
    for (let i = 0; i < 3; i++) {
      await page.fill('#pub-body', 'order ' + i);
      await page.click('#pub-submit');
      await page.waitForFunction((n) => /^stored/.test(document.querySelector('#pub-result').textContent)
        && !document.querySelector('#pub-submit').disabled, i);
    }
    await page.waitForFunction((before) => Number(document.querySelector('#total-published').textContent) >= before + 4,
      report.publishedBefore, { timeout: 5000 });
    report.publishedAfter = await count('#total-published');
    await page.waitForFunction(() => [...document.querySelectorAll('#destinations tbody tr')]
      .some((tr) => tr.dataset.name === '/queue/console-orders' && tr.children[2].textContent === '3'), null, { timeout: 5000 });
    report.destinations = await page.$$eval('#destinations tbody tr', (rows) => rows.map((r) => r.dataset.name));
    report.connections = await page.$$eval('#connections tbody tr', (rows) => rows.map((r) => r.children[1].textContent));
    report.subscriptions = await page.$$eval('#subscriptions tbody tr', (rows) => rows.map((r) => r.children[2].textContent));
    report.deliveredTotal = await count('#total-delivered');
    report.chartsDrawn = await page.$$eval('canvas', (cs) => cs.map((c) => c.width > 0 && c.height > 0));
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    // Say where the page was when a wait failed.
    const page = browser.contexts()[0] && browser.contexts()[0].pages()[0];
    if (page) {
      report.state = await page.evaluate(() => ['#stomp-state', '#poll-state', '#tail-state', '#pub-result']
        .map((sel) => sel + '=' + document.querySelector(sel).textContent)).catch((e) => String(e));
    }
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
