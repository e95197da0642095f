// RentAHal node web UI: one websocket to this node (protocol: node/control.py), no dependencies.
// Everything that came from the node or a peer is shown with textContent, never as HTML.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
// The tabs in the page; a realm without a panel of its own gets one from the node's catalog.
const TABS = ['chat', 'imagine', 'speech', 'dashboard'];

// --- small helpers ---------------------------------------------------------------------------

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const shortId = (id) => { id = String(id ?? ''); return id.length > 16 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id; };
const execName = (id) => (id === 'local' ? 'this node' : shortId(id));
const errText = (e) => `${e && e.code ? e.code : 'error'}: ${e && e.message ? e.message : String(e)}`;

function fmtMs(ms) {
  if (!isNum(ms)) return '–';
  if (ms >= 1000) return `${(ms / 1000).toFixed(1)} s`;
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

function td(text, title) {
  const cell = document.createElement('td');
  cell.textContent = text;
  if (title) cell.title = title;
  return cell;
}

// File or Blob -> base64, in chunks so a large file does not overflow the call stack.
async function toBase64(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

// A {"$bytes": base64} value from the node as a data: URL, or null if it is not one.
function dataUrl(media, type) {
  const b64 = media && typeof media.$bytes === 'string' ? media.$bytes : '';
  return b64 && /^[A-Za-z0-9+/]*={0,2}$/.test(b64) ? `data:${type};base64,${b64}` : null;
}

// Put an optional number field into a payload; a non-number goes as typed so the node names it.
function optNumber(payload, key, input) {
  const raw = input.value.trim();
  if (raw === '') return;
  const n = Number(raw);
  payload[key] = Number.isFinite(n) ? n : raw;
}

// --- who we are ------------------------------------------------------------------------------

function userGuid() {
  let g = null;
  try { g = localStorage.getItem('rentahal.guid'); } catch (_) { /* storage disabled */ }
  if (!/^[0-9a-f]{32}$/.test(g || '')) {
    const b = crypto.getRandomValues(new Uint8Array(16));
    g = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    try { localStorage.setItem('rentahal.guid', g); } catch (_) { /* this session only */ }
  }
  return g;
}
const GUID = userGuid();

// --- the connection --------------------------------------------------------------------------

const conn = { ws: null, ready: false, nextRid: 1, handlers: new Map(), backoff: 500 };

function setConn(state) {
  const el = $('#conn');
  el.textContent = state;
  el.dataset.state = state;
}

function connect() {
  setConn('connecting');
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  let ws;
  try { ws = new WebSocket(`${scheme}://${location.host}/`); } catch (_) { return reconnectLater(); }
  conn.ws = ws;
  conn.nextRid = 1; // rids are per connection; hello is rid 1
  ws.onopen = () => hello(ws);
  ws.onmessage = (ev) => onMessage(ev.data);
  ws.onclose = () => onClose(ws);
}

function reconnectLater() {
  setTimeout(connect, conn.backoff + Math.random() * 250);
  conn.backoff = Math.min(conn.backoff * 2, 10000);
}

async function hello(ws) {
  try {
    const a = await request('hello', { guid: GUID });
    if (ws !== conn.ws) return;
    conn.ready = true;
    conn.backoff = 500;
    await loadCatalog(); // the realms' forms first: "connected" means the page is ready
    if (ws !== conn.ws) return;
    setConn('connected');
    $('#notice').hidden = true;
    $('#whoami').textContent = a.guid;
    if (typeof a.nickname === 'string' && document.activeElement !== $('#nickname')) $('#nickname').value = a.nickname;
    Object.values(slots).forEach((s) => s.reattach());
    watchDashboard();
    loadHistory();
  } catch (e) {
    if (e.closed) return; // the connection dropped: onClose reconnects
    const n = $('#notice');
    n.textContent = `The node refused this browser: ${errText(e)}`;
    n.hidden = false;
    ws.close();
  }
}

function onClose(ws) {
  if (ws !== conn.ws) return;
  conn.ready = false;
  conn.ws = null;
  setConn('disconnected');
  const lost = { op: 'error', code: 'disconnected', message: 'lost the connection to the node', closed: true };
  const handlers = Array.from(conn.handlers.values());
  conn.handlers.clear();
  handlers.forEach((fn) => fn(lost));
  reconnectLater();
}

function onMessage(raw) {
  let msg;
  try { msg = JSON.parse(raw); } catch (_) { return; }
  if (!msg || typeof msg !== 'object') return;
  const fn = conn.handlers.get(msg.rid);
  if (fn) fn(msg);
  else if (msg.op === 'dashboard' && msg.rid === undefined) drawDashboard(msg.snapshot);
  else if (msg.op === 'error') console.warn('node:', msg.code, msg.message);
}

// Send one request; handler(msg) gets every answer with its rid. Throws when not connected.
function send(op, fields, handler) {
  const ws = conn.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || (!conn.ready && op !== 'hello')) {
    throw { code: 'disconnected', message: 'not connected to the node' };
  }
  const rid = conn.nextRid++;
  conn.handlers.set(rid, handler);
  ws.send(JSON.stringify({ op, rid, ...fields }));
  return rid;
}

// One request, one answer: resolves with the answer, rejects with an error message.
function request(op, fields = {}) {
  return new Promise((resolve, reject) => {
    const rid = send(op, fields, (msg) => {
      conn.handlers.delete(rid);
      if (msg.op === 'error') reject(msg); else resolve(msg);
    });
  });
}

// --- queries: one slot per realm section, at most one query in flight in each ---------------

class Slot {
  constructor(realm, buttons, cancelButton) {
    this.realm = realm;
    this.status = $(`#tab-${realm} .status`);
    this.buttons = buttons;
    this.cancelButton = cancelButton;
    this.q = null;
    this.onBusy = null; // optional hook (the record button)
    cancelButton.addEventListener('click', () => this.cancel());
  }

  say(text, isError = false) {
    this.status.textContent = text;
    this.status.classList.toggle('error', isError);
    const mirror = this.q && this.q.view.mirror;
    if (mirror) mirror.textContent = text;
  }

  setBusy(on) {
    this.buttons.forEach((b) => { b.disabled = on; });
    this.cancelButton.disabled = !on;
    if (this.onBusy) this.onBusy(on);
  }

  // Run a query. payload may be a promise (a file being read); view says how to show it:
  // { answer, reset(), token?(text), progress?(event), render(output, stats), summary?(...), mirror? }
  async run(payload, view) {
    if (this.q) return false;
    const q = (this.q = { view, id: null, rid: null, attempt: 0, note: '', cancelWanted: false });
    const a = view.answer;
    a.dataset.state = 'queued';
    delete a.dataset.executor;
    delete a.dataset.queryId;
    view.reset();
    this.setBusy(true);
    this.say('sending…');
    try {
      payload = await payload;
    } catch (e) {
      return this.finish(q, 'error', `bad_request: ${e.message || e}`);
    }
    if (q === this.q) this.follow(q, 'submit_query', { realm: this.realm, payload, stream: true });
    return true;
  }

  follow(q, op, fields) {
    try {
      q.rid = send(op, fields, (m) => this.onMessage(q, m));
    } catch (e) {
      this.finish(q, 'error', errText(e));
    }
  }

  // After a reconnect: follow the running query again (the node kept running it).
  reattach() {
    const q = this.q;
    if (!q || q.rid !== null) return;
    if (!q.id) return this.finish(q, 'error', 'disconnected: the connection dropped before the node took the query');
    this.say('reconnected; following the query again…');
    this.follow(q, 'watch', { query_id: q.id });
  }

  onMessage(q, m) {
    if (q !== this.q) return; // a query this slot no longer shows
    if (m.closed) {
      q.rid = null;
      return this.say('lost the connection to the node; reconnecting…', true);
    }
    if (m.op === 'event') return this.onEvent(q, m.event || {});
    if (m.op === 'result') return this.done(q, m.result || {});
    if (m.op === 'watch') return this.fromStore(q, m); // it had finished while we were away
    if (m.op === 'error') {
      if (typeof m.query_id === 'string') this.setId(q, m.query_id);
      this.finish(q, m.code === 'cancelled' ? 'cancelled' : 'error', errText(m));
    }
  }

  onEvent(q, ev) {
    const a = q.view.answer;
    if (typeof ev.query_id === 'string') this.setId(q, ev.query_id);
    if (isNum(ev.attempt) && ev.attempt < q.attempt) return; // late news from a failed executor
    const where = execName(a.dataset.executor);
    switch (ev.type) {
      case 'queued':
        this.say(`${q.note}queued`);
        break;
      case 'routed':
        q.attempt = isNum(ev.attempt) ? ev.attempt : q.attempt + 1;
        a.dataset.executor = String(ev.executor);
        this.say(`${q.note}sent to ${execName(ev.executor)} (attempt ${q.attempt})`);
        break;
      case 'accepted': {
        if (ev.position === 0) {  // position 0: running now
          a.dataset.state = 'running';
          this.say(`${q.note}running on ${where}…`);
          break;
        }
        const eta = isNum(ev.eta_ms) ? `, ETA ~${fmtMs(ev.eta_ms)}` : '';
        const ahead = isNum(ev.position) ? ev.position - 1 : '?';
        this.say(`${q.note}in the queue at ${where}: ${ahead} ahead${eta}`);
        break;
      }
      case 'progress':
        a.dataset.state = 'running';
        if (q.view.progress) q.view.progress(ev);
        this.say(q.note + (isNum(ev.total) ? `${ev.stage}: step ${ev.done}/${ev.total}` : `${ev.stage}…`));
        break;
      case 'token':
        if (a.dataset.state !== 'running') this.say(`${q.note}generating on ${where}…`);
        a.dataset.state = 'running';
        if (typeof ev.text === 'string' && q.view.token) q.view.token(ev.text);
        break;
      case 'failover':
        // That attempt is over; the next executor starts the answer again.
        if (isNum(ev.attempt)) q.attempt = ev.attempt + 1;
        q.note = `failover: ${execName(ev.executor)} ${ev.kind} (${ev.message}); `;
        q.view.reset();
        a.dataset.state = 'queued';
        this.say(`${q.note}trying the next executor…`);
        break;
      default:
        break;
    }
  }

  setId(q, id) {
    if (q.id === id) return;
    q.id = id;
    q.view.answer.dataset.queryId = id;
    if (q.cancelWanted) this.cancel();
  }

  done(q, r) {
    if (typeof r.query_id === 'string') this.setId(q, r.query_id);
    if (r.executor) q.view.answer.dataset.executor = String(r.executor);
    const output = r.output && typeof r.output === 'object' ? r.output : {};
    const stats = r.stats && typeof r.stats === 'object' ? r.stats : {};
    try {
      q.view.render(output, stats);
    } catch (e) {
      return this.finish(q, 'error', `bad_result: ${e.message}`);
    }
    let text = `done in ${fmtMs(stats.ms)} on ${execName(r.executor)}`;
    if (Array.isArray(r.failovers) && r.failovers.length) text += ` after failover from ${r.failovers.map(execName).join(', ')}`;
    if (q.view.summary) text += q.view.summary(output, stats);
    this.finish(q, 'done', text);
  }

  fromStore(q, m) {
    const row = m.query || {};
    if (m.result) return this.done(q, { ...m.result, executor: row.executor, failovers: row.failovers });
    const state = row.status === 'cancelled' ? 'cancelled' : 'error';
    this.finish(q, state, `${row.error_code || row.status}: ${row.error_message || 'no result'}`);
  }

  finish(q, state, text) {
    if (q !== this.q) return;
    conn.handlers.delete(q.rid);
    q.view.answer.dataset.state = state;
    this.say(text, state === 'error');
    this.q = null;
    this.setBusy(false);
    loadHistory();
  }

  async cancel() {
    const q = this.q;
    if (!q) return;
    if (!q.id) { q.cancelWanted = true; return this.say('cancelling…'); } // once the node names it
    q.cancelWanted = false;
    try {
      await request('cancel', { query_id: q.id });
      if (q === this.q) this.say('cancelling…');
    } catch (e) {
      if (q === this.q) this.say(`cancel failed: ${errText(e)}`, true);
    }
  }
}

const slots = {
  chat: new Slot('chat', [$('#chat-send')], $('#chat-cancel')),
  imagine: new Slot('imagine', [$('#imagine-send')], $('#imagine-cancel')),
  speech: new Slot('speech', [$('#speech-send'), $('#tts-send'), $('#chat-speak')], $('#speech-cancel')),
};

// --- how each kind of answer is shown --------------------------------------------------------

function textView(answer) {
  return {
    answer,
    reset() { answer.textContent = ''; },
    token(text) { answer.append(text); },
    render(out) {
      if (typeof out.text !== 'string') throw new Error('no text in the result');
      answer.textContent = out.text;
    },
  };
}

function imageView() {
  const img = $('#imagine-answer');
  const bar = $('#imagine-progress');
  return {
    answer: img,
    reset() {
      img.removeAttribute('src');
      delete img.dataset.width;
      delete img.dataset.height;
      bar.max = 1;
      bar.value = 0;
    },
    progress(ev) {
      if (isNum(ev.total) && ev.total > 0 && isNum(ev.done)) {
        bar.max = ev.total;
        bar.value = Math.min(ev.done, ev.total);
      }
    },
    render(out, stats) {
      const url = dataUrl(out.image, 'image/png');
      if (!url) throw new Error('no image in the result');
      img.src = url;
      const w = isNum(out.width) ? out.width : stats.width;
      const h = isNum(out.height) ? out.height : stats.height;
      if (isNum(w)) img.dataset.width = String(w);
      if (isNum(h)) img.dataset.height = String(h);
      bar.value = bar.max;
    },
    summary(out) {
      return isNum(out.seed) ? ` (seed ${out.seed})` : '';
    },
  };
}

function ttsView(mirror = null) {
  const audio = $('#tts-answer');
  return {
    answer: audio,
    mirror,
    reset() { audio.removeAttribute('src'); audio.load(); },
    render(out) {
      const url = dataUrl(out.audio, 'audio/wav');
      if (!url) throw new Error('no audio in the result');
      audio.src = url;
      audio.play().catch(() => { /* autoplay refused: the controls are there */ });
    },
  };
}

// --- the realm forms -------------------------------------------------------------------------

function sendChat() {
  const prompt = $('#chat-prompt').value;
  if (!prompt.trim()) return slots.chat.q || slots.chat.say('type a prompt first', true);
  const payload = { prompt };
  optNumber(payload, 'max_tokens', $('#chat-max-tokens'));
  optNumber(payload, 'temperature', $('#chat-temperature'));
  slots.chat.run(payload, textView($('#chat-answer')));
}

function sendImagine() {
  const prompt = $('#imagine-prompt').value;
  if (!prompt.trim()) return slots.imagine.q || slots.imagine.say('describe the image first', true);
  const payload = { prompt };
  optNumber(payload, 'width', $('#imagine-width'));
  optNumber(payload, 'height', $('#imagine-height'));
  optNumber(payload, 'steps', $('#imagine-steps'));
  optNumber(payload, 'seed', $('#imagine-seed'));
  optNumber(payload, 'guidance', $('#imagine-guidance'));
  slots.imagine.run(payload, imageView());
}

function transcribe(blob) {
  const payload = toBase64(blob).then((b64) => ({ audio: { $bytes: b64 } }));
  slots.speech.run(payload, textView($('#speech-answer')));
}

function sendSpeechFile() {
  const file = $('#speech-file').files[0];
  if (!file) return slots.speech.q || slots.speech.say('choose an audio file first (or record)', true);
  transcribe(file);
}

function speak(text, mirror = null) {
  return slots.speech.run({ text }, ttsView(mirror));
}

function sendTts() {
  const text = $('#tts-text').value;
  if (!text.trim()) return slots.speech.q || slots.speech.say('type some text to speak', true);
  speak(text);
}

function speakChat() {
  const note = $('#chat-speak-note');
  const text = $('#chat-answer').textContent.trim();
  if (!text) { note.textContent = 'nothing to speak yet'; return; }
  if (slots.speech.q) { note.textContent = 'speech is busy'; return; }
  $('#tts-text').value = text;
  speak(text, note);
}

// Microphone recording: the first click starts, the second stops and sends (WebM/Opus).
const rec = { recorder: null, starting: false };

function updateRecordButton() {
  const btn = $('#speech-record');
  const on = rec.recorder !== null;
  btn.textContent = on ? 'Stop' : 'Record';
  btn.dataset.recording = String(on);
  btn.setAttribute('aria-pressed', String(on));
  btn.disabled = !on && slots.speech.q !== null;
}
slots.speech.onBusy = updateRecordButton;

async function toggleRecord() {
  if (rec.recorder) { rec.recorder.stop(); return; }
  if (rec.starting) return; // still asking for the microphone
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === 'undefined') {
    return slots.speech.say('unsupported: this browser cannot record here (the microphone needs https or localhost)', true);
  }
  let stream;
  rec.starting = true;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    return slots.speech.say(`microphone: ${e.message || e.name}`, true);
  } finally {
    rec.starting = false;
  }
  const type = ['audio/webm;codecs=opus', 'audio/webm', 'audio/ogg;codecs=opus'].find((t) => MediaRecorder.isTypeSupported(t));
  const chunks = [];
  let recorder;
  try {
    recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
    recorder.ondataavailable = (e) => { if (e.data && e.data.size) chunks.push(e.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      rec.recorder = null;
      updateRecordButton();
      const blob = new Blob(chunks, { type: recorder.mimeType || 'audio/webm' });
      if (!blob.size) return slots.speech.say('nothing was recorded', true);
      if (slots.speech.q) return slots.speech.say('a speech query is already running; recording discarded', true);
      transcribe(blob);
    };
    recorder.start();
  } catch (e) {
    stream.getTracks().forEach((t) => t.stop());
    return slots.speech.say(`recorder: ${e.message || e.name}`, true);
  }
  rec.recorder = recorder;
  updateRecordButton();
  slots.speech.say('recording… press Stop to send');
}

// --- nickname --------------------------------------------------------------------------------

async function saveNickname() {
  const err = $('#nickname-error');
  const btn = $('#nickname-save');
  err.textContent = '';
  try {
    const a = await request('set_nickname', { nickname: $('#nickname').value });
    $('#nickname').value = a.nickname;
    btn.textContent = 'Saved';
    setTimeout(() => { btn.textContent = 'Save'; }, 1500);
  } catch (e) {
    err.textContent = errText(e);
  }
}

// --- dashboard -------------------------------------------------------------------------------

const dash = { count: 0 };

// The node pushes one snapshot a second to every dashboard (op 'dashboard'); this page
// subscribes once per connection and draws each snapshot it is sent.
function watchDashboard() {
  const rid = conn.nextRid++;
  conn.handlers.set(rid, (msg) => {
    conn.handlers.delete(rid);
    if (msg.op === 'dashboard') drawDashboard(msg.snapshot);
    else if (!msg.closed) showDashboardError(msg);
  });
  conn.ws.send(JSON.stringify({ op: 'dashboard', rid }));
}

function showDashboardError(msg) {
  const status = $('#tab-dashboard .status');
  status.textContent = `dashboard: ${errText(msg)}`;
  status.classList.add('error');
}

function drawDashboard(snap) {
  if (!snap || typeof snap !== 'object') return;
  renderNode(snap.status || {});
  renderRealms(Array.isArray(snap.realms) ? snap.realms : [], snap.stats || {});
  renderPeers(Array.isArray(snap.peers) ? snap.peers : []);
  const u = $('#dash-updated');
  u.textContent = new Date().toLocaleTimeString();
  u.dataset.count = String(++dash.count);
  const status = $('#tab-dashboard .status');
  status.textContent = '';
  status.classList.remove('error');
}

function renderNode(s) {
  const id = String(s.peer_id || '');
  const name = String(s.name || '') || 'RentAHal node';  // [node] name in node.toml, if set
  $('.brand h1').textContent = name;
  document.title = name;
  $('#peer-id').textContent = id || '…';
  $('#peer-id').title = `this node's peer id: ${id}`;
  const up = isNum(s.uptime_s) ? `${Math.floor(s.uptime_s / 3600)} h ${Math.floor((s.uptime_s % 3600) / 60)} min ${Math.floor(s.uptime_s % 60)} s` : '–';
  const reach = s.reachability && typeof s.reachability === 'object' ? s.reachability : {};
  const items = [
    ['Peer id', id],
    ['Version', String(s.version ?? '–')],
    ['Uptime', up],
    ['Reachability', String(reach.text || '–')],
    ['A friend joins with', reach.bootstrap ? `rentahal-node run --bootstrap ${String(reach.bootstrap)}` : '–'],
    ['Addresses', Array.isArray(s.addrs) ? s.addrs.map(String).join('\n') : ''],
    ['Queries served for peers', String(s.queries_served_for_peers ?? 0)],
  ];
  $('#dash-node').replaceChildren(...items.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    const dd = document.createElement('dd');
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
}

function renderRealms(realms, stats) {
  const rows = realms.map((r) => {
    const name = String(r.realm);
    const local = r.local || {};
    const st = stats[name] || {};
    const tr = document.createElement('tr');
    tr.dataset.realm = name;
    tr.dataset.local = String(local.status || '');
    const peers = Array.isArray(r.peers) ? r.peers.map(String).join('\n') : '';
    tr.append(
      td(name), td(String(local.status || '–')), td(String(local.model || '–')),
      td(local.smoke_test ? 'yes: gibberish' : 'no'),
      td(String(r.live_peers ?? 0), peers), td(String(st.queue_depth ?? local.queue_depth ?? 0)),
      td(String(st.running ?? 0)), td(String(st.served_local ?? 0)), td(String(st.served_for_peers ?? 0)),
      td(String(st.failures ?? 0)), td(String(st.cancelled ?? 0)), td(fmtMs(st.avg_ms)), td(fmtMs(st.p95_ms)),
    );
    if (local.smoke_test) tr.classList.add('smoke');
    return tr;
  });
  $('#dash-realms tbody').replaceChildren(...rows);
}

function renderPeers(peers) {
  const rows = peers.map((p) => {
    const id = String(p.peer_id || '');
    const tr = document.createElement('tr');
    tr.dataset.peer = id;
    tr.dataset.state = String(p.state || 'unknown');
    const realms = Array.isArray(p.realms) ? p.realms.map(String) : [];
    const models = p.models && typeof p.models === 'object' ? p.models : {};
    const modelsTitle = realms.map((r) => `${r}: ${String(models[r] ?? '')}`).join('\n');
    tr.append(
      td(shortId(id), id),
      td(tr.dataset.state, p.unreachable ? `unreachable: ${String(p.unreachable)}` : (p.last_failure ? String(p.last_failure) : '')),
      td(isNum(p.score) ? p.score.toFixed(2) : '–'),
      td(isNum(p.record_age_s) ? `${p.record_age_s.toFixed(1)} s` : '–'),
      td(fmtMs(p.rtt_ms)), td(realms.join(', '), modelsTitle),
      td(p.connected ? (p.path === 'relayed' ? 'via relay' : 'direct') : 'no'),
      td(String(isNum(p.failures) ? p.failures : 0)),
    );
    return tr;
  });
  $('#dash-peers tbody').replaceChildren(...rows);
  $('#dash-no-peers').hidden = rows.length > 0;
}

// --- realms from the node's catalog ---------------------------------------------------------
//
// The node says what each realm's payload may hold (fields, bounds, this node's caps). A realm
// with a panel of its own in the page gets its inputs' bounds from it; any other realm (vision,
// or one added to the node's catalog later) gets a panel built here: its media as file inputs,
// its text field, its number and true/false fields, and an answer shown by what comes back.

const MEDIA_ACCEPT = { image: 'image/*', audio: 'audio/*' };
const label = (name) => name.charAt(0).toUpperCase() + name.slice(1).replace(/_/g, ' ');

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === 'text') e.textContent = v; else e.setAttribute(k, String(v));
  }
  e.append(...children);
  return e;
}

function boundInput(input, f) {
  if (isNum(f.min)) input.min = String(f.min);
  if (isNum(f.max)) input.max = String(f.max);
  input.step = isNum(f.step) ? String(f.step) : (f.kind === 'integer' ? '1' : 'any');
  if (f.default !== undefined) input.placeholder = String(f.default);
  input.title = String(f.what || '');
}

// A realm whose panel is in the page: its number inputs (#<realm>-<field>) take the node's bounds.
function boundPanel(def) {
  for (const f of def.fields || []) {
    const input = document.getElementById(`${def.realm}-${String(f.name).replace(/_/g, '-')}`);
    if (input && input.type === 'number' && (f.kind === 'integer' || f.kind === 'number')) boundInput(input, f);
  }
}

function genericView(realm) {
  const answer = $(`#${realm}-answer`);
  const media = $(`#${realm}-media`);
  return {
    answer,
    reset() { answer.textContent = ''; media.replaceChildren(); },
    token(text) { answer.append(text); },
    render(out) {
      if (typeof out.text === 'string') answer.textContent = out.text;
      const image = dataUrl(out.image, 'image/png');
      const audio = dataUrl(out.audio, 'audio/wav');
      if (image) media.replaceChildren(el('img', { src: image, alt: `the ${realm} answer` }));
      if (audio) media.replaceChildren(el('audio', { src: audio, controls: '' }));
      if (typeof out.text !== 'string' && !image && !audio) answer.textContent = JSON.stringify(out);
    },
  };
}

function buildPanel(def) {
  const realm = String(def.realm);
  const fields = (def.fields || []).filter((f) => typeof f.name === 'string');
  const id = (name) => `${realm}-${name.replace(/_/g, '-')}`;
  const section = el('section', { id: `tab-${realm}`, class: 'tab', role: 'tabpanel', 'data-generic': '', hidden: '' });
  section.append(el('p', { class: 'note', text: String(def.summary || '') }));
  for (const name of def.media_fields || []) {
    const input = el('input', { id: id(name), type: 'file', accept: MEDIA_ACCEPT[name] || '*/*' });
    section.append(el('div', { class: 'row' }, el('label', { text: `${label(name)} ` }, input)));
    if (name === 'image') {
      const img = el('img', { id: `${realm}-preview`, class: 'preview', alt: 'the chosen image' });
      let url = null;
      input.addEventListener('change', () => {
        if (url) URL.revokeObjectURL(url);
        url = input.files[0] ? URL.createObjectURL(input.files[0]) : null;
        if (url) img.src = url; else img.removeAttribute('src');
      });
      section.append(img);
    }
  }
  const text = fields.find((f) => f.name === def.text_field);
  if (text) {
    const input = el('input', { id: id(text.name), type: 'text', maxlength: text.max_length, title: text.what });
    section.append(el('label', { class: 'field', text: `${label(text.name)} ` }, input));
  }
  const row = el('div', { class: 'row' });
  const options = fields.filter((f) => f !== text && ['integer', 'number', 'boolean'].includes(f.kind));
  for (const f of options) {
    const input = el('input', { id: id(f.name), type: f.kind === 'boolean' ? 'checkbox' : 'number' });
    if (f.kind !== 'boolean') boundInput(input, f);
    row.append(el('label', { text: `${label(f.name)} ` }, input));
  }
  const sendButton = el('button', { id: `${realm}-send`, type: 'button', class: 'primary', text: 'Send' });
  const cancelButton = el('button', { id: `${realm}-cancel`, type: 'button', disabled: '', text: 'Cancel' });
  row.append(sendButton, cancelButton);
  section.append(row, el('p', { class: 'status', 'aria-live': 'polite' }),
    el('div', { id: `${realm}-answer`, class: 'answer text', 'data-state': 'idle', 'aria-live': 'polite' }),
    el('div', { id: `${realm}-media`, class: 'answer media' }));
  $('main').insertBefore(section, $('#tab-dashboard'));

  const slot = (slots[realm] = new Slot(realm, [sendButton], cancelButton));
  const send = () => {
    const payload = {};
    const reads = [];
    for (const name of def.media_fields || []) {
      const file = $(`#${id(name)}`).files[0];
      const f = fields.find((x) => x.name === name);
      if (file) reads.push(toBase64(file).then((b64) => { payload[name] = { $bytes: b64 }; }));
      else if (f && f.required) return slot.q || slot.say(`choose the ${label(name).toLowerCase()} first`, true);
    }
    if (text) {
      const value = $(`#${id(text.name)}`).value;
      if (value.trim()) payload[text.name] = value;
      else if (text.required) return slot.q || slot.say(`type the ${label(text.name).toLowerCase()} first`, true);
    }
    for (const f of options) {
      const input = $(`#${id(f.name)}`);
      if (f.kind === 'boolean') { if (input.checked) payload[f.name] = true; } else optNumber(payload, f.name, input);
    }
    return slot.run(Promise.all(reads).then(() => payload), genericView(realm));
  };
  sendButton.addEventListener('click', send);
  if (text) onEnter($(`#${id(text.name)}`), send);
}

function addTab(def, order) {
  const realm = String(def.realm);
  const button = el('button', { type: 'button', role: 'tab', 'data-tab': realm, 'aria-controls': `tab-${realm}`, text: label(realm) });
  button.addEventListener('click', () => showTab(realm));
  // In the catalog's order: before the first tab of a realm that comes after it, else before Dashboard.
  const later = order.slice(order.indexOf(realm) + 1).find((r) => TABS.includes(r)) || 'dashboard';
  $('nav.tabs').insertBefore(button, $(`nav.tabs [data-tab="${later}"]`));
  TABS.splice(TABS.indexOf(later), 0, realm);
}

let catalogLoaded = false;
async function loadCatalog() {
  if (catalogLoaded) return;
  let realms;
  try { realms = (await request('catalog')).realms; } catch (_) { return; }
  if (!Array.isArray(realms) || catalogLoaded) return;
  catalogLoaded = true;
  const order = realms.map((d) => String(d.realm));
  for (const def of realms) {
    if (!/^[a-z][a-z0-9_]*$/.test(String(def.realm))) continue;
    if (document.getElementById(`tab-${def.realm}`)) { boundPanel(def); continue; }
    buildPanel(def);
    addTab(def, order);
  }
  if (location.hash.slice(1) === WANTED_TAB && TABS.includes(WANTED_TAB)) showTab(WANTED_TAB);
}

// --- history ---------------------------------------------------------------------------------

async function loadHistory() {
  if (!conn.ready) return;
  let rows;
  try { rows = (await request('history', { limit: 20 })).history; } catch (_) { return; }
  if (!Array.isArray(rows)) return;
  $('#history').replaceChildren(...rows.map((r) => {
    const li = document.createElement('li');
    li.dataset.queryId = String(r.id || '');
    li.dataset.state = String(r.status || '');
    const head = document.createElement('div');
    head.className = 'meta';
    const when = isNum(r.created_at) ? new Date(r.created_at * 1000).toLocaleString() : '';
    const by = r.executor ? ` · ${execName(r.executor)}` : '';
    head.textContent = `${when} · ${String(r.realm)} · ${String(r.status)}${by}`;
    const body = document.createElement('div');
    const clip = (s) => (s.length > 200 ? `${s.slice(0, 200)}…` : s);
    const prompt = typeof r.prompt === 'string' ? clip(r.prompt) : '';
    const answer = typeof r.result_text === 'string' ? clip(r.result_text)
      : r.error_code ? `${r.error_code}: ${String(r.error_message || '')}` : '';
    body.textContent = prompt && answer ? `${prompt} → ${answer}` : prompt || answer;
    li.append(head, body);
    return li;
  }));
}

// --- tabs ------------------------------------------------------------------------------------

// The tab the address asked for: a realm's tab built from the catalog is shown once it exists.
const WANTED_TAB = location.hash.slice(1);

function showTab(name) {
  const known = TABS.includes(name);
  if (!known) name = 'chat';
  $$('[data-tab]').forEach((b) => {
    const on = b.dataset.tab === name;
    b.setAttribute('aria-selected', String(on));
    b.classList.toggle('active', on);
  });
  TABS.forEach((t) => { $(`#tab-${t}`).hidden = t !== name; });
  if (known && location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
}

// --- wiring ----------------------------------------------------------------------------------

function onEnter(input, fn) {
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); fn(); }
  });
}

$$('[data-tab]').forEach((b) => b.addEventListener('click', () => showTab(b.dataset.tab)));
$('#whoami').textContent = GUID;
$('#nickname-save').addEventListener('click', saveNickname);
onEnter($('#nickname'), saveNickname);
$('#chat-send').addEventListener('click', sendChat);
onEnter($('#chat-prompt'), sendChat);
$('#chat-speak').addEventListener('click', speakChat);
$('#imagine-send').addEventListener('click', sendImagine);
onEnter($('#imagine-prompt'), sendImagine);
$('#speech-record').addEventListener('click', toggleRecord);
$('#speech-send').addEventListener('click', sendSpeechFile);
$('#tts-send').addEventListener('click', sendTts);
updateRecordButton();
showTab(location.hash.slice(1));
connect();
