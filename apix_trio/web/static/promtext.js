// Prometheus text format (version 0.0.4) in the browser: parse a /metrics
// answer, sum series, turn successive counter samples into rates and
// histogram buckets into quantiles. Pure functions (tested in Node:
// tests/js/promtext.test.mjs).

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$/;

function parseValue(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (text === "NaN") return NaN;
  const value = Number(text);
  return Number.isNaN(value) ? null : value;
}

function parseLabels(text) {
  const labels = {};
  let i = 0;
  while (i < text.length) {
    while (text[i] === "," || text[i] === " ") i += 1;
    if (i >= text.length) break;
    const eq = text.indexOf("=", i);
    if (eq < 0 || text[eq + 1] !== '"') return null;
    const name = text.slice(i, eq).trim();
    let value = "";
    let j = eq + 2;
    for (; j < text.length && text[j] !== '"'; j += 1) {
      if (text[j] === "\\" && j + 1 < text.length) {
        j += 1;
        value += text[j] === "n" ? "\n" : text[j];
      } else {
        value += text[j];
      }
    }
    if (j >= text.length) return null;
    labels[name] = value;
    i = j + 1;
  }
  return labels;
}

/**
 * `{samples: Map<name, [{labels, value}]>, types: Map<family, type>}`.
 * Comment lines give the types; malformed lines are skipped.
 */
export function parsePrometheus(text) {
  const samples = new Map();
  const types = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    if (line.startsWith("#")) {
      const parts = line.split(/\s+/);
      if (parts[1] === "TYPE" && parts.length >= 4) types.set(parts[2], parts[3]);
      continue;
    }
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = match[3] ? parseLabels(match[3]) : {};
    const value = parseValue(match[4]);
    if (labels === null || value === null) continue;
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value });
  }
  return { samples, types };
}

function matches(labels, where) {
  for (const [name, value] of Object.entries(where)) if (labels[name] !== value) return false;
  return true;
}

/** The sum of the series of `name` whose labels include `where`; null when there is no such metric. */
export function total(parsed, name, where = {}) {
  const series = parsed.samples.get(name);
  if (!series) return null;
  let sum = 0;
  for (const { labels, value } of series) if (matches(labels, where)) sum += value;
  return sum;
}

/** `Map<label value, sum>` of the series of `name`, keyed by `label`. */
export function byLabel(parsed, name, label) {
  const out = new Map();
  for (const { labels, value } of parsed.samples.get(name) || []) {
    const key = labels[label] ?? "";
    out.set(key, (out.get(key) || 0) + value);
  }
  return out;
}

/**
 * The histogram `family` (without _bucket) as `{buckets: [[le, cumulative]...], count, sum}`,
 * buckets sorted by `le` (+Inf last); null when absent.
 */
export function histogram(parsed, family) {
  const series = parsed.samples.get(`${family}_bucket`);
  if (!series) return null;
  const buckets = new Map();
  for (const { labels, value } of series) {
    const le = parseValue(labels.le ?? "");
    if (le === null) continue;
    buckets.set(le, (buckets.get(le) || 0) + value);
  }
  return {
    buckets: [...buckets.entries()].sort((a, b) => a[0] - b[0]),
    count: total(parsed, `${family}_count`) ?? 0,
    sum: total(parsed, `${family}_sum`) ?? 0,
  };
}

/** The observations of `later` that `earlier` did not have (a counter reset: all of `later`). */
export function histogramDelta(later, earlier) {
  if (!later) return null;
  if (!earlier || later.count < earlier.count) return later;
  const before = new Map(earlier.buckets);
  return {
    buckets: later.buckets.map(([le, count]) => [le, count - (before.get(le) || 0)]),
    count: later.count - earlier.count,
    sum: later.sum - earlier.sum,
  };
}

/**
 * The `q` quantile of cumulative `buckets` like PromQL's histogram_quantile:
 * linear within the bucket holding the rank; the highest finite bound when
 * it falls in +Inf; NaN with no observations.
 */
export function histogramQuantile(q, buckets) {
  if (!buckets || buckets.length === 0) return NaN;
  const count = buckets[buckets.length - 1][1];
  if (!(count > 0)) return NaN;
  const rank = q * count;
  let previousBound = 0;
  let previousCount = 0;
  for (const [le, cumulative] of buckets) {
    if (cumulative >= rank) {
      if (le === Infinity) return previousBound;
      if (cumulative === previousCount) return le;
      return previousBound + (le - previousBound) * ((rank - previousCount) / (cumulative - previousCount));
    }
    previousBound = le;
    previousCount = cumulative;
  }
  return previousBound;
}

/** Per-second rate of a counter between two samples `seconds` apart (a reset counts from 0). */
export function perSecond(current, previous, seconds) {
  if (current === null || previous === null || current === undefined || previous === undefined || !(seconds > 0)) return null;
  const delta = current >= previous ? current - previous : current;
  return delta / seconds;
}
