"""scripts/bench.py storage --quick runs and reports every figure (a smoke test, not a timing test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def test_storage_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "storage", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    for section in ("floor_fsync_4k", "floor_duckdb_single_row_commit", "sequential_durable_put",
                    "concurrent_durable_puts_10k_rows", "concurrent_durable_puts_100k_rows",
                    "reads_at_100k_rows", "recovery_replay", "activation_memory",
                    "apply_batches"):
        assert section in m, f"{section} missing from {sorted(m)}"
    assert m["apply_batches"]["batch_1000_existing_keys_ms"] > 0
    assert m["concurrent_durable_puts_10k_rows"]["puts"] > 0
    assert m["concurrent_durable_puts_100k_rows"]["stored_rows"] >= 100_000
    assert m["recovery_replay"]["records"] == m["recovery_replay"]["logged"] > 0
    assert 0 < m["reads_at_100k_rows"]["cached_get_us"]


def test_rpc_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "rpc", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    for section in ("floor_zmq_2hop_echo", "floor_zmq_1hop_echo", "floor_zmq_send", "noop_sequential", "noop_64_in_flight_100_objects",
                    "counter_sequential", "counter_64_in_flight_100_objects",
                    "method_noop_sequential", "method_counter_sequential",
                    "method_vs_fetch_noop_p50", "call_codec_1kb_dict"):
        assert section in m, f"{section} missing from {sorted(m)}"
    assert m["noop_64_in_flight_100_objects"]["calls"] > 0
    assert m["counter_64_in_flight_100_objects"]["calls"] > 0
    assert m["method_noop_64_in_flight_100_objects"]["calls"] > 0
    assert m["call_codec_1kb_dict"]["bytes"] >= 1000
    for hops in ("1hop", "2hop"):
        assert m[f"floor_zmq_{hops}_echo"]["cpu_ms_per_round_trip"] > 0
    assert m["floor_zmq_send"]["back_to_back_cpu_us"] > 0
    assert m["floor_zmq_send"]["alone_cpu_us"] > 0


def test_http_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "http", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    for section in ("noop_sequential", "noop_64_connections_100_objects", "counter_sequential",
                    "counter_64_connections_100_objects"):
        assert m[section]["requests"] > 0, section


def test_websockets_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "websockets", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    assert m["echo_gateway"]["messages"] == m["echo_python_client"]["messages"] > 0
    assert m["broadcast"]["rounds"] > 0 and m["broadcast"]["last_delivery_p99_ms"] > 0
    fan = m["fanout_sustained"]
    assert fan["delivered"] == fan["sockets"] * fan["messages_sent"]
    hib = m["hibernated"]
    assert hib["still_open_after_hold"] == hib["sockets"] == 1000
    assert hib["gateway_bytes_per_socket"] > 0


def test_testing_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "testing", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    assert m["start_p50_ms"] > 0 and m["noop_calls_per_s"] > 0 and m["counter_increments_per_s"] > 0
    assert m["pytest_fresh_runtime_tests"]["tests"] == 100


def test_metrics_bench_quick_reports_every_figure():
    out = subprocess.run([sys.executable, str(BENCH), "metrics", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    assert m["scrapes"] >= 1 and m["p50_ratio"] > 0 and m["calls_per_s_ratio"] > 0


def test_vs_workerd_bench_quick_runs_durables_half():
    """CI has no workerd: the durable half of `bench.py vs-workerd` runs and reports every
    figure of #18's table, for both HTTP fronts, and for slots with the broker path."""
    out = subprocess.run([sys.executable, str(BENCH), "vs-workerd", "--quick", "--rounds", "1",
                          "--front", "slots,gateways,slots:broker"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    speed = result["python_10m_additions_s"]  # (before and after: the figures' scale)
    assert len(speed) == 2 and all(0 < s < 60 for s in speed), speed
    median = result["median"]
    assert median["fronts"] == {"durable": "slots", "durable_gateways": "gateways",
                                "durable_slots:broker": "slots:broker"}
    # (each round waited for a quiet machine, or gave up at the limit: None)
    assert {k: len(v) for k, v in median["settled_s"].items()} == {
        "durable": 1, "durable_gateways": 1, "durable_slots:broker": 1}, median["settled_s"]
    assert all(w is None or w > 0 for v in median["settled_s"].values() for w in v)
    assert median["quiet_windows"] == 1  # (--quick: one window; three in a full run)
    # (the peer path: calls from object and gateway processes skip the broker, which may
    # then spend nothing)
    for name, roles in (("durable", ("objectproc",)),
                        ("durable_slots:broker", ("broker", "objectproc")),
                        ("durable_gateways", ("gateway", "objectproc"))):
        m = median[name]
        for figure in ("noop_sequential_p50_ms", "counter_sequential_p50_ms", "noop_64_per_s",
                       "noop_64_p99_ms", "counter_64_per_s", "counter_spread_64_per_s",
                       "counter_wide_64_per_s", "new_object_64_per_s", "server_cpu_per_noop_ms",
                       "server_cpu_per_counter_64_ms", "server_cpu_per_counter_spread_64_ms",
                       "server_cpu_per_counter_wide_64_ms", "server_cpu_per_new_object_64_ms"):
            assert m[figure] > 0, (name, figure)
        split = {k: v for k, v in m.items() if k.startswith("server_cpu_per_noop_ms_")}
        for role in roles:  # every process on the path spent some
            assert split[f"server_cpu_per_noop_ms_{role}"] > 0, (name, role)
        assert ("server_cpu_per_noop_ms_gateway" in split) == (name == "durable_gateways")
        assert abs(sum(split.values()) - m["server_cpu_per_noop_ms"]) < 0.01
        assert 0 < median[f"{name}_new_object_over_counter"]["counter_spread_64"] < 5, median
        assert 0 < median[f"{name}_new_object_over_counter"]["counter_64_by_round"] < 5, median
        assert 0 < median[f"{name}_new_object_over_counter"]["counter_wide_64_by_round"] < 5, median


def test_calls_bench_quick_counts_each_loads_calls():
    """`bench.py calls`: the object processes profile each load (the hook in
    scripts/cprofile_hook, switched by a signal) and the counts are per request. A request to
    a new object makes more Python calls than one to a hot counter: its id's HMACs, its
    activation, the filter's checks."""
    out = subprocess.run([sys.executable, str(BENCH), "calls", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    loads = ("counter_64", "counter_spread_64", "counter_wide_64", "new_object_64")
    for name in loads:
        load = m[name]
        assert load["requests"] > 0, name
        assert 100 < load["python_function_calls_per_request"] < load["calls_per_request"], load
        assert len(load["most_called"]) == 15, load
    assert m["new_object_64"]["calls_per_request"] > m["counter_64"]["calls_per_request"] + 50, m
    against = {label: (before, after)
               for label, before, after in m["new_object_64"]["against_counter_64"]}
    hmacs = [v for label, v in against.items() if label.startswith("client/ids.py")]
    assert hmacs and all(after > before for before, after in hmacs), against
    assert "against_counter_64" not in m["counter_64"]


def test_idle_bench_quick_reports_every_role():
    out = subprocess.run([sys.executable, str(BENCH), "idle", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]["durable"]
    for figure in ("cpu_percent_of_a_core", "wakeups_per_s"):
        assert {"supervisor", "broker", "objectproc", "total"} <= set(m[figure]), m[figure]
        assert m[figure]["total"] == pytest.approx(
            sum(v for k, v in m[figure].items() if k != "total"), abs=0.01)
    assert m["wakeups_per_s"]["objectproc"] > 0  # (its heartbeats, at the least)


def test_evict_tail_bench_quick_evicts_in_its_window_and_reports_the_difference():
    out = subprocess.run([sys.executable, str(BENCH), "evict-tail", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["median"]
    (cycle,) = m["cycles"]
    assert cycle["objects_made"] > 100
    assert cycle["evicted"] > cycle["objects_made"] / 2, cycle  # (the new ones, in the window)
    assert cycle["quiet_p99_ms"] > 0 and cycle["evicting_p99_ms"] > 0
    assert m["p99_difference_ms"] == pytest.approx(
        cycle["evicting_p99_ms"] - cycle["quiet_p99_ms"], abs=0.002)
