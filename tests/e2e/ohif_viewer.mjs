// Drives OHIF 3 (served by tests/e2e/ohif/ohif_server.py) in Debian's chromium with playwright-core:
// opens the study, loads our SEG (answers "Yes" to open it), goes to the slice of the nodule's centre,
// screenshots it with the segment shown and hidden (the segmentation panel's eye), then loads our SR
// and screenshots its outline and text with the annotation layer shown and hidden, then opens our
// Parametric Map (screening heatmap) and screenshots it with the map shown and hidden. Prints what it
// saw as JSON on stdout: viewport geometry (the nodule centre projected onto the canvas by OHIF's own
// cornerstone viewport, in page pixels), segment rows, SR outline points and text, screenshot paths.
// Input (environment): OHIF_BASE, OHIF_STUDY, OHIF_OUT (screenshots, console log),
// OHIF_CENTER (JSON [x, y, z] in mm, patient LPS: the nodule's centre), OHIF_POINTS (JSON
// {name: [x, y, z]}: more patient points to project onto the canvas), OHIF_DECOY (optional JSON
// [x, y, z]: the centre of segment 2, screenshot with that segment shown and hidden).
import fs from "node:fs";
import { chromium } from "playwright-core";

const base = process.env.OHIF_BASE;
const study = process.env.OHIF_STUDY;
const out = process.env.OHIF_OUT;
const center = JSON.parse(process.env.OHIF_CENTER);
const points = JSON.parse(process.env.OHIF_POINTS || "{}");
const decoy = process.env.OHIF_DECOY ? JSON.parse(process.env.OHIF_DECOY) : null;
const TIMEOUT = 90000;
const logs = [];

// Viewport geometry in page pixels, computed by the viewer's own cornerstone viewport.
function geometry([center, points]) {
  const viewports = window.cornerstone.getEnabledElements().map((e) => e.viewport);
  const vp = viewports.find((v) => v.id === "default") || viewports[0];
  const rect = vp.canvas.getBoundingClientRect();
  const toPage = (p) => {
    const [x, y] = vp.worldToCanvas(p);
    return [rect.x + x, rect.y + y];
  };
  const c = toPage(center);
  const e = toPage([center[0] + 10, center[1], center[2]]);
  return {
    viewportId: vp.id,
    imageIndex: vp.getCurrentImageIdIndex(),
    imageId: vp.getCurrentImageId(),
    rect: [rect.x, rect.y, rect.width, rect.height],
    nodule: c,
    pxPerMm: Math.hypot(e[0] - c[0], e[1] - c[1]) / 10,
    points: Object.fromEntries(Object.entries(points).map(([k, p]) => [k, toPage(p)])),
    // The image scrollbar inside the viewport (it marks slices with segments, so it changes too).
    scrollbars: [...vp.element.closest('[data-cy="viewport-pane"]')?.querySelectorAll('[aria-label="Image navigation scrollbar"]') || []].map((el) => {
      const b = el.getBoundingClientRect();
      return [b.x, b.y, b.width, b.height];
    }),
  };
}

// Two identical screenshots in a row: the viewer has finished drawing.
async function stableScreenshot(page, path) {
  const deadline = Date.now() + 30000;
  let previous = await page.screenshot();
  for (;;) {
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    const current = await page.screenshot();
    if (current.equals(previous)) {
      fs.writeFileSync(path, current);
      return path;
    }
    if (Date.now() > deadline) throw new Error(`viewer did not settle for ${path}`);
    previous = current;
  }
}

// OHIF's notifications (toasts), recorded as they appear: OHIF reports import problems there.
function recordToasts() {
  window.__toasts = [];
  new MutationObserver(() => {
    for (const toast of document.querySelectorAll("[data-sonner-toast]")) {
      const text = toast.innerText.trim();
      if (text && !window.__toasts.includes(text)) window.__toasts.push(text);
    }
  }).observe(document, { childList: true, subtree: true, characterData: true });
}

// Screenshots for pixel comparison are taken with no notification over the viewport.
async function noToasts(page) {
  await page.waitForFunction(() => document.querySelectorAll("[data-sonner-toast]").length === 0, null, { timeout: TIMEOUT });
}

// Requests the page has in flight (images, metadata), counted from the start.
let inflight = 0;
function countRequests(page) {
  page.on("request", () => { inflight += 1; });
  const done = () => { inflight -= 1; };
  page.on("requestfinished", done);
  page.on("requestfailed", done);
}

// The study is shown: the default viewport exists with its first image drawn, and the network has
// been quiet for a second (OHIF prefetches the stack). Opening a series before that raced the
// viewer's start under load (seen: "ViewportId is required to set display sets for viewport",
// "IMAGE_LOAD_ERROR TypeError: handler is not a function").
async function viewerSettled(page) {
  await page.waitForFunction(() => {
    const vp = window.cornerstone?.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
    return Boolean(vp && vp.getImageIds().length && vp.getCurrentImageId() && vp.getImageData());
  }, null, { timeout: TIMEOUT });
  const deadline = Date.now() + TIMEOUT;
  let quietSince = Date.now();
  while (Date.now() - quietSince < 1000) {
    if (Date.now() > deadline) throw new Error(`the viewer kept ${inflight} requests in flight`);
    await new Promise((r) => setTimeout(r, 100));
    if (inflight > 0) quietSince = Date.now();
  }
}

async function openSeries(page, modality) {
  await page.locator('[data-cy="series-modality-label"]', { hasText: new RegExp(`^${modality}$`) }).first().dblclick();
}

async function seg(page) {
  await openSeries(page, "SEG");
  await page.getByRole("button", { name: "Yes" }).click({ timeout: TIMEOUT }); // "open this Segmentation?"
  await page.click('[data-cy="panelSegmentation-btn"]');
  await page.waitForSelector('[data-cy="data-row-title"]', { timeout: TIMEOUT });
  const segments = await page.$$eval('[data-cy="data-row"]', (rows) =>
    rows.map((r) => ({
      title: r.querySelector('[data-cy="data-row-title"]')?.textContent.trim(),
      color: r.querySelector('[data-cy="data-row-colorhex"]')?.style.backgroundColor,
    })));
  return { segments, ...(await segmentShots(page, 0, center, points, "seg")) };
}

// Show or hide the segment of panel row `row` with a click event, not the pointer: a pointer left
// over a row opens OHIF's segment statistics card over the viewport (seen under load).
async function toggleSegment(page, row) {
  await page.locator('[data-cy="data-row-visibility-toggle"]').nth(row).dispatchEvent("click");
}

// Go to the slice nearest to `where` (as a user scrolling there would see it), screenshot it with
// the segment of panel row `row` shown and hidden.
async function segmentShots(page, row, where, named, name) {
  const target = await page.evaluate(async (z) => {
    const vp = window.cornerstone.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
    const zs = vp.getImageIds().map((id) => window.cornerstone.metaData.get("imagePlaneModule", id).imagePositionPatient[2]);
    const index = zs.reduce((best, v, i) => (Math.abs(v - z) < Math.abs(zs[best] - z) ? i : best), 0);
    await vp.setImageIdIndex(index);
    return { index, z: zs[index] };
  }, where[2]);
  await page.waitForFunction((i) => window.cornerstone.getEnabledElements().some((e) => e.viewport.id === "default" && e.viewport.getCurrentImageIdIndex() === i), target.index, { timeout: TIMEOUT });
  await noToasts(page);
  const on = await stableScreenshot(page, `${out}/${name}-on.png`);
  const geo = await page.evaluate(geometry, [where, named]);
  await toggleSegment(page, row);
  const off = await stableScreenshot(page, `${out}/${name}-off.png`);
  const geoOff = await page.evaluate(geometry, [where, named]);
  await toggleSegment(page, row);
  return { target, geometry: geo, geometryOff: geoOff, shots: { on, off } };
}

// Open the SR and show the image its outline is on. OHIF usually jumps there itself; sometimes
// (seen in CI) the SR viewport keeps the previous slice, or a double-click is swallowed under
// load: then open again and step through the slices around the nodule, as a user would.
async function openSr(page, nearIndex) {
  const selector = "svg.svg-layer polyline";
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    await openSeries(page, "SR");
    if (await shows(page, selector, 10000)) return;
    for (let step = 0; step <= 8; step += 1) {
      for (const index of new Set([nearIndex - step, nearIndex + step])) {
        await page.evaluate((i) => {
          const vp = window.cornerstone.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
          if (vp && i >= 0 && i < vp.getImageIds().length) return vp.setImageIdIndex(i);
          return null;
        }, index);
        if (await shows(page, selector, 1500)) return;
      }
    }
    if (Date.now() > deadline) throw new Error("OHIF did not draw the SR outline near the nodule");
  }
}

async function shows(page, selector, timeout) {
  try {
    await page.waitForSelector(selector, { state: "attached", timeout });
    return true;
  } catch {
    return false;
  }
}

async function sr(page, nearIndex) {
  await openSr(page, nearIndex);
  await page.waitForFunction(() => /mm/.test(document.querySelector("svg.svg-layer text")?.textContent || ""), null, { timeout: TIMEOUT });
  await noToasts(page);
  const on = await stableScreenshot(page, `${out}/sr-on.png`);
  const geo = await page.evaluate(geometry, [center, points]);
  const drawn = await page.evaluate(() => {
    const svg = document.querySelector("svg.svg-layer");
    const r = svg.getBoundingClientRect();
    const polylines = [...svg.querySelectorAll("polyline")].map((p) =>
      [...p.points].map((pt) => [r.x + pt.x, r.y + pt.y]));
    const texts = [...svg.querySelectorAll("text")].map((t) => [...t.querySelectorAll("tspan")].map((s) => s.textContent));
    return { polylines, texts };
  });
  await page.evaluate(() => { document.querySelector("svg.svg-layer").style.visibility = "hidden"; });
  const off = await stableScreenshot(page, `${out}/sr-off.png`);
  await page.evaluate(() => { document.querySelector("svg.svg-layer").style.visibility = ""; });
  return { geometry: geo, ...drawn, shots: { on, off } };
}

// Open our Parametric Map (the screening heatmap): OHIF shows it in a volume viewport fused over
// its CT. Move the slice plane through `where`, screenshot with the map's actor shown and hidden.
async function pmap(page, where, named) {
  await openSeries(page, "PMAP");
  await page.waitForFunction(() => {
    const vp = window.cornerstone.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
    return vp && typeof vp.getActors === "function" && vp.getActors().length >= 2
      && !document.body.innerText.includes("Loading Parametric Map");
  }, null, { timeout: TIMEOUT });
  const plane = await page.evaluate((c) => {
    const vp = window.cornerstone.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
    const cam = vp.getCamera();
    const n = cam.viewPlaneNormal;
    const d = (c[0] - cam.focalPoint[0]) * n[0] + (c[1] - cam.focalPoint[1]) * n[1] + (c[2] - cam.focalPoint[2]) * n[2];
    vp.setCamera({
      focalPoint: cam.focalPoint.map((v, i) => v + d * n[i]),
      position: cam.position.map((v, i) => v + d * n[i]),
    });
    vp.render();
    const after = vp.getCamera();
    return { normal: n, focalPoint: after.focalPoint, actors: vp.getActors().map((a) => a.referencedId) };
  }, where);
  await noToasts(page);
  const on = await stableScreenshot(page, `${out}/pmap-on.png`);
  const geo = await page.evaluate(geometry, [where, named]);
  const visibility = (shown) => {
    const vp = window.cornerstone.getEnabledElements().map((e) => e.viewport).find((v) => v.id === "default");
    const actors = vp.getActors();
    actors[actors.length - 1].actor.setVisibility(shown);
    vp.render();
  };
  await page.evaluate(visibility, false);
  const off = await stableScreenshot(page, `${out}/pmap-off.png`);
  const geoOff = await page.evaluate(geometry, [where, named]);
  await page.evaluate(visibility, true);
  return { plane, geometry: geo, geometryOff: geoOff, shots: { on, off } };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  const result = {};
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, serviceWorkers: "block" });
    await context.addInitScript(recordToasts);
    page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on("console", (m) => logs.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`[pageerror] ${e}`));
    countRequests(page);
    const started = Date.now();
    await page.goto(`${base}/viewer?StudyInstanceUIDs=${study}`);
    await page.getByText("Skip all").click({ timeout: TIMEOUT }); // onboarding tour
    await viewerSettled(page);
    result.viewerReadySeconds = (Date.now() - started) / 1000;
    result.seg = await seg(page);
    if (decoy) result.decoy = await segmentShots(page, 1, decoy, {}, "decoy");
    result.segSeconds = (Date.now() - started) / 1000;
    result.sr = await sr(page, result.seg.target.index);
    result.pmap = await pmap(page, center, {});
    result.totalSeconds = (Date.now() - started) / 1000;
  } catch (error) {
    result.error = String(error && error.stack ? error.stack : error);
    try {
      await page.screenshot({ path: `${out}/failure.png` });
    } catch {
      // the failure screenshot is best effort; the error above is what matters
    }
  } finally {
    result.toasts = page ? await page.evaluate(() => window.__toasts).catch(() => null) : null;
    fs.writeFileSync(`${out}/console.log`, logs.join("\n") + "\n");
    await browser.close();
  }
  result.consoleErrors = logs.filter((l) => l.startsWith("[error]") || l.startsWith("[pageerror]"));
  result.consoleNotes = logs.filter((l) => /SEG|SR |SCOORD|rehydrat|segment|Measurement/i.test(l)).slice(0, 50);
  process.stdout.write(JSON.stringify(result));
}

await main();
