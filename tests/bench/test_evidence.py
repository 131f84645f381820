"""The benchmark's checks of a peer's guarantee and of CPU time catch what they exist for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.evidence import CpuMeter, FileWatch, GuaranteeNotMet, no_save_errors
from bench.peers import MosquittoBridge, NatsLeaf
from devkit import localrun
from tests.conftest import publish_raw, wait_for


def _mosquitto(tmp_path: Path, user_line: str) -> tuple[localrun.Proc, int, Path, Path]:
    store = tmp_path / "store"
    store.mkdir()
    if os.geteuid() != 0:  # a non-root broker keeps its user: make the directory unwritable
        store.chmod(0o555)
    port = localrun.free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{user_line}"
                    f"persistence true\npersistence_location {store}/\nautosave_interval 1\n"
                    "log_dest stderr\nlog_type error\nlog_type warning\n")
    log = tmp_path / "m.log"
    proc = localrun.Proc(name="mosquitto", argv=["mosquitto", "-c", str(conf)], log=log).start()
    localrun.wait_port(port)
    return proc, port, store, log


def test_a_mosquitto_that_cannot_write_its_store_fails_the_guarantee_check(tmp_path: Path):
    # As root and with no `user` line, mosquitto drops to the `mosquitto` user, which cannot
    # write a directory root made: it logs the failure and carries on from memory.
    proc, port, store, log = _mosquitto(tmp_path, "")
    watch = FileWatch(paths=(store / "mosquitto.db",), what="peer")
    try:
        publish_raw(port, [("substation/x", b"1")])
        with pytest.raises(GuaranteeNotMet, match="not written during the run"):
            watch.require(wait_s=3.0)
    finally:
        proc.stop()
    with pytest.raises(GuaranteeNotMet, match=r"Error saving|Permission denied"):
        no_save_errors(log, "peer")


def test_the_mosquitto_peer_writes_its_snapshots_and_passes_its_check(tmp_path: Path):
    peer = MosquittoBridge(workdir=tmp_path, durable=True)
    peer.start()
    try:
        publish_raw(peer.mqtt_port, [(f"substation/s/{i}", b'{"seq":1,"ts":1}')
                                     for i in range(20)])
        wait_for(lambda: peer.committed() >= 20, what="20 messages at the cloud collector")
        evidence = peer.verify()
    finally:
        peer.stop()
    assert evidence["edge_writes"] >= 1 and evidence["cloud_writes"] >= 1
    assert evidence["edge_db_bytes_max"] > 0


def test_a_nats_peer_whose_server_does_not_sync_always_fails_the_durable_check(tmp_path: Path):
    peer = NatsLeaf(workdir=tmp_path, durable=True)
    peer.durable = False  # the servers start without sync_interval: always ...
    peer.start()
    try:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)  # NATS: 3.1.1
        client.connect("127.0.0.1", peer.mqtt_port)
        client.loop_start()
        client.publish("substation/s/1", b'{"seq":1,"ts":1}', qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        wait_for(lambda: peer.committed() >= 1, what="the message in the cloud stream")
        peer.durable = True  # ... and the column claims it
        with pytest.raises(GuaranteeNotMet, match="sync_always=False"):
            peer.verify()
    finally:
        peer.stop()


def test_the_cpu_meter_counts_a_busy_process_and_not_an_idle_one():
    code = ("import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\n"
            "sys.stdin.read()")
    busy = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE, text=True)
    assert busy.stdin is not None and busy.stdout is not None
    try:
        meter = CpuMeter(pids={"busy": busy.pid, "idle": idle.pid})
        busy.stdin.write("go\n")
        busy.stdin.flush()
        assert busy.stdout.readline() == "done\n"
        used = meter.stop()
    finally:
        for p in (busy, idle):
            p.communicate("")
    assert 0.29 <= used["busy"] < 1.5
    assert used["idle"] < 0.1
