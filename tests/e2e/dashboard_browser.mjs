// Drives Debian's chromium with playwright-core through every dashboard page, reads the numbers
// shown, clicks "retry" on the failed study, opens the API's Swagger UI offline, and prints what
// it saw as JSON on stdout.
// Input (environment): E2E_BASE, E2E_TOKEN, E2E_OUT (screenshots), E2E_FAILED_UID, E2E_UIDS (JSON).
import { chromium } from "playwright-core";

const base = process.env.E2E_BASE;
const token = process.env.E2E_TOKEN;
const out = process.env.E2E_OUT;
const failedUid = process.env.E2E_FAILED_UID;
const uids = JSON.parse(process.env.E2E_UIDS || "[]");
const TIMEOUT = 30000;

async function texts(page, selector) {
  return page.$$eval(selector, (els) => Object.fromEntries(els.map((e) => [e.dataset.testid, e.textContent.trim()])));
}

async function waitForRefresh(page) {
  const before = Number((await page.getAttribute("#live", "data-refreshes")) || 0);
  await page.waitForFunction((n) => Number(document.getElementById("live").dataset.refreshes || 0) > n, before, { timeout: TIMEOUT });
}

async function overview(page) {
  await page.goto(`${base}/dashboard`);
  await page.waitForSelector("#latency-chart[data-drawn]", { timeout: TIMEOUT });
  await waitForRefresh(page); // live update without reload
  const shown = await texts(page, "#live [data-testid]");
  await page.screenshot({ path: `${out}/overview.png`, fullPage: true });
  return {
    shown,
    latencySeries: Number(await page.getAttribute("#latency-chart", "data-drawn")),
    refreshedAt: (await page.textContent("#refreshed-at")).trim(),
  };
}

async function studies(page) {
  await page.goto(`${base}/dashboard/studies`);
  const rows = await page.$$eval("table[data-testid=studies] tr[data-uid]", (trs) =>
    trs.map((tr) => ({
      uid: tr.dataset.uid,
      state: tr.querySelector("[data-col=state]").textContent.trim(),
      instances: Number(tr.querySelector("[data-col=instances]").textContent),
      series: Number(tr.querySelector("[data-col=series]").textContent),
    })));
  const total = Number(await page.textContent("[data-testid=studies-total]"));
  await page.screenshot({ path: `${out}/studies.png`, fullPage: true });
  await page.selectOption("#state-filter", "failed");
  await Promise.all([page.waitForURL(/state=failed/), page.click("#study-filter button[type=submit]")]);
  const failedTotal = Number(await page.textContent("[data-testid=studies-total]"));
  await page.fill("#search", failedUid.slice(-10));
  await Promise.all([page.waitForURL(/q=/), page.click("#study-filter button[type=submit]")]);
  const searched = await page.$$eval("tr[data-uid]", (trs) => trs.map((tr) => tr.dataset.uid));
  await page.screenshot({ path: `${out}/studies-failed-filter.png`, fullPage: true });
  return { rows, total, failedTotal, searched };
}

async function studyPages(page) {
  const result = {};
  for (const [i, uid] of uids.entries()) {
    await page.goto(`${base}/dashboard/studies/${uid}`);
    result[uid] = await texts(page, "#live [data-testid^=study-], #live [data-testid=patient-hidden]");
    await page.screenshot({ path: `${out}/study-${i}.png`, fullPage: true });
  }
  return result;
}

async function failures(page) {
  await page.goto(`${base}/dashboard/failures`);
  const row = `tr[data-uid="${failedUid}"]`;
  const before = await page.$$eval("table[data-testid=failures] tr[data-job]", (trs) =>
    trs.map((tr) => ({ job: tr.dataset.job, uid: tr.dataset.uid,
      code: tr.querySelector("[data-col=code]").textContent.trim(),
      reason: tr.querySelector("[data-col=reason]").textContent.trim(),
      attempts: Number(tr.querySelector("[data-col=attempts]").textContent) })));
  await page.screenshot({ path: `${out}/failures.png`, fullPage: true });
  // Not signed in: the action is refused.
  await page.click(`${row} button[data-action=retry]`);
  await page.waitForSelector("#flash.fail", { timeout: TIMEOUT });
  const refused = (await page.textContent("#flash")).trim();
  await page.fill("#token", token);
  await page.click("#signin-button");
  // The server sets the session cookie (HttpOnly: the page cannot read it, only ask who it is).
  await page.waitForFunction(() => /^signed in: token/.test(document.getElementById("signed-in").textContent), null, { timeout: TIMEOUT });
  const cookies = (await page.context().cookies()).filter((c) => c.name === "noduleai_session");
  const cookieFromScript = await page.evaluate(() => document.cookie);
  await page.click(`${row} button[data-action=retry]`);
  await page.waitForSelector("#flash.ok", { timeout: TIMEOUT });
  const accepted = (await page.textContent("#flash")).trim();
  await page.waitForSelector(row, { state: "detached", timeout: TIMEOUT });
  await page.screenshot({ path: `${out}/failures-after-retry.png`, fullPage: true });
  await page.goto(`${base}/dashboard/studies/${failedUid}`);
  await page.waitForFunction(() => document.querySelector("[data-testid=study-state]").textContent.trim() === "queued", null, { timeout: TIMEOUT });
  await page.screenshot({ path: `${out}/study-after-retry.png`, fullPage: true });
  const session = cookies.map((c) => ({ httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path }));
  return { before, refused, accepted, session, cookieFromScript };
}

async function config(page) {
  await page.goto(`${base}/dashboard/config`);
  const settings = await page.$$eval("td[data-setting]", (tds) => Object.fromEntries(tds.map((td) => [td.dataset.setting, td.textContent.trim()])));
  await page.screenshot({ path: `${out}/config.png`, fullPage: true });
  return { settings, html: await page.content() };
}

// The API's Swagger UI with the network cut off beyond the node (a hospital network without
// internet access): every request that leaves the node's own address is aborted and recorded.
async function apiDocs(browser) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const outside = [];
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base)) return route.continue();
    outside.push(url);
    return route.abort();
  });
  await page.goto(`${base}/docs`);
  await page.waitForSelector(".swagger-ui .opblock", { timeout: TIMEOUT });
  const operations = await page.$$eval(".swagger-ui .opblock-summary-path", (els) => els.map((e) => e.textContent.trim()));
  const title = (await page.textContent(".swagger-ui .title")).trim();
  await page.screenshot({ path: `${out}/api-docs.png`, fullPage: false });
  await page.close();
  return { title, operations, outside };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  // A Content-Security-Policy violation is a console error, not a page error.
  page.on("console", (msg) => {
    if (msg.type() === "error" && /Content Security Policy/i.test(msg.text())) errors.push(msg.text());
  });
  const result = {
    overview: await overview(page),
    studies: await studies(page),
    studyPages: await studyPages(page),
    failures: await failures(page),
    config: await config(page),
    apiDocs: await apiDocs(browser),
  };
  result.pageErrors = errors;
  process.stdout.write(JSON.stringify(result));
} finally {
  await browser.close();
}
