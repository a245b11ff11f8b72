// Privora's web client: sign in, find people, chat live, survive lost connections.
//
// It speaks the server's own protocol (docs/protocol.md): `login` first, then `message` frames;
// the server answers a login with `offline`*, `history`, `contacts` and `presence`, and refuses
// things with `error` frames, shown here in words. The server sends nothing back for a message
// it stored, so every message is followed by a `ping`: frames are handled in order, so its
// `pong` means the message before it was stored, and an `error` before the `pong` is that
// message's refusal. Each message carries a `msg_id`, which the server keeps, so a message
// shown while it was being sent is recognised when it comes back in `history`. The login asks
// for acks (`"acks": true`): then the server takes a `msg_id` as the message's name, so a
// message sent again after a lost connection is not stored (nor delivered) twice. The `ack`
// frames themselves are not needed here (the `pong` says as much) and are ignored.

const API = new URL("api/", document.baseURI);
const WS_URL = (() => {
  const url = new URL("ws", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
})();
const SESSION_KEY = "privora.session";
const HEARTBEAT_MS = 20000; // a ping now and then shows a dead connection quickly
const PONG_TIMEOUT_MS = 10000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30000;

// --- the server's error codes, in words ----------------------------------------------------
const ERROR_WORDS = {
  unknown_recipient: "That person has not joined Privora yet, so the message was not sent.",
  rate_limited: "You are sending messages too quickly. Wait a moment, then try again.",
  too_large: "That message is too long to send.",
  unavailable: "The server could not save that message just now. Try again in a moment.",
  internal: "Something went wrong on the server. The message was not sent.",
  invalid_token: "Your sign-in is no longer valid. Please sign in again.",
  login_required: "The connection was not signed in. Reconnecting…",
  bad_frame: "The server could not read what was sent",
  unknown_type: "The server does not understand that kind of request.",
};

function inWords(code, message) {
  const words = ERROR_WORDS[code] || "The server refused that";
  return code === "bad_frame" || !ERROR_WORDS[code] ? `${words}: ${message}` : words;
}

// --- state -----------------------------------------------------------------------------------
const state = {
  session: null,         // { token, userId, displayName, kind: "development" | "firebase" }
  contacts: new Map(),   // userId -> { userId, displayName, online, unread }
  threads: new Map(),    // partner userId -> Map(key -> message)
  active: null,          // partner userId of the open conversation
  socket: null,
  loggedIn: false,
  attempt: 0,            // reconnect attempts since the last good login
  retryTimer: null,
  retryAt: 0,
  inFlight: [],          // what each outstanding ping stands for, oldest first
  outbox: [],            // messages written while offline, sent after the next login
  heartbeat: null,
  pongDeadline: null,
  firebase: null,        // { auth, module } when Firebase sign-in is configured
};

const $ = (id) => document.getElementById(id);

// --- start -----------------------------------------------------------------------------------
async function start() {
  let config = { auth: "development", firebase: null };
  try {
    const response = await fetch(new URL("config", API));
    if (response.ok) config = await response.json();
  } catch (_) {
    // The server is not reachable: show the sign-in page; signing in will say so.
  }
  if (config.auth === "firebase" && config.firebase) {
    await setUpFirebase(config.firebase);
  }
  const saved = loadSession();
  if (saved && saved.kind === config.auth) {
    enterChat(saved);
  } else {
    showSignIn(config.auth);
  }
}

function loadSession() {
  try {
    return JSON.parse(localStorage.getItem(SESSION_KEY));
  } catch (_) {
    return null;
  }
}

// --- sign in -----------------------------------------------------------------------------------
function showSignIn(kind, reason = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("dev-signin").hidden = kind !== "development";
  $("firebase-signin").hidden = kind !== "firebase";
  $("signin-error").textContent = reason;
  if (kind === "development") $("name").focus();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  $("sign-in").disabled = true;
  $("signin-error").textContent = "";
  try {
    const response = await fetch(new URL("dev/token", API), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `the server answered ${response.status}`);
    const session = { token: body.token, userId: body.userId, displayName: body.displayName, kind: "development" };
    localStorage.setItem(SESSION_KEY, JSON.stringify(session));
    enterChat(session);
  } catch (error) {
    $("signin-error").textContent = `Could not sign in: ${error.message}`;
  } finally {
    $("sign-in").disabled = false;
  }
});

// Firebase: the Web SDK from Google's CDN, configured by the server (`PRIVORA_FIREBASE_WEB_CONFIG`).
async function setUpFirebase(webConfig) {
  const version = "10.14.1";
  try {
    const app = await import(`https://www.gstatic.com/firebasejs/${version}/firebase-app.js`);
    const auth = await import(`https://www.gstatic.com/firebasejs/${version}/firebase-auth.js`);
    const firebaseApp = app.initializeApp(webConfig);
    state.firebase = { auth: auth.getAuth(firebaseApp), module: auth };
  } catch (error) {
    $("signin-error").textContent = `Could not load Firebase sign-in: ${error.message}`;
  }
}

$("google-sign-in").addEventListener("click", async () => {
  if (!state.firebase) return;
  const { auth, module } = state.firebase;
  try {
    const result = await module.signInWithPopup(auth, new module.GoogleAuthProvider());
    const user = result.user;
    const session = {
      token: await user.getIdToken(),
      userId: user.email || user.uid,
      displayName: user.displayName || user.email || user.uid,
      kind: "firebase",
    };
    localStorage.setItem(SESSION_KEY, JSON.stringify(session));
    enterChat(session);
  } catch (error) {
    $("signin-error").textContent = `Could not sign in: ${error.message}`;
  }
});

/// A fresh token for each connection: Firebase ID tokens live one hour.
async function currentToken() {
  if (state.session.kind === "firebase" && state.firebase?.auth.currentUser) {
    state.session.token = await state.firebase.auth.currentUser.getIdToken();
  }
  return state.session.token;
}

$("sign-out").addEventListener("click", () => signOut(""));

function signOut(reason) {
  localStorage.removeItem(SESSION_KEY);
  const kind = state.session?.kind || "development";
  state.session = null;
  clearTimeout(state.retryTimer);
  if (state.socket) {
    state.socket.onclose = null;
    state.socket.close(1000, "signed out");
    state.socket = null;
  }
  if (kind === "firebase" && state.firebase) state.firebase.module.signOut(state.firebase.auth);
  state.contacts.clear();
  state.threads.clear();
  state.active = null;
  state.outbox = [];
  location.hash = "";
  render();
  showSignIn(kind, reason);
}

function enterChat(session) {
  state.session = session;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = session.displayName;
  paintAvatar($("me-avatar"), session.displayName, session.userId);
  render();
  connect();
}

// --- the connection ---------------------------------------------------------------------------
async function connect() {
  clearTimeout(state.retryTimer);
  if (!state.session) return;
  setStatus("connecting", "Connecting…");
  const token = await currentToken().catch(() => state.session?.token);
  if (!state.session) return;
  const socket = new WebSocket(WS_URL);
  state.socket = socket;
  state.loggedIn = false;
  state.inFlight = [];
  socket.onopen = () => socket.send(JSON.stringify({ type: "login", token, acks: true }));
  socket.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    handleFrame(frame);
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    stopHeartbeat();
    state.socket = null;
    state.loggedIn = false;
    // Messages that were on their way and not confirmed are sent again after the next login;
    // the server knows them by their msg_id and does not store one twice.
    for (const entry of state.inFlight) {
      if (entry.message && entry.message.status === "sending") queueForSending(entry.message);
    }
    state.inFlight = [];
    if (event.code === 1008) {
      signOut(inWords("invalid_token", event.reason));
      return;
    }
    scheduleReconnect();
  };
}

/// Exponential backoff with full jitter: many clients cut off at once do not come back at once.
function scheduleReconnect() {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
  const delay = Math.round(Math.random() * ceiling);
  state.attempt += 1;
  state.retryAt = Date.now() + delay;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay);
  showRetryCountdown();
}

function showRetryCountdown() {
  if (state.socket || !state.session) return;
  if (!navigator.onLine) {
    setStatus("offline", "Offline — waiting for the network");
    return;
  }
  const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  setStatus("connecting", seconds > 0 ? `Reconnecting in ${seconds} s…` : "Reconnecting…");
  if (seconds > 0) setTimeout(showRetryCountdown, 1000);
}

window.addEventListener("online", () => {
  if (state.session && !state.socket) {
    state.attempt = 0;
    connect();
  }
});
window.addEventListener("offline", () => {
  if (state.session && !state.socket) showRetryCountdown();
});

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status-text").textContent = text;
  const banner = $("banner");
  banner.hidden = kind === "online";
  banner.classList.toggle("offline", kind === "offline");
  banner.textContent = text;
}

function send(frame) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

/// A ping whose pong confirms what came before it (`message`), or just that the line is alive.
function sendPing(message = null) {
  if (send({ type: "ping" })) state.inFlight.push({ message });
}

function startHeartbeat() {
  stopHeartbeat();
  state.heartbeat = setInterval(() => {
    sendPing();
    if (!state.pongDeadline) {
      state.pongDeadline = setTimeout(() => state.socket && state.socket.close(4000, "no pong"), PONG_TIMEOUT_MS);
    }
  }, HEARTBEAT_MS);
}

function stopHeartbeat() {
  clearInterval(state.heartbeat);
  clearTimeout(state.pongDeadline);
  state.heartbeat = null;
  state.pongDeadline = null;
}

// --- frames from the server ----------------------------------------------------------------------
function handleFrame(frame) {
  switch (frame.type) {
    case "offline":
    case "message":
      addMessage(frame);
      break;
    case "history":
      for (const message of frame.messages || []) addMessage(message, { quiet: true });
      break;
    case "contacts":
      for (const contact of frame.contacts || []) upsertContact(contact.userId, contact.displayName);
      loggedIn();
      break;
    case "presence":
      upsertContact(frame.userId).online = frame.status === "online";
      break;
    case "pong": {
      clearTimeout(state.pongDeadline);
      state.pongDeadline = null;
      const entry = state.inFlight.shift();
      if (entry?.message && entry.message.status === "sending") entry.message.status = "sent";
      break;
    }
    case "error": {
      const words = inWords(frame.code, frame.message);
      const entry = state.inFlight[0];
      if (entry?.message && entry.message.status === "sending") {
        entry.message.status = "failed";
        entry.message.error = words;
      }
      toast(words);
      break;
    }
    default:
      return; // newer servers may send frames this client does not know
  }
  render();
}

/// `contacts` ends the login burst: the connection is good, send what waited.
function loggedIn() {
  if (state.loggedIn) return;
  state.loggedIn = true;
  state.attempt = 0;
  setStatus("online", "Online");
  startHeartbeat();
  const waiting = state.outbox;
  state.outbox = [];
  for (const message of waiting) transmit(message);
}

function upsertContact(userId, displayName) {
  let contact = state.contacts.get(userId);
  if (!contact) {
    contact = { userId, displayName: displayName || userId, online: false, unread: 0 };
    state.contacts.set(userId, contact);
  } else if (displayName && displayName !== userId) {
    contact.displayName = displayName;
  }
  return contact;
}

function thread(partner) {
  if (!state.threads.has(partner)) state.threads.set(partner, new Map());
  return state.threads.get(partner);
}

/// One stored message (live, offline or from history). Known ones are merged, not doubled.
function addMessage(frame, { quiet = false } = {}) {
  const me = state.session.userId;
  const mine = frame.from === me;
  const partner = mine ? frame.to : frame.from;
  const messages = thread(partner);
  const msgKey = frame.msg_id != null ? `m:${frame.from}:${frame.msg_id}` : null;
  const known = messages.get(`id:${frame.id}`) || (msgKey && messages.get(msgKey));
  if (known) {
    Object.assign(known, { id: frame.id, timestamp: frame.timestamp, status: "sent" });
    messages.set(`id:${frame.id}`, known);
    return;
  }
  const message = {
    id: frame.id,
    from: frame.from,
    to: frame.to,
    text: frame.message,
    timestamp: frame.timestamp,
    status: "sent",
  };
  messages.set(`id:${frame.id}`, message);
  if (msgKey) messages.set(msgKey, message);
  const contact = upsertContact(partner, mine ? undefined : frame.fromDisplayName);
  if (!mine && !quiet && partner !== state.active) contact.unread += 1;
}

// --- sending ----------------------------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("draft").value.trim();
  if (!text || !state.active) return;
  $("draft").value = "";
  autosize();
  const msgId = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  const message = {
    msgId,
    from: state.session.userId,
    to: state.active,
    text,
    timestamp: new Date().toISOString(),
    status: "sending",
  };
  thread(state.active).set(`m:${message.from}:${msgId}`, message);
  transmit(message);
  render();
});

$("draft").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("draft").addEventListener("input", autosize);

function autosize() {
  const area = $("draft");
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, 160)}px`;
}

function transmit(message) {
  message.status = "sending";
  message.error = null;
  if (state.loggedIn && send({ type: "message", to: message.to, message: message.text, msg_id: message.msgId })) {
    sendPing(message);
  } else {
    queueForSending(message);
  }
}

function queueForSending(message) {
  if (!state.outbox.includes(message)) state.outbox.push(message);
}

// --- search -----------------------------------------------------------------------------------
let searchTimer = null;
let searchSeq = 0;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, 250);
});
$("search").addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeResults();
});

async function search() {
  const q = $("search").value.trim();
  const seq = ++searchSeq;
  if (!q) return closeResults();
  const list = $("results");
  try {
    const url = new URL("search-users", API);
    url.searchParams.set("q", q);
    const response = await fetch(url, { headers: { Authorization: `Bearer ${await currentToken()}` } });
    const body = await response.json().catch(() => ({}));
    if (seq !== searchSeq) return; // a newer search is on its way
    if (response.status === 401) return signOut(inWords("invalid_token"));
    if (!response.ok) throw new Error(body.detail || `the server answered ${response.status}`);
    list.replaceChildren();
    const people = body.filter((user) => user.userId !== state.session.userId);
    for (const user of people) {
      const item = el("li", { className: "result", tabIndex: 0 });
      item.dataset.user = user.userId;
      const avatar = el("div", { className: "avatar" });
      paintAvatar(avatar, user.displayName, user.userId);
      const who = el("div", {}, [el("div", { className: "name", textContent: user.displayName }),
        el("div", { className: "sub", textContent: user.userId })]);
      item.append(avatar, who);
      const choose = () => {
        upsertContact(user.userId, user.displayName);
        $("search").value = "";
        closeResults();
        openConversation(user.userId);
      };
      item.addEventListener("click", choose);
      item.addEventListener("keydown", (e) => e.key === "Enter" && choose());
      list.append(item);
    }
    if (people.length === 0) list.append(el("li", { className: "none", textContent: `Nobody called “${q}” yet.` }));
    list.hidden = false;
  } catch (error) {
    if (seq === searchSeq) toast(`Search failed: ${error.message}`);
  }
}

function closeResults() {
  $("results").hidden = true;
  $("results").replaceChildren();
}

// --- rendering ------------------------------------------------------------------------------------
function openConversation(userId) {
  state.active = userId;
  const contact = upsertContact(userId);
  contact.unread = 0;
  location.hash = encodeURIComponent(userId);
  render();
  $("draft").focus();
}

function render() {
  renderContacts();
  renderConversation();
}

function lastMessage(partner) {
  let last = null;
  for (const m of thread(partner).values()) if (!last || m.timestamp > last.timestamp) last = m;
  return last;
}

function renderContacts() {
  const list = $("contacts");
  const contacts = [...state.contacts.values()].sort((a, b) => {
    const la = lastMessage(a.userId)?.timestamp || "";
    const lb = lastMessage(b.userId)?.timestamp || "";
    return lb.localeCompare(la) || a.displayName.localeCompare(b.displayName);
  });
  list.replaceChildren();
  for (const contact of contacts) {
    const item = el("li", { className: "contact" });
    item.dataset.user = contact.userId;
    item.classList.toggle("active", contact.userId === state.active);
    item.classList.toggle("online", contact.online);
    const avatar = el("div", { className: "avatar" }, [el("span", { className: "presence-dot" })]);
    paintAvatar(avatar, contact.displayName, contact.userId);
    const last = lastMessage(contact.userId);
    const preview = last ? `${last.from === state.session?.userId ? "You: " : ""}${last.text}` : contact.online ? "Online" : "Offline";
    const who = el("div", { className: "who" }, [
      el("div", { className: "name", textContent: contact.displayName }),
      el("div", { className: "sub", textContent: preview }),
    ]);
    item.append(avatar, who);
    if (contact.unread > 0) item.append(el("span", { className: "unread", textContent: String(contact.unread) }));
    item.addEventListener("click", () => openConversation(contact.userId));
    list.append(item);
  }
  $("no-contacts").hidden = contacts.length > 0;
}

function renderConversation() {
  const partner = state.active;
  $("welcome").hidden = !!partner;
  $("peer-header").hidden = !partner;
  $("messages").hidden = !partner;
  $("composer").hidden = !partner;
  if (!partner) return;
  const contact = upsertContact(partner);
  $("peer-name").textContent = contact.displayName;
  paintAvatar($("peer-avatar"), contact.displayName, contact.userId);
  $("peer-presence").textContent = contact.online ? "Online" : "Offline";
  $("peer-presence").classList.toggle("online", contact.online);

  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const unique = [...new Set(thread(partner).values())].sort((a, b) =>
    a.timestamp === b.timestamp ? (a.id || Infinity) - (b.id || Infinity) : a.timestamp.localeCompare(b.timestamp));
  list.replaceChildren();
  let day = "";
  for (const m of unique) {
    const when = new Date(m.timestamp);
    const thisDay = when.toLocaleDateString(undefined, { weekday: "long", month: "short", day: "numeric" });
    if (thisDay !== day) {
      day = thisDay;
      list.append(el("li", { className: "day", textContent: thisDay }));
    }
    const mine = m.from === state.session.userId;
    const item = el("li", { className: `msg${mine ? " mine" : ""}${m.status === "failed" ? " failed" : ""}` });
    item.dataset.status = m.status;
    const time = when.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    const status = !mine ? "" : m.status === "sending" ? " · sending…" : m.status === "failed" ? "" : " · ✓";
    const meta = el("div", { className: "meta", textContent: m.status === "failed" ? m.error : `${time}${status}` });
    item.append(el("div", { className: "bubble", textContent: m.text }), meta);
    if (m.status === "failed") {
      const retry = el("button", { className: "retry", type: "button", textContent: "Try again" });
      retry.addEventListener("click", () => {
        transmit(m);
        render();
      });
      meta.append(" ", retry);
    }
    list.append(item);
  }
  if (atBottom || list.dataset.partner !== partner) list.scrollTop = list.scrollHeight;
  list.dataset.partner = partner;
}

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/// Initials on a colour picked from the user id, so a person keeps their colour.
function paintAvatar(node, name, userId) {
  const initials = (name || "?").split(/\s+/).filter(Boolean).slice(0, 2).map((w) => [...w][0]).join("").toUpperCase();
  let hash = 0;
  for (const c of userId || "") hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  node.style.background = `hsl(${hash % 360} 55% 52%)`;
  const dot = node.querySelector(".presence-dot");
  node.textContent = initials;
  if (dot) node.append(dot);
}

function toast(text) {
  const node = el("div", { className: "toast error", textContent: text });
  $("toasts").append(node);
  setTimeout(() => node.remove(), 6000);
}

document.addEventListener("click", (event) => {
  if (!event.target.closest(".search")) closeResults();
});

start();
