// Headless-browser test of the operator dashboard served at BASE_URL/dashboard.
//
// Usage: node tests/browser/dashboard.mjs BASE_URL EXPECTED_MIN_REQUESTS NEW_THRESHOLD
//
// Opens the page in Debian's Chromium, waits for live numbers, changes the similarity
// threshold through the page's own form, saves a screenshot to target/dashboard.png and
// prints one JSON line. Exits 1 on any failed step, console error or failed request.
// Run tests/browser/setup first: it installs Chromium and playwright-core.

import { mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const STEP_TIMEOUT_MS = 10_000;
const OVERALL_TIMEOUT_MS = 90_000;

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const screenshotPath = resolve(repoRoot, 'target', 'dashboard.png');

function usage(message) {
  process.stderr.write(`dashboard test: ${message}\n`);
  process.stderr.write('usage: node tests/browser/dashboard.mjs BASE_URL EXPECTED_MIN_REQUESTS NEW_THRESHOLD\n');
  process.exit(2);
}

const [baseArg, minArg, thresholdArg] = process.argv.slice(2);
if (!baseArg || minArg === undefined || thresholdArg === undefined) usage('missing arguments');
const baseUrl = baseArg.replace(/\/+$/, '');
const expectedMinRequests = Number(minArg);
const newThreshold = Number(thresholdArg);
if (!/^https?:\/\//.test(baseUrl)) usage(`BASE_URL must start with http:// or https://, got ${baseArg}`);
if (!Number.isInteger(expectedMinRequests) || expectedMinRequests < 0) usage(`EXPECTED_MIN_REQUESTS must be a non-negative integer, got ${minArg}`);
if (!Number.isFinite(newThreshold) || newThreshold < 0 || newThreshold > 1) usage(`NEW_THRESHOLD must be a number in [0, 1], got ${thresholdArg}`);

const consoleErrors = [];
const failedRequests = [];
const problems = [];
const result = { requests: null, hits: null, threshold: null, feedback: null, surfaces: null, judge: null };
let collecting = true;

const watchdog = setTimeout(() => {
  process.stderr.write(`dashboard test: FAILED: gave up after ${OVERALL_TIMEOUT_MS / 1000} s\n`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
watchdog.unref();

async function readInt(page, selector) {
  const text = (await page.textContent(selector)) ?? '';
  return /^\s*\d+\s*$/.test(text) ? parseInt(text, 10) : null;
}

async function step(name, fn) {
  try {
    return await fn();
  } catch (err) {
    const detail = String(err && err.message ? err.message : err).split('\n')[0];
    throw new Error(`${name}: ${detail}`);
  }
}

let browser;
const started = Date.now();
try {
  browser = await step('launching Chromium', () =>
    chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30_000 }),
  );
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);

  page.on('console', (msg) => {
    if (collecting && msg.type() === 'error') {
      const where = msg.location();
      consoleErrors.push(where && where.url ? `${msg.text()} (${where.url}:${where.lineNumber})` : msg.text());
    }
  });
  page.on('pageerror', (err) => {
    if (collecting) consoleErrors.push(`uncaught: ${err.message}`);
  });
  page.on('requestfailed', (req) => {
    if (collecting) failedRequests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText ?? 'failed'}`);
  });
  page.on('response', (res) => {
    if (collecting && res.status() >= 400) failedRequests.push(`${res.request().method()} ${res.url()}: HTTP ${res.status()}`);
  });

  const response = await step(`opening ${baseUrl}/dashboard`, () =>
    page.goto(`${baseUrl}/dashboard`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS }),
  );
  if (!response || !response.ok()) throw new Error(`opening ${baseUrl}/dashboard: HTTP ${response ? response.status() : 'no response'}`);

  await step(`waiting for #requests >= ${expectedMinRequests} and a threshold`, () =>
    page.waitForFunction(
      (min) => {
        const requests = document.getElementById('requests')?.textContent ?? '';
        const threshold = document.getElementById('threshold-current')?.textContent ?? '';
        return /^\s*\d+\s*$/.test(requests) && parseInt(requests, 10) >= min && threshold.trim() !== '';
      },
      expectedMinRequests,
      { timeout: STEP_TIMEOUT_MS, polling: 100 },
    ),
  ).catch(async (err) => {
    const seen = await page.textContent('#requests').catch(() => '?');
    const badge = await page.textContent('#status-badge').catch(() => '?');
    throw new Error(`${err.message} (#requests shows "${seen}", status badge "${badge}")`);
  });

  result.requests = await readInt(page, '#requests');
  result.hits = await readInt(page, '#hits');
  if (result.hits === null) problems.push('#hits does not show a plain integer');
  result.surfaces = await page.$$eval('#surfaces-table tbody tr', (rows) =>
    rows.map((row) => Array.from(row.cells).map((cell) => cell.textContent.trim())),
  );
  // The judge's card: shown only when the service has a judge.
  result.judge = await page.$eval('#judge', (card) =>
    card.hidden
      ? null
      : {
          calls: document.getElementById('judge-calls').textContent.trim(),
          line: document.getElementById('judge-line').textContent.trim(),
          cost: document.getElementById('judge-cost').textContent.trim(),
        },
  );
  for (const id of ['tokens-saved', 'entries']) {
    if ((await readInt(page, `#${id}`)) === null) problems.push(`#${id} does not show a plain integer`);
  }

  await step('setting the threshold', async () => {
    await page.fill('#threshold-input', String(newThreshold));
    await page.click('#threshold-apply');
    await page.waitForFunction(
      (want) => {
        const shown = parseFloat(document.getElementById('threshold-current')?.textContent ?? '');
        return Number.isFinite(shown) && Math.abs(shown - want) < 5e-5;
      },
      newThreshold,
      { timeout: STEP_TIMEOUT_MS, polling: 100 },
    );
  }).catch(async (err) => {
    const shown = await page.textContent('#threshold-current').catch(() => '?');
    const status = await page.textContent('#threshold-status').catch(() => '?');
    throw new Error(`${err.message} (#threshold-current shows "${shown}", status "${status}")`);
  });
  result.threshold = parseFloat((await page.textContent('#threshold-current')) ?? '');

  await step('reporting the newest answer as wrong', async () => {
    await page.waitForSelector('#entries-table button.wrong', { timeout: STEP_TIMEOUT_MS });
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.url().includes('/feedback') && r.request().method() === 'POST', { timeout: STEP_TIMEOUT_MS }),
      page.click('#entries-table button.wrong'),
    ]);
    result.feedback = { status: response.status(), body: await response.json() };
  });

  // Let one more refresh land so the screenshot shows the new threshold everywhere.
  await page.waitForTimeout(300);
  await step(`saving the screenshot to ${screenshotPath}`, async () => {
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await page.screenshot({ path: screenshotPath, fullPage: true });
  });
  collecting = false;
} catch (err) {
  problems.push(err.message);
} finally {
  collecting = false;
  if (browser) await browser.close().catch(() => {});
}

if (consoleErrors.length) problems.push(`${consoleErrors.length} console error(s): ${consoleErrors.join(' | ')}`);
if (failedRequests.length) problems.push(`${failedRequests.length} failed request(s): ${failedRequests.join(' | ')}`);

process.stdout.write(
  JSON.stringify({
    requests: result.requests,
    hits: result.hits,
    surfaces: result.surfaces,
    judge: result.judge,
    threshold: result.threshold,
    feedback: result.feedback,
    console_errors: consoleErrors,
    failed_requests: failedRequests,
  }) + '\n',
);
const seconds = ((Date.now() - started) / 1000).toFixed(1);
if (problems.length) {
  for (const p of problems) process.stderr.write(`dashboard test: FAILED: ${p}\n`);
  process.exit(1);
}
process.stderr.write(`dashboard test: passed in ${seconds} s (screenshot: ${screenshotPath})\n`);
process.exit(0);
