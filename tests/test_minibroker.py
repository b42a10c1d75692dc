"""The demo's embedded broker (used when mosquitto is missing) carries a real `edgeq run` to a paho subscriber."""


import pytest

from brokers import Collector
from conftest import run_edgeq
from edgeq.minibroker import MiniBroker, topic_matches


def test_topic_matching():
    assert topic_matches("edgeq/#", "edgeq/cam/detections")
    assert topic_matches("edgeq/+/stats", "edgeq/cam/stats")
    assert not topic_matches("edgeq/+/stats", "edgeq/cam/detections")
    assert not topic_matches("a/b", "a/b/c")


@pytest.mark.slow
def test_edgeq_run_through_embedded_broker(tmp_path, tiny_bundle, shapes_dir):
    broker = MiniBroker().start()
    sub = Collector(broker.port, ["edgeq/#"], client_id="mini-sub")
    try:
        assert sub.wait_for(lambda: sub.client.is_connected(), 10)
        r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(shapes_dir / "square"),
                      "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--spool", str(tmp_path / "s.db"))
        assert r.returncode == 0, r.stderr
        assert sub.wait_for(lambda: sub.seqs() == set(range(1, 13)), 10), sorted(sub.seqs())
        assert sub.payloads("/status")[-1]["state"] == "stopped"
    finally:
        sub.close()
        broker.stop()
