// Open a gru-deploy edge bundle's web page in a system Chromium (headless, driven by
// playwright-core; no browser is downloaded), wait for its result, save a screenshot and
// print one JSON line: {"status", "verdict", "label", "maxAbs", "tolerance", ...}.
//
//   node check_page.mjs URL SCREENSHOT.png [TIMEOUT_MS]
//
// CHROMIUM names the browser (default /usr/bin/chromium). Exit 0 when the page reports a
// match with the golden output, 1 when it reports anything else, 2 on bad usage.
import { chromium } from "playwright-core";

const [url, screenshot, timeoutArg] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node check_page.mjs URL SCREENSHOT.png [TIMEOUT_MS]");
  process.exit(2);
}
const timeout = Number(timeoutArg || 60000);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
const messages = [];
let out;
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  page.on("console", (m) => messages.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => messages.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => messages.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  const started = Date.now();
  await page.goto(url, { timeout });
  await page.waitForSelector('#result:not([data-status="pending"])', { timeout });
  const seconds = (Date.now() - started) / 1000;
  out = await page.evaluate(() => ({
    ...window.gruResult,
    verdict: document.getElementById("verdict").textContent,
    labelText: document.getElementById("label").textContent,
    bars: document.querySelectorAll("#bars rect.bar").length,
    statusLine: document.getElementById("status").textContent,
  }));
  out.seconds = seconds;
  await page.screenshot({ path: screenshot, fullPage: true });
} catch (error) {
  out = { status: "error", error: String(error && error.message || error) };
} finally {
  await browser.close();
}
out.browser = browser.version ? browser.version() : undefined;
out.console = messages.slice(-20);
console.log(JSON.stringify(out));
process.exit(out.status === "match" ? 0 : 1);
