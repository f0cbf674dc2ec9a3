// kefu's visitor widget: one script tag, no framework.
//   <script src="https://NODE/widget.js" data-inbox="WEBSITE_TOKEN" async></script>
// It asks the node for a visitor session (POST /v1/widget/session), logs in over WebSocket with
// the visitor token, and chats in the visitor's conversation (a closed group) with J-IM frames:
// cmd 11 messages, 100/101 typing, 103 read receipts, 104 sync from the last seq it has (so a
// reconnect backfills with no gap and no duplicate), 108 conversation changes (queue position,
// resolution). Its DOM lives in a shadow root, so the host page's styles do not reach it.
(function () {
  "use strict";
  var script = document.currentScript || document.querySelector("script[data-inbox]");
  if (!script || window.__kefuLoaded) return;
  window.__kefuLoaded = true;
  var origin = new URL(script.src, location.href).origin;
  var settings = window.kefuSettings || {};
  var inbox = script.getAttribute("data-inbox") || settings.inbox;
  var storeKey = "kefu:" + inbox;
  var queued = (window.kefu && window.kefu.q) || [];

  // -- state -----------------------------------------------------------------------------------
  var session = null; // the node's answer to /v1/widget/session
  var user = settings.user || null; // {id, name, email, identifier_hash}
  var ws = null;
  var lastSeq = 0;
  var seen = {}; // message ids shown
  var unread = 0;
  var isOpen = false;
  var retry = 0;
  var typingSent = 0;
  var typingTimer = null;
  var readSent = 0;
  var conv = null; // {id, status, agent, rated, queuePosition}
  var firstTry = null; // the timer of the next try at the first session
  var loggedIn = false;
  // Chats not yet answered by the node, oldest first: sent again after a reconnect (the node
  // keeps one message per client id, so a repeat is not a duplicate), and held until the first
  // login, so nothing typed early is lost (typed before the session exists, they get its
  // conversation when it comes).
  var unacked = [];

  function saved() {
    try { return JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { return {}; }
  }
  function save(v) {
    try { localStorage.setItem(storeKey, JSON.stringify(v)); } catch (e) { /* private mode: this tab only */ }
  }

  // -- DOM -------------------------------------------------------------------------------------
  var host = document.createElement("div");
  host.setAttribute("data-kefu", "");
  var root = host.attachShadow({ mode: "open" });
  var color = settings.color || "#2563eb";
  root.innerHTML =
    "<style>" +
    ":host{all:initial}*{box-sizing:border-box;font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif}" +
    ".l{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;background:" + color + ";color:#fff;font-size:24px;cursor:pointer;box-shadow:0 4px 12px rgba(0,0,0,.25);z-index:2147483646}" +
    ".b{position:absolute;top:-4px;right:-4px;min-width:20px;height:20px;border-radius:10px;background:#dc2626;color:#fff;font-size:12px;line-height:20px;text-align:center;padding:0 5px}" +
    ".p{position:fixed;right:20px;bottom:88px;width:360px;height:520px;max-height:calc(100vh - 110px);display:flex;flex-direction:column;background:#fff;color:#111;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.3);overflow:hidden;z-index:2147483647}" +
    ".h{background:" + color + ";color:#fff;padding:12px 14px;display:flex;align-items:center;gap:8px}.h b{flex:1;font-weight:600}.h button{background:none;border:0;color:#fff;font-size:20px;cursor:pointer}" +
    ".s{padding:6px 14px;background:#f3f4f6;color:#374151;font-size:12px}" +
    ".m{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:6px}" +
    ".g{max-width:80%;padding:8px 10px;border-radius:10px;white-space:pre-wrap;word-wrap:break-word}" +
    ".g[data-from=visitor]{align-self:flex-end;background:" + color + ";color:#fff}.g[data-from=agent]{align-self:flex-start;background:#f3f4f6}" +
    ".g.p{align-self:flex-end;background:" + color + ";color:#fff;opacity:.55}" +
    ".r{align-self:flex-end;font-size:11px;color:#6b7280}.r.greet{align-self:flex-start;font-size:13px}.l svg{vertical-align:middle}.t{padding:0 14px 4px;font-size:12px;color:#6b7280;min-height:18px}" +
    ".f{display:flex;gap:6px;padding:8px;border-top:1px solid #e5e7eb}.f textarea{flex:1;resize:none;border:1px solid #d1d5db;border-radius:8px;padding:8px;height:40px}" +
    ".f button,.o button,.c button{border:0;border-radius:8px;background:" + color + ";color:#fff;padding:0 14px;cursor:pointer}" +
    ".o,.c{padding:12px;display:flex;flex-direction:column;gap:8px;border-top:1px solid #e5e7eb}.o input,.o textarea,.c textarea{border:1px solid #d1d5db;border-radius:8px;padding:8px}" +
    ".o button,.c button{padding:8px}.c .n{display:flex;gap:4px}.c .n button{flex:1;background:#e5e7eb;color:#111}.c .n button.on{background:" + color + ";color:#fff}" +
    "[hidden]{display:none!important}" +
    "@media (max-width:600px){.p{inset:0;width:auto;height:100%;max-height:none;border-radius:0}}" +
    "</style>" +
    '<button class="l" data-testid="kefu-launcher" aria-label="Chat"><svg width="26" height="26" viewBox="0 0 24 24" fill="currentColor" aria-hidden="true"><path d="M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z"/></svg><span class="b" hidden></span></button>' +
    '<div class="p" data-testid="kefu-panel" hidden role="dialog" aria-label="Chat">' +
    '<div class="h"><b></b><button class="x" aria-label="Close">&times;</button></div>' +
    '<div class="s" data-testid="kefu-queue-position" hidden></div>' +
    '<div class="m" aria-live="polite"></div>' +
    '<div class="t" data-testid="kefu-typing"></div>' +
    '<form class="o" data-testid="kefu-offline-form" hidden><div class="w"></div><input name="name" placeholder="Name"><input name="email" type="email" placeholder="Email"><textarea name="message" placeholder="Message" required></textarea><button type="submit">Send</button></form>' +
    '<form class="c" data-testid="kefu-csat" hidden><div>How did we do?</div><div class="n"></div><textarea name="comment" placeholder="Comment (optional)"></textarea><button type="submit">Rate</button></form>' +
    '<form class="f"><textarea data-testid="kefu-input" placeholder="Write a message" aria-label="Message"></textarea><button type="submit" data-testid="kefu-send">Send</button></form>' +
    "</div>";
  var $ = function (s) { return root.querySelector(s); };
  var launcher = $(".l"), badge = $(".b"), panel = $(".p"), list = $(".m"), input = $("[data-testid=kefu-input]");
  var typing = $(".t"), queue = $(".s"), offline = $(".o"), csat = $(".c"), composer = $(".f");
  $(".h b").textContent = settings.title || "Chat";
  var rating = 0;
  for (var i = 1; i <= 5; i++) {
    (function (n) {
      var b = document.createElement("button");
      b.type = "button";
      b.textContent = n;
      b.setAttribute("data-rating", n);
      b.onclick = function () {
        rating = n;
        csat.querySelectorAll(".n button").forEach(function (x) { x.classList.toggle("on", +x.getAttribute("data-rating") === n); });
      };
      csat.querySelector(".n").appendChild(b);
    })(i);
  }

  function mount() {
    if (!host.isConnected) document.body.appendChild(host);
  }
  function fire(name, detail) {
    window.dispatchEvent(new CustomEvent(name, { detail: detail }));
  }
  function setBadge() {
    badge.hidden = unread === 0;
    badge.textContent = unread > 99 ? "99+" : String(unread);
  }
  function scroll() {
    list.scrollTop = list.scrollHeight;
  }
  // Keep the input above a phone's on-screen keyboard.
  if (window.visualViewport) {
    window.visualViewport.addEventListener("resize", function () {
      if (window.innerWidth <= 600) panel.style.height = window.visualViewport.height + "px";
    });
  }

  function beep() {
    try {
      var Ctx = window.AudioContext || window.webkitAudioContext;
      var ctx = new Ctx(), o = ctx.createOscillator(), g = ctx.createGain();
      o.frequency.value = 880;
      g.gain.value = 0.05;
      o.connect(g);
      g.connect(ctx.destination);
      o.start();
      o.stop(ctx.currentTime + 0.12);
    } catch (e) { /* no audio: nothing to do */ }
  }

  function line(cls, text) {
    var d = document.createElement("div");
    d.className = cls;
    d.textContent = text;
    list.appendChild(d);
    scroll();
    return d;
  }

  // A chat of this browser's not yet back from the node, drawn faded until it is.
  function pending(id) {
    return list.querySelector('[data-testid=kefu-pending][data-client-id="' + id + '"]');
  }
  function show(m, live) {
    if (!m || !m.id || seen[m.id]) return;
    seen[m.id] = true;
    if (m.seq > lastSeq) lastSeq = m.seq;
    var mine = session && m.from === session.visitor;
    var sending = mine && m.clientId && pending(m.clientId);
    if (sending) sending.remove();
    var d = document.createElement("div");
    d.className = "g";
    d.setAttribute("data-testid", "kefu-message");
    d.setAttribute("data-from", mine ? "visitor" : "agent");
    d.setAttribute("data-seq", m.seq || 0);
    d.textContent = m.content;
    list.appendChild(d);
    scroll();
    if (!mine) {
      typing.textContent = "";
      if (live) {
        if (!isOpen || document.hidden) {
          unread++;
          setBadge();
          beep();
        }
        fire("kefu:message", { from: m.from, content: m.content, seq: m.seq });
      }
      markRead();
    }
  }

  function markRead() {
    if (!isOpen || document.hidden || !conv || lastSeq <= readSent || !ws || ws.readyState !== 1) return;
    readSent = lastSeq;
    send({ cmd: 103, groupId: conv.id, seq: lastSeq });
  }

  function render() {
    if (!conv) return;
    var pos = conv.status === "queued" && conv.queuePosition;
    queue.hidden = !pos;
    if (pos) queue.textContent = "You are number " + pos + " in the queue";
    // Nobody there (closed, or no agent online) and nobody on it yet: the form instead.
    var away = session && !(session.agentsOnline && session.open !== false) && (conv.status === "new" || conv.status === "resolved");
    offline.hidden = !away;
    composer.hidden = !!away;
    if (away) offline.querySelector(".w").textContent = (session.inbox && session.inbox.awayMessage) || "We are away. Leave a message and we will get back to you.";
    csat.hidden = !(conv.status === "resolved" && !conv.rated && session && session.inbox && session.inbox.csat);
  }

  // -- the node --------------------------------------------------------------------------------
  function api(path, body, token) {
    var headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    // `retry` marks what is worth trying again: no answer (the network), or the node busy or
    // failing (429, 5xx). A refusal keeps its status whatever its body (a proxy's HTML page).
    var sent = fetch(origin + path, { method: "POST", headers: headers, body: JSON.stringify(body) }).catch(function (x) {
      x.retry = true;
      throw x;
    });
    return sent.then(function (r) {
      if (r.ok) return r.json();
      return r.json().catch(function () { return {}; }).then(function (j) {
        var e = new Error(j.error || j.msg || r.status);
        e.status = r.status;
        e.retry = r.status >= 500 || r.status === 429;
        throw e;
      });
    });
  }

  // Each start is one generation: an answer that comes after a restart began another is dropped.
  var generation = 0;
  function start() {
    var mine = ++generation;
    var s = saved();
    var body = { inbox: inbox };
    if (user && user.identifier_hash) body.user = user;
    else if (s.visitor && s.secret) {
      body.visitor = s.visitor;
      body.secret = s.secret;
      if (user) body.user = { id: user.id, name: user.name, email: user.email };
    } else if (user) body.user = { id: user.id, name: user.name, email: user.email };
    return api("/v1/widget/session", body).then(function (r) {
      if (mine !== generation) return null;
      session = r;
      conv = r.conversation;
      unacked.forEach(function (c) { if (!c.groupId) c.groupId = conv.id; });
      if (r.secret) save({ visitor: r.visitor, secret: r.secret });
      if (r.inbox && r.inbox.name && !settings.title) $(".h b").textContent = r.inbox.name;
      if (r.inbox && r.inbox.greeting && !list.querySelector(".greet")) line("r greet", r.inbox.greeting);
      render();
      connect();
      return r;
    });
  }

  function send(frame) {
    if (ws && ws.readyState === 1 && loggedIn) ws.send(JSON.stringify(frame));
  }

  // Closes the connection, if any, without the reconnect its close would start.
  function dropSocket() {
    if (ws) { ws.onclose = null; ws.close(); }
    ws = null;
  }

  function connect() {
    var url = origin.replace(/^http/, "ws") + "/?token=" + encodeURIComponent(session.token);
    // One connection at a time.
    dropSocket();
    ws = new WebSocket(url);
    ws.onmessage = function (e) {
      var f;
      try { f = JSON.parse(e.data); } catch (x) { return; }
      var d = f.data || f;
      switch (f.command) {
        case 6:
          if (f.code !== 10007) { ws.close(); session = null; return; }
          retry = 0;
          loggedIn = true;
          sync();
          unacked.forEach(function (c) { ws.send(JSON.stringify(c)); });
          break;
        case 11:
          if (d.groupId === conv.id) show(d, true);
          break;
        case 12:
          // Answers come in the order the chats were sent.
          var answered = unacked.shift();
          // A send that was not stored says so (sent and delivered replies need nothing).
          if (f.code !== 10000 && f.code !== 10001) {
            var faded = answered && pending(answered.id);
            if (faded) faded.remove();
            line("r", "Not sent: " + (f.msg || f.code));
          }
          break;
        case 105:
          (d.messages || []).forEach(function (m) { show(m, false); });
          if (d.more) sync();
          break;
        case 100:
          if (d.from !== session.visitor) typing.textContent = "Agent is typing…";
          break;
        case 101:
          typing.textContent = "";
          break;
        case 103:
          if (d.from !== session.visitor) markSeen(d.seq);
          break;
        case 108:
          if (d.conversation && d.conversation.id === conv.id) {
            conv = d.conversation;
            render();
          }
          break;
      }
    };
    ws.onclose = function () {
      ws = null;
      loggedIn = false;
      // Back with a fresh session after a failed login (an expired token), else the same one.
      var wait = Math.min(15000, 500 * Math.pow(2, retry++));
      setTimeout(function () { (session ? Promise.resolve(connect()) : start()).catch(function () { ws = null; setTimeout(start, wait); }); }, wait);
    };
  }

  function sync() {
    send({ cmd: 104, groupId: conv.id, seq: lastSeq, count: 100 });
  }

  function markSeen(seq) {
    var old = list.querySelector(".r.read");
    if (old) old.remove();
    var mine = list.querySelectorAll(".g[data-from=visitor]");
    var last = mine[mine.length - 1];
    if (last && +last.getAttribute("data-seq") <= seq) {
      var r = document.createElement("div");
      r.className = "r read";
      r.setAttribute("data-testid", "kefu-read");
      r.textContent = "Seen";
      last.after(r);
    }
  }

  function say(text) {
    text = text.trim();
    if (!text) return;
    var id = "w" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
    var chat = { cmd: 11, chatType: 1, groupId: conv ? conv.id : null, msgType: 0, content: text, id: id };
    unacked.push(chat);
    var d = line("g p", text);
    d.setAttribute("data-testid", "kefu-pending");
    d.setAttribute("data-client-id", id);
    typingSent = 0;
    // Without a conversation yet, the session's answer fills it in and the login sends it.
    if (!conv) return;
    send(chat);
    send({ cmd: 101, groupId: conv.id });
  }

  // -- events ----------------------------------------------------------------------------------
  launcher.onclick = function () { (isOpen ? close : open)(); };
  $(".x").onclick = function () { close(); };
  composer.onsubmit = function (e) {
    e.preventDefault();
    say(input.value);
    input.value = "";
  };
  input.onkeydown = function (e) {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      composer.onsubmit(e);
    }
  };
  input.oninput = function () {
    if (!conv) return;
    var now = Date.now();
    if (now - typingSent > 3000) {
      typingSent = now;
      send({ cmd: 100, groupId: conv.id });
    }
    clearTimeout(typingTimer);
    typingTimer = setTimeout(function () { typingSent = 0; send({ cmd: 101, groupId: conv.id }); }, 4000);
  };
  offline.onsubmit = function (e) {
    e.preventDefault();
    var f = new FormData(offline);
    api("/v1/widget/offline", { name: f.get("name") || null, email: f.get("email") || null, message: f.get("message") }, session.token).then(function () {
      offline.hidden = true;
      composer.hidden = false;
      line("r", "Thanks, we will reply here and by email.");
    }).catch(function (x) { line("r", "Could not send: " + x.message); });
  };
  csat.onsubmit = function (e) {
    e.preventDefault();
    if (!rating) return;
    api("/v1/widget/csat", { rating: rating, comment: new FormData(csat).get("comment") || null }, session.token).then(function () {
      conv.rated = true;
      render();
      line("r", "Thanks for your rating.");
    });
  };
  document.addEventListener("visibilitychange", markRead);
  // While the form is up, look again now and then: agents come online, hours begin.
  setInterval(function () {
    if (!session || offline.hidden) return;
    fetch(origin + "/v1/widget/conversation", { headers: { Authorization: "Bearer " + session.token } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) {
        if (!v) return;
        session.agentsOnline = v.agentsOnline;
        session.open = v.open;
        render();
      })
      .catch(function () {});
  }, 20000);

  function open() {
    mount();
    isOpen = true;
    panel.hidden = false;
    unread = 0;
    setBadge();
    markRead();
    scroll();
    input.focus();
  }
  function close() {
    isOpen = false;
    panel.hidden = true;
  }
  // Drops this browser's conversation view and connection, then starts a session again.
  function restart() {
    clearTimeout(firstTry);
    firstTry = null;
    dropSocket();
    loggedIn = false;
    // What is typed from now on waits for the new session's conversation, not the old one's.
    conv = null;
    unacked = [];
    seen = {};
    lastSeq = readSent = 0;
    list.textContent = "";
    return start();
  }
  function reset() {
    save({});
    session = null;
    conv = null;
    user = null;
    return restart();
  }
  function hostUser(id, info) {
    info = info || {};
    return { id: String(id), name: info.name, email: info.email, identifier_hash: info.identifier_hash };
  }
  function setUser(id, info) {
    user = hostUser(id, info);
    // A different person on this browser: start over as them.
    if (session) return restart();
  }

  window.kefu = { setUser: setUser, open: open, close: close, reset: reset };
  function boot() {
    mount();
    // Calls made before the script loaded, in order: setUser first matters for the session.
    var later = [];
    queued.forEach(function (c) {
      var name = c[0], args = c[1] || [];
      if (name === "setUser") user = hostUser(args[0], args[1]);
      else later.push(c);
    });
    var tries = 0;
    var ready = function (r) {
      later.forEach(function (c) { if (window.kefu[c[0]]) window.kefu[c[0]].apply(null, c[1] || []); });
      // A restart meanwhile (null: this answer was dropped) has its own session to wait for.
      if (r && session && conv) fire("kefu:ready", { visitor: session.visitor, conversation: conv.id });
    };
    (function first() {
      firstTry = null;
      start().then(ready, function (x) {
        // The node unreachable or overloaded for now: try again, backing off, so what the
        // visitor types meanwhile is still sent once a session comes. A refusal (a wrong inbox,
        // a bad identity) stays one, and so does anything else that went wrong. A restart
        // (setUser, reset) cancels the next try.
        console.warn("kefu widget:", x.message);
        if (x.retry) firstTry = setTimeout(first, Math.min(15000, 500 * Math.pow(2, tries++)));
      });
    })();
  }
  if (document.body) boot();
  else document.addEventListener("DOMContentLoaded", boot);
})();
