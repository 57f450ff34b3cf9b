/**
 * Drives a wse_sync server (tests/apps/node_app.py) with Node's `ws`, partly
 * through the shipped JavaScript client (wse_sync/static/wse.js, given the
 * `ws` constructor as its WebSocket option), and prints one JSON line per flow
 * with what it observed. The assertions live in tests/processes/test_node_protocol.py.
 *
 *   node flows.mjs ws://127.0.0.1:PORT/ ws://127.0.0.1:CRA_PORT/ [flow ...]
 *
 * The first URL serves `server` (no challenge), the second `cra_server`
 * (challenge-response on). Each flow is bounded by WSE_FLOW_TIMEOUT_MS.
 * WSE_CLIENT_JS names the client module to test (a path; default the one of
 * this source tree): the tests pass the file of the wse_sync they import.
 */
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import WS from 'ws'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const CLIENT_JS = process.env.WSE_CLIENT_JS || path.join(HERE, '..', '..', 'wse_sync', 'static', 'wse.js')
const { WseClient: ShippedClient, WseError } = await import(pathToFileURL(path.resolve(CLIENT_JS)).href)

/** The shipped client on Node's `ws` (Node 20 has no global WebSocket). */
class WseClient extends ShippedClient {
  constructor (options) {
    super({ WebSocket: WS, ...options })
  }
}

const [URL_PLAIN, URL_CRA, ...ONLY] = process.argv.slice(2)
const FLOW_MS = Number(process.env.WSE_FLOW_TIMEOUT_MS || 10000)
const UID = `${process.pid}-${Date.now().toString(36)}`
const PROTOCOL = 'wse-default-json'

let counter = 0
const unique = prefix => `${prefix}-${UID}-${++counter}`
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

/** Poll `pred` until truthy (returns its value); throws after `ms`. */
async function until (pred, what, ms = FLOW_MS / 2) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = pred()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(5)
  }
}

function errorInfo (err) {
  if (err instanceof WseError) return { code: err.code, details: err.details === undefined ? null : err.details }
  if (typeof err === 'string') return { rejected_with: err }
  return { message: String(err && err.message) }
}

/** A plain `ws` socket that records everything. protocols === null: none requested. */
function rawPeer (url, protocols = PROTOCOL) {
  const ws = protocols === null ? new WS(url) : new WS(url, protocols)
  const peer = { ws, frames: [], opened: false, protocol: null, header: null, error: null, close: null }
  ws.on('upgrade', res => {
    const h = res.headers['sec-websocket-protocol']
    peer.header = h === undefined ? null : h
  })
  ws.on('open', () => {
    peer.opened = true
    peer.protocol = ws.protocol
  })
  ws.on('message', (data, isBinary) => {
    peer.frames.push(isBinary ? { binary_hex: Buffer.from(data).toString('hex') } : data.toString('utf8'))
  })
  ws.on('error', err => {
    peer.error = err.message
  })
  ws.on('close', (code, reason) => {
    peer.close = { code, reason: reason.toString('utf8'), reason_hex: reason.toString('hex') }
  })
  peer.settled = () => until(() => peer.opened || peer.close, 'open or close')
  peer.closed = () => until(() => peer.close, 'the close event')
  peer.frame = n => until(() => peer.frames.length > n && peer.frames[n], `frame #${n}`)
  peer.sendFrame = (type, payload, stamp) => ws.send(JSON.stringify([type, payload, stamp]))
  return peer
}

/** A raw peer that has been welcomed as `identity`; resolves with {peer, welcome}. */
async function rawWelcomed (identity, url = URL_PLAIN) {
  const peer = rawPeer(url)
  await peer.settled()
  peer.sendFrame('~wse:hi', { identity, meta: {} })
  const frame = await peer.frame(0)
  const [type, welcome] = JSON.parse(frame)
  if (type !== '~wse:welcome') throw new Error(`expected a welcome, got ${frame}`)
  return { peer, welcome }
}

/** A WseClient whose frames, closes and statuses are recorded. */
function traced (url = URL_PLAIN, options = {}) {
  const rec = { frames: [], closes: [], statuses: [], welcomes: [] }
  rec.client = new WseClient({ url, trace: (dir, data) => rec.frames.push([dir, String(data)]), ...options })
  rec.client.when.closed((code, reason) => rec.closes.push([code, reason]))
  rec.client.when.updated(status => rec.statuses.push(status))
  rec.client.when.ready(welcome => rec.welcomes.push(welcome))
  return rec
}

/** Ask the plain (or CRA) server `rp` through a fresh client until `pred(result)`. */
async function probe (rp, payload, pred = () => true, url = URL_PLAIN) {
  const client = new WseClient({ url })
  client.challenge((quest, solve) => solve(quest.a + quest.b))
  await client.connect(unique('probe'))
  try {
    const deadline = Date.now() + FLOW_MS / 2
    for (;;) {
      const value = await client.call(rp, payload)
      if (pred(value) || Date.now() > deadline) return value
      await sleep(20)
    }
  } finally {
    client.close()
  }
}

async function closeClient (rec) {
  if (!rec.client._ws) return
  const n = rec.closes.length
  rec.client.close()
  await until(() => rec.closes.length > n, 'the client close')
}

// -- flows -------------------------------------------------------------------
async function handshake (protocols) {
  const p = rawPeer(URL_PLAIN, protocols)
  await p.settled()
  if (p.opened) p.ws.close(1000)
  await p.closed()
  return { opened: p.opened, protocol: p.protocol, header: p.header, error: p.error, close: p.close, frames: p.frames }
}

async function connectOutcome (identity, url = URL_PLAIN, solver = null, options = {}) {
  const rec = traced(url, options)
  if (solver) rec.client.challenge(solver)
  let welcome = null
  let welcomed = false
  let error = null
  try {
    welcome = await rec.client.connect(identity)
    welcomed = true
  } catch (err) {
    error = errorInfo(err)
  }
  if (welcomed) await closeClient(rec)
  else await until(() => rec.closes.length, 'the close')
  return { welcomed, welcome, error, closes: rec.closes, frames: rec.frames, statuses: rec.statuses }
}

async function callOutcome (rp, payload) {
  const rec = traced()
  await rec.client.connect(unique(rp))
  let result = null
  let error = null
  try {
    result = await rec.client.call(rp, payload)
  } catch (err) {
    error = errorInfo(err)
  }
  await closeClient(rec)
  return { result, error, frames: rec.frames }
}

async function beforeHi (text) {
  const p = rawPeer(URL_PLAIN)
  await p.settled()
  p.ws.send(text)
  await p.closed()
  return { opened: p.opened, frames: p.frames, close: p.close }
}

async function badAfterWelcome (data, options = {}) {
  const { peer, welcome } = await rawWelcomed(unique('bad'))
  peer.ws.send(data, options)
  await peer.closed()
  const errors = await probe('errors_of', welcome.conn_id, v => v.length > 0)
  return { frames: peer.frames.slice(1), close: peer.close, errors }
}

async function dropFlow (type, payload) {
  const { peer, welcome } = await rawWelcomed(unique('drop'))
  peer.sendFrame(type, payload)
  await peer.closed()
  const disconnected = await probe('disconnect_of', welcome.conn_id, v => v !== null)
  return { frames: peer.frames.slice(1), close: peer.close, disconnected }
}

const ECHO_PAYLOAD = {
  s: 'a/b é ✓ \u2028 "q" \\ \n \t \u0001 \u007f 😀 </script>',
  n: 12345678901,
  neg: -5,
  f: 0.5,
  arr: [true, false, null, [], {}],
  nested: { k: [1, 'two'], empty: '' },
}

const FLOWS = {
  subprotocol: () => handshake(PROTOCOL),
  subprotocol_among_others: () => handshake(['chat.v9', PROTOCOL]),
  wrong_subprotocol: () => handshake('not-wse'),
  no_subprotocol: () => handshake(null),

  async welcome () {
    const identity = unique('welcome')
    const out = await connectOutcome(identity)
    return { identity, ...out }
  },

  async meta () {
    const meta = { device: 'phone', tags: ['a', 'b'], n: 7, nested: { ok: true } }
    const rec = traced()
    const welcome = await rec.client.connect(unique('meta'), meta)
    const whoami = await rec.client.call('whoami')
    await closeClient(rec)
    return { sent_meta: meta, welcome, whoami, hi: rec.frames[0] }
  },

  async meta_default () {
    const rec = traced()
    const welcome = await rec.client.connect()
    const whoami = await rec.client.call('whoami')
    await closeClient(rec)
    return { welcome, whoami, hi: rec.frames[0] }
  },

  refused: () => connectOutcome('bad'),
  accept_falsy: () => connectOutcome('falsy'),
  identify_raises: () => connectOutcome('raise'),
  // a refusal closes with 1000, which nothing retries: connect() settles even with re on
  refused_with_re: () => connectOutcome('bad', URL_PLAIN, null, { re: true }),

  async cra_pass () {
    const quests = []
    const identity = unique('cra-ok')
    const out = await connectOutcome(identity, URL_CRA, (quest, solve) => {
      quests.push(quest)
      solve(quest.a + quest.b)
    })
    return { identity, quests, ...out }
  },

  async cra_fail () {
    const quests = []
    const out = await connectOutcome(unique('cra-wrong'), URL_CRA, (quest, solve) => {
      quests.push(quest)
      solve(quest.a + quest.b + 1)
    })
    return { quests, ...out }
  },

  async cra_refused () {
    const quests = []
    const out = await connectOutcome('cra-refuse', URL_CRA, (quest, solve) => {
      quests.push(quest)
      solve(quest.a + quest.b)
    })
    const identified = await probe('identified', null, () => true, URL_CRA)
    return { quests, identified, ...out }
  },

  async cra_other_message_when_challenged () {
    // the reference closes with wse.protocol-error on anything but ~wse:challenge here
    const p = rawPeer(URL_CRA)
    await p.settled()
    p.sendFrame('~wse:hi', { identity: unique('cra-chatty'), meta: {} })
    const quest = JSON.parse(await p.frame(0))[1]
    p.sendFrame('poke')
    p.sendFrame('~wse:challenge', quest.a + quest.b)
    await until(() => p.close || p.frames.length > 1, 'a close or a welcome')
    if (!p.close) p.ws.close(1000)
    await p.closed()
    return { frames: p.frames, close: p.close }
  },

  welcome_null: () => connectOutcome('no-welcome-payload'),

  async identity_object () {
    const identity = { user: unique('obj'), token: 't/1', list: [1, 2] }
    const rec = traced()
    const welcome = await rec.client.connect(identity)
    const whoami = await rec.client.call('whoami')
    await closeClient(rec)
    return { sent_identity: identity, welcome, whoami }
  },

  async clients_concurrency () {
    const identity = unique('twice')
    const a = traced()
    const b = traced()
    const wa = await a.client.connect(identity)
    const wb = await b.client.connect(identity)
    await until(() => a.closes.length, 'the close of the older connection')
    const whoami = await b.client.call('whoami')
    await closeClient(b)
    return { first: wa, second: wb, older_closes: a.closes, newer_whoami: whoami }
  },

  rpc_ok: () => callOutcome('echo', { a: 1, s: 'x/é', list: [1, null] }),
  rpc_null_result: () => callOutcome('nothing', 5),
  rpc_not_registered: () => callOutcome('no_such_rp', 1),
  rpc_wse_error: () => callOutcome('fail_wse', { x: 1 }),
  rpc_wse_error_own_rpc: () => callOutcome('fail_wse_own_rpc', 'p'),
  rpc_exception: () => callOutcome('fail_plain', { y: 2 }),

  async server_calls_client () {
    const rec = traced()
    const c = rec.client
    c.register('js_add', ({ a, b }) => a + b)
    c.register('js_async', async payload => {
      await sleep(20)
      return { later: payload }
    })
    c.register('js_throw', () => {
      throw new Error('js boom')
    })
    c.register('js_throw_obj', () => {
      // eslint-disable-next-line no-throw-literal
      throw { field: 1 }
    })
    c.register('js_throw_wse', () => {
      throw new WseError('js.custom', { k: 1 })
    })
    const answers = []
    c.channel.on('asked', payload => answers.push(payload))
    await c.connect(unique('callee'))
    const asks = [
      ['js_add', { a: 1, b: 2 }],
      ['js_async', 'p'],
      ['js_missing', 1],
      ['js_throw', null],
      ['js_throw_obj', null],
      ['js_throw_wse', null],
    ]
    for (const [rp, payload] of asks) {
      const n = answers.length
      c.send('ask', { rp, payload })
      await until(() => answers.length > n, `the answer about ${rp}`)
    }
    await closeClient(rec)
    return { answers, frames: rec.frames }
  },

  async send_null () {
    const rec = traced()
    const got = []
    rec.client.channel.on('x', payload => got.push(payload === undefined ? 'undefined' : payload))
    await rec.client.connect(unique('poke'))
    rec.client.send('poke')
    await until(() => got.length >= 2, 'two x messages')
    await closeClient(rec)
    return { got, frames: rec.frames }
  },

  async channel_echo_exact () {
    const rec = traced()
    const got = []
    rec.client.channel.on('echoed', payload => got.push(payload))
    await rec.client.connect(unique('echo'))
    rec.client.send('echo', ECHO_PAYLOAD)
    await until(() => got.length, 'the echo')
    await closeClient(rec)
    const expected = JSON.stringify(['echoed', ECHO_PAYLOAD, null])
    const received = rec.frames.filter(([dir]) => dir === 'in').map(([, data]) => data)
    return { expected, received, same_bytes: received.includes(expected) }
  },

  async ignored_event () {
    const { peer, welcome } = await rawWelcomed(unique('ign'))
    peer.sendFrame('nobody_listens', { z: 1 })
    const ignored = await probe('ignored_of', welcome.conn_id, v => v.length > 0)
    peer.ws.close(1000)
    await peer.closed()
    return { ignored, frames: peer.frames.slice(1) }
  },

  msg_before_hi: () => beforeHi('["hello",null,null]'),
  challenge_before_hi: () => beforeHi('["~wse:challenge",5,null]'),
  rpc_before_hi: () => beforeHi('["echo",1,"abcdefghij"]'),
  non_json_before_hi: () => beforeHi('not json at all'),

  non_json: () => badAfterWelcome('this is {not json'),
  not_an_array: () => badAfterWelcome('{"type":"x"}'),
  empty_type: () => badAfterWelcome('["",1,null]'),

  async binary_json () {
    const { peer } = await rawWelcomed(unique('bin'))
    peer.ws.send(Buffer.from('["poke",null,null]', 'utf8'), { binary: true })
    await peer.frame(2)
    peer.ws.close(1000)
    await peer.closed()
    return { frames: peer.frames.slice(1), close: peer.close }
  },

  numeric_stamp: () => badAfterWelcome('["echo",1,5]'),
  numeric_type: () => badAfterWelcome('[5,null,null]'),
  binary_garbage: () => badAfterWelcome(Buffer.from([0xff, 0xfe, 0x00]), { binary: true }),

  async unmatched_response () {
    // an answer to a call nobody made is dropped silently; the connection stays usable
    const { peer } = await rawWelcomed(unique('unmatched'))
    peer.sendFrame('~wse:response', 1, 'zzzzzzzzzz')
    peer.sendFrame('~wse:response-err', { code: 'x' }, 'yyyyyyyyyy')
    peer.sendFrame('poke')
    await peer.frame(2)
    peer.ws.close(1000)
    await peer.closed()
    return { frames: peer.frames.slice(1), close: peer.close }
  },

  async too_big () {
    const { peer } = await rawWelcomed(unique('big'))
    peer.ws.send(JSON.stringify(['echo', 'x'.repeat(1024 * 1024 + 10), null]))
    await peer.closed()
    return { frames: peer.frames.slice(1), close: peer.close, error: peer.error }
  },

  drop_default: () => dropFlow('drop_me'),
  drop_custom_reason: () => dropFlow('drop_me', 'custom reason ✓'),
  drop_long_reason: () => dropFlow('drop_me', 'é'.repeat(100)),
  drop_client: () => dropFlow('drop_client'),

  async client_close_code () {
    const { peer, welcome } = await rawWelcomed(unique('closer'))
    peer.ws.close(4321, 'bye-bye')
    await peer.closed()
    const disconnected = await probe('disconnect_of', welcome.conn_id, v => v !== null)
    return { close: peer.close, disconnected }
  },

  async client_close_default () {
    const rec = traced()
    const welcome = await rec.client.connect(unique('wse-closer'))
    await closeClient(rec)
    const disconnected = await probe('disconnect_of', welcome.conn_id, v => v !== null)
    return { closes: rec.closes, disconnected }
  },

  async jump () {
    const rec = traced()
    const first = await rec.client.connect(unique('jumper'))
    const target = URL_PLAIN.replace(/\/?$/, '/jumped')
    const second = await rec.client.jump(target)
    const whoami = await rec.client.call('whoami')
    const disconnected = await probe('disconnect_of', first.conn_id, v => v !== null)
    const url = rec.client.url
    await closeClient(rec)
    return { first, second, whoami, disconnected, closes: rec.closes, url, target, statuses: rec.statuses }
  },

  async reconnect_1012 () {
    const rec = traced(URL_PLAIN, { re: true })
    const first = await rec.client.connect(unique('re'))
    rec.client.send('restart_me')
    await until(() => rec.welcomes.length >= 2, 'the second welcome')
    const whoami = await rec.client.call('whoami')
    await closeClient(rec)
    return { first, welcomes: rec.welcomes, whoami, closes: rec.closes, statuses: rec.statuses }
  },
}

async function main () {
  if (!URL_PLAIN || !URL_CRA) {
    process.stderr.write('usage: node flows.mjs PLAIN_URL CRA_URL [flow ...]\n')
    process.exit(2)
  }
  const names = ONLY.length ? ONLY : Object.keys(FLOWS)
  for (const name of names) {
    let out
    let timer
    try {
      const run = FLOWS[name]
      if (!run) throw new Error(`unknown flow ${name}`)
      out = await Promise.race([
        run(),
        new Promise((resolve, reject) => {
          timer = setTimeout(() => reject(new Error(`flow timed out after ${FLOW_MS} ms`)), FLOW_MS)
        }),
      ])
    } catch (err) {
      out = { flow_error: String((err && err.stack) || err) }
    } finally {
      clearTimeout(timer)
    }
    process.stdout.write(JSON.stringify({ flow: name, ...out }) + '\n')
  }
  process.exit(0)
}

main()
