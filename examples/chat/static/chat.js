/* The chat page: who is online (joined/left + the `who` RPC), messages,
 * and automatic reconnection (re: true) after a server restart. An ES module:
 * it imports the client shipped in the wse_sync package, served as /wse.js. */
import { WseClient, WSE_STATUS } from './wse.js'

// a module has its own scope: nothing below is global but window.chatClient
const $ = sel => document.querySelector(sel)
const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws'
const online = new Set()
let client = null

function render () {
  const ul = $('#online')
  ul.textContent = ''
  for (const cid of [...online].sort()) {
    const li = document.createElement('li')
    li.textContent = cid
    li.dataset.cid = cid
    ul.appendChild(li)
  }
}

function log (text, cls = 'msg') {
  const div = document.createElement('div')
  div.className = cls
  div.textContent = text
  $('#log').appendChild(div)
  $('#log').scrollTop = $('#log').scrollHeight
}

// joined/left events seen while a `who` call is out: its answer may predate
// them (it can arrive after them), so they are applied again on top of it
let pending = null

async function refresh () {
  const seen = pending = []
  try {
    const users = await client.call('who') // a client -> server RPC
    online.clear()
    users.forEach(cid => online.add(cid))
    for (const [event, cid] of seen) event === 'joined' ? online.add(cid) : online.delete(cid)
    render()
  } finally {
    if (pending === seen) pending = null
  }
}

function track (event, cid) {
  if (pending) pending.push([event, cid])
  event === 'joined' ? online.add(cid) : online.delete(cid)
  render()
  log(`${cid} ${event}`, 'event')
}

function join (name) {
  client = new WseClient({ url, re: true })
  window.chatClient = client
  client.when.updated(status => {
    $('#status').textContent = status
    document.body.dataset.status = status
  })
  client.when.ready(welcome => {
    log(`welcome, ${welcome.name}`, 'event')
    refresh().catch(err => log(`who failed: ${err.code || err}`, 'event'))
  })
  client.when.closed((code, reason) => log(`disconnected (${code}${reason ? ' ' + reason : ''})`, 'event'))
  client.channel.on('said', m => log(`${m.from}: ${m.text}`))
  client.channel.on('joined', cid => track('joined', cid))
  client.channel.on('left', cid => track('left', cid))
  $('#login').hidden = true
  $('#room').hidden = false
  return client.connect(name, { page: location.pathname })
}

$('#login').addEventListener('submit', event => {
  event.preventDefault()
  const name = $('#name').value.trim()
  if (name) join(name)
})

$('#composer').addEventListener('submit', event => {
  event.preventDefault()
  const text = $('#text').value
  if (!text.trim() || !client || client.status !== WSE_STATUS.READY) return
  client.send('say', text)
  $('#text').value = ''
})

$('#refresh').addEventListener('click', () => refresh())

const preset = new URLSearchParams(location.search).get('name')
if (preset) join(preset)
