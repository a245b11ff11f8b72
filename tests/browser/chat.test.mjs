// A real browser against a real server: Debian's chromium, driven by playwright-core (no
// browser download). Two people sign in (development mode), find each other by search, chat
// live; one closes the page, misses a message, comes back and gets it. A screenshot of the
// conversation is saved under test-artifacts/.
//
// Usage: node chat.test.mjs http://127.0.0.1:PORT/ [screenshot.png]
// (crates/privora/tests/it/browser.rs starts the server and runs this.)

import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { chromium } from "playwright-core";

const base = process.argv[2];
const screenshot = process.argv[3] || "test-artifacts/browser-chat.png";
if (!base || !base.startsWith("http://127.0.0.1:")) {
  console.error("usage: node chat.test.mjs http://127.0.0.1:PORT/ [screenshot.png]");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const PATIENCE = 15000;

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

async function signIn(context, name) {
  const page = await context.newPage();
  page.setDefaultTimeout(PATIENCE);
  page.on("pageerror", (error) => console.error(`[${name}] page error: ${error.message}`));
  await page.goto(base);
  await page.fill("#name", name);
  await page.click("#sign-in");
  await page.waitForSelector('#status[data-state="online"]');
  check((await page.textContent("#me-name")) === name, `${name} is signed in and online`);
  return page;
}

async function openChatWith(page, query, name) {
  await page.fill("#search", query);
  const result = page.locator(".result", { hasText: name });
  await result.waitFor();
  await result.click();
  await page.waitForFunction((n) => document.querySelector("#peer-name")?.textContent === n, name);
}

async function say(page, text) {
  await page.fill("#draft", text);
  await page.press("#draft", "Enter");
  // Sent = the server handled it (its pong came back) and refused nothing.
  await page.locator(".msg.mine[data-status=sent]", { hasText: text }).waitFor();
}

async function sees(page, text, who) {
  await page.locator(".msg:not(.mine) .bubble", { hasText: text }).waitFor();
  check(true, `${who} sees "${text}"`);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  // Playwright gives the browser a new, empty --user-data-dir of its own (it refuses one passed
  // in args), and removes it afterwards.
});
let failed = false;
try {
  const viewport = { width: 1100, height: 720 };
  const aliceContext = await browser.newContext({ viewport });
  let bobContext = await browser.newContext({ viewport });
  const alice = await signIn(aliceContext, "Alice Liddell");
  let bob = await signIn(bobContext, "Bob Marley");

  // Alice finds Bob by a part of his name and writes; Bob sees it live.
  await openChatWith(alice, "marl", "Bob Marley");
  await say(alice, "Hi Bob! Are you coming tonight?");
  // Alice appears in Bob's conversations as her message arrives; he opens it.
  await bob.locator('.contact[data-user="alice.liddell"] .unread').waitFor();
  check(true, "Bob gets a conversation with Alice, marked unread");
  await bob.locator('.contact[data-user="alice.liddell"]').click();
  await sees(bob, "Hi Bob! Are you coming tonight?", "Bob");
  await say(bob, "Yes, see you at eight.");
  await sees(alice, "Yes, see you at eight.", "Alice");

  // Bob leaves; Alice sees him go offline and writes anyway.
  await bobContext.close();
  await alice.waitForFunction(() => document.querySelector("#peer-presence")?.textContent === "Offline");
  check(true, "Alice sees Bob go offline");
  await say(alice, "I will bring the guitar.");

  // Bob comes back in a new browser: the missed message is waiting, with the history.
  bobContext = await browser.newContext({ viewport });
  bob = await signIn(bobContext, "Bob Marley");
  const unread = bob.locator('.contact[data-user="alice.liddell"] .unread');
  await unread.waitFor();
  check((await unread.textContent()) === "1", "Bob has one unread message from Alice");
  await bob.locator('.contact[data-user="alice.liddell"]').click();
  await sees(bob, "I will bring the guitar.", "Bob (missed while away)");
  const bubbles = await bob.locator(".msg .bubble").allTextContents();
  check(
    JSON.stringify(bubbles) ===
      JSON.stringify(["Hi Bob! Are you coming tonight?", "Yes, see you at eight.", "I will bring the guitar."]),
    "Bob's conversation holds the whole history, in order, once",
  );
  await alice.waitForSelector("#peer-presence.online");
  check(true, "Alice sees Bob online again");
  await say(bob, "Great, bring it!");
  await sees(alice, "Great, bring it!", "Alice");

  mkdirSync(dirname(screenshot), { recursive: true });
  await alice.screenshot({ path: screenshot });
  console.log(`screenshot: ${screenshot}`);

  // An error frame, in words, and an automatic reconnect: a frame over the server's hard limit
  // is answered with `too_large` and the connection is closed (1009). The page must say why,
  // show the reconnecting state, and come back online by itself.
  await alice.evaluate(() => {
    window.statusSeen = [];
    const status = document.querySelector("#status");
    new MutationObserver(() => window.statusSeen.push(status.dataset.state)).observe(status, { attributes: true });
  });
  await alice.fill("#draft", "x".repeat(300 * 1024));
  await alice.press("#draft", "Enter");
  const failed = alice.locator(".msg.failed .meta");
  await failed.waitFor();
  check((await failed.textContent()).includes("too long"), "the refused message says, in words, that it is too long");
  check((await alice.locator(".toast").first().textContent()).includes("too long"), "a notice says so too");
  await alice.waitForFunction(() => {
    const seen = window.statusSeen.join(" ");
    return /connecting.*online/.test(seen) && document.querySelector("#status").dataset.state === "online";
  });
  check(true, "the page showed it was reconnecting and came back online by itself");
  await say(alice, "Still here.");
  await sees(bob, "Still here.", "Bob (after Alice's reconnect)");
} catch (error) {
  failed = true;
  console.error(`not ok - ${error.stack || error}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
