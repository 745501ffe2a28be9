"""`lorakit serve --replicas` without Ray: its options, its autoscaling, the message where Ray is missing, and the
metrics of several replicas summed (tests/scale runs it on Ray itself)."""

import sys
from types import SimpleNamespace

import pytest

import lorakit.serve
from lorakit import cli
from lorakit.errors import LorakitError
from lorakit.options import ServeOptions
from lorakit.serve import metrics, replicas
from lorakit.serve.metrics import Stats


@pytest.mark.parametrize("text, span", [("3", (3, 3)), ("1..5", (1, 5)), ("0..2", (0, 2)), (" 2..4 ", (2, 4))])
def test_replicas_is_n_or_min_to_max(text, span):
    assert replicas.span(text) == span


@pytest.mark.parametrize("text", ["5..1", "0", "1..", "..3", "-1..2", "a..b", "1-5", "1..2..3"])
def test_a_replicas_span_that_is_not_one_is_one_message(text):
    with pytest.raises(LorakitError, match=r"--replicas .*(N or MIN\.\.MAX|MIN <= MAX)"):
        replicas.span(text)


@pytest.mark.parametrize(
    "kw, said",
    [
        ({"address": "10.0.0.1:6379"}, "give --replicas too"),
        ({"replicas": "2", "engine": "vllm"}, "leave out --engine vllm"),
        ({"replicas": "1..3", "watch": True}, "--watch needs --adapters-dir"),
        ({"replicas": "1..3", "target_queue": 0.0}, "--target-queue 0: must be above 0"),
    ],
)
def test_options_that_do_not_go_with_replicas_are_refused(kw, said):
    with pytest.raises(LorakitError, match=said):
        replicas.check(ServeOptions(model="m", **kw))


def test_autoscaling_is_the_seeds_queue_depth_autoscaler_on_ray():
    opts = ServeOptions(model="m", replicas="1..5", target_queue=1, upscale_delay_s=4, downscale_delay_s=90)
    cfg = replicas.autoscaling(opts, *replicas.check(opts))
    assert cfg["min_replicas"] == 1 and cfg["max_replicas"] == 5 and cfg["target_ongoing_requests"] == 1
    assert cfg["upscale_delay_s"] == 4 and cfg["downscale_delay_s"] == 90
    # Ray averages the queue over look_back_period_s: a window longer than the upscale delay would hold it back.
    assert cfg["look_back_period_s"] <= 4 and cfg["metrics_interval_s"] < cfg["look_back_period_s"]
    assert replicas.autoscaling(opts, 0, 5)["initial_replicas"] == 1, "scaled to zero, it starts with one"


def test_without_ray_replicas_names_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "lorakit.serve.deployments", raising=False)
    monkeypatch.delattr(lorakit.serve, "deployments", raising=False)
    code = cli.main(["serve", "--model", "m", "--replicas", "1..3"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'lorakit[ray]'" in err and "Traceback" not in err


def exposition(requests: dict[str, int], depth: int, errors: dict[int, int] = {}) -> str:  # noqa: B006
    stats = Stats()
    for model, n in requests.items():
        for _ in range(n):
            stats.count(model, prompt_tokens=10, completion_tokens=4, seconds=0.3)
    for status, n in errors.items():
        for _ in range(n):
            stats.error(status)
    engine = SimpleNamespace(depth=lambda: depth, running=depth, batches=7, joined=1)
    return stats.prometheus(engine, SimpleNamespace(active={"a": None}))


def test_metrics_of_replicas_add_up_sample_by_sample():
    one, two = exposition({"a": 2, "base": 1}, depth=3), exposition({"a": 1, "b": 4}, depth=1, errors={400: 2})
    text = metrics.summed([one, two], replicas=2)
    lines = set(text.splitlines())
    assert {
        "lorakit_replicas 2",
        "lorakit_queue_depth 4",
        "lorakit_adapters_loaded 2",
        "lorakit_batches_total 14",
    } <= lines
    assert {'lorakit_requests_total{model="a"} 3', 'lorakit_requests_total{model="b"} 4'} <= lines
    assert 'lorakit_completion_tokens_total{model="a"} 12' in lines
    assert 'lorakit_request_latency_seconds_bucket{model="a",le="0.5"} 3' in lines
    assert 'lorakit_request_latency_seconds_bucket{model="a",le="0.25"} 0' in lines
    assert 'lorakit_request_errors_total{status="400"} 2' in lines
    assert text.count("# TYPE lorakit_requests_total counter") == 1, "one family, one TYPE line"
    sum_a = next(x for x in lines if x.startswith('lorakit_request_latency_seconds_sum{model="a"}'))
    assert float(sum_a.rsplit(" ", 1)[1]) == pytest.approx(0.9)


def test_a_replica_gone_keeps_its_counters_not_its_gauges():
    gone = metrics.counters(exposition({"a": 2}, depth=5))
    assert "lorakit_queue_depth" not in gone and "lorakit_adapters_loaded" not in gone
    text = metrics.summed([exposition({"a": 1}, depth=1), gone], replicas=1)
    assert {'lorakit_requests_total{model="a"} 3', "lorakit_queue_depth 1", "lorakit_replicas 1"} <= set(
        text.splitlines()
    )
