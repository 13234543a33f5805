"""/metrics, read by the official Prometheus client's parser: well-formed, named by convention,
and counting the requests that were made."""

import json
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(base):
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def scrape_settled(base):
    """A scrape once no generation request is between its answer and its count (a request is
    counted just after its last byte is sent, and is in flight until then)."""
    for _ in range(100):
        families = scrape(base)
        if value(families, "chatd_requests_in_flight") == 0:
            return families
        time.sleep(0.02)
    raise AssertionError("requests stayed in flight")


def post(base, body):
    request = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def value(families, name, family=None, **labels):
    """A sample's value; counters are looked up by family name (their samples end in _total)."""
    for sample in families[family or name].samples:
        if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return 0.0


def test_metrics_parse_and_count_requests(chatd):
    before = scrape_settled(chatd)
    ok = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "temperature": 0}
    assert post(chatd, ok) == 200
    assert post(chatd, ok) == 200
    assert post(chatd, {"messages": "not a list"}) == 400
    after = scrape_settled(chatd)

    endpoint = "/v1/chat/completions"
    # The parser strips _total from counter family names.
    assert value(after, "chatd_requests", endpoint=endpoint, status="200") - value(
        before, "chatd_requests", endpoint=endpoint, status="200"
    ) == 2
    assert value(after, "chatd_requests", endpoint=endpoint, status="400") - value(
        before, "chatd_requests", endpoint=endpoint, status="400"
    ) == 1
    assert value(after, "chatd_completion_tokens") - value(before, "chatd_completion_tokens") >= 2
    ttft = "chatd_time_to_first_token_seconds"
    assert value(after, ttft + "_count", ttft) - value(before, ttft + "_count", ttft) == 2
    latency = after["chatd_request_duration_seconds"]
    assert latency.type == "histogram"
    assert after["chatd_time_per_output_token_seconds"].type == "histogram"
    for name in ["chatd_requests_running", "chatd_requests_queued", "chatd_kv_cache_bytes", "chatd_model_load_seconds"]:
        assert after[name].type == "gauge", name
    assert value(after, "chatd_model_load_seconds") > 0
    info = after["chatd_build_info"].samples[0]
    assert info.labels["version"] and info.labels["model"] == "smollm2-135m-instruct" and info.value == 1
    for family in after.values():
        assert family.name.startswith("chatd_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
