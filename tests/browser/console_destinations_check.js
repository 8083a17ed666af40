// The destinations table when REST's GET /destinations is served next to the console's overview: each destination
// must be one row carrying both sources' data (REST's publish/s, the overview's consumers), not one row from each.
// Usage: node console_destinations_check.js <console-url> <queue> <topic>
'use strict';
const { launch, main, pageState } = require('./launch');

main(async () => {
  const [url, queue, topic] = process.argv.slice(2);
  const browser = await launch();
  const report = { errors: [] };
  let page;
  try {
    page = await browser.newPage();
    page.setDefaultTimeout(5000);
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    await page.goto(url);
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live'
      && document.querySelector('#destinations-source').textContent === '(from GET /destinations)');
    // The page's own tail makes it a subscriber of the topic, so the topic has a consumer in both sources.
    await page.fill('#tail-destination', topic);
    await page.click('#tail-follow');
    await page.waitForFunction((t) => document.querySelector('#tail-state').textContent === 'following ' + t, topic);

    // Wait until one poll's rows show everything merged. Without the merge this never holds: the report below then
    // shows what the table had instead (the assertions are in the pytest test, on these rows).
    report.merged = await page.waitForFunction(([q, t]) => {
      const rows = [...document.querySelectorAll('#destinations tbody tr')];
      const names = rows.map((tr) => tr.dataset.name);
      const row = (name) => rows.find((tr) => tr.dataset.name === name);
      const cells = (name) => [...row(name).children].map((td) => td.textContent);
      return new Set(names).size === names.length && row(q) && row(t)
        && cells(q)[2] === '2' && cells(q)[5] !== '–' && cells(t)[4] === '1' && cells(t)[5] !== '–';
    }, [queue, topic]).then(() => true, () => false);
    report.rows = await page.$$eval('#destinations tbody tr', (rows) => rows.map((tr) => ({
      name: tr.dataset.name, cells: [...tr.children].slice(0, 7).map((td) => td.textContent),
    })));
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    report.state = await pageState(page, ['#poll-state', '#destinations-source', '#tail-state']);
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
