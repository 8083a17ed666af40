// The console page: polls the gateway every second, draws the charts by hand on <canvas> and inline SVG,
// fills the tables, publishes (REST when the gateway serves it, else over STOMP) and tails over STOMP/WebSocket.
(function () {
  'use strict';
  const $ = (sel) => document.querySelector(sel);
  const WINDOW_MS = 5 * 60 * 1000;
  const SPARK_MS = 2 * 60 * 1000;
  const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];
  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/stomp';

  const history = { totals: [], destinations: new Map() }; // name -> [{t, depth, publish, deliver}]
  let previous = null; // last overview, for rates
  let rest = { checkedAt: 0, available: false };
  let selected = null;
  const tail = { id: null, destination: null, count: 0 };

  // ---- sign-in: with a users file, REST (the overview, GET /destinations, publishing) needs an admin's bearer token,
  // and this page's STOMP connection (the tail, publishing without REST) a login and passcode, since the gateway
  // checks only those in CONNECT. sessionStorage keeps them for this tab; none of them is ever logged. ----
  const KEYS = { token: 'stompgate.console.token', login: 'stompgate.console.login', passcode: 'stompgate.console.passcode' };
  const stored = (name) => sessionStorage.getItem(KEYS[name]);
  const stompCredentials = () => (stored('login') ? { login: stored('login'), passcode: stored('passcode') || '' } : {});
  const signIn = { rest: null, stomp: null }; // why REST or STOMP needs a sign-in; null while it works

  function withToken(headers) {
    const token = stored('token');
    return Object.assign(token ? { Authorization: 'Bearer ' + token } : {}, headers);
  }

  // ---- STOMP connection of the page (publish fallback and tail) ----
  const stomp = new StompLite(wsUrl, { heartbeat: 10000, connectHeaders: stompCredentials() });
  stomp.onstate = (state, detail) => {
    const el = $('#stomp-state');
    const login = stored('login');
    el.textContent = 'STOMP: ' + (state === 'refused' ? 'sign-in needed'
      : state === 'connected' ? 'connected (' + detail + ')' + (login ? ' as ' + login : '') : state);
    el.className = 'pill ' + (state === 'connected' ? 'ok' : state === 'closed' || state === 'refused' ? 'bad' : '');
    if (tail.id) {
      $('#tail-state').textContent = state === 'connected' ? 'following ' + tail.destination
        : state === 'refused' ? 'STOMP sign-in needed' : 'waiting for STOMP…';
    }
    // StompLite does not retry a refused login (each failure counts towards the gateway's lockout): ask instead.
    if (state === 'refused') {
      signIn.stomp = login
        ? 'The gateway did not accept the passcode of ' + JSON.stringify(login) + ' for this page\'s STOMP connection ('
          + detail + '): give the user name and passcode again.'
        : 'The live tail (and publishing where REST is not served) uses STOMP, which needs a user name and passcode ('
          + detail + ').';
      renderSignIn();
    } else if (state === 'connected' && signIn.stomp) {
      signIn.stomp = null;
      renderSignIn();
    }
  };
  stomp.onerror = (error) => console.warn('STOMP', error.message); // the gateway's ERROR text: it repeats no secret
  stomp.start();

  async function problemDetail(response) {
    try { const problem = await response.json(); return problem.detail || problem.title || 'HTTP ' + response.status; }
    catch (e) { return 'HTTP ' + response.status; } // not JSON
  }

  // The sign-in form, shown while REST or STOMP is refused, with why for each.
  function renderSignIn() {
    for (const [sel, why] of [['#auth-message', signIn.rest], ['#auth-stomp-message', signIn.stomp]]) {
      $(sel).textContent = why || '';
      $(sel).hidden = !why;
    }
    $('#auth').hidden = !signIn.rest && !signIn.stomp;
    if (!$('#auth').hidden && !$('#auth-login').value) $('#auth-login').value = stored('login') || '';
    $('#auth-forget').hidden = !stored('token') && !stored('login');
  }

  // Why REST refused: no token yet, a token not accepted (401), or a user without the admin role (403).
  function askForToken(status, detail) {
    if (status === 403) signIn.rest = 'This token\'s user may not use the console (' + detail + '): give the token of a user with the admin role.';
    else if (stored('token')) signIn.rest = 'The gateway did not accept this token (' + detail + '): give another one.';
    else signIn.rest = 'This gateway has users: give the bearer token of a user with the admin role.';
    renderSignIn();
  }

  // Each part given replaces what the tab keeps: a token alone leaves the STOMP login as it was, and the reverse.
  $('#auth-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('#auth-token').value.trim();
    const login = $('#auth-login').value.trim();
    const passcode = $('#auth-passcode').value; // as typed: spaces may be part of it
    $('#auth-token').value = '';
    $('#auth-passcode').value = '';
    if (token) {
      sessionStorage.setItem(KEYS.token, token);
      rest.checkedAt = 0; // ask GET /destinations again with the token
      poll();
    }
    if (login) {
      sessionStorage.setItem(KEYS.login, login);
      sessionStorage.setItem(KEYS.passcode, passcode);
      stomp.restart(stompCredentials()); // the tail, if any, is subscribed again on the new connection
    }
  });
  $('#auth-forget').addEventListener('click', () => {
    const hadLogin = stored('login');
    Object.values(KEYS).forEach((key) => sessionStorage.removeItem(key));
    $('#auth-login').value = '';
    if (hadLogin) stomp.restart({}); // drop the signed-in STOMP session; with users, the gateway refuses the new one
    poll(); // with users, this asks for a token again; without, nothing changes
  });

  // ---- polling ----
  async function fetchJson(url) {
    const response = await fetch(url, { cache: 'no-store', headers: withToken({}) });
    if (!response.ok) {
      const detail = await problemDetail(response);
      throw Object.assign(new Error(url + ': ' + detail), { status: response.status, detail });
    }
    return response.json();
  }

  async function restDestinations(now) {
    if (!rest.available && now - rest.checkedAt < 30000) return null;
    rest.checkedAt = now;
    try {
      const list = await fetchJson('/destinations');
      rest.available = Array.isArray(list);
      return rest.available ? list : null;
    } catch (error) {
      rest.available = false;
      return null;
    }
  }

  async function poll() {
    const now = Date.now();
    try {
      const [overview, restList] = await Promise.all([fetchJson('/console/api/overview'), restDestinations(now)]);
      update(overview, restList, now);
      if (signIn.rest) {
        signIn.rest = null;
        renderSignIn();
      }
      $('#poll-state').textContent = 'live';
      $('#poll-state').className = 'pill ok';
    } catch (error) {
      const refused = error.status === 401 || error.status === 403;
      if (refused) askForToken(error.status, error.detail);
      $('#poll-state').textContent = refused ? 'sign-in needed' : 'gateway unreachable';
      $('#poll-state').className = 'pill bad';
    }
  }

  function rate(current, before, seconds) {
    return before == null || seconds <= 0 ? 0 : Math.max(0, (current - before) / seconds);
  }

  // One row per destination, keyed by the full destination ("/queue/orders"): the overview's name is that, and REST
  // items carry it as destination (their name is the part after the kind, "orders", the same for a queue and topic).
  function update(overview, restList, now) {
    const seconds = previous ? (overview.now_ms - previous.now_ms) / 1000 : 0;
    const before = new Map((previous ? previous.destinations : []).map((d) => [d.name, d]));
    const restByDestination = new Map((restList || []).map((d) => [d.destination, d]));
    const rows = overview.destinations.map((d) => {
      const r = restByDestination.get(d.name);
      const old = before.get(d.name);
      return {
        name: d.name, kind: d.kind,
        depth: r ? r.depth : d.depth, unacked: r ? r.unacked : d.unacked, consumers: r ? r.consumers : d.consumers,
        publish: r ? r.publish_rate : null,
        deliver: r ? r.deliver_rate : rate(d.delivered_total, old && old.delivered_total, seconds),
      };
    });
    const listed = new Set(rows.map((row) => row.name));
    for (const r of restList || []) if (!listed.has(r.destination)) {
      rows.push({ name: r.destination, kind: r.kind, depth: r.depth, unacked: r.unacked, consumers: r.consumers,
        publish: r.publish_rate, deliver: r.deliver_rate });
    }
    rows.sort((a, b) => a.name.localeCompare(b.name));
    const totals = {
      t: now,
      publish: rate(overview.published_total, previous && previous.published_total, seconds),
      deliver: rate(overview.delivered_total, previous && previous.delivered_total, seconds),
    };
    history.totals.push(totals);
    for (const row of rows) {
      if (!history.destinations.has(row.name)) history.destinations.set(row.name, []);
      history.destinations.get(row.name).push({ t: now, depth: row.depth, deliver: row.deliver, publish: row.publish });
    }
    trim(now);
    previous = overview;

    $('#total-connections').textContent = overview.connections.length;
    $('#total-published').textContent = Math.round(overview.published_total);
    $('#total-delivered').textContent = Math.round(overview.delivered_total);
    $('#rate-published').textContent = totals.publish.toFixed(1);
    $('#rate-delivered').textContent = totals.deliver.toFixed(1);
    $('#uptime').textContent = duration(overview.uptime_s);
    $('#destinations-source').textContent = restList ? '(from GET /destinations)' : '(from /console/api/overview)';
    renderDestinations(rows);
    renderRows('#connections', overview.connections, (c) => [c.id, c.kind, c.peer, c.version || '–', c.user || '–',
      num(c.subscriptions), num(c.frames_in), num(c.messages_out), num(duration(c.age_s))], 'no connections');
    renderRows('#subscriptions', overview.subscriptions, (s) => [s.session, s.id, s.destination, s.ack,
      num(s.prefetch), num(s.unacked), num(s.delivered)], 'no subscriptions');
    drawCharts(now);
  }

  function trim(now) {
    while (history.totals.length && history.totals[0].t < now - WINDOW_MS) history.totals.shift();
    for (const [name, points] of history.destinations) {
      while (points.length && points[0].t < now - WINDOW_MS) points.shift();
      if (!points.length) history.destinations.delete(name);
    }
  }

  // ---- tables ----
  const num = (v) => ({ num: v });
  function cell(value) {
    const td = document.createElement('td');
    if (value && typeof value === 'object' && 'num' in value) { td.className = 'num'; value = value.num; }
    if (value instanceof Node) td.appendChild(value); else td.textContent = value == null ? '–' : String(value);
    return td;
  }

  function renderRows(table, items, columns, empty) {
    const body = $(table + ' tbody');
    body.replaceChildren();
    for (const item of items) {
      const tr = document.createElement('tr');
      for (const value of columns(item)) tr.appendChild(cell(value));
      body.appendChild(tr);
    }
    if (!items.length) {
      const tr = document.createElement('tr');
      const td = cell(empty);
      td.colSpan = $(table + ' thead tr').children.length;
      td.className = 'empty';
      tr.appendChild(td);
      body.appendChild(tr);
    }
    return body;
  }

  function renderDestinations(rows) {
    const body = renderRows('#destinations', rows, (d) => [d.name, d.kind, num(d.kind === 'topic' ? '–' : d.depth),
      num(d.kind === 'topic' ? '–' : d.unacked), num(d.consumers), num(d.publish == null ? '–' : d.publish.toFixed(1)),
      num(d.deliver.toFixed(1)), sparkline(history.destinations.get(d.name) || [])], 'no destinations yet');
    rows.forEach((d, i) => {
      const tr = body.children[i];
      tr.dataset.name = d.name;
      if (d.name === selected) tr.classList.add('selected');
      tr.addEventListener('click', () => choose(d.name));
    });
  }

  function sparkline(points) {
    const svgNS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(svgNS, 'svg');
    svg.setAttribute('class', 'spark');
    svg.setAttribute('viewBox', '0 0 120 22');
    const now = Date.now();
    const recent = points.filter((p) => p.t >= now - SPARK_MS);
    const max = Math.max(1, ...recent.map((p) => p.depth));
    const coords = recent.map((p) => [120 * (1 - (now - p.t) / SPARK_MS), 21 - 20 * (p.depth / max)]);
    const line = document.createElementNS(svgNS, 'polyline');
    line.setAttribute('points', coords.map((c) => c[0].toFixed(1) + ',' + c[1].toFixed(1)).join(' '));
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', '#2563eb');
    line.setAttribute('stroke-width', '1.5');
    svg.appendChild(line);
    const title = document.createElementNS(svgNS, 'title');
    title.textContent = 'depth, max ' + max + ' in the last 2 minutes';
    svg.appendChild(title);
    return svg;
  }

  // ---- charts (hand-drawn on canvas) ----
  // A top for the y axis whose quarter is a round number (integers below 4).
  function niceMax(value) {
    if (value <= 4) return 4;
    const raw = value / 4;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const tick = [1, 2, 2.5, 5, 10].map((s) => s * power).find((t) => t >= raw);
    return 4 * tick;
  }

  function drawChart(canvas, series, now) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const g = canvas.getContext('2d');
    g.scale(ratio, ratio);
    g.clearRect(0, 0, width, height);
    const left = 44, right = 8, top = 22, bottom = 20;
    const plotW = width - left - right, plotH = height - top - bottom;
    const max = niceMax(Math.max(0, ...series.flatMap((s) => s.points.map((p) => p.v))));
    g.font = '11px system-ui, sans-serif';
    g.strokeStyle = '#e5e7eb';
    g.fillStyle = '#6b7280';
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
      const label = (max * i) / 4;
      g.fillText(Number.isInteger(label) ? String(label) : label.toFixed(1), left - 6, y);
    }
    g.textAlign = 'center';
    g.textBaseline = 'top';
    for (let m = 0; m <= 5; m++) {
      const x = left + plotW - (plotW * m) / 5;
      g.textAlign = m === 0 ? 'right' : 'center'; // 'now' sits at the right edge: centred, the canvas cut it
      g.fillText(m === 0 ? 'now' : '-' + m + 'm', x, top + plotH + 5);
    }
    const x = (t) => left + plotW * (1 - (now - t) / WINDOW_MS);
    const y = (v) => top + plotH - (plotH * v) / max;
    let legendX = left;
    g.textAlign = 'left';
    g.textBaseline = 'middle';
    series.forEach((s) => {
      g.strokeStyle = s.color;
      g.lineWidth = 2;
      g.beginPath();
      s.points.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.v)) : g.moveTo(x(p.t), y(p.v))));
      g.stroke();
      g.fillStyle = s.color;
      g.fillRect(legendX, 6, 10, 10);
      g.fillStyle = '#374151';
      g.fillText(s.label, legendX + 14, 11);
      legendX += 24 + g.measureText(s.label).width;
    });
    if (!series.length) {
      g.fillStyle = '#9ca3af';
      g.textAlign = 'center';
      g.fillText('no queues yet', left + plotW / 2, top + plotH / 2);
    }
  }

  function drawCharts(now) {
    const rates = [
      { label: 'published/s (all)', color: COLORS[0], points: history.totals.map((p) => ({ t: p.t, v: p.publish })) },
      { label: 'delivered/s (all)', color: COLORS[2], points: history.totals.map((p) => ({ t: p.t, v: p.deliver })) },
    ];
    if (selected && history.destinations.has(selected)) {
      const points = history.destinations.get(selected);
      rates.push({ label: 'deliver/s ' + selected, color: COLORS[3], points: points.map((p) => ({ t: p.t, v: p.deliver })) });
      if (points.some((p) => p.publish != null)) {
        rates.push({ label: 'publish/s ' + selected, color: COLORS[4],
          points: points.filter((p) => p.publish != null).map((p) => ({ t: p.t, v: p.publish })) });
      }
    }
    drawChart($('#chart-rates'), rates, now);
    const queues = [...history.destinations.entries()].filter(([name]) => !name.startsWith('/topic/'));
    queues.sort((a, b) => (b[0] === selected) - (a[0] === selected) ||
      b[1][b[1].length - 1].depth - a[1][a[1].length - 1].depth);
    drawChart($('#chart-depth'), queues.slice(0, COLORS.length).map(([name, points], i) => ({
      label: name, color: COLORS[i], points: points.map((p) => ({ t: p.t, v: p.depth })),
    })), now);
  }

  function duration(seconds) {
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + 's';
    if (seconds < 3600) return Math.floor(seconds / 60) + 'm ' + (seconds % 60) + 's';
    return Math.floor(seconds / 3600) + 'h ' + Math.floor((seconds % 3600) / 60) + 'm';
  }

  // A click on a destination: select it for the charts, fill both forms, and follow it (as the page's hint says).
  function choose(name) {
    selected = name;
    $('#pub-destination').value = name;
    $('#tail-destination').value = name;
    document.querySelectorAll('#destinations tbody tr').forEach((tr) => tr.classList.toggle('selected', tr.dataset.name === name));
    // A topic is followed at once. Following a queue makes this page one of its consumers and takes its messages, so
    // a click on a queue only fills in the forms: the Follow button says that is meant.
    if (name.startsWith('/topic/') && (tail.id === null || tail.destination !== name)) follow(name);
    $('#tail-queue-note').hidden = !name.startsWith('/queue/');
    drawCharts(Date.now());
  }

  // ---- publish ----
  function parseHeaders(text) {
    const headers = {};
    for (const line of text.split('\n')) {
      if (!line.trim()) continue;
      const at = line.indexOf(':');
      if (at <= 0) throw new Error('header line without a name: ' + line);
      headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    return headers;
  }

  async function publishRest(destination, headers, body) {
    const stompHeaders = {};
    for (const [k, v] of Object.entries(headers)) stompHeaders['X-Stomp-' + k] = v;
    // REST names a destination by its kind and name as path segments: /queue/orders -> /destinations/queue/orders
    const path = destination.replace(/^\/+/, '').split('/').map(encodeURIComponent).join('/');
    const response = await fetch('/destinations/' + path, {
      method: 'POST', body, headers: withToken(Object.assign({ 'Content-Type': headers['content-type'] || 'text/plain' }, stompHeaders)),
    });
    if (response.status === 404 || response.status === 405) return false; // no REST publishing here: use STOMP
    if (!response.ok) {
      const detail = await problemDetail(response);
      if (response.status === 401) askForToken(401, detail);
      throw new Error(detail);
    }
    return true;
  }

  $('#publish-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const result = $('#pub-result');
    const button = $('#pub-submit');
    button.disabled = true;
    result.className = '';
    result.textContent = 'publishing…';
    try {
      const destination = $('#pub-destination').value.trim();
      const headers = parseHeaders($('#pub-headers').value);
      const body = $('#pub-body').value;
      const viaRest = rest.available && (await publishRest(destination, headers, body));
      if (!viaRest && stomp.state === 'refused') throw new Error('STOMP needs a sign-in with a user name and passcode');
      if (!viaRest) await stomp.send(destination, body, headers);
      result.className = 'ok-text';
      result.textContent = 'stored (' + (viaRest ? 'REST' : 'STOMP receipt') + ') at ' + new Date().toLocaleTimeString();
      poll();
    } catch (error) {
      result.className = 'bad-text';
      result.textContent = 'failed: ' + error.message;
    } finally {
      button.disabled = false;
    }
  });

  // ---- tail ----
  const TAIL_KEEP = 200;

  function stopTail() {
    if (tail.id) stomp.unsubscribe(tail.id);
    tail.id = null;
    $('#tail-stop').disabled = true;
    $('#tail-state').textContent = 'not following';
  }

  // Follow one destination: the page keeps one tail, so the previous one is unsubscribed first.
  function follow(destination) {
    stopTail();
    tail.destination = destination;
    $('#tail-list').replaceChildren();
    $('#tail-queue-note').hidden = !destination.startsWith('/queue/');
    tail.id = stomp.subscribe(destination, (message) => {
      tail.count += 1;
      const li = document.createElement('li');
      const meta = document.createElement('span');
      meta.className = 'meta';
      const extra = Object.entries(message.headers)
        .filter(([k, v]) => !['destination', 'subscription', 'message-id', 'content-length', 'ack'].includes(k)
          && !(k === 'redelivered' && v === 'false')) // worth a look only when true
        .map(([k, v]) => k + ':' + v).join(' ');
      meta.textContent = new Date().toLocaleTimeString() + ' ' + message.headers.destination + (extra ? ' ' + extra : '') + '\n';
      li.appendChild(meta);
      let text;
      try { text = new TextDecoder('utf-8', { fatal: true }).decode(message.body); } catch (e) { text = null; }
      li.appendChild(document.createTextNode(text == null ? '(' + message.body.length + ' binary bytes)' : text));
      const list = $('#tail-list');
      list.insertBefore(li, list.firstChild);
      while (list.children.length > TAIL_KEEP) list.removeChild(list.lastChild);
    });
    $('#tail-stop').disabled = false;
    $('#tail-state').textContent = stomp.state === 'connected' ? 'following ' + destination
      : stomp.state === 'refused' ? 'STOMP sign-in needed' : 'waiting for STOMP…';
  }

  $('#tail-form').addEventListener('submit', (event) => {
    event.preventDefault();
    follow($('#tail-destination').value.trim());
  });
  $('#tail-stop').addEventListener('click', stopTail);

  window.addEventListener('resize', () => drawCharts(Date.now()));
  renderSignIn(); // the Sign out button of a tab that kept its sign-in, even when nothing is refused
  poll();
  setInterval(poll, 1000);
})();
