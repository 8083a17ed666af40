from app.broker.metrics import OTHER, BrokerMetrics


def _published(metrics: BrokerMetrics) -> dict[str, float]:
    return {
        sample.labels["destination"]: sample.value
        for metric in metrics.destination_published.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def test_a_group_is_counted_per_destination_with_slots_in_first_seen_order() -> None:
    metrics = BrokerMetrics(max_destinations=2)
    metrics.published("queue", ["/queue/a", "/queue/b", "/queue/a", "/queue/c", "/queue/a", "/queue/d", "/queue/c"])
    assert _published(metrics) == {"/queue/a": 3.0, "/queue/b": 1.0, OTHER: 3.0}
    assert metrics.messages_published.labels("queue")._value.get() == 7.0
    metrics.published("queue", ["/queue/b"])
    assert _published(metrics)["/queue/b"] == 2.0
