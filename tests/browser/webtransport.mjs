// Opens a WebTransport session from a real headless Chromium to the node's /wt endpoint, trusting
// the self-signed certificate by its SHA-256 hash, logs in through the query string, sends a chat
// to PEER and waits for one back. Usage: node webtransport.mjs PAGE_URL QUIC_PORT FINGERPRINT PEER
import { chromium } from "playwright-core";

const [pageUrl, port, fingerprint, peer] = process.argv.slice(2);
if (!peer) throw new Error("usage: node webtransport.mjs PAGE_URL QUIC_PORT FINGERPRINT PEER");

// QUIC stays enabled: WebTransport runs over it.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error("page:", m.text()));
  await page.goto(pageUrl);
  const result = await page.evaluate(async ({ port, fingerprint, peer }) => {
    const hash = new Uint8Array(fingerprint.split(":").map((h) => parseInt(h, 16)));
    const wt = new WebTransport(`https://127.0.0.1:${port}/wt?username=wtuser&password=pw`, {
      serverCertificateHashes: [{ algorithm: "sha-256", value: hash }],
    });
    await wt.ready;
    const stream = await wt.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    const reader = stream.readable.getReader();
    const enc = new TextEncoder();
    const dec = new TextDecoder();
    let buf = "";
    const send = (obj) => writer.write(enc.encode(JSON.stringify(obj) + "\n"));
    const next = async () => {
      for (;;) {
        const i = buf.indexOf("\n");
        if (i >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          return JSON.parse(line);
        }
        const { value, done } = await reader.read();
        if (done) throw new Error("stream closed");
        buf += dec.decode(value, { stream: true });
      }
    };
    // Frames of other commands are kept for later: the node writes pushes queued for a session
    // before a reply, so a chat from PEER may arrive ahead of our own send's acknowledgement.
    const kept = [];
    const until = async (cmd, want = () => true) => {
      const i = kept.findIndex((m) => m.command === cmd && want(m));
      if (i >= 0) return kept.splice(i, 1)[0];
      for (;;) {
        const m = await next();
        if (m.command === cmd && want(m)) return m;
        kept.push(m);
      }
    };
    // The stream reaches the server with its first bytes; the query-string login runs then.
    await send({ cmd: 13 });
    const login = await until(6);
    if (login.code !== 10007) return "login failed: " + JSON.stringify(login);
    console.log("logged in");
    await send({ cmd: 11, chatType: 2, to: peer, content: "from webtransport" });
    const reply = await until(12);
    console.log("send acknowledged");
    if (reply.code !== 10000) return "send failed: " + JSON.stringify(reply);
    const m = await until(11, (m) => m.data.from === peer);
    wt.close();
    return "got " + m.data.content;
  }, { port, fingerprint, peer });
  console.log(result);
} finally {
  await browser.close();
}
