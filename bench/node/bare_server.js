#!/usr/bin/env node
// A bare Node `ws` server speaking just enough of the wse wire protocol for the
// benchmarks (the "bare node" baseline):
//   ["~wse:hi", {identity, meta}, null]  -> ["~wse:welcome", {}, null]
//   ["echo", payload, stamp]             -> ["~wse:response", payload, stamp]
//   ["ping", payload, null]              -> ["pong", payload, null]
//   ["fanout", {count}, stamp]           -> ["tick", i, null] to every socket, i < count,
//                                           then ["~wse:response", count, stamp]
//   ["pid", null, stamp]                 -> ["~wse:response", process.pid, stamp]
// No broker, no cluster. Usage: node bare_server.js --port P [--host 127.0.0.1]
//   [--max-seconds S]  (exits by itself after S seconds; default 1800)
'use strict'

const { WebSocketServer } = require('ws')

const PROTOCOL = 'wse-default-json'

function arg (name, dflt) {
  const i = process.argv.indexOf('--' + name)
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt
}

const host = arg('host', '127.0.0.1')
const port = Number(arg('port', '4300'))
const maxSeconds = Number(arg('max-seconds', '1800'))

const wss = new WebSocketServer({
  host,
  port,
  backlog: 2048,
  perMessageDeflate: false,
  clientTracking: false,
  handleProtocols: (protocols) => (protocols.has(PROTOCOL) ? PROTOCOL : false)
})

const authed = new Set()

function onConnection (ws) {
  if (ws.protocol !== PROTOCOL) {
    ws.close(1000, 'wse.protocol-error')
    return
  }
  let valid = false
  ws.on('message', (data) => {
    let msg
    try {
      msg = JSON.parse(data)
    } catch (e) {
      ws.close(1000, 'wse.protocol-error')
      return
    }
    const type = msg[0]
    const payload = msg[1]
    const stamp = msg[2] === undefined ? null : msg[2]
    if (!valid) {
      if (type !== '~wse:hi') {
        ws.close(1000, 'wse.protocol-error')
        return
      }
      valid = true
      authed.add(ws)
      ws.send(JSON.stringify(['~wse:welcome', {}, null]))
      return
    }
    if (stamp === null) {
      if (type === 'ping') ws.send(JSON.stringify(['pong', payload === undefined ? null : payload, null]))
      return
    }
    if (type === 'echo') {
      ws.send(JSON.stringify(['~wse:response', payload === undefined ? null : payload, stamp]))
    } else if (type === 'fanout') {
      const count = payload.count
      for (let i = 0; i < count; i++) {
        const data = JSON.stringify(['tick', i, null])
        for (const peer of authed) peer.send(data)
      }
      ws.send(JSON.stringify(['~wse:response', count, stamp]))
    } else if (type === 'pid') {
      ws.send(JSON.stringify(['~wse:response', process.pid, stamp]))
    } else {
      ws.send(JSON.stringify(['~wse:response-err', { code: 'wse.server.rp.not-registered' }, stamp]))
    }
  })
  ws.on('close', () => authed.delete(ws))
  ws.on('error', () => {})
}

wss.on('connection', onConnection)
wss.on('listening', () => process.stderr.write(`bare node ws server on ${host}:${port}\n`))

function stop () {
  wss.close()
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
setTimeout(stop, maxSeconds * 1000).unref()
