// The real @stomp/stompjs 7 client in headless Chromium against a live gateway:
// connect, subscribe (client-individual), publish text and binary, receive, ack (with receipts), disconnect.
// Usage: node stompjs_flow.js <page-url> <ws-url> <queue>
'use strict';
const { launch, main } = require('./launch');

main(async () => {
  const [pageUrl, wsUrl, queue] = process.argv.slice(2);
  const browser = await launch();
  try {
    const page = await browser.newPage();
    const consoleLines = [];
    page.on('console', (m) => consoleLines.push(m.text()));
    page.on('pageerror', (e) => consoleLines.push('pageerror: ' + e.message));
    await page.goto(pageUrl);
    await page.waitForFunction(() => typeof window.StompJs === 'object');
    const result = await page.evaluate(async ({ wsUrl, queue }) => {
      const out = { received: [], receipts: [], errors: [], messageKinds: [] };
      // Record whether each MESSAGE frame arrived in a TEXT or a BINARY WebSocket message (stompjs hides it).
      const Native = window.WebSocket;
      window.WebSocket = class extends Native {
        constructor(url, protocols) {
          super(url, protocols);
          this.addEventListener('message', (e) => {
            const text = typeof e.data === 'string';
            const head = text ? e.data.slice(0, 7) : new TextDecoder().decode(new Uint8Array(e.data).slice(0, 7));
            if (head === 'MESSAGE') out.messageKinds.push(text ? 'text' : 'binary');
          });
        }
      };
      const client = new StompJs.Client({
        brokerURL: wsUrl,
        reconnectDelay: 0,
        heartbeatIncoming: 0,
        heartbeatOutgoing: 1000,
        onStompError: (f) => out.errors.push(f.headers.message + ': ' + f.body),
        onWebSocketError: () => out.errors.push('websocket error'),
      });
      const timeout = (ms, what) => new Promise((_, reject) => setTimeout(() => reject(new Error('timeout: ' + what)), ms));
      const connected = new Promise((resolve) => { client.onConnect = resolve; });
      client.activate();
      const frame = await Promise.race([connected, timeout(5000, 'connect')]);
      out.version = frame.headers.version;
      out.subprotocol = client.webSocket.protocol;

      const got = [];
      let wake = null;
      client.subscribe(queue, (message) => { got.push(message); if (wake) wake(); }, { ack: 'client-individual' });
      const next = async () => {
        while (!got.length) await Promise.race([new Promise((r) => { wake = r; }), timeout(5000, 'message')]);
        return got.shift();
      };

      const publications = [
        { destination: queue, body: 'hello from stompjs', headers: { 'content-type': 'text/plain' } },
        { destination: queue, binaryBody: new Uint8Array([0, 1, 2, 250, 251, 255]),
          headers: { 'content-type': 'application/octet-stream' } },
      ];
      // One at a time, so each MESSAGE travels in a WebSocket message of its own.
      for (let i = 0; i < publications.length; i++) {
        client.publish(publications[i]);
        const message = await next();
        const receipt = 'ack-' + i;
        const acked = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
        message.ack({ receipt });
        await Promise.race([acked, timeout(5000, 'ack receipt')]);
        out.receipts.push(receipt);
        out.received.push({
          body: i === 0 ? message.body : Array.from(message.binaryBody),
          ackHeader: 'ack' in message.headers,
          destination: message.headers.destination,
        });
      }
      const disconnected = new Promise((resolve) => { client.onDisconnect = resolve; });
      const closed = new Promise((resolve) => { client.onWebSocketClose = (evt) => resolve(evt.code); });
      await client.deactivate();
      await Promise.race([disconnected, timeout(5000, 'disconnect receipt')]);
      out.disconnectedWithReceipt = true;
      out.closeCode = await Promise.race([closed, timeout(5000, 'close')]);
      return out;
    }, { wsUrl, queue });
    result.console = consoleLines;
    result.ok = result.errors.length === 0;
    return result;
  } finally {
    await browser.close();
  }
});
