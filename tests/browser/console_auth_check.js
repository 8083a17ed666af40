// The console of a gateway with users: the page asks for a token, says why a token is refused, and works with an
// admin's token kept in sessionStorage. Usage: node console_auth_check.js <console-url> <admin-token> <other-token>
'use strict';
const { launch, main } = require('./launch');

main(async () => {
  const [url, adminToken, otherToken] = process.argv.slice(2);
  const browser = await launch();
  const report = { errors: [] };
  try {
    const page = await browser.newPage();
    page.on('pageerror', (e) => report.errors.push('pageerror: ' + e.message));
    await page.goto(url);
    const signInShown = () => page.waitForFunction(() => !document.querySelector('#auth').hidden
      && document.querySelector('#poll-state').textContent === 'sign-in needed', null, { timeout: 5000 });
    await signInShown();
    report.firstMessage = await page.textContent('#auth-message');

    await page.fill('#auth-token', 'not-a-token');
    await page.click('#auth-submit');
    await page.waitForFunction(() => /did not accept/.test(document.querySelector('#auth-message').textContent), null, { timeout: 5000 });
    report.wrongMessage = await page.textContent('#auth-message');

    await page.fill('#auth-token', otherToken);
    await page.click('#auth-submit');
    await page.waitForFunction(() => /admin role/.test(document.querySelector('#auth-message').textContent)
      && /may not use/.test(document.querySelector('#auth-message').textContent), null, { timeout: 5000 });
    report.forbiddenMessage = await page.textContent('#auth-message');

    await page.fill('#auth-token', adminToken);
    await page.click('#auth-submit');
    // REST is satisfied; the form stays for the STOMP login, which a token cannot give (console_auth_tail_check.js).
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live'
      && document.querySelector('#auth-message').hidden, null, { timeout: 5000 });
    report.stored = await page.evaluate(() => sessionStorage.getItem('stompgate.console.token'));
    report.uptime = await page.textContent('#uptime');

    await page.reload(); // the same tab keeps the token
    await page.waitForFunction(() => document.querySelector('#poll-state').textContent === 'live', null, { timeout: 5000 });
    report.liveAfterReload = true;

    await page.click('#auth-forget');
    await signInShown();
    report.forgotten = await page.evaluate(() => sessionStorage.getItem('stompgate.console.token'));
    report.ok = report.errors.length === 0;
    return report;
  } catch (error) {
    const page = browser.contexts()[0] && browser.contexts()[0].pages()[0];
    if (page) {
      report.state = await page.evaluate(() => ['#poll-state', '#auth-message']
        .map((sel) => sel + '=' + document.querySelector(sel).textContent)).catch((e) => String(e));
    }
    report.ok = false;
    report.error = String(error && error.stack || error);
    return report;
  } finally {
    await browser.close();
  }
});
