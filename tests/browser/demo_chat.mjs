// Opens kefu's own demo page in two tabs of a headless Chromium, logs in two users and checks
// that a group message and a private message cross between them. Usage: node demo_chat.mjs URL
import { chromium } from "playwright-core";

const url = process.argv[2];
if (!url) throw new Error("usage: node demo_chat.mjs http://127.0.0.1:PORT/");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const deadline = { timeout: 15000 };
try {
  const context = await browser.newContext();
  const login = async (user) => {
    const page = await context.newPage();
    await page.goto(url);
    await page.fill("#user", user);
    await page.click("#login");
    await page.waitForFunction((u) => document.querySelector("#status").textContent === "online as " + u, user, deadline);
    return page;
  };
  const alice = await login("alice");
  const bob = await login("bob");
  // Each sees the other in the online list (alice learns of bob through the join notice).
  await alice.waitForSelector('#online li[data-user="bob"].online', deadline);
  await bob.waitForSelector('#online li[data-user="alice"].online', deadline);

  // Group chat.
  await alice.selectOption("#target", "g:100");
  await alice.fill("#text", "hello from alice");
  await alice.press("#text", "Enter");
  await bob.waitForSelector('.msg[data-from="alice"]:has-text("hello from alice")', deadline);

  // Private chat the other way.
  await bob.selectOption("#target", "u:alice");
  await bob.fill("#text", "hi alice, bob here");
  await bob.click("#send");
  await alice.waitForSelector('.msg[data-from="bob"]:has-text("hi alice, bob here")', deadline);

  // History button brings back the private conversation.
  await alice.selectOption("#target", "u:bob");
  await alice.click("#history");
  await alice.waitForSelector('.msg[data-from="bob"]:has-text("hi alice, bob here")', deadline);
  console.log("demo chat ok");
} finally {
  await browser.close();
}
