// StompLite: the console's own small STOMP 1.2 client over WebSocket. Plain JavaScript, no dependencies.
// Offers v12/v11/v10.stomp, sends heart-beats, reconnects with back-off, re-subscribes, and resolves RECEIPTs.
// An ERROR before CONNECTED (a refused login) ends in state 'refused' without reconnecting: retrying the same
// credentials cannot succeed, and each failure counts towards the gateway's lockout of that login.
(function (global) {
  'use strict';
  const encoder = new TextEncoder();
  const decoder = new TextDecoder();
  const ESCAPES = { '\\': '\\\\', '\r': '\\r', '\n': '\\n', ':': '\\c' };
  const UNESCAPES = { '\\': '\\', r: '\r', n: '\n', c: ':' };
  const escape = (v) => String(v).replace(/[\\\r\n:]/g, (c) => ESCAPES[c]);
  const unescape = (v) => v.replace(/\\(.)/g, (m, c) => (c in UNESCAPES ? UNESCAPES[c] : m));

  function concat(a, b) {
    const out = new Uint8Array(a.length + b.length);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  class StompLite {
    constructor(url, options) {
      this.url = url;
      this.options = Object.assign({ heartbeat: 10000, connectHeaders: {} }, options || {});
      this.subscriptions = new Map(); // id -> {destination, callback, headers}
      this.receipts = new Map(); // receipt id -> {resolve, reject}
      this.counter = 0;
      this.state = 'closed';
      this.onstate = () => {};
      this.onerror = () => {};
      this._want = false;
      this._backoff = 500;
      this._timers = [];
    }

    start() { this._want = true; if (!this.ws) this._open(); }

    // Connect again at once with these CONNECT headers (e.g. login and passcode), keeping the subscriptions. The old
    // socket is detached first, so nothing it still receives (a late ERROR, its close) touches the new connection.
    restart(connectHeaders) {
      this.options.connectHeaders = Object.assign({}, connectHeaders || {});
      this._want = true;
      const old = this.ws;
      if (old) {
        old.onopen = null;
        old.onmessage = null;
        old.onclose = null;
        old.close(1000);
        this._closed();
      }
      this._open();
    }

    stop() {
      this._want = false;
      if (this.state === 'connected') {
        const done = () => { if (this.ws) this.ws.close(1000); };
        this._frame('DISCONNECT', { receipt: this._receipt(done, done) });
        setTimeout(done, 1000);
      } else if (this.ws) {
        this.ws.close(1000);
      }
    }

    subscribe(destination, callback, headers) {
      const id = 'sub-' + ++this.counter;
      this.subscriptions.set(id, { destination, callback, headers: Object.assign({}, headers || {}) });
      if (this.state === 'connected') this._subscribe(id);
      return id;
    }

    unsubscribe(id) {
      if (this.subscriptions.delete(id) && this.state === 'connected') this._frame('UNSUBSCRIBE', { id });
    }

    // Publish; resolves when the gateway's RECEIPT says the message is stored.
    send(destination, body, headers) {
      if (this.state !== 'connected') return Promise.reject(new Error('not connected'));
      return new Promise((resolve, reject) => {
        const all = Object.assign({}, headers || {}, { destination });
        all.receipt = this._receipt(resolve, reject);
        this._frame('SEND', all, body);
      });
    }

    ack(message) { this._frame('ACK', { id: message.headers.ack }); }

    // ---- internals ----

    _receipt(resolve, reject) {
      const id = 'r-' + ++this.counter;
      this.receipts.set(id, { resolve, reject });
      return id;
    }

    _setState(state, detail) {
      this.state = state;
      this.onstate(state, detail);
    }

    _open() {
      this._refused = null;
      this._setState('connecting');
      this.buffer = new Uint8Array(0);
      const ws = new WebSocket(this.url, ['v12.stomp', 'v11.stomp', 'v10.stomp']);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      ws.onopen = () => {
        const beat = this.options.heartbeat;
        const headers = Object.assign({ 'accept-version': '1.2,1.1,1.0', host: '/', 'heart-beat': beat + ',' + beat },
          this.options.connectHeaders);
        this._frame('CONNECT', headers, null, true);
      };
      ws.onmessage = (event) => {
        this.lastReceived = Date.now();
        const chunk = typeof event.data === 'string' ? encoder.encode(event.data) : new Uint8Array(event.data);
        this.buffer = concat(this.buffer, chunk);
        this._parse();
      };
      ws.onclose = (event) => {
        this._closed();
        if (this._refused) {
          this._setState('refused', this._refused.message);
          return;
        }
        this._setState('closed', 'code ' + event.code);
        if (this._want) {
          setTimeout(() => { if (this._want && !this.ws) this._open(); }, this._backoff);
          this._backoff = Math.min(this._backoff * 2, 10000);
        }
      };
    }

    _closed() {
      this._timers.forEach(clearInterval);
      this._timers = [];
      this.ws = null;
      for (const pending of this.receipts.values()) pending.reject(new Error('connection closed'));
      this.receipts.clear();
    }

    _frame(command, headers, body, raw) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      const bytes = body == null ? new Uint8Array(0) : typeof body === 'string' ? encoder.encode(body) : body;
      const lines = [command];
      const all = Object.assign({}, headers);
      if (bytes.length) all['content-length'] = String(bytes.length);
      for (const [k, v] of Object.entries(all)) lines.push(raw ? k + ':' + v : escape(k) + ':' + escape(v));
      const head = encoder.encode(lines.join('\n') + '\n\n');
      const frame = concat(concat(head, bytes), new Uint8Array([0]));
      if (typeof body === 'string' || body == null) this.ws.send(decoder.decode(frame));
      else this.ws.send(frame);
    }

    _subscribe(id) {
      const sub = this.subscriptions.get(id);
      this._frame('SUBSCRIBE', Object.assign({ ack: 'auto' }, sub.headers, { id, destination: sub.destination }));
    }

    _parse() {
      for (;;) {
        let start = 0;
        while (start < this.buffer.length && (this.buffer[start] === 10 || this.buffer[start] === 13)) start++;
        this.buffer = this.buffer.subarray(start);
        let headEnd = -1;
        let bodyStart = -1;
        for (let i = 0; i + 1 < this.buffer.length; i++) {
          if (this.buffer[i] !== 10) continue;
          if (this.buffer[i + 1] === 10) { headEnd = i; bodyStart = i + 2; break; }
          if (this.buffer[i + 1] === 13 && this.buffer[i + 2] === 10) { headEnd = i; bodyStart = i + 3; break; }
        }
        if (headEnd < 0) return;
        const lines = decoder.decode(this.buffer.subarray(0, headEnd)).split('\n').map((l) => l.replace(/\r$/, ''));
        const command = lines[0];
        const headers = {};
        for (const line of lines.slice(1)) {
          const at = line.indexOf(':');
          const key = command === 'CONNECTED' ? line.slice(0, at) : unescape(line.slice(0, at));
          const value = command === 'CONNECTED' ? line.slice(at + 1) : unescape(line.slice(at + 1));
          if (!(key in headers)) headers[key] = value;
        }
        let bodyEnd;
        if ('content-length' in headers) {
          bodyEnd = bodyStart + parseInt(headers['content-length'], 10);
          if (this.buffer.length <= bodyEnd) return;
        } else {
          bodyEnd = this.buffer.indexOf(0, bodyStart);
          if (bodyEnd < 0) return;
        }
        const body = this.buffer.slice(bodyStart, bodyEnd);
        this.buffer = this.buffer.subarray(bodyEnd + 1);
        this._dispatch(command, headers, body);
      }
    }

    _dispatch(command, headers, body) {
      if (command === 'CONNECTED') {
        this._backoff = 500;
        this.version = headers.version;
        this._heartbeats(headers['heart-beat'] || '0,0');
        this._setState('connected', headers.version);
        for (const id of this.subscriptions.keys()) this._subscribe(id);
      } else if (command === 'MESSAGE') {
        const sub = this.subscriptions.get(headers.subscription);
        const message = { headers, body, get text() { return decoder.decode(body); } };
        if (sub) sub.callback(message);
      } else if (command === 'RECEIPT') {
        const pending = this.receipts.get(headers['receipt-id']);
        this.receipts.delete(headers['receipt-id']);
        if (pending) pending.resolve(headers);
      } else if (command === 'ERROR') {
        const error = new Error((headers.message || 'ERROR') + (body.length ? ': ' + decoder.decode(body) : ''));
        const pending = this.receipts.get(headers['receipt-id']);
        if (pending) pending.reject(error);
        if (this.state !== 'connected') this._refused = error; // the gateway closes the socket next
        this.onerror(error);
      }
    }

    _heartbeats(serverBeat) {
      const [sx, sy] = serverBeat.split(',').map((n) => parseInt(n, 10) || 0);
      const mine = this.options.heartbeat;
      if (mine > 0 && sy > 0) {
        this._timers.push(setInterval(() => { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send('\n'); },
          Math.max(mine, sy)));
      }
      if (mine > 0 && sx > 0) {
        const period = Math.max(mine, sx);
        this._timers.push(setInterval(() => {
          if (Date.now() - this.lastReceived > 2 * period && this.ws) this.ws.close(4000, 'no heart-beat');
        }, period));
      }
    }
  }

  global.StompLite = StompLite;
})(window);
