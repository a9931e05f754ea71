"""The Prometheus endpoint of one rank: names, types and values over HTTP."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from dino_scale.config import MetricsConfig
from dino_scale.metrics import TrainingMetrics


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_endpoint_serves_training_metrics(tmp_path):
    metrics = TrainingMetrics(MetricsConfig(base_port=0), rank=1, local_rank=1)
    port = metrics.serve(tmp_path)
    try:
        assert (tmp_path / "rank1.port").read_text() == str(port)
        metrics.observe_step(losses={"loss": 3.5, "loss_ce": 1.25}, lrs={"rest": 1e-4, "backbone": 1e-5},
                             grad_norm=0.5, images=4, step_seconds=2.0, data_wait_seconds=0.25)
        metrics.skipped_steps.inc()
        metrics.steps.inc()
        metrics.checkpoint_seconds.observe(1.5)
        metrics.observe_eval({"AP": 0.25, "AP50": 0.5})
        families = scrape(port)
    finally:
        metrics.shutdown()
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in families.values() for s in fam}
    assert value[("dino_loss", (("term", "loss_ce"),))] == 1.25
    assert value[("dino_learning_rate", (("group", "backbone"),))] == 1e-5
    assert value[("dino_grad_norm", ())] == 0.5
    assert value[("dino_images_per_second", ())] == 2.0
    assert value[("dino_step_seconds_count", ())] == 1 and value[("dino_step_seconds_sum", ())] == 2.0
    assert value[("dino_data_wait_seconds_sum", ())] == 0.25
    assert value[("dino_skipped_steps_total", ())] == 1
    assert value[("dino_steps_total", ())] == 1
    assert value[("dino_images_total", ())] == 4
    assert value[("dino_checkpoint_seconds_count", ())] == 1
    assert value[("dino_eval_ap", (("metric", "AP50"),))] == 0.5
    assert value[("dino_process_resident_memory_bytes", ())] > 10e6


def test_disabled_metrics_serve_nothing(tmp_path):
    metrics = TrainingMetrics(MetricsConfig(enabled=False), rank=0, local_rank=0)
    assert metrics.serve(tmp_path) is None and not list(tmp_path.iterdir())
