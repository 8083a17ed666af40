// Shared by the browser scripts: headless Chromium from the system (no downloaded browser), so that the tests need nothing downloaded at run time.
'use strict';
const { chromium } = require('playwright-core');

async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-dev-shm-usage',
    ],
  });
}

// Print the JSON report as the last stdout line and exit; any crash becomes a report too.
function main(fn) {
  fn().then(
    (report) => { process.stdout.write(JSON.stringify(report) + '\n'); process.exit(report.ok ? 0 : 1); },
    (err) => { process.stdout.write(JSON.stringify({ ok: false, error: String(err && err.stack || err) }) + '\n'); process.exit(2); },
  );
}

// Where the page was when a wait failed: the text of a few elements (nothing when the page never opened).
async function pageState(page, selectors) {
  if (!page) return null;
  return page.evaluate((sels) => sels.map((sel) => {
    const el = document.querySelector(sel);
    return sel + '=' + (el ? el.textContent : '(none)');
  }), selectors).catch((e) => String(e));
}

module.exports = { launch, main, pageState };
