// The console watching a gateway with some life in it, for docs/console.png and as a test of the page under load:
// a helper page (not in the picture) runs StompLite clients that publish at changing rates to a few queues and a
// topic, and consume some of it slowly; the console page follows the topic by a click on its row. The picture is
// taken once the orders queue's sparkline holds <points> polls.
// Usage: node console_scene.js <console-url> <screenshot.png> <points>
'use strict';
const { launch, main, pageState } = require('./launch');

// Runs in the helper page (stomp-lite.js loaded). Each client is its own connection, named by its login (the gateway
// in open mode takes a login as a name only), so the connections table reads like a real deployment.
function startTraffic() {
  const url = 'ws://' + location.host + '/stomp';
  const client = (login) => {
    const c = new StompLite(url, { heartbeat: 10000, connectHeaders: { login } });
    c.start();
    return c;
  };
  // A consumer that acknowledges each message after `ms` (one at a time): its queue drains at about 1000/ms a second.
  const consume = (login, destination, ms) => {
    const c = client(login);
    c.subscribe(destination, (m) => setTimeout(() => c.ack(m), ms), { ack: 'client-individual', 'prefetch-count': '1' });
  };
  consume('order-worker', '/queue/orders', 170);
  consume('mailer', '/queue/emails', 900);
  for (const login of ['dashboard', 'risk-engine']) client(login).subscribe('/topic/prices', () => {});

  const producer = client('shop-api');
  const started = Date.now();
  const owed = new Map(); // destination -> messages due but not yet sent (rates are not whole per tick)
  const symbols = ['ACME', 'GLOBEX', 'INITECH', 'UMBRELLA'];
  let emailsBurst = 40;
  let serial = 0;
  const send = (destination, body, headers) => producer.send(destination, body, headers).catch(() => {});
  setInterval(() => {
    if (producer.state !== 'connected') return;
    const t = (Date.now() - started) / 1000;
    const rates = {
      '/queue/orders': 6 + 4 * Math.sin((2 * Math.PI * t) / 40),
      '/queue/invoices': 1.5,
      '/queue/emails': 0.6,
      '/topic/prices': 4 + 2 * Math.sin((2 * Math.PI * t) / 25),
    };
    for (const [destination, perSecond] of Object.entries(rates)) {
      let due = (owed.get(destination) || 0) + perSecond / 10;
      for (; due >= 1; due -= 1) {
        serial += 1;
        if (destination === '/topic/prices') {
          const symbol = symbols[serial % symbols.length];
          const price = (100 + 20 * Math.sin(serial / 7) + (serial % 13) / 10).toFixed(2);
          send(destination, JSON.stringify({ symbol, price: Number(price) }), { 'content-type': 'application/json', symbol });
        } else {
          send(destination, JSON.stringify({ id: serial, at: new Date().toISOString() }), { 'content-type': 'application/json' });
        }
      }
      owed.set(destination, due);
    }
    for (; emailsBurst > 0; emailsBurst--) send('/queue/emails', 'welcome mail ' + emailsBurst, { 'content-type': 'text/plain' });
  }, 100);
}

main(async () => {
  const [url, screenshot, points] = process.argv.slice(2);
  const wanted = Number(points);
  const browser = await launch();
  const report = { errors: [] };
  let page;
  try {
    const helper = await browser.newPage();
    helper.on('pageerror', (e) => report.errors.push('helper pageerror: ' + e.message));
    await helper.goto(new URL('/health', url).href); // same origin as the gateway, for stomp-lite.js
    await helper.addScriptTag({ url: '/console/static/stomp-lite.js' });
    await helper.evaluate(startTraffic);

    page = await browser.newPage({ viewport: { width: 1360, height: 1100 } });
    page.setDefaultTimeout(10000);
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    await page.goto(url);
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live');
    await page.click('#destinations tbody tr[data-name="/topic/prices"]');
    await page.waitForFunction(() => document.querySelector('#tail-state').textContent === 'following /topic/prices');
    await page.fill('#pub-headers', 'content-type:text/plain\npriority:9');
    await page.fill('#pub-body', 'order 1042 cancelled by the customer');

    // The depth history the picture shows: one sparkline point per poll of the page.
    await page.waitForFunction((n) => {
      const line = document.querySelector('#destinations tbody tr[data-name="/queue/orders"] svg polyline');
      return line && line.getAttribute('points').split(' ').length >= n;
    }, wanted, { timeout: (wanted * 1.5 + 10) * 1000 });
    report.rows = await page.$$eval('#destinations tbody tr', (rows) => rows.map((tr) => ({
      name: tr.dataset.name, cells: [...tr.children].slice(0, 7).map((td) => td.textContent),
    })));
    report.tailItems = await page.$$eval('#tail-list li', (items) => items.length);
    report.connections = await page.$$eval('#connections tbody tr', (rows) => rows.map((r) => r.children[4].textContent));
    report.rates = await page.$$eval('#rate-published, #rate-delivered', (els) => els.map((el) => Number(el.textContent)));
    await page.screenshot({ path: screenshot, fullPage: true });
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    report.state = await pageState(page, ['#stomp-state', '#poll-state', '#tail-state', '#destinations tbody']);
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
