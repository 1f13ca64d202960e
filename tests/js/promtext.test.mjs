// Unit tests of the dashboard's Prometheus text helpers (apix_trio/web/static/promtext.js).

import { test } from "node:test";
import assert from "node:assert/strict";
import { byLabel, histogram, histogramDelta, histogramQuantile, parsePrometheus, perSecond, total } from "../../apix_trio/web/static/promtext.js";

const PAGE = `# HELP apix_connections Open WebSocket connections
# TYPE apix_connections gauge
apix_connections 3.0
# TYPE apix_connection_closes_total counter
apix_connection_closes_total{code="1000"} 5.0
apix_connection_closes_total{code="4009"} 2.0
apix_connection_closes_total{code="4009",node="b"} 1.0
# TYPE apix_x_total counter
apix_x_total{path="a \\"quoted\\", b"} 7 1700000000000
# TYPE apix_lat_seconds histogram
apix_lat_seconds_bucket{le="0.001"} 0.0
apix_lat_seconds_bucket{le="0.01"} 50.0
apix_lat_seconds_bucket{le="0.1"} 90.0
apix_lat_seconds_bucket{le="+Inf"} 100.0
apix_lat_seconds_count 100.0
apix_lat_seconds_sum 2.5
garbage line here
`;

test("parse: samples, labels with escapes, timestamps, types; garbage skipped", () => {
  const parsed = parsePrometheus(PAGE);
  assert.equal(parsed.types.get("apix_connections"), "gauge");
  assert.equal(parsed.types.get("apix_lat_seconds"), "histogram");
  assert.equal(total(parsed, "apix_connections"), 3);
  assert.deepEqual(parsed.samples.get("apix_x_total"), [{ labels: { path: 'a "quoted", b' }, value: 7 }]);
  assert.equal(total(parsed, "apix_missing"), null);
  assert.equal(parsed.samples.has("garbage"), false);
});

test("total with a label filter, byLabel sums per label value", () => {
  const parsed = parsePrometheus(PAGE);
  assert.equal(total(parsed, "apix_connection_closes_total"), 8);
  assert.equal(total(parsed, "apix_connection_closes_total", { code: "4009" }), 3);
  assert.deepEqual([...byLabel(parsed, "apix_connection_closes_total", "code")], [["1000", 5], ["4009", 3]]);
});

test("histogram quantiles interpolate within the bucket like histogram_quantile", () => {
  const h = histogram(parsePrometheus(PAGE), "apix_lat_seconds");
  assert.deepEqual(h.buckets, [[0.001, 0], [0.01, 50], [0.1, 90], [Infinity, 100]]);
  assert.equal(h.count, 100);
  assert.ok(Math.abs(histogramQuantile(0.5, h.buckets) - 0.01) < 1e-12);
  assert.ok(Math.abs(histogramQuantile(0.25, h.buckets) - 0.0055) < 1e-12);
  assert.ok(Math.abs(histogramQuantile(0.7, h.buckets) - 0.055) < 1e-12);
  assert.equal(histogramQuantile(0.99, h.buckets), 0.1); // in +Inf: the highest finite bound
  assert.ok(Number.isNaN(histogramQuantile(0.5, [[0.1, 0], [Infinity, 0]])));
});

test("histogramDelta: only the new observations; a reset counts everything", () => {
  const later = { buckets: [[0.01, 60], [Infinity, 70]], count: 70, sum: 1 };
  const earlier = { buckets: [[0.01, 50], [Infinity, 50]], count: 50, sum: 0.5 };
  assert.deepEqual(histogramDelta(later, earlier), { buckets: [[0.01, 10], [Infinity, 20]], count: 20, sum: 0.5 });
  const reset = { buckets: [[0.01, 1], [Infinity, 1]], count: 1, sum: 0.001 };
  assert.deepEqual(histogramDelta(reset, earlier), reset);
});

test("perSecond: deltas over time, a reset counts from zero, unknowns are null", () => {
  assert.equal(perSecond(150, 50, 2), 50);
  assert.equal(perSecond(10, 500, 1), 10);
  assert.equal(perSecond(null, 5, 1), null);
  assert.equal(perSecond(5, 1, 0), null);
});
