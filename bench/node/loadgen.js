#!/usr/bin/env node
// Load generator for the wse_sync benchmarks, speaking the wse wire protocol
// (subprotocol wse-default-json) directly.
//
//   node loadgen.js --scenario rpc|msg|fanout|connect|cross|probe --url ws://127.0.0.1:P/ [options]
//
// Scenarios (see bench/README.md):
//   rpc      --conns N (50): each connection in a closed loop of ["echo", payload, stamp]
//   msg      --conns N (50): closed loop of ["ping", payload, null] answered by ["pong", payload, null]
//   fanout   --receivers R (2000) --count C (10): a trigger calls RPC fanout {count: C}; the
//            server broadcasts ["tick", i, null] (i < C) to every socket, the trigger's included;
//            --measure-connect: the receivers' handshakes are measured first, as in connect
//   connect  --conns N (2000) --concurrency K (100): open N connections hi -> welcome and hold
//            them until the runner has read the server's memory
//   cross    --receivers R (100) --count C (20): a server with 2 workers; R receivers on
//            worker A; a trigger on A (phase "local") then one on B (phase "remote") call
//            RPC send_to {cids, count}, i.e. server.send(cid, "tick", i) for each cid and i < C
//   probe    one hi -> welcome (with --expect-pids K: until K distinct answers of RPC pid)
//
// Measuring: --warmup S is excluded, --duration S is the window; --windows K repeats
// warm-up + window K times on the same connections (the runner interleaves servers).
// With --sync the generator prints {"event": ...} lines ("ready" before each window's
// warm-up, "start" and "end" at the window's edges) and waits for a "go" line on stdin
// after each: the runner reads the server's CPU there. Between windows it is quiet.
// The last stdout line is the JSON result. It exits by itself after --max-seconds (120).
//
// Clients: RPC/message loops and the triggers use the `ws` package. The bulk sockets
// (fanout and cross receivers, connect) use a minimal raw WebSocket client below
// (--client ws switches them to `ws` too): ws's per-connection and per-frame machinery
// costs this one-core generator more than the servers under test spend.
'use strict'

const crypto = require('crypto')
const net = require('net')
const WebSocket = require('ws')

const PROTOCOL = 'wse-default-json'

// ---------------------------------------------------------------- arguments
const args = {}
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i]
  if (!a.startsWith('--')) continue
  const key = a.slice(2)
  const next = process.argv[i + 1]
  if (next === undefined || next.startsWith('--')) args[key] = true
  else { args[key] = next; i++ }
}
const num = (k, d) => (args[k] === undefined ? d : Number(args[k]))
const scenario = args.scenario || 'rpc'
const url = args.url || 'ws://127.0.0.1:4200/'
const warmup = num('warmup', 1)
const duration = num('duration', 3)
const windows = num('windows', 1)
const maxSeconds = num('max-seconds', 120)
const sync = !!args.sync
const concurrency = num('concurrency', 100)
const bulkClient = args.client || 'raw'

const now = () => Number(process.hrtime.bigint()) / 1e6 // ms, CLOCK_MONOTONIC
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const cpu0 = process.cpuUsage()
const t0 = now()
const genCpu = () => { const c = process.cpuUsage(cpu0); return (c.user + c.system) / 1e6 }

function out (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

let finished = false
function finish (result, code = 0) {
  if (finished) return
  finished = true
  result.scenario = scenario
  result.gen_cpu_s = genCpu()
  result.gen_wall_s = (now() - t0) / 1000
  out(result)
  // let stdout drain, then go: the kernel closes the sockets
  process.stdout.write('', () => process.exit(code))
  setTimeout(() => process.exit(code), 2000).unref()
}

setTimeout(() => finish({ error: `loadgen gave up after ${maxSeconds}s` }, 2), maxSeconds * 1000).unref()

// ---------------------------------------------------------------- runner sync
const goWaiters = []
let stdinBuf = ''
if (sync) {
  process.stdin.setEncoding('utf8')
  process.stdin.on('data', (chunk) => {
    stdinBuf += chunk
    let i
    while ((i = stdinBuf.indexOf('\n')) >= 0) {
      stdinBuf = stdinBuf.slice(i + 1)
      const w = goWaiters.shift()
      if (w) w()
    }
  })
  process.stdin.on('end', () => finish({ error: 'runner went away' }, 2))
}

// Print an event with the generator's own CPU so far; with --sync wait for "go".
function event (name, extra = {}) {
  if (!sync) return Promise.resolve()
  out(Object.assign({ event: name, t: now(), gen_cpu_s: genCpu() }, extra))
  return new Promise((resolve) => {
    const timer = setTimeout(() => finish({ error: `no go from the runner after ${name}` }, 2),
      maxSeconds * 1000)
    goWaiters.push(() => { clearTimeout(timer); resolve() })
  })
}

// ---------------------------------------------------------------- connections
// A connection: send(text), close(), and message listeners getting the payload Buffer.
let errors = 0
let lastError = null
let closing = false
const target = new URL(url)
const host = target.hostname
const port = Number(target.port || 80)
const path = target.pathname + target.search

function failure (msg) {
  errors++
  lastError = msg
}

class Conn {
  constructor () { this.listeners = [] }
  on (fn) { this.listeners.push(fn) }
  off (fn) { this.listeners = this.listeners.filter((f) => f !== fn) }
  dispatch (data) {
    const ls = this.listeners
    for (let i = 0; i < ls.length; i++) ls[i](data)
  }
}

class WsConn extends Conn {
  constructor (ws) { super(); this.ws = ws }
  send (text) { this.ws.send(text) }
  close () { this.ws.close(1000) }
  get isOpen () { return this.ws.readyState === WebSocket.OPEN }
}

class RawConn extends Conn {
  constructor (sock) { super(); this.sock = sock; this.open = true }
  send (text) { this.sock.write(frame(0x1, Buffer.from(text))) }
  close () {
    if (!this.open) return
    this.open = false
    const code = Buffer.from([0x03, 0xe8]) // 1000
    this.sock.end(frame(0x8, code))
  }
  get isOpen () { return this.open }
}

// A masked client frame (RFC 6455 5.2).
function frame (opcode, payload) {
  const len = payload.length
  const hdr = len < 126 ? 2 : len < 65536 ? 4 : 10
  const buf = Buffer.allocUnsafe(hdr + 4 + len)
  buf[0] = 0x80 | opcode
  if (hdr === 2) buf[1] = 0x80 | len
  else if (hdr === 4) { buf[1] = 0x80 | 126; buf.writeUInt16BE(len, 2) } else { buf[1] = 0x80 | 127; buf.writeBigUInt64BE(BigInt(len), 2) }
  const m = (Math.random() * 0x100000000) >>> 0
  buf.writeUInt32BE(m, hdr)
  const mask = buf.subarray(hdr, hdr + 4)
  for (let i = 0; i < len; i++) buf[hdr + 4 + i] = payload[i] ^ mask[i & 3]
  return buf
}

const HI = (identity) => JSON.stringify(['~wse:hi', { identity, meta: {} }, null])
const PROTO_RE = new RegExp(`^sec-websocket-protocol:[ \\t]*${PROTOCOL}[ \\t]*$`, 'im')

// Open one connection, hi -> welcome; onMessage gets every later message.
function open (identity, onMessage, kind = 'ws') {
  return kind === 'raw' ? openRaw(identity, onMessage) : openWs(identity, onMessage)
}

function openWs (identity, onMessage) {
  return new Promise((resolve, reject) => {
    const started = now()
    const ws = new WebSocket(url, PROTOCOL, {
      perMessageDeflate: false, skipUTF8Validation: true, handshakeTimeout: 60000
    })
    const conn = new WsConn(ws)
    let welcomed = false
    ws.on('open', () => ws.send(HI(identity)))
    ws.on('message', (data) => {
      if (welcomed) { conn.dispatch(data); return }
      if (!isWelcome(data)) {
        reject(new Error('expected a welcome, got ' + String(data).slice(0, 80)))
        ws.terminate()
        return
      }
      welcomed = true
      conn.on(onMessage)
      resolve({ conn, latency: now() - started })
    })
    ws.on('close', (code, reason) => {
      if (!welcomed) reject(new Error(`closed before welcome: ${code} ${reason}`))
      else if (!closing) failure(`closed: ${code} ${reason}`)
    })
    ws.on('error', (err) => {
      if (!welcomed) reject(err)
      else if (!closing) failure(String(err))
    })
  })
}

function isWelcome (data) {
  try {
    const msg = JSON.parse(data)
    return Array.isArray(msg) && msg[0] === '~wse:welcome'
  } catch (e) {
    return false
  }
}

function openRaw (identity, onMessage) {
  return new Promise((resolve, reject) => {
    const started = now()
    const sock = net.connect({ host, port })
    sock.setNoDelay(true)
    const conn = new RawConn(sock)
    let state = 0 // 0: HTTP response, 1: waiting for the welcome, 2: open
    let buf = null
    const fail = (msg) => {
      if (state < 2) reject(new Error(msg))
      else if (!closing) failure(msg)
      conn.open = false
      sock.destroy()
    }
    sock.on('connect', () => {
      sock.write(`GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\n` +
        `Connection: Upgrade\r\nSec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\n` +
        `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ${PROTOCOL}\r\n\r\n`)
    })
    sock.on('data', (chunk) => {
      buf = buf === null ? chunk : Buffer.concat([buf, chunk])
      if (state === 0) {
        const end = buf.indexOf('\r\n\r\n')
        if (end < 0) return
        const head = buf.toString('latin1', 0, end)
        if (!head.startsWith('HTTP/1.1 101')) return fail('upgrade refused: ' + head.split('\r\n')[0])
        if (!PROTO_RE.test(head)) return fail('the server did not select ' + PROTOCOL)
        buf = buf.subarray(end + 4)
        state = 1
        conn.send(HI(identity))
      }
      let off = 0
      const n = buf.length
      while (n - off >= 2) {
        const b1 = buf[off + 1]
        if (b1 & 0x80) return fail('masked frame from the server')
        let len = b1 & 0x7f
        let hdr = 2
        if (len === 126) {
          if (n - off < 4) break
          len = buf.readUInt16BE(off + 2); hdr = 4
        } else if (len === 127) {
          if (n - off < 10) break
          len = Number(buf.readBigUInt64BE(off + 2)); hdr = 10
        }
        if (n - off < hdr + len) break
        const op = buf[off] & 0x0f
        if (!(buf[off] & 0x80)) return fail('fragmented frame (not expected from these servers)')
        const payload = buf.subarray(off + hdr, off + hdr + len)
        off += hdr + len
        if (op === 0x1 || op === 0x2) {
          if (state === 2) conn.dispatch(payload)
          else if (isWelcome(payload)) {
            state = 2
            conn.on(onMessage)
            resolve({ conn, latency: now() - started })
          } else return fail('expected a welcome, got ' + payload.toString().slice(0, 80))
        } else if (op === 0x8) {
          const code = len >= 2 ? payload.readUInt16BE(0) : 1005
          const reason = payload.toString('utf8', 2)
          if (conn.open) { conn.open = false; sock.end(frame(0x8, payload.subarray(0, 2))) }
          if (state < 2) reject(new Error(`closed before welcome: ${code} ${reason}`))
          else if (!closing) failure(`closed: ${code} ${reason}`)
          return
        } else if (op === 0x9) {
          sock.write(frame(0xa, payload))
        }
      }
      buf = off === n ? null : buf.subarray(off)
    })
    sock.on('error', (err) => fail(String(err)))
    sock.on('close', () => {
      if (state < 2) reject(new Error('socket closed before welcome'))
      else if (conn.open && !closing) failure('socket closed')
      conn.open = false
    })
  })
}

// Open n connections with at most `concurrency` handshakes in flight. conns[i] is the
// connection of identityOf(i) / onMessageOf(i) (undefined when it failed).
async function openMany (n, identityOf, onMessageOf, kind) {
  const conns = new Array(n)
  const latencies = []
  let next = 0
  let failed = 0
  async function lane () {
    while (next < n) {
      const i = next++
      try {
        const c = await open(identityOf(i), onMessageOf(i), kind)
        conns[i] = c.conn
        latencies.push(c.latency)
      } catch (e) {
        failed++
        lastError = String(e)
      }
    }
  }
  const lanes = []
  for (let k = 0; k < Math.min(concurrency, n); k++) lanes.push(lane())
  await Promise.all(lanes)
  return { conns, open: conns.filter(Boolean), latencies, failed }
}

// One RPC outside the measured loops. Answers are recognised by their stamp.
let callSeq = 0
function call (conn, rp, payload, timeoutMs = 60000) {
  return new Promise((resolve, reject) => {
    const stamp = 'c' + (++callSeq) + 'x' + ((Math.random() * 1e9) >>> 0)
    const timer = setTimeout(() => { conn.off(onMsg); reject(new Error(`rpc ${rp} timed out`)) }, timeoutMs)
    const onMsg = (data) => {
      if (data[0] !== 0x5b || data[2] !== 0x7e) return // not ["~...
      const msg = JSON.parse(data)
      if (msg[2] !== stamp) return
      clearTimeout(timer)
      conn.off(onMsg)
      if (msg[0] === '~wse:response') resolve(msg[1])
      else reject(new Error('rpc error: ' + JSON.stringify(msg[1])))
    }
    conn.on(onMsg)
    conn.send(JSON.stringify([rp, payload, stamp]))
  })
}

function percentile (sorted, p) {
  if (!sorted.length) return null
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1))
  return sorted[idx]
}

function latencyStats (values) {
  const s = Float64Array.from(values).sort()
  return { p50_ms: percentile(s, 50), p99_ms: percentile(s, 99), max_ms: s.length ? s[s.length - 1] : null }
}

// Run `windows` times: "ready" (wait), warm(), "start", measure() -> figures, "end", cool().
async function measureWindows ({ warm, measure, cool, mode, count }) {
  const results = []
  for (let w = 0; w < (count || windows); w++) {
    await event('ready', { window: w })
    await warm()
    const extra = mode ? { window: w, mode } : { window: w }
    await event('start', extra)
    const start = now()
    const fig = await measure(start)
    fig.window_s = (fig.end - start) / 1000
    delete fig.end
    fig.rate = fig.ops / fig.window_s
    await event('end', Object.assign({ ops: fig.ops }, extra))
    if (cool) await cool()
    results.push(fig)
  }
  return results
}

const PAYLOAD = { n: 1, text: 'hello wse' }

// ---------------------------------------------------------------- closed loops (rpc, msg)
async function closedLoop (kind) {
  const n = num('conns', 50)
  let measuring = false
  let running = false
  let inflight = 0
  let ops = 0
  let lat = new Float64Array(1 << 16)
  let nlat = 0
  const record = (ms) => {
    if (nlat === lat.length) { const b = new Float64Array(lat.length * 2); b.set(lat); lat = b }
    lat[nlat++] = ms
  }
  const starters = []
  const handlers = []
  const opened = await openMany(n, (i) => `${kind}${i}`, (i) => (data) => handlers[i](data), 'ws')
  if (opened.failed) return finish({ error: `${opened.failed} connections failed: ${lastError}` }, 2)
  opened.conns.forEach((conn, i) => {
    let seq = 0
    let stamp = null
    let sent = 0
    const fire = () => {
      inflight++
      sent = now()
      if (kind === 'rpc') {
        stamp = 's' + (++seq)
        conn.send(JSON.stringify(['echo', PAYLOAD, stamp]))
      } else {
        conn.send(JSON.stringify(['ping', PAYLOAD, null]))
      }
    }
    handlers[i] = (data) => {
      const msg = JSON.parse(data)
      if (kind === 'rpc' ? (msg[0] !== '~wse:response' || msg[2] !== stamp) : msg[0] !== 'pong') {
        failure('unexpected ' + String(data).slice(0, 100))
        return
      }
      inflight--
      if (measuring) { ops++; record(now() - sent) }
      if (running) fire()
    }
    starters.push(fire)
  })
  const results = await measureWindows({
    warm: async () => {
      running = true
      for (const fire of starters) fire()
      await sleep(warmup * 1000)
      ops = 0
      nlat = 0
      measuring = true
    },
    measure: async (start) => {
      await sleep(Math.max(0, duration * 1000 - (now() - start)))
      const end = now()
      measuring = false
      return Object.assign({ ops, end }, latencyStats(lat.subarray(0, nlat)))
    },
    cool: async () => { // stop issuing; wait for the calls in flight
      running = false
      const deadline = now() + 30000
      while (inflight > 0 && now() < deadline) await sleep(2)
    }
  })
  closing = true
  finish({ conns: n, windows: results, errors, last_error: lastError })
}

// ---------------------------------------------------------------- fanout
async function fanout () {
  const R = num('receivers', 2000)
  const C = num('count', 10)
  let received = 0
  let lastAt = 0
  const onTick = (data) => {
    // ["tick",i,null]: counted without parsing (the generator must stay cheap)
    if (data[2] === 0x74) { received++; lastAt = now() } else if (data[2] !== 0x7e) failure('unexpected ' + String(data).slice(0, 80))
  }
  let opened
  let connectFig = null
  if (args['measure-connect']) {
    // the receivers' handshakes are the "connect" figure: a window of their own
    connectFig = (await measureWindows({
      count: 1,
      warm: () => warmConnections(num('warm-conns', 20)),
      measure: async () => {
        opened = await openMany(R, (i) => `r${i}`, () => onTick, bulkClient)
        return Object.assign({ end: now(), ops: opened.open.length, failed: opened.failed },
          latencyStats(opened.latencies))
      }
    }))[0]
  } else {
    opened = await openMany(R, (i) => `r${i}`, () => onTick, bulkClient)
  }
  if (opened.failed) return finish({ error: `${opened.failed} receivers failed: ${lastError}` }, 2)
  let trig
  try {
    trig = (await open('trigger', onTick, 'ws')).conn
  } catch (e) {
    return finish({ error: 'trigger: ' + e }, 2)
  }
  const sockets = R + 1 // the trigger gets the broadcast too
  async function round () {
    const goal = received + C * sockets
    const t = now()
    const res = await call(trig, 'fanout', { count: C })
    if (res !== C) throw new Error('fanout answered ' + JSON.stringify(res))
    const deadline = t + 60000
    while (received < goal) {
      if (now() > deadline) throw new Error(`round stuck: ${goal - received} ticks missing`)
      await sleep(1)
    }
    if (received !== goal) throw new Error('more ticks than expected')
    return lastAt - t
  }
  try {
    const results = await measureWindows({
      warm: async () => {
        const wEnd = now() + warmup * 1000
        do await round(); while (now() < wEnd)
      },
      measure: async (start) => {
        const rounds = []
        do rounds.push(await round()); while (now() - start < duration * 1000 || rounds.length < 3)
        const s = Float64Array.from(rounds).sort()
        return {
          end: now(), rounds: rounds.length, ops: rounds.length * C * sockets,
          round_p50_ms: percentile(s, 50), round_max_ms: s[s.length - 1], tick_ms: percentile(s, 50) / C
        }
      }
    })
    closing = true
    finish({ receivers: R, count: C, client: bulkClient, connect: connectFig, windows: results, errors, last_error: lastError })
  } catch (e) {
    finish({ error: String(e) }, 2)
  }
}

// ---------------------------------------------------------------- connect
// Open and close a few connections (the server's first ones cost more), then rest.
async function warmConnections (n) {
  const warm = await openMany(n, (i) => `w${i}`, () => () => {}, bulkClient)
  if (warm.failed) throw new Error(`warm-up connections failed: ${lastError}`)
  closing = true
  for (const c of warm.open) c.close()
  await sleep(Math.max(100, warmup * 1000))
  closing = false
}

async function connect () {
  const N = num('conns', 2000)
  let opened
  const results = await measureWindows({
    warm: () => warmConnections(num('warm-conns', 20)),
    measure: async () => {
      opened = await openMany(N, (i) => `c${i}`, () => () => {}, bulkClient)
      // the runner reads CPU at "end", lets the server settle, reads its memory, then says go
      return Object.assign({ end: now(), ops: opened.open.length, failed: opened.failed },
        latencyStats(opened.latencies))
    }
  })
  const stillOpen = opened.open.filter((c) => c.isOpen).length
  closing = true
  finish({ conns: N, client: bulkClient, still_open: stillOpen, windows: results, errors, last_error: lastError })
}

// ---------------------------------------------------------------- cross
async function cross () {
  const R = num('receivers', 100)
  const C = num('count', 20)
  let received = 0
  const onTick = (data) => {
    if (data[2] === 0x74) received++
    else if (data[2] !== 0x7e) failure('unexpected ' + String(data).slice(0, 80)) // ~wse:response: call()'s
  }
  // place sockets: receivers and the local trigger on worker A, the remote trigger on B
  const receivers = []
  const cids = []
  let pidA = null
  let local = null
  let remote = null
  const extra = []
  let j = 0
  const maxAttempts = 6 * R + 200
  while ((receivers.length < R || !local || !remote) && j < maxAttempts) {
    const batch = []
    const k = Math.min(concurrency, 2 * (R - receivers.length) + 4)
    for (let b = 0; b < k; b++, j++) {
      const id = `x${j}`
      batch.push(open(id, onTick, bulkClient).then(async (c) => ({ id, conn: c.conn, pid: await call(c.conn, 'pid', null) })))
    }
    for (const r of await Promise.allSettled(batch)) {
      if (r.status !== 'fulfilled') { lastError = String(r.reason); continue }
      const c = r.value
      if (pidA === null) pidA = c.pid
      if (c.pid === pidA && !local) local = c
      else if (c.pid === pidA && receivers.length < R) { receivers.push(c); cids.push(c.id) } else if (c.pid !== pidA && !remote) remote = c
      else extra.push(c)
    }
  }
  closing = true
  for (const c of extra) c.conn.close()
  await sleep(200)
  closing = false
  if (receivers.length < R || !local || !remote) {
    return finish({ error: `could not place sockets: ${receivers.length}/${R} receivers, local=${!!local}, remote=${!!remote} (does the server run 2 workers?) ${lastError || ''}` }, 2)
  }
  async function round (trigger) {
    const goal = received + C * R
    const t = now()
    const res = await call(trigger.conn, 'send_to', { cids, count: C })
    if (res !== C * R) throw new Error('send_to answered ' + JSON.stringify(res))
    const deadline = t + 60000
    while (received < goal) {
      if (now() > deadline) throw new Error(`round stuck: ${goal - received} ticks missing`)
      await sleep(1)
    }
    if (received !== goal) throw new Error('more ticks than expected')
    return now() - t
  }
  const phase = (trigger) => ({
    warm: async () => {
      const wEnd = now() + warmup * 1000
      do await round(trigger); while (now() < wEnd)
    },
    measure: async (start) => {
      const rounds = []
      do rounds.push(await round(trigger)); while (now() - start < duration * 1000 || rounds.length < 3)
      const s = Float64Array.from(rounds).sort()
      return { end: now(), rounds: rounds.length, ops: rounds.length * C * R, round_p50_ms: percentile(s, 50) }
    }
  })
  const results = []
  try {
    // each window: the local phase, then the remote one
    const nWindows = windows
    for (let w = 0; w < nWindows; w++) {
      const fig = {}
      for (const [mode, trigger] of [['local', local], ['remote', remote]]) {
        const p = phase(trigger)
        await event('ready', { window: w, mode })
        await p.warm()
        await event('start', { window: w, mode })
        const start = now()
        const f = await p.measure(start)
        f.window_s = (f.end - start) / 1000
        delete f.end
        f.rate = f.ops / f.window_s
        await event('end', { window: w, mode, ops: f.ops })
        fig[mode] = f
      }
      results.push(fig)
    }
  } catch (e) {
    return finish({ error: String(e) }, 2)
  }
  closing = true
  finish({ receivers: R, count: C, client: bulkClient, pid_a: pidA, pid_b: remote.pid, windows: results, errors, last_error: lastError })
}

// ---------------------------------------------------------------- probe
async function probe () {
  const want = num('expect-pids', 0)
  const pids = new Set()
  const deadline = now() + num('timeout', 30) * 1000
  let attempt = 0
  while (now() < deadline) {
    try {
      const c = await open(`probe${attempt++}`, () => {}, 'ws')
      if (want) pids.add(await call(c.conn, 'pid', null, 5000))
      closing = true
      c.conn.close()
      closing = false
      if (pids.size >= want) return finish({ ok: true, pids: [...pids] })
    } catch (e) {
      lastError = String(e)
      await sleep(100)
    }
  }
  finish({ ok: false, pids: [...pids], error: lastError }, 2)
}

const scenarios = { rpc: () => closedLoop('rpc'), msg: () => closedLoop('msg'), fanout, connect, cross, probe }
if (!scenarios[scenario]) {
  process.stderr.write(`unknown scenario ${scenario}\n`)
  process.exit(2)
}
scenarios[scenario]().catch((e) => finish({ error: String(e && e.stack ? e.stack : e) }, 2))
