// The console of a gateway with users, signed in as an admin: REST takes the bearer token, the page's STOMP
// connection (live tail) a login and passcode. A refused passcode is said once, not retried (retries would lock the
// user out); the right one connects, the tail follows, and a message published from the form shows in the tail.
// Usage: node console_auth_tail_check.js <console-url> <token> <login> <passcode> <topic>
'use strict';
const { launch, main, pageState } = require('./launch');

main(async () => {
  const [url, token, login, passcode, topic] = process.argv.slice(2);
  const browser = await launch();
  const report = { errors: [], consoleLines: [], webSockets: 0 };
  let page;
  try {
    page = await browser.newPage();
    page.setDefaultTimeout(5000);
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    page.on('console', (m) => report.consoleLines.push(m.type() + ': ' + m.text()));
    page.on('websocket', () => { report.webSockets += 1; });
    await page.goto(url);
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'sign-in needed');

    // The token alone: REST works, and the page says that its STOMP connection was refused.
    await page.fill('#auth-token', token);
    await page.click('#auth-submit');
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live');
    await page.waitForFunction(() => document.querySelector('#stomp-state').textContent === 'STOMP: sign-in needed'
      && !document.querySelector('#auth').hidden);
    report.stompMessage = await page.textContent('#auth-stomp-message');

    await page.fill('#auth-login', login);
    await page.fill('#auth-passcode', 'wrong-' + passcode);
    await page.click('#auth-submit');
    await page.waitForFunction(() => /did not accept/.test(document.querySelector('#auth-stomp-message').textContent)
      && document.querySelector('#stomp-state').textContent === 'STOMP: sign-in needed');
    report.wrongMessage = await page.textContent('#auth-stomp-message');

    await page.fill('#auth-login', login);
    await page.fill('#auth-passcode', passcode);
    await page.click('#auth-submit');
    await page.waitForFunction(() => document.querySelector('#stomp-state').textContent.includes('connected (')
      && document.querySelector('#auth').hidden);
    report.stompState = await page.textContent('#stomp-state');
    report.secretsCleared = await page.evaluate(() => ['#auth-token', '#auth-passcode']
      .every((sel) => document.querySelector(sel).value === ''));

    await page.fill('#tail-destination', topic);
    await page.click('#tail-follow');
    await page.waitForFunction((t) => document.querySelector('#tail-state').textContent === 'following ' + t, topic);
    const body = 'from the signed-in console ' + Date.now();
    await page.fill('#pub-destination', topic);
    await page.fill('#pub-body', body);
    await page.click('#pub-submit');
    await page.waitForFunction(() => /^stored/.test(document.querySelector('#pub-result').textContent));
    report.publishResult = await page.textContent('#pub-result');
    await page.waitForFunction((b) => document.querySelector('#tail-list').textContent.includes(b), body);
    report.tailShows = true;
    report.user = await page.evaluate(async () => {
      const overview = await (await fetch('/console/api/overview', {
        headers: { Authorization: 'Bearer ' + sessionStorage.getItem('stompgate.console.token') } })).json();
      return overview.connections.filter((c) => c.kind === 'websocket').map((c) => c.user);
    });
    report.storedLogin = await page.evaluate(() => sessionStorage.getItem('stompgate.console.login'));

    report.webSocketsSignedIn = report.webSockets;

    await page.click('#auth-forget');
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'sign-in needed'
      && document.querySelector('#stomp-state').textContent === 'STOMP: sign-in needed');
    report.storedAfterSignOut = await page.evaluate(() => Object.keys(sessionStorage));
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    report.state = await pageState(page, ['#poll-state', '#stomp-state', '#tail-state', '#auth-message', '#auth-stomp-message']);
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
