/*
 * The live stock ticker page.
 *
 * Settings: the page repeats none of the stock daemon's. It first asks the gateway (GET info.json) for the
 * broker's name (the subtitle) and the ticker: the daemon's symbols (the rows shown unless the visitor
 * chose others) and the destination prefix a symbol completes (/exchange/stocks/ by default). Until it has
 * them, the page says so, shows the visitor's stored rows and asks again (1 s doubling to 30 s); only then
 * does it connect.
 *
 * Data path: @stomp/stompjs (vendor/stomp.umd.min.js, global StompJs) connects to the gateway at
 * ws(s)://<this host>/ws. Every row subscribes to <prefix><SYMBOL> (the stock daemon, or any other
 * service, publishes one JSON tick per symbol there). Continuity comes from the gateway (README,
 * "Continuity"), through SUBSCRIBE headers:
 *  - x-last-value:true: the newest tick of the symbol comes first (the gateway retains the exchange), so a
 *    new row is filled at once, for any symbol anyone publishes (no snapshot request to the daemon);
 *  - x-recover-from:<the x-recovery-position of the row's last tick>: after a reconnect the ticks missed
 *    while the connection was down come first, in order, so the sparkline has no hole (when the gateway no
 *    longer has them, the last value comes instead, and the RECEIPT says x-recovered:false);
 *  - x-conflate:<ms> while the tab is hidden: at most one tick per symbol per interval, the newest; when the
 *    tab is shown again each row goes back to its series and position from before, and subscribes anew from
 *    there, so it gets every tick conflation skipped.
 * Any symbol can be added: a row without a tick yet says "waiting for data", and after a while "no data yet".
 *
 * Tokens: a page opened as /?access_token=<JWT> (or #access_token=...) passes the token on as the
 * access_token query parameter of the WebSocket URL. The page only subscribes, so an anonymous read scope
 * for the ticks is all it needs without one.
 *
 * While the connection is down the rows are dimmed and the page says since when the prices are stale;
 * an ERROR from the server is shown in plain words and cleared once the connection is back.
 *
 * Subscriptions are made in onConnect, so every automatic reconnect re-subscribes every row (the book's
 * client did not). Each sparkline's <svg> carries the times of the ticks it draws in data-times (tests read
 * it to check that no tick is missing). A price flashes green when the NEW price is above the OLD one and red when below; an
 * unchanged price does not flash (the book had the two arguments swapped).
 *
 * No inline script or style: the page runs under a strict Content-Security-Policy.
 */
(function () {
  'use strict';

  const SYMBOL_RE = /^[A-Z][A-Z0-9.]{0,9}$/;
  const STORAGE_KEY = 'stock-ticker.symbols';
  const INFO_RETRY_MAX_MS = 30000;
  // A hidden tab takes at most one tick per symbol per this many ms (?conflate=<ms> for tests).
  const HIDDEN_CONFLATE_MS = Number(new URLSearchParams(window.location.search).get('conflate')) || 2000;
  const SPARK_POINTS = 40;
  const SPARK_WIDTH = 100;
  const SPARK_HEIGHT = 28;
  const MESSAGE_MS = 8000;
  // How long a row waits for its first tick before it says so (?nodata=<ms> for tests).
  const NO_DATA_MS = Number(new URLSearchParams(window.location.search).get('nodata')) || 15000;
  const STABLE_MS = 10000; // a connection that lasted less than this counts as flapping
  const FLAP_DELAY_MAX_MS = 30000;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const $ = (selector) => document.querySelector(selector);
  const statusEl = $('#status');
  const form = $('#add-form');
  const input = $('#symbol-input');
  const messageEl = $('#message');
  const tbody = $('#quotes tbody');
  const emptyEl = $('#empty');
  const banner = $('#error-banner');

  /** symbol -> row state: {symbol, tr, price, change, percent, line, history, times, last, time, position,
   *  subscription, conflated, beforeHidden} */
  const rows = new Map();
  let lastUpdate = null; // Date of the newest tick shown
  let messageTimer = null;
  let connectedAt = 0;
  let flapDelay = 0;
  /** From info.json: {symbols, destination_prefix}; null until it answered. */
  let ticker = null;
  /** Whether the visitor's own list of symbols is in use (stored earlier, or changed on this page). */
  let chosen = false;

  // Fixed format, whatever the locale: "1234.56", "+1.23", "-0.40", "0.00" (Number() reads them back).
  const priceFormat = new Intl.NumberFormat('en-US', {
    minimumFractionDigits: 2, maximumFractionDigits: 2, useGrouping: false,
  });
  const changeFormat = new Intl.NumberFormat('en-US', {
    minimumFractionDigits: 2, maximumFractionDigits: 2, useGrouping: false, signDisplay: 'exceptZero',
  });

  // ---- small helpers --------------------------------------------------------------------------------

  function meta(name) {
    const el = document.querySelector(`meta[name="${name}"]`);
    return el ? el.content.trim() : '';
  }

  /** A token given to the page as ?access_token=... or #access_token=... (what an OAuth 2.0 login returns). */
  function accessToken() {
    const fromQuery = new URLSearchParams(window.location.search).get('access_token');
    const fromHash = new URLSearchParams(window.location.hash.replace(/^#/, '')).get('access_token');
    return (fromQuery || fromHash || '').trim();
  }

  // Browsers cannot set headers on a WebSocket: the token travels as the access_token query parameter.
  function brokerUrl() {
    const configured = meta('stomp-url');
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = configured || `${scheme}//${window.location.host}/ws`;
    const token = accessToken();
    if (!token) return url;
    return `${url}${url.includes('?') ? '&' : '?'}access_token=${encodeURIComponent(token)}`;
  }

  function normalize(text) {
    return String(text).trim().toUpperCase();
  }

  function showMessage(text, kind) {
    messageEl.textContent = text;
    messageEl.className = `message ${kind || 'info'}`;
    clearTimeout(messageTimer);
    messageTimer = setTimeout(() => {
      messageEl.textContent = '';
      messageEl.className = 'message';
    }, MESSAGE_MS);
  }

  function setStatus(online) {
    statusEl.textContent = online ? 'Online' : 'Reconnecting…';
    statusEl.classList.toggle('online', online);
    statusEl.classList.toggle('offline', !online);
    document.body.classList.toggle('stale', !online);
    const note = $('#stale-note');
    if (online) {
      note.hidden = true;
    } else {
      note.textContent = lastUpdate
        ? `Connection lost: prices as of ${lastUpdate.toLocaleTimeString()}, reconnecting…`
        : 'Not connected yet: reconnecting…';
      note.hidden = false;
    }
  }

  // What a page visitor is told for the ERROR frames they may meet; details stay in the fold.
  const PLAIN_WORDS = {
    connection_forced: 'The price feed is unavailable right now. The page reconnects by itself.',
    'Bad CONNECT': 'The server did not accept this page\'s login.',
    'Slow consumer': 'The connection fell too far behind and was reset. The page reconnects by itself.',
    'Heart-beat timeout': 'The connection went quiet and was reset. The page reconnects by itself.',
    'Token expired': 'Your sign-in expired. Open the page again with a new token.',
    access_refused: 'Your sign-in does not allow this.',
  };

  function showError(message, body) {
    $('#error-message').textContent =
      PLAIN_WORDS[message] || `The server reported a problem (${message || 'unknown'}). The page reconnects by itself.`;
    const bodyEl = $('#error-body');
    bodyEl.textContent = body || '';
    $('#error-details').hidden = !body;
    banner.hidden = false;
  }

  // ---- persistence --------------------------------------------------------------------------------

  /** The visitor's stored symbols, cleaned, or null if none are stored (then the daemon's are shown). */
  function loadSymbols() {
    try {
      const stored = window.localStorage.getItem(STORAGE_KEY);
      if (stored !== null) {
        const list = JSON.parse(stored);
        if (Array.isArray(list)) {
          return [...new Set(list.map(normalize).filter((s) => SYMBOL_RE.test(s)))];
        }
      }
    } catch (err) {
      // Storage disabled or corrupt: fall back to the defaults.
    }
    return null;
  }

  function saveSymbols() {
    try {
      window.localStorage.setItem(STORAGE_KEY, JSON.stringify([...rows.keys()]));
    } catch (err) {
      // Storage disabled (private mode): the choice lasts until the page is closed.
    }
  }

  // ---- rows -----------------------------------------------------------------------------------------

  function cell(className, text) {
    const td = document.createElement('td');
    td.className = className;
    td.textContent = text;
    return td;
  }

  function createRow(symbol) {
    const tr = document.createElement('tr');
    tr.dataset.symbol = symbol;

    const name = cell('symbol', symbol);
    const price = cell('price num', '—');
    const change = cell('change num col-change', '—');
    const percent = cell('change-percent num', '—');

    const trend = document.createElement('td');
    trend.className = 'trend col-trend';
    const svg = document.createElementNS(SVG_NS, 'svg');
    svg.setAttribute('class', 'sparkline');
    svg.setAttribute('viewBox', `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`);
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('aria-hidden', 'true');
    const line = document.createElementNS(SVG_NS, 'polyline');
    line.setAttribute('vector-effect', 'non-scaling-stroke');
    line.setAttribute('points', '');
    svg.appendChild(line);
    trend.appendChild(svg);

    const actions = document.createElement('td');
    actions.className = 'actions';
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'remove';
    remove.textContent = '✕';
    remove.title = `Remove ${symbol}`;
    remove.setAttribute('aria-label', `Remove ${symbol}`);
    remove.addEventListener('click', () => removeSymbol(symbol));
    actions.appendChild(remove);

    tr.append(name, price, change, percent, trend, actions);
    price.textContent = 'waiting for data';
    price.classList.add('waiting');
    const row = {
      symbol, tr, price, change, percent, line, history: [], times: [], last: null, time: '', position: null,
      subscription: null, conflated: false, beforeHidden: null,
    };
    row.noDataTimer = setTimeout(() => {
      if (row.last === null) {
        price.textContent = 'no data yet';
        price.title = `Nothing has been published for ${symbol} since it was added.`;
      }
    }, NO_DATA_MS);
    return row;
  }

  function addRow(symbol) {
    const row = createRow(symbol);
    rows.set(symbol, row);
    tbody.appendChild(row.tr);
    emptyEl.hidden = rows.size > 0;
    subscribe(row);
    return row;
  }

  function dropRow(symbol) {
    const row = rows.get(symbol);
    if (!row) return;
    clearTimeout(row.noDataTimer);
    unsubscribe(row);
    row.tr.remove();
    rows.delete(symbol);
    emptyEl.hidden = rows.size > 0;
  }

  function flash(el, up) {
    el.classList.remove('flash-up', 'flash-down');
    void el.offsetWidth; // restart the CSS animation when the same direction repeats
    el.classList.add(up ? 'flash-up' : 'flash-down');
  }

  function drawSparkline(row) {
    const points = row.history;
    const min = Math.min(...points);
    const max = Math.max(...points);
    const span = max - min;
    const pad = 2;
    // One point is drawn as a flat line across; a flat history sits in the middle.
    const xs = points.length > 1 ? points.map((_, i) => (i * SPARK_WIDTH) / (points.length - 1)) : [0, SPARK_WIDTH];
    const ys = (points.length > 1 ? points : [points[0], points[0]]).map((p) =>
      span > 0 ? pad + (1 - (p - min) / span) * (SPARK_HEIGHT - 2 * pad) : SPARK_HEIGHT / 2);
    row.line.setAttribute('points', xs.map((x, i) => `${x.toFixed(1)},${ys[i].toFixed(1)}`).join(' '));
    const svg = row.line.ownerSVGElement;
    svg.dataset.times = row.times.join(' ');
    const first = points[0];
    const last = points[points.length - 1];
    svg.classList.toggle('rising', last > first);
    svg.classList.toggle('falling', last < first);
  }

  /** Show one quote ({symbol, price, change, change_percent, time}) in its row. */
  function applyQuote(quote) {
    if (!quote || typeof quote !== 'object') return;
    const row = rows.get(quote.symbol);
    if (!row) return;
    const price = Number(quote.price);
    const change = Number(quote.change);
    const percent = Number(quote.change_percent);
    if (!Number.isFinite(price)) return;
    const time = typeof quote.time === 'string' ? quote.time : '';
    if (time && row.time && time <= row.time) return; // already shown, or older (a last value we had)

    if (row.last !== null && price !== row.last) flash(row.price, price > row.last);
    row.last = price;
    row.time = time;
    row.price.classList.remove('waiting');
    row.price.title = '';
    const at = time ? new Date(time) : new Date();
    if (!Number.isNaN(at.getTime()) && (!lastUpdate || at > lastUpdate)) lastUpdate = at;

    row.price.textContent = priceFormat.format(price);
    if (time) row.price.title = `as of ${new Date(time).toLocaleTimeString()}`;
    if (Number.isFinite(change)) {
      row.change.textContent = changeFormat.format(change);
      row.percent.textContent = Number.isFinite(percent) ? `${changeFormat.format(percent)}%` : '—';
      for (const el of [row.change, row.percent]) {
        el.classList.toggle('positive', change > 0);
        el.classList.toggle('negative', change < 0);
      }
    }
    row.history.push(price);
    row.times.push(time);
    if (row.history.length > SPARK_POINTS) {
      row.history.splice(0, row.history.length - SPARK_POINTS);
      row.times.splice(0, row.times.length - SPARK_POINTS);
    }
    drawSparkline(row);
  }

  // ---- STOMP ----------------------------------------------------------------------------------------

  const connectHeaders = {};
  for (const [header, name] of [['login', 'stomp-login'], ['passcode', 'stomp-passcode'], ['host', 'stomp-host']]) {
    const value = meta(name);
    if (value) connectHeaders[header] = value;
  }

  const client = new StompJs.Client({
    brokerURL: brokerUrl(),
    connectHeaders,
    heartbeatIncoming: 10000,
    heartbeatOutgoing: 10000,
    reconnectDelay: 1000,
    connectionTimeout: 10000,
  });
  // Back-off, two parts. stompjs: 1 s doubling to 30 s while the WebSocket cannot connect, reset once
  // CONNECTED arrives. Ours: a connection that dies soon after CONNECTED (an ERROR frame, a broker that
  // is down behind the gateway) would otherwise reconnect every second forever, so such flapping adds
  // its own delay, 1 s doubling to 30 s, forgotten once a connection stays up for STABLE_MS.
  if (StompJs.ReconnectionTimeMode) {
    client.reconnectTimeMode = StompJs.ReconnectionTimeMode.EXPONENTIAL;
    client.maxReconnectDelay = 30000;
  }
  client.beforeConnect = () => (flapDelay > 0 ? new Promise((resolve) => setTimeout(resolve, flapDelay)) : undefined);

  /** Subscribe a row: the last value (or, with a position, what was missed since), then live ticks;
   * conflated while the tab is hidden. */
  function subscribe(row) {
    if (!ticker || !client.connected || row.subscription) return;
    if (!document.hidden && row.beforeHidden) {
      // Shown again: back to the series as it was before conflation, and recover every tick since.
      if (row.beforeHidden.position) Object.assign(row, row.beforeHidden);
      row.beforeHidden = null;
    }
    const headers = { 'x-last-value': 'true' };
    if (row.position) headers['x-recover-from'] = row.position;
    row.conflated = document.hidden;
    if (row.conflated) headers['x-conflate'] = String(HIDDEN_CONFLATE_MS);
    row.subscription = client.subscribe(ticker.destination_prefix + row.symbol, (message) => {
      const position = message.headers['x-recovery-position'];
      if (position) row.position = position; // where to recover from after a reconnect
      let quote;
      try {
        quote = JSON.parse(message.body);
      } catch (err) {
        return; // not a tick
      }
      if (quote && quote.symbol === row.symbol) applyQuote(quote);
    }, headers);
  }

  function unsubscribe(row) {
    if (row.subscription && client.connected) row.subscription.unsubscribe();
    row.subscription = null;
  }

  // Hidden: conflate, remembering the series as it was. Shown again (now, or at the next connect if the
  // connection is down): back to that series and its position, from which the gateway sends every tick
  // since, the ones conflation skipped included (see subscribe).
  document.addEventListener('visibilitychange', () => {
    for (const row of rows.values()) {
      if (document.hidden && !row.beforeHidden) {
        row.beforeHidden = {
          history: [...row.history], times: [...row.times], last: row.last, time: row.time, position: row.position,
        };
      }
      if (client.connected && row.subscription && row.conflated !== document.hidden) {
        unsubscribe(row);
        subscribe(row);
      }
    }
  });

  client.onConnect = () => {
    connectedAt = Date.now();
    setStatus(true);
    banner.hidden = true; // the connection is back: whatever went wrong is over
    for (const row of rows.values()) {
      row.subscription = null; // subscriptions of the previous connection died with it
      subscribe(row);
    }
  };

  client.onStompError = (frame) => {
    showError(frame.headers.message, frame.body);
  };

  client.onWebSocketClose = () => {
    if (connectedAt) {
      const flapped = Date.now() - connectedAt < STABLE_MS;
      flapDelay = flapped ? Math.min(Math.max(flapDelay * 2, 1000), FLAP_DELAY_MAX_MS) : 0;
      connectedAt = 0;
    }
    setStatus(false);
    for (const row of rows.values()) row.subscription = null;
  };

  client.onDisconnect = () => setStatus(false);

  // ---- user actions ---------------------------------------------------------------------------------

  function addSymbol(text) {
    const symbol = normalize(text);
    if (!symbol) {
      showMessage('Type a symbol first, e.g. AAPL.', 'error');
      return false;
    }
    if (!SYMBOL_RE.test(symbol)) {
      showMessage(`Invalid symbol: ${symbol} (a letter, then up to 9 letters, digits or dots)`, 'error');
      return false;
    }
    if (rows.has(symbol)) {
      showMessage(`${symbol} is already in the table.`, 'info');
      return false;
    }
    addRow(symbol);
    chosen = true;
    saveSymbols();
    showMessage(`Added ${symbol}.`, 'info'); // its last value, if anyone published one, fills it at once
    return true;
  }

  function removeSymbol(symbol) {
    dropRow(symbol);
    chosen = true;
    saveSymbols();
    showMessage(`Removed ${symbol}.`, 'info');
    input.focus();
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (addSymbol(input.value)) input.value = '';
    input.focus();
  });

  $('#error-close').addEventListener('click', () => {
    banner.hidden = true;
  });

  // ---- start ----------------------------------------------------------------------------------------

  /** The ticker part of info.json if it has every field the page needs, else null. */
  function tickerOf(info) {
    const t = info && info.ticker;
    if (!t || !Array.isArray(t.symbols) || typeof t.destination_prefix !== 'string') return null;
    return t;
  }

  /** info.json answered: name the broker, show the daemon's symbols unless the visitor chose others, connect. */
  function start(info) {
    if (info.broker) $('#broker').textContent = info.broker; // the broker actually behind the gateway
    ticker = tickerOf(info);
    if (!chosen) {
      ticker.symbols.map(normalize).filter((s) => SYMBOL_RE.test(s) && !rows.has(s)).forEach(addRow);
      saveSymbols();
    }
    emptyEl.hidden = rows.size > 0;
    setStatus(false);
    client.activate();
  }

  /** Ask the gateway for the ticker's settings; without them, say so and ask again later. */
  function loadInfo(delay) {
    fetch('info.json', { cache: 'no-store' })
      .then((response) => (response.ok ? response.json() : null))
      .then((info) => {
        if (!tickerOf(info)) throw new Error('info.json has no ticker settings');
        start(info);
      })
      .catch(() => {
        const note = $('#stale-note');
        note.textContent = 'The server has not said which prices it publishes yet: asking again…';
        note.hidden = false;
        setTimeout(() => loadInfo(Math.min(delay * 2, INFO_RETRY_MAX_MS)), delay);
      });
  }

  setStatus(false);
  const stored = loadSymbols();
  if (stored !== null) {
    chosen = true;
    stored.forEach(addRow);
    saveSymbols(); // what was stored, cleaned (upper case, valid symbols, no duplicates)
  }
  emptyEl.hidden = rows.size > 0 || !chosen;
  loadInfo(1000);
})();
