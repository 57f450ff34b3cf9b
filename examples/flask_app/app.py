"""An existing Flask app (a notes board) that gains live notifications.

Two workers, one broker, one command:

    gunicorn -c python:wse_sync.gunicorn_conf -w 2 -b 127.0.0.1:8000 --chdir examples/flask_app app:application

Open http://127.0.0.1:8000/ in two tabs and post a note: it shows up in both
at once, whichever worker served the POST. The lines marked ``# wse_sync``
are all it took. From outside the web app (a cron job, a management
command), ``notify.py`` broadcasts through the same broker.
"""
import importlib.resources
import os
import sqlite3
import tempfile
import time

from flask import Flask, Response, jsonify, request

from wse_sync import WseServer, mount  # wse_sync

DB = os.environ.get("NOTES_DB", os.path.join(tempfile.gettempdir(), "wse-sync-notes.sqlite3"))

app = Flask(__name__)


def db():
    conn = sqlite3.connect(DB)
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT, at REAL)")
    return conn


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notes</title></head>
<body>
<h1>notes</h1>
<form id="new"><input id="text" required placeholder="a note"><button>post</button></form>
<p>live: <b id="status">IDLE</b></p>
<ul id="notes">{items}</ul>
<script type="module">
  import {{ WseClient }} from '/wse.js'
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws'
  const client = new WseClient({{ url, re: true }})
  client.when.updated(s => {{ document.getElementById('status').textContent = s }})
  client.channel.on('note', note => {{
    const li = document.createElement('li')
    li.textContent = note.text
    document.getElementById('notes').prepend(li)
  }})
  client.connect('reader-' + Math.random().toString(36).slice(2))
  document.getElementById('new').addEventListener('submit', async e => {{
    e.preventDefault()
    const input = document.getElementById('text')
    await fetch('/notes', {{ method: 'POST', headers: {{ 'Content-Type': 'application/json' }},
                            body: JSON.stringify({{ text: input.value }}) }})
    input.value = ''
  }})
</script>
</body></html>
"""


@app.get("/")
def index():
    with db() as conn:
        rows = conn.execute("SELECT text FROM notes ORDER BY id DESC LIMIT 50").fetchall()
    from html import escape
    return PAGE.format(items="".join(f"<li>{escape(text)}</li>" for (text,) in rows))


@app.post("/notes")
def add_note():
    text = str((request.get_json(silent=True) or request.form).get("text", "")).strip()
    if not text:
        return jsonify(error="empty note"), 400
    with db() as conn:
        note_id = conn.execute("INSERT INTO notes (text, at) VALUES (?, ?)",
                               (text, time.time())).lastrowid
    live.broadcast("note", {"id": note_id, "text": text, "pid": os.getpid()})  # wse_sync
    return jsonify(id=note_id, pid=os.getpid()), 201


@app.get("/api/online")
def online():
    """Who has the page open, across all workers."""
    return jsonify(pid=os.getpid(), online=sorted(live.clients, key=str))


@app.post("/api/notify/<cid>")
def notify_one(cid):
    """A direct message to one user, wherever their socket is."""
    live.send(cid, "notice", request.get_data(as_text=True))
    return "", 204


@app.get("/wse.js")
def wse_js():
    # the dependency-free JS client (an ES module) shipped inside the wse_sync package
    body = (importlib.resources.files("wse_sync") / "static" / "wse.js").read_bytes()
    return Response(body, mimetype="text/javascript")


def identify(identity, accept, refuse, **_):
    # a real app checks a session token here (it may block on the database)
    accept(identity, {"pid": os.getpid()}) if identity else refuse()


live = WseServer(identify=identify, conn_per_user=10)  # wse_sync
application = mount(app, live, "/ws")  # wse_sync: give gunicorn `app:application`
