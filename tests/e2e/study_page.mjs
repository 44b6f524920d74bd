// Opens one study page of the dashboard in Debian's chromium with playwright-core, waits until every
// finding's thumbnail has loaded, reads the findings table, screenshots the page and prints what it
// saw as JSON on stdout. Input (environment): E2E_URL (the study page), E2E_OUT (screenshot folder).
import { chromium } from "playwright-core";

const url = process.env.E2E_URL;
const out = process.env.E2E_OUT;
const TIMEOUT = 30000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1100 } });
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => { if (msg.type() === "error" && !/Failed to load resource/.test(msg.text())) errors.push(msg.text()); });
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  await page.goto(url);
  await page.waitForSelector('[data-testid="study-nodules"] tr[data-nodule]');
  await page.waitForFunction(
    () => [...document.querySelectorAll('img[data-testid="finding-thumbnail"]')].every((i) => i.complete && i.naturalWidth > 0),
    null,
    { timeout: TIMEOUT },
  );
  const rows = await page.$$eval('[data-testid="study-nodules"] tr[data-nodule]', (trs) =>
    trs.map((tr) => ({
      number: Number(tr.dataset.nodule),
      lungRads: tr.querySelector('[data-col="lung-rads"]').textContent.trim(),
      risk: tr.querySelector('[data-col="risk"]').textContent.trim(),
      thumbnailWidth: tr.querySelector('img[data-testid="finding-thumbnail"]')?.naturalWidth || 0,
    })));
  const studyLungRads = await page.textContent('[data-testid="study-lung-rads"]');
  await page.screenshot({ path: `${out}/demo-study.png`, fullPage: true });
  const noDestination = await page.$$eval('[data-testid="no-destination"] li code', (els) => els.map((e) => e.textContent));
  process.stdout.write(JSON.stringify({ rows, studyLungRads, noDestination, errors }));
} finally {
  await browser.close();
}
