/**
 * wse.js: the JavaScript client of wse_sync (and of any wse 4.x server), with
 * the API of the wse 4.x JavaScript WseClient. One dependency-free ES module
 * for browsers and Node >= 18; shipped in the wse_sync wheel as
 * wse_sync/static/wse.js.
 *
 *   import { WseClient } from './wse.js'
 *   const client = new WseClient({ url: 'ws://host/ws', re: true, tO: 20 })
 *   client.channel.on('chat', payload => ...)          // server -> client messages
 *   client.when.ready(welcome => ...)                  // also: connected, closed(code, reason),
 *                                                      //   error(err), updated(status), ignored(type, payload)
 *   client.register('ping', payload => 'pong')         // server -> client RPC
 *   client.challenge((quest, solve) => solve(answer))  // challenge-response auth
 *   const welcome = await client.connect(identity, meta)
 *   client.send('say', 'hello')
 *   const result = await client.call('who', null)      // client -> server RPC (Promise)
 *   client.close()  ·  client.jump(url, identity, meta)  ·  client.status
 *
 * The WebSocket: globalThis.WebSocket (browsers, Node >= 22), or the
 * constructor given as the `WebSocket` option, e.g. on Node 18/20:
 *
 *   import WebSocket from 'ws'
 *   const client = new WseClient({ url, WebSocket })
 *
 * Options other than url, tO, re, protocol, WebSocket and trace go to that
 * constructor as its third argument (the `ws` package takes headers, TLS
 * options...; browsers ignore it).
 *
 * On the wire, as the original: subprotocol 'wse-default-json'; frames are
 * JSON [type, payload, stamp] (undefined -> null); ['~wse:hi', {identity, meta}]
 * on open; before the welcome only '~wse:challenge' and '~wse:welcome' are
 * looked at; RPC answers '~wse:response' / '~wse:response-err' with the call's
 * stamp, errors normalised like the original RpcManager.normalizeError. With
 * `re: true` it reconnects (1 to 2 s later) after closes with codes 1005,
 * 1006, 1011, 1012 (server restart), 1013, 1014 and 4000 (jump).
 *
 * Debugging aid: option `trace(direction, data)` is called with 'out' or 'in'
 * and every frame exactly as it goes over the socket.
 *
 * Node 18/20 load a .js file as an ES module only inside a package of
 * "type": "module": the package.json beside this file says so.
 */

export const WSE_REASON = Object.freeze({
  NO_REASON: '',
  CLIENTS_CONCURRENCY: 'wse.clients-concurrency',
  NOT_AUTHORIZED: 'wse.not-authorized',
  PROTOCOL_ERR: 'wse.protocol-error',
  BY_CLIENT: 'wse.by-client',
  BY_SERVER: 'wse.by-server',
})

export const WSE_STATUS = Object.freeze({
  IDLE: 'IDLE',
  OFFLINE: 'OFFLINE',
  READY: 'READY',
  CONNECTING: 'CONNECTING',
  RE_CONNECTING: 'RE_CONNECTING',
})

export const WSE_ERROR = Object.freeze({
  INVALID_CRA_HANDLER: 'wse.client.invalid-cra-handler',
  RP_TIMEOUT: 'wse.client.rp.timeout',
  RP_DISCONNECT: 'wse.client.rp.disconnect',
  CLIENT_ALREADY_CONNECTED: 'wse.client.already-connected',
  WS_CLIENT_ERROR: 'wse.client.ws-error',
  NOT_AUTHORIZED: 'wse.not-authorized',
  CONNECTION_NOT_READY: 'wse.client.not-ready',
  NO_CLIENT_CONNECTION: 'wse.server.client.connection-missing',
  IDENTIFY_HANDLER_MISSING: 'wse.server.auth.identify-handler-missing',
  INVALID_CRA_GENERATOR: 'wse.server.auth.invalid-cra-generator',
  RP_EXECUTION_FAILED: 'wse.server.rp.failed',
  RP_NOT_REGISTERED: 'wse.server.rp.not-registered',
  RP_ALREADY_REGISTERED: 'wse.server.rp.already-registered',
  PROTOCOL_VIOLATION: 'wse.server.protocol-violation',
  CONNECTION_ERROR: 'wse.server.connection-error',
  MESSAGE_PROCESSING_ERROR: 'wse.server.msg-processing-error',
})

/** What a missing WebSocket constructor raises (see the `WebSocket` option). */
export const NO_WEBSOCKET_MESSAGE =
  'wse.js: no WebSocket constructor. globalThis.WebSocket exists in browsers and in ' +
  'Node >= 22; on Node 18/20 pass one: `import WebSocket from \'ws\'` (npm install ws), ' +
  'then `new WseClient({ url, WebSocket })` (or run node with --experimental-websocket on 20.10+)'

const OPEN = 1 // WebSocket.OPEN, the same in every implementation
const STAMP_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'

/** 10 random characters of [A-Za-z0-9], like the reference's make_stamp(). */
export function makeStamp (len = 10) {
  let out = ''
  for (let i = 0; i < len; i++) out += STAMP_CHARS[Math.floor(Math.random() * STAMP_CHARS.length)]
  return out
}

export class WseError extends Error {
  constructor (code, details = {}) {
    super(code)
    this.type = 'wse-error'
    this.code = code
    this.details = details
  }

  toJSON () {
    return { code: this.code, details: this.details }
  }
}

/** The default protocol: [type, payload, stamp] as JSON text. */
export class WseJSON {
  constructor () {
    this.name = 'wse-default-json'
    this.internal_types = Object.freeze({
      hi: '~wse:hi',
      challenge: '~wse:challenge',
      welcome: '~wse:welcome',
      call: '~wse:call',
      response: '~wse:response',
      response_error: '~wse:response-err',
    })
  }

  pack ({ type, payload = undefined, stamp = undefined }) {
    return JSON.stringify([type, payload, stamp])
  }

  unpack (encoded) {
    return JSON.parse(encoded)
  }
}

/** A small event emitter (the `channel`): on/once/off/emit/listenerCount. */
export class Emitter {
  constructor () {
    this._events = new Map()
  }

  on (type, fn) {
    if (!this._events.has(type)) this._events.set(type, [])
    this._events.get(type).push(fn)
    return this
  }

  addListener (type, fn) {
    return this.on(type, fn)
  }

  once (type, fn) {
    const wrapped = (...args) => {
      this.off(type, wrapped)
      fn(...args)
    }
    wrapped.listener = fn
    return this.on(type, wrapped)
  }

  off (type, fn) {
    const list = this._events.get(type)
    if (list) {
      const i = list.findIndex(f => f === fn || f.listener === fn)
      if (i >= 0) list.splice(i, 1)
      if (list.length === 0) this._events.delete(type)
    }
    return this
  }

  removeListener (type, fn) {
    return this.off(type, fn)
  }

  removeAllListeners (type) {
    if (type === undefined) this._events.clear()
    else this._events.delete(type)
    return this
  }

  emit (type, ...args) {
    const list = this._events.get(type)
    if (!list || list.length === 0) return false
    for (const fn of [...list]) fn(...args)
    return true
  }

  listenerCount (type) {
    const list = this._events.get(type)
    return list ? list.length : 0
  }
}

/** A signal (as a-signal): on/once/emit; `memorable` replays the last value. */
export class Signal {
  constructor ({ memorable = false } = {}) {
    this._subs = new Set()
    this._memorable = memorable
    this._last = null
  }

  on (fn) {
    this._subs.add(fn)
    if (this._memorable && this._last) fn(...this._last)
    return { off: () => this._subs.delete(fn) }
  }

  once (fn) {
    const wrapped = (...args) => {
      this._subs.delete(wrapped)
      fn(...args)
    }
    this._subs.add(wrapped)
    return { off: () => this._subs.delete(wrapped) }
  }

  emit (...args) {
    if (this._memorable) this._last = args
    for (const fn of [...this._subs]) fn(...args)
  }

  forget () {
    this._last = null
  }

  wait () {
    return new Promise(resolve => {
      if (this._memorable && this._last) return resolve(this._last[0])
      this.once(value => resolve(value))
    })
  }
}

/** Registered procedures and pending calls. */
export class RpcManager {
  constructor () {
    this._rps = new Map()
    this._callbacks = new Map()
  }

  /** The response-err payload for an error thrown by a procedure. */
  static normalizeError (err, rpcName, rpcPayload) {
    if (err && err.code && err.details) {
      if (rpcName && !err.details.rpc) err.details.rpc = rpcName
      if (rpcPayload !== undefined && !err.details.payload) err.details.payload = rpcPayload
      return err
    }
    if (err && typeof err === 'object' && !err.message && !err.stack) {
      const details = Object.assign({}, err)
      if (rpcName) details.rpc = rpcName
      if (rpcPayload !== undefined) details.payload = rpcPayload
      return { code: WSE_ERROR.RP_EXECUTION_FAILED, message: 'RPC execution failed', details }
    }
    const details = { origin: { name: err && err.name, message: err && err.message, stack: err && err.stack } }
    if (rpcName) details.rpc = rpcName
    if (rpcPayload !== undefined) details.payload = rpcPayload
    return { code: WSE_ERROR.RP_EXECUTION_FAILED, message: (err && err.message) || 'Unexpected error', details }
  }

  register (rp, handler) {
    if (this._rps.has(rp)) throw new WseError(WSE_ERROR.RP_ALREADY_REGISTERED, { rp })
    this._rps.set(rp, handler)
  }

  unregister (rp) {
    if (!this._rps.has(rp)) throw new WseError(WSE_ERROR.RP_NOT_REGISTERED, { rp })
    this._rps.delete(rp)
  }

  has (rp) {
    return this._rps.has(rp)
  }

  get (rp) {
    return this._rps.get(rp)
  }

  handleResponse (stamp, payload, isSuccess) {
    const callback = this._callbacks.get(stamp)
    if (!callback) return false
    this._callbacks.delete(stamp)
    callback(payload, isSuccess)
    return true
  }

  call (protocol, rp, payload, timeout, sendFn, disconnectSignal) {
    if (!rp || typeof rp !== 'string') throw new WseError(WSE_ERROR.RP_NOT_REGISTERED, { rp })
    return new Promise((resolve, reject) => {
      const stamp = makeStamp()
      let timer = null
      let disconnectBind = null
      const cleanup = () => {
        if (timer) clearTimeout(timer)
        if (disconnectBind) disconnectBind.off()
        this._callbacks.delete(stamp)
      }
      this._callbacks.set(stamp, (result, isSuccess) => {
        cleanup()
        if (isSuccess) resolve(result)
        else reject(new WseError(result && result.code, result && result.details))
      })
      disconnectBind = disconnectSignal.once((...args) => {
        cleanup()
        reject(new WseError(WSE_ERROR.RP_DISCONNECT, { disconnected: args }))
      })
      if (timeout > 0) {
        timer = setTimeout(() => {
          cleanup()
          reject(new WseError(WSE_ERROR.RP_TIMEOUT))
        }, timeout * 1000)
      }
      try {
        sendFn(protocol.pack({ type: rp, payload, stamp }))
      } catch (err) {
        // a send that throws leaves nothing pending behind it
        cleanup()
        reject(new WseError(WSE_ERROR.WS_CLIENT_ERROR, { raw: err }))
      }
    })
  }
}

export class WseClient {
  /**
   * @param options.url - ws:// or wss:// endpoint
   * @param [options.tO=20] - RPC timeout in seconds (0: none)
   * @param [options.re=false] - reconnect after closes with a code of re_on_codes
   * @param [options.protocol] - protocol object (default WseJSON)
   * @param [options.WebSocket] - WebSocket constructor (default globalThis.WebSocket)
   * @param [options.trace] - debugging aid: trace('out'|'in', data) for every frame
   * Other options go to the WebSocket constructor as its third argument.
   */
  constructor ({ url, tO = 20, protocol, re = false, trace = null, WebSocket = null, ...wsOptions } = {}) {
    const WS = WebSocket || globalThis.WebSocket
    if (typeof WS !== 'function') throw new TypeError(NO_WEBSOCKET_MESSAGE)
    this.WebSocket = WS
    this.protocol = protocol || new WseJSON()
    this.url = url
    this.ws_options = wsOptions
    this.reused = 0
    this.tO = tO
    this.channel = new Emitter()
    this.ignored = new Signal()
    this.connected = new Signal()
    this.ready = new Signal({ memorable: true })
    this.updated = new Signal({ memorable: true })
    this.error = new Signal()
    this.closed = new Signal()
    this.re = re
    this.re_t0 = 1000
    this.re_on_codes = [1005, 1006, 1011, 1012, 1013, 1014, 4000] // 4000: jump
    this._rpc = new RpcManager()
    this._trace = typeof trace === 'function' ? trace : null
    this.when = {
      ignored: fn => this.ignored.on(fn),
      connected: fn => this.connected.on(fn),
      ready: fn => this.ready.on(fn),
      error: fn => this.error.on(fn),
      closed: fn => this.closed.on(fn),
      updated: fn => this.updated.on(fn),
    }
    this.status = WSE_STATUS.IDLE
    this.challenge_solver = null
    this._ws = null
    this._timer = null
    this._user_closed = false
  }

  _update_status (status) {
    // assigned first: an `updated` handler reading client.status sees the new one
    this.status = status
    this.updated.emit(status)
  }

  _is_open () {
    return !!this._ws && this._ws.readyState === OPEN
  }

  _raw_send (data) {
    if (this._trace) this._trace('out', data)
    this._ws.send(data)
  }

  _unpack (message) {
    if (this._trace) this._trace('in', message.data)
    return this.protocol.unpack(message.data)
  }

  _open_socket () {
    const opts = this.ws_options
    return Object.keys(opts).length
      ? new this.WebSocket(this.url, this.protocol.name, opts)
      : new this.WebSocket(this.url, this.protocol.name)
  }

  connect (identity = '', meta = {}) {
    if (this._ws) throw new WseError(WSE_ERROR.CLIENT_ALREADY_CONNECTED)
    if (this._timer) {
      // a reconnect was due (jump() while RE_CONNECTING): this connect replaces it
      clearTimeout(this._timer)
      this._timer = null
    }
    this._user_closed = false
    this._update_status(WSE_STATUS.CONNECTING)
    let settle = null

    const onOpen = () => {
      this.send(this.protocol.internal_types.hi, { identity, meta })
      this.connected.emit()
    }

    const onMessage = message => this._process_msg(message)

    const onPreMessage = message => {
      let type, payload
      try {
        [type, payload] = this._unpack(message)
      } catch (err) {
        this.error.emit(new WseError(WSE_ERROR.WS_CLIENT_ERROR, { raw: err }))
        return
      }
      const types = this.protocol.internal_types
      if (type === types.challenge && typeof this.challenge_solver === 'function') {
        this.challenge_solver(payload, solution => this.send(types.challenge, solution))
        return
      }
      if (type === types.welcome) {
        if (settle) settle.resolve(payload)
        settle = null
        this._ws.onmessage = onMessage
        this._update_status(WSE_STATUS.READY)
        this.ready.emit(payload)
      }
    }

    const onError = event => {
      const error = new WseError(WSE_ERROR.WS_CLIENT_ERROR, { raw: event })
      this.error.emit(error)
      if (!this.re && settle) {
        settle.reject(error)
        settle = null
      }
    }

    const onClose = event => {
      this.closed.emit(event.code, String(event.reason))
      this._update_status(WSE_STATUS.OFFLINE)
      this._wipe_ws()
      const again = ((this.re && this.re_on_codes.includes(event.code)) || event.code === 4000) &&
        !this._user_closed
      if (!again && settle) {
        // not welcomed and nothing will retry (a refusal is a 1000): settle now
        settle.reject(String(event.reason))
        settle = null
      }
      if (again) {
        const delay = event.code === 4000 ? 0 : this.re_t0 + Math.random() * 1000
        this._update_status(WSE_STATUS.RE_CONNECTING)
        this._timer = setTimeout(tryConnect, delay)
      }
    }

    const tryConnect = () => {
      this._timer = null
      if (this._user_closed) return
      this.reused++
      this._ws = this._open_socket()
      this._ws.onopen = onOpen
      this._ws.onmessage = onPreMessage
      this._ws.onerror = onError
      this._ws.onclose = onClose
    }

    return new Promise((resolve, reject) => {
      settle = { resolve, reject }
      tryConnect()
    })
  }

  _wipe_ws () {
    if (!this._ws) return
    this._ws.onopen = null
    this._ws.onmessage = null
    this._ws.onerror = null
    this._ws.onclose = null
    this._ws = null
  }

  challenge (solver) {
    if (typeof solver !== 'function') throw new WseError(WSE_ERROR.INVALID_CRA_HANDLER)
    this.challenge_solver = solver
  }

  _process_msg (message) {
    let type, payload, stamp
    try {
      [type, payload, stamp] = this._unpack(message)
    } catch (err) {
      this.error.emit(new WseError(WSE_ERROR.WS_CLIENT_ERROR, { raw: err }))
      return
    }
    const types = this.protocol.internal_types
    if (type === types.response && this._rpc.handleResponse(stamp, payload, true)) return
    if (type === types.response_error && this._rpc.handleResponse(stamp, payload, false)) return
    if (stamp) {
      if (this._rpc.has(type)) return this._handle_incoming_call(type, payload, stamp)
      this._raw_send(this.protocol.pack({
        type: types.response_error,
        payload: { code: WSE_ERROR.RP_NOT_REGISTERED },
        stamp,
      }))
      return
    }
    const handled = type !== 'error' || this.channel.listenerCount('error') > 0
      ? this.channel.emit(type, payload, stamp)
      : false
    if (!handled) this.ignored.emit(type, payload, stamp)
  }

  _handle_incoming_call (type, payload, stamp) {
    const procedure = this._rpc.get(type)
    const types = this.protocol.internal_types
    const socket = this._ws
    // the answer goes back on the socket that asked, if it is still open
    const reply = frame => {
      if (this._ws === socket && this._is_open()) this._raw_send(frame)
    }
    const run = async () => {
      const result = await procedure(payload)
      reply(this.protocol.pack({ type: types.response, payload: result, stamp }))
    }
    run().catch(err => {
      try {
        reply(this.protocol.pack({
          type: types.response_error,
          payload: RpcManager.normalizeError(err, type, payload),
          stamp,
        }))
      } finally {
        this.error.emit(new WseError(WSE_ERROR.RP_EXECUTION_FAILED, { type, payload, stamp, err }))
      }
    }).catch(() => {}) // an error handler that throws is not an unhandled rejection
  }

  send (type, payload) {
    if (this._is_open()) {
      this._raw_send(this.protocol.pack({ type, payload }))
    } else {
      const err = new WseError(WSE_ERROR.CONNECTION_NOT_READY)
      this.error.emit(err)
      throw err
    }
  }

  close (reason = WSE_REASON.BY_CLIENT) {
    this._user_closed = true
    if (this._timer) {
      clearTimeout(this._timer)
      this._timer = null
    }
    if (this._ws) this._ws.close(1000, reason)
    else if (this.status === WSE_STATUS.RE_CONNECTING) this._update_status(WSE_STATUS.OFFLINE)
  }

  jump (newUrl, identity = '', meta = {}) {
    this.url = newUrl
    if (this._ws) {
      this.ready.forget()
      this._ws.close(4000, 'jump')
      return this.ready.wait()
    }
    return this.connect(identity, meta)
  }

  async call (rp, payload) {
    if (this._is_open()) {
      return this._rpc.call(this.protocol, rp, payload, this.tO, data => this._raw_send(data), this.closed)
    }
    const err = new WseError(WSE_ERROR.CONNECTION_NOT_READY)
    this.error.emit(err)
    throw err
  }

  register (rp, handler) {
    this._rpc.register(rp, handler)
  }

  unregister (rp) {
    this._rpc.unregister(rp)
  }
}
