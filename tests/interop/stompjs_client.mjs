// Drives the unmodified @stomp/stompjs client (npm) against the gateway, for tests/interop/test_stompjs.py.
//
//   node tests/interop/stompjs_client.mjs <ws-url> <scenario> [json-args]
//
// Node 20 has no global WebSocket, so the `ws` package provides it; stompjs then opens the socket itself
// (brokerURL), offering its own subprotocol list (v12.stomp, v11.stomp, v10.stomp).
//
// Everything observed is printed as one JSON object per line: {"event": ..., "client": ..., "t": ms, ...}.
// The last line is {"event": "done"} on success, {"event": "fatal", "error": ...} (exit 1) when a step
// failed, or {"event": "timeout"} (exit 3) when the whole run overran args.timeoutMs.

import { createHash } from 'node:crypto';

import { Client, Versions } from '@stomp/stompjs';
import WebSocket from 'ws';

Object.assign(globalThis, { WebSocket });

const [url, scenario, argsJson = '{}'] = process.argv.slice(2);
const args = JSON.parse(argsJson);
const started = Date.now();

function emit(event, data = {}) {
  // stdout on a pipe is synchronous on Linux, so nothing is lost by a later process.exit()
  process.stdout.write(`${JSON.stringify({ event, t: Date.now() - started, ...data })}\n`);
}

const overall = setTimeout(() => {
  emit('timeout', { scenario });
  process.exit(3);
}, args.timeoutMs ?? 10000);

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

function describe(frame) {
  const out = { command: frame.command, headers: { ...frame.headers } };
  const bytes = frame.binaryBody;
  out.length = bytes.length;
  if (bytes.length <= 4096) {
    out.body = frame.body;
    out.hex = Buffer.from(bytes).toString('hex');
  } else {
    out.sha256 = createHash('sha256').update(bytes).digest('hex');
  }
  return out;
}

/** One stompjs Client plus a log of what it saw; next() waits for the next unconsumed event of a kind. */
class Probe {
  constructor(name, config = {}) {
    this.name = name;
    this.log = [];
    this.waiters = [];
    this.client = new Client({
      brokerURL: url,
      // no host header, as in stompjs's own RabbitMQ examples: the gateway's default vhost applies
      connectHeaders: { login: 'guest', passcode: 'guest' },
      reconnectDelay: 0, // never reconnect: a second session would hide what happened to the first
      heartbeatIncoming: 0,
      heartbeatOutgoing: 0,
      debug: () => {},
      // args.versions, e.g. ["1.1"]: what stompjs offers (accept-version and the WebSocket subprotocols)
      ...(args.versions ? { stompVersions: new Versions(args.versions) } : {}),
      // args.clientConfig: plain stompjs settings, e.g. {"forceBinaryWSFrames": true}
      ...(args.clientConfig ?? {}),
      ...config,
    });
    const c = this.client;
    c.onConnect = frame => this.record('connected', { ...describe(frame), connectedVersion: c.connectedVersion });
    c.onStompError = frame => this.record('stomp_error', describe(frame));
    c.onWebSocketClose = evt => this.record('ws_close', { code: evt.code, reason: String(evt.reason ?? '') });
    c.onWebSocketError = evt => this.record('ws_error', { message: String(evt?.message ?? evt) });
    c.onUnhandledMessage = message => this.record('message', { sub: null, ...describe(message) }, message);
    c.onUnhandledReceipt = frame => this.record('unhandled_receipt', describe(frame));
    c.onUnhandledFrame = frame => this.record('unhandled_frame', describe(frame));
    c.onHeartbeatReceived = () => this.record('heartbeat');
    c.onDisconnect = frame => this.record('disconnect_receipt', describe(frame));
  }

  record(event, data = {}, raw = undefined) {
    const entry = { event, client: this.name, t: Date.now() - started, ...data };
    emit(event, { client: this.name, ...data });
    this.log.push({ entry, raw, taken: false });
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Resolves with {entry, raw} of the next unconsumed `event` (matching `pred`), or rejects after `ms`. */
  next(event, { pred = () => true, ms = 5000 } = {}) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.log.find(e => !e.taken && e.entry.event === event && pred(e.entry));
        if (!found) return false;
        found.taken = true;
        cleanup();
        resolve(found);
        return true;
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${this.name}: no '${event}' within ${ms} ms`));
      }, ms);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters = this.waiters.filter(w => w !== check);
      };
      if (!check()) this.waiters.push(check);
    });
  }

  count(event) {
    return this.log.filter(e => e.entry.event === event).length;
  }

  async connect() {
    this.client.activate();
    return (await this.next('connected')).entry;
  }

  receipt(id) {
    this.client.watchForReceipt(id, frame => this.record('receipt', describe(frame)));
    return () => this.next('receipt', { pred: e => e.headers['receipt-id'] === id });
  }

  async subscribe(destination, headers = {}) {
    const receiptId = `sub-${destination}`;
    const wait = this.receipt(receiptId);
    const sub = this.client.subscribe(
      destination,
      message => this.record('message', { sub: sub.id, ...describe(message) }, message),
      { ...headers, receipt: receiptId },
    );
    await wait();
    return sub;
  }

  async publish(params) {
    const receiptId = `pub-${Math.random().toString(36).slice(2)}`;
    const wait = this.receipt(receiptId);
    this.client.publish({ ...params, headers: { ...(params.headers ?? {}), receipt: receiptId } });
    await wait();
  }

  message(ms = 5000) {
    return this.next('message', { ms });
  }

  async nothing(ms = 300) {
    const before = this.count('message');
    await sleep(ms);
    if (this.count('message') !== before) throw new Error(`${this.name}: unexpected MESSAGE`);
  }

  async close() {
    if (this.client.connected) {
      await this.client.deactivate();
    }
  }
}

const scenarios = {
  // CONNECTED (version, heart-beat), server heart-beats, and our PINGs keep the session alive while idle.
  async connect() {
    const p = new Probe('c', {
      heartbeatIncoming: 1000,
      heartbeatOutgoing: 1000,
      debug: line => {
        if (/every \d+ms|did not receive server activity/.test(line)) emit('debug', { client: 'c', line });
      },
    });
    await p.connect();
    await p.next('heartbeat', { ms: args.firstHeartbeatMs ?? 3000 });
    // The gateway expects a client heart-beat every 1000 ms and gives up after 2000 ms of silence:
    // staying idle longer than that proves stompjs's PINGs reach it.
    await sleep(args.idleMs ?? 2500);
    emit('state', { client: 'c', connected: p.client.connected, heartbeats: p.count('heartbeat') });
    await p.close();
    await p.next('ws_close');
  },

  // SUBSCRIBE, SEND with content-type and a header needing escaping, receive the MESSAGE.
  async pubsub() {
    const p = new Probe('c');
    await p.connect();
    await p.subscribe(args.destination);
    await p.publish({ destination: args.destination, body: args.body, headers: args.headers });
    await p.message();
    await p.nothing();
    await p.close();
  },

  // ack: 'client-individual'; nack() requeues (redelivered: true), ack() settles for good.
  async ack() {
    const p = new Probe('c');
    await p.connect();
    await p.subscribe(args.destination, { ack: 'client-individual' });
    await p.publish({ destination: args.destination, body: 'm1' });
    const first = await p.message();
    const nacked = p.receipt('nack-1');
    first.raw.nack({ receipt: 'nack-1' });
    await nacked();
    const again = await p.message();
    const acked = p.receipt('ack-1');
    again.raw.ack({ receipt: 'ack-1' });
    await acked();
    await p.nothing();
    await p.close();
    // Had the ACK not settled m1, closing would have requeued it ahead of the marker.
    const check = new Probe('check');
    await check.connect();
    await check.publish({ destination: args.destination, body: 'marker' });
    await check.subscribe(args.destination);
    await check.message();
    await check.nothing();
    await check.close();
  },

  // RECEIPTs for SUBSCRIBE, SEND, UNSUBSCRIBE and DISCONNECT (deactivate() asks for one itself).
  async receipts() {
    const p = new Probe('c');
    await p.connect();
    const sub = await p.subscribe(args.destination);
    await p.publish({ destination: args.destination, body: 'x' });
    await p.message();
    const unsubscribed = p.receipt('unsub-1');
    sub.unsubscribe({ receipt: 'unsub-1' });
    await unsubscribed();
    await p.publish({ destination: args.destination, body: 'after unsubscribe' });
    await p.nothing();
    await p.client.deactivate();
    await p.next('disconnect_receipt');
    await p.next('ws_close');
  },

  // binaryBody: a Uint8Array with every byte value (so NULs too) goes out and comes back unchanged.
  async binary() {
    const p = new Probe('c');
    await p.connect();
    await p.subscribe(args.destination);
    const size = args.size ?? 256;
    const body = new Uint8Array(size);
    for (let i = 0; i < size; i++) body[i] = i % 256;
    emit('sent', {
      client: 'c',
      length: size,
      hex: size <= 4096 ? Buffer.from(body).toString('hex') : undefined,
      sha256: createHash('sha256').update(body).digest('hex'),
    });
    await p.publish({
      destination: args.destination,
      binaryBody: body,
      headers: { 'content-type': 'application/octet-stream' },
    });
    const got = await p.message();
    emit('binary_check', {
      client: 'c',
      isUint8Array: got.raw.binaryBody instanceof Uint8Array,
      equal: Buffer.compare(Buffer.from(got.raw.binaryBody), Buffer.from(body)) === 0,
    });
    await p.close();
  },

  // begin() → publish in the transaction → commit() delivers; abort() drops.
  async transaction() {
    const p = new Probe('c');
    await p.connect();
    await p.subscribe(args.destination);
    const tx1 = p.client.begin();
    p.client.publish({ destination: args.destination, body: 'in-tx1', headers: { transaction: tx1.id } });
    await p.nothing(400);
    emit('commit', { client: 'c', transaction: tx1.id });
    tx1.commit();
    await p.message();
    const tx2 = p.client.begin();
    p.client.publish({ destination: args.destination, body: 'in-tx2', headers: { transaction: tx2.id } });
    emit('abort', { client: 'c', transaction: tx2.id });
    tx2.abort();
    // The gateway handles one session's frames in order: an aborted send that leaked would come first.
    await p.publish({ destination: args.destination, body: 'after-abort' });
    await p.message();
    await p.nothing(400);
    await p.close();
  },

  // SUBSCRIBE to a missing exchange: ERROR (message: not_found) through onStompError, then the close.
  async error() {
    const p = new Probe('c');
    await p.connect();
    p.client.subscribe(args.destination, () => {}, { receipt: 'sub-missing' });
    await p.next('stomp_error');
    await p.next('ws_close');
    emit('state', { client: 'c', connected: p.client.connected });
  },

  // A wrong passcode: ERROR (message: Bad CONNECT) through onStompError, never onConnect.
  async badlogin() {
    const p = new Probe('c', { connectHeaders: { login: 'guest', passcode: 'wrong', host: '/' } });
    p.client.activate();
    await p.next('stomp_error');
    await p.next('ws_close');
    emit('state', { client: 'c', connected: p.client.connected, connects: p.count('connected') });
  },

  // Tokens (README "Tokens and permissions"): CONNECT with a token as the passcode, subscribe to two
  // destinations, refresh in band (SEND to /gateway/token) with a token for the same sub that allows only
  // args.keep: the other subscription ends with an ERROR (the session goes on), the RECEIPT confirms, and
  // the session outlives the first token's exp.
  async refresh() {
    const p = new Probe('c', { connectHeaders: { login: 'alice', passcode: args.token, host: '/' } });
    await p.connect();
    await p.subscribe(args.keep);
    await p.subscribe(args.drop);
    await p.publish({ destination: '/gateway/token', body: args.newToken });
    await p.next('stomp_error');
    await sleep(Math.max(0, args.firstExpMs - Date.now()) + 300);
    await p.publish({ destination: args.keep, body: 'after' });
    await p.message();
    emit('state', { client: 'c', connected: p.client.connected });
    await p.close();
  },

  // RabbitMQ's reply-to:/temp-queue/…: the reply has no stompjs subscription, so onUnhandledMessage gets it.
  async rpc() {
    const server = new Probe('server');
    const requester = new Probe('requester');
    await server.connect();
    await requester.connect();
    await server.subscribe(args.destination);
    await requester.publish({
      destination: args.destination,
      body: 'ping',
      headers: { 'reply-to': '/temp-queue/replies', 'correlation-id': 'c-1' },
    });
    const request = await server.message();
    await server.publish({
      destination: request.entry.headers['reply-to'],
      body: 'pong',
      headers: { 'correlation-id': request.entry.headers['correlation-id'] },
    });
    await requester.message();
    await server.close();
    await requester.close();
  },
};

try {
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${JSON.stringify(scenario)}`);
  await run();
  emit('done', { scenario });
  clearTimeout(overall);
  process.exit(0);
} catch (error) {
  emit('fatal', { scenario, error: String(error?.stack ?? error) });
  process.exit(1);
}
