"""The Triton engine on CPU: PyTriton's bundled tritonserver, the gateway in front of it, the stock model repository.

One Triton (PyTriton) serves the whole module; the test that stops and
restarts it runs last among those that use it.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient import grpc as triton_grpc
from tritonclient import http as triton_http
from tritonclient.grpc import model_config_pb2

from carve3d_reward.grid import join_grid, to_uint8_image
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.model import OUTPUTS, ModelOutputs, MRCModel
from carve3d_reward.service.app import create_app
from carve3d_reward.service.batcher import EngineUnavailableError
from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.service.triton_engine import TritonEngine
from carve3d_reward.settings import MetricSettings
from carve3d_reward.triton.binding import MRCTriton, preferred_batch_sizes, use_interpreter_libpython
from carve3d_reward.triton.tensors import INPUT, MODEL_NAME, OUTPUT_SPECS, run_requests

from .serving import free_port, serve_app, serve_process

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "services" / "reward" / "triton" / "model_repository"
SMALL = {"view_size": 64, "carve_resolution": 32, "carve_samples": 64}
SMALL_FLAGS = ["--view-size", "64", "--carve-resolution", "32", "--carve-samples", "64"]
MAX_BATCH = 8


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> MetricSettings:
    return MetricSettings(**SMALL)


@pytest.fixture(scope="module")
def model(small) -> MRCModel:
    return MRCModel(small)


@pytest.fixture(scope="module")
def grids(clean_views) -> np.ndarray:
    """uint8 grids [6, 128, 128, 3]."""
    return np.stack([to_uint8_image(g) for g in join_grid(clean_views, INSTANT3D_2X2)])


def triton_settings(small: MetricSettings) -> ServiceSettings:
    return ServiceSettings(
        metric=small,
        max_batch=MAX_BATCH,
        max_delay_ms=100,  # long enough that concurrent requests share batches
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
    )


class Running:
    """The module's Triton, replaced in place when a test restarts it."""

    def __init__(self, server: MRCTriton) -> None:
        self.server = server

    def __getattr__(self, name: str):
        return getattr(self.server, name)


@pytest.fixture(scope="module")
def triton(small, model, tmp_path_factory) -> Iterator[Running]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    running = Running(MRCTriton(triton_settings(small), models=[model], log_file=log_file).start())
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def gateway(triton, model, small) -> Iterator[str]:
    settings = ServiceSettings(metric=small, engine="triton", max_batch=MAX_BATCH, triton_url=triton.grpc_url)
    engine = TritonEngine(triton.grpc_url, metric_id=model.metric_id, max_batch=MAX_BATCH, probe_timeout_s=1.0)
    with serve_app(create_app(settings, model=model, engine=engine)) as url:
        yield url


def post_raw(url: str, grids: np.ndarray, **extra) -> httpx.Response:
    body = {"grids": [{"data": g.tobytes(), "shape": list(g.shape), "dtype": "uint8"} for g in grids], **extra}
    return httpx.post(
        url + "/mrc",
        content=msgpack.packb(body, use_bin_type=True),
        headers={"content-type": "application/msgpack"},
        timeout=60,
    )


def png(grid: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["status"] == w["status"] and g["metric"] == w["metric"] and g["version"] == w["version"]
        assert g["mrc"] == pytest.approx(w["mrc"], abs=1e-6) and g["reward"] == pytest.approx(w["reward"], abs=1e-6)
        assert [v["bbox"] for v in g["views"]] == [v["bbox"] for v in w["views"]]
        assert [v["empty"] for v in g["views"]] == [v["empty"] for v in w["views"]]
        np.testing.assert_allclose([v["distance"] for v in g["views"]], [v["distance"] for v in w["views"]], atol=1e-6)


def assert_same_tensors(tensors: dict[str, np.ndarray], model: MRCModel, grids: np.ndarray) -> None:
    want = model(grids)
    for spec in OUTPUT_SPECS:
        assert tensors[spec.name].dtype == spec.numpy_dtype, spec.name
    assert tensors["mrc"].shape == (len(grids), 1)
    np.testing.assert_allclose(tensors["mrc"][:, 0], want.mrc, atol=1e-6)
    np.testing.assert_allclose(tensors["distances"], want.distances, atol=1e-6)
    np.testing.assert_array_equal(tensors["boxes"], want.boxes)
    np.testing.assert_array_equal(tensors["empty"], want.empty)


# -- pure functions (no server) --------------------------------------------------------------------
def test_tensor_interface_matches_the_model_outputs() -> None:
    assert tuple(s.name for s in OUTPUT_SPECS) == OUTPUTS
    assert (INPUT.name, INPUT.datatype, INPUT.dims) == ("grids", "UINT8", (-1, -1, 3))
    assert preferred_batch_sizes(16) == [8, 16] and preferred_batch_sizes(3) == [3] and preferred_batch_sizes(1) == [1]
    env = {"LD_LIBRARY_PATH": "/opt/x"}
    libdir = use_interpreter_libpython(env)
    assert libdir == sysconfig.get_config_var("LIBDIR") and env["LD_LIBRARY_PATH"] == f"{libdir}:/opt/x"
    use_interpreter_libpython(env)
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/opt/x"  # idempotent


def test_run_requests_batches_by_size_and_isolates_a_failing_request(model, grids) -> None:
    calls: list[int] = []

    class Spy:
        def __call__(self, batch: np.ndarray):
            calls.append(len(batch))
            if (batch == 7).all(axis=(1, 2, 3)).any():
                raise ValueError("poison")
            return model(batch)

    poison = np.full((1, 128, 128, 3), 7, np.uint8)
    other_size = np.stack([np.asarray(Image.fromarray(grids[0]).resize((256, 256)))])
    results = run_requests(Spy(), [grids[:2], poison, grids[2:3], other_size])  # type: ignore[arg-type]
    # The three 128 px requests in one call, then one by one after it failed; the 256 px one apart.
    assert calls == [4, 2, 1, 1, 1]
    assert isinstance(results[1], ValueError)
    joined = {name: np.concatenate([results[0][name], results[2][name]]) for name in OUTPUTS}  # type: ignore[index]
    assert_same_tensors(joined, model, grids[:3])
    assert results[3]["mrc"].shape == (1, 1)  # type: ignore[index]


def test_in_process_results_are_built_from_the_model_callable(model, grids) -> None:
    grids = grids[:2]
    outputs = model(grids)
    plain = model.score_grids(grids, return_renders=False)
    assert plain == outputs.scores(model.metric_id)  # what Triton's answer turns into
    result = model.score(grids, return_renders=True)
    for name in OUTPUTS:  # the renders path converts like MRCModel.__call__
        np.testing.assert_array_equal(getattr(ModelOutputs.from_result(result), name), getattr(outputs, name))
    assert plain == result.scores()  # and like the library's own scores
    with_renders = model.score_grids(grids, return_renders=True)
    assert all(len(r.renders) == 4 for r in with_renders)
    assert [r.without_renders() for r in with_renders] == plain


def test_config_pbtxt_matches_the_binding() -> None:
    text = (MODEL_REPOSITORY / MODEL_NAME / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == MODEL_NAME and config.backend == "python" and config.max_batch_size >= 1
    dtype = model_config_pb2.DataType.Name
    assert [(t.name, dtype(t.data_type), tuple(t.dims)) for t in config.input] == [
        (INPUT.name, INPUT.config_dtype, INPUT.dims)
    ]
    assert [(t.name, dtype(t.data_type), tuple(t.dims)) for t in config.output] == [
        (s.name, s.config_dtype, s.dims) for s in OUTPUT_SPECS
    ]
    assert tuple(t.name for t in config.output) == OUTPUTS
    assert list(config.dynamic_batching.preferred_batch_size) == preferred_batch_sizes(config.max_batch_size)
    assert set(config.parameters) <= set(MetricSettings.model_fields)
    assert (MODEL_REPOSITORY / MODEL_NAME / "1" / "model.py").is_file()


# -- the PyTriton server ---------------------------------------------------------------------------
@pytest.mark.slow
def test_live_model_config_is_the_repository_config(triton) -> None:
    """What PyTriton serves has the tensors of config.pbtxt (so clients cannot tell them apart)."""
    with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
        live = client.get_model_config(MODEL_NAME).config
    stock = text_format.Parse(
        (MODEL_REPOSITORY / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )

    def tensors(config):
        return [(t.name, t.data_type, tuple(t.dims)) for t in [*config.input, *config.output]]

    assert tensors(live) == tensors(stock)
    assert live.max_batch_size == MAX_BATCH
    assert list(live.dynamic_batching.preferred_batch_size) == preferred_batch_sizes(MAX_BATCH)
    assert live.dynamic_batching.max_queue_delay_microseconds == 100_000
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in live.instance_group] == [
        (1, "KIND_CPU")
    ]


@pytest.mark.slow
def test_same_scores_in_process_through_the_gateway_and_raw_tritonclient(triton, gateway, model, grids) -> None:
    want = [r.to_wire() for r in model.score_grids(grids, return_renders=False)]
    # Gateway -> Triton.
    r = post_raw(gateway, grids)
    assert r.status_code == 200, r.text
    assert_same_results(msgpack.unpackb(r.content, raw=False)["results"], want)
    # An in-process gateway answers the same bytes' worth of scores.
    with serve_app(create_app(ServiceSettings(metric=model.settings), model=model)) as inprocess:
        assert_same_results(msgpack.unpackb(post_raw(inprocess, grids).content, raw=False)["results"], want)
    # Raw KServe v2 calls, HTTP and gRPC.
    with triton_http.InferenceServerClient(triton.http_url) as client:
        tensor = triton_http.InferInput("grids", list(grids.shape), "UINT8")
        tensor.set_data_from_numpy(grids)
        reply = client.infer(MODEL_NAME, [tensor])
        assert_same_tensors({n: reply.as_numpy(n) for n in OUTPUTS}, model, grids)
    with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
        tensor = triton_grpc.InferInput("grids", list(grids[:3].shape), "UINT8")
        tensor.set_data_from_numpy(grids[:3])
        reply = client.infer(MODEL_NAME, [tensor])
        assert_same_tensors({n: reply.as_numpy(n) for n in OUTPUTS}, model, grids[:3])


@pytest.mark.slow
def test_gateway_reports_triton_ready_and_splits_large_requests(gateway, model, grids) -> None:
    ready = httpx.get(gateway + "/readyz")
    assert ready.status_code == 200 and ready.json()["metric"] == model.metric_id
    assert httpx.get(gateway + "/v1/info").json()["engine"] == "triton"
    many = np.concatenate([grids, grids, grids])[:17]  # more than Triton's max_batch_size (8)
    r = post_raw(gateway, many)
    assert r.status_code == 200, r.text
    got = [x["mrc"] for x in msgpack.unpackb(r.content, raw=False)["results"]]
    np.testing.assert_allclose(got, model(many).mrc, atol=1e-6)


@pytest.mark.slow
def test_renders_are_refused_with_a_clear_400(gateway, grids) -> None:
    r = post_raw(gateway, grids[:1], return_renders=True)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "renders_unsupported" and "triton" in body["detail"]
    r = httpx.post(gateway + "/mrc?return_renders=true", content=png(grids[0]), headers={"content-type": "image/png"})
    assert r.status_code == 400


@pytest.mark.slow
def test_invalid_grids_are_flagged_by_the_gateway_not_sent(gateway, grids) -> None:
    files = [
        ("grid", ("ok.png", png(grids[0]), "image/png")),
        ("grid", ("odd.png", png(np.full((130, 128, 3), 255, np.uint8)), "image/png")),
    ]
    results = httpx.post(gateway + "/mrc", files=files, timeout=60).json()["results"]
    assert [x["status"] for x in results] == ["ok", "invalid"]


def _model_stats(triton) -> tuple[int, int]:
    with triton_http.InferenceServerClient(triton.http_url) as client:
        stats = client.get_inference_statistics(MODEL_NAME)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _prom(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.slow
def test_concurrent_requests_are_batched_by_triton(triton, gateway, grids) -> None:
    inferences0, executions0 = _model_stats(triton)
    bodies = [png(grids[i % len(grids)]) for i in range(MAX_BATCH)]
    with ThreadPoolExecutor(MAX_BATCH) as pool:
        replies = list(
            pool.map(
                lambda b: httpx.post(gateway + "/mrc", content=b, headers={"content-type": "image/png"}, timeout=60),
                bodies,
            )
        )
    assert [r.status_code for r in replies] == [200] * MAX_BATCH
    deadline = time.monotonic() + 10  # Triton records statistics just after it answers
    while (stats := _model_stats(triton))[0] - inferences0 < MAX_BATCH and time.monotonic() < deadline:
        time.sleep(0.05)
    inferences, executions = stats
    assert inferences - inferences0 == MAX_BATCH
    assert executions - executions0 < MAX_BATCH, "Triton ran every request alone"
    # The same counters on Triton's Prometheus port, next to the gateway's own mrc_* metrics.
    text = httpx.get(triton.metrics_url).text
    assert _prom(text, "nv_inference_count") >= inferences and _prom(text, "nv_inference_exec_count") >= executions
    assert 'model="mrc"' in text
    assert "mrc_requests_total" in httpx.get(gateway + "/metrics").text


def test_engine_reports_an_unreachable_triton_without_raising() -> None:
    async def probe() -> tuple[tuple[bool, str], Exception | None]:
        engine = TritonEngine(f"127.0.0.1:{free_port()}", metric_id="m", probe_timeout_s=1.0)
        await engine.start()
        ready = await engine.ready()
        try:
            await engine(np.zeros((1, 128, 128, 3), np.uint8), False)
            error = None
        except EngineUnavailableError as exc:
            error = exc
        await engine.close()
        return ready, error

    (ok, why), error = asyncio.run(probe())
    assert not ok and "unreachable" in why
    assert error is not None and error.retry_after > 0


@pytest.mark.slow
def test_triton_down_answers_503_and_the_gateway_recovers_by_itself(triton, gateway, model, grids, tmp_path) -> None:
    settings = triton.server.settings
    triton.server.stop()
    ready = httpx.get(gateway + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"] == "engine_unavailable", ready.text
    assert int(ready.headers["retry-after"]) >= 1
    r = post_raw(gateway, grids[:2])
    assert r.status_code == 503 and r.json()["error"] == "engine_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(gateway + "/healthz").status_code == 200  # alive, only not ready

    triton.server = MRCTriton(settings, models=[model], log_file=tmp_path / "triton-2.log").start()
    deadline = time.monotonic() + 30
    while httpx.get(gateway + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not see Triton come back"
        time.sleep(0.2)
    r = post_raw(gateway, grids[:2])
    assert r.status_code == 200, r.text
    want = [r.to_wire() for r in model.score_grids(grids[:2], return_renders=False)]
    assert_same_results(msgpack.unpackb(r.content, raw=False)["results"], want)


# -- the stock model repository on the bundled tritonserver -----------------------------------------
def _descendants(pid: int) -> dict[int, str]:
    """``{pid: command name}`` of every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = (int(fields[1]), comm)
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, comm) in parents.items():
            if ppid == parent and child not in found:
                found[child] = comm
                frontier.append(child)
    return found


def _alive(pid: int, comm: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.index("(") + 1 : text.rindex(")")] == comm and text[text.rindex(")") + 2] != "Z"


@pytest.mark.slow
def test_stock_model_repository_on_tritonserver_scores_like_the_library(model, grids, tmp_path) -> None:
    """services/reward/triton/model_repository with a plain tritonserver (PyTriton's binary) and its Python backend."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = tmp_path / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        (backend / item.name).symlink_to(item)
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backend)
    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY, repo)
    config = repo / MODEL_NAME / "config.pbtxt"
    text = config.read_text()
    for key in ("view_size", "carve_resolution"):  # two settings as parameters, one from the environment
        text = text.replace(
            f'key: "{key}" value: {{ string_value: "" }}', f'key: "{key}" value: {{ string_value: "{SMALL[key]}" }}'
        )
    config.write_text(text)

    env = {
        **os.environ,
        "MRC_CARVE_SAMPLES": str(SMALL["carve_samples"]),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env["LD_LIBRARY_PATH"] = f"{sysconfig.get_config_var('LIBDIR')}:{libs}"
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log = (tmp_path / "tritonserver.log").open("w")
    proc = subprocess.Popen(
        [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={tmp_path / 'backends'}",
            "--http-address=127.0.0.1", f"--http-port={http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
            "--exit-timeout-secs=5",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with triton_http.InferenceServerClient(f"127.0.0.1:{http_port}") as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
                try:
                    if client.is_model_ready(MODEL_NAME):
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                assert time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()[-3000:]
                time.sleep(0.25)

            def infer(batch: np.ndarray):
                tensor = triton_http.InferInput("grids", list(batch.shape), "UINT8")
                tensor.set_data_from_numpy(batch)
                return client.infer(MODEL_NAME, [tensor])

            reply = infer(grids)
            assert_same_tensors({n: reply.as_numpy(n) for n in OUTPUTS}, model, grids)
            with pytest.raises(Exception, match="views must be square"):
                infer(np.zeros((1, 130, 128, 3), np.uint8))
        # The gateway in front of it: `mrc serve --engine triton --triton-url ...` without launching PyTriton.
        engine = TritonEngine(f"127.0.0.1:{grpc_port}", metric_id=model.metric_id, max_batch=4)
        settings = ServiceSettings(metric=model.settings, engine="triton", triton_url=f"127.0.0.1:{grpc_port}")
        with serve_app(create_app(settings, model=model, engine=engine)) as url:
            r = post_raw(url, grids)
            assert r.status_code == 200, r.text
            want = [r.to_wire() for r in model.score_grids(grids, return_renders=False)]
            assert_same_results(msgpack.unpackb(r.content, raw=False)["results"], want)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- mrc serve --engine triton ----------------------------------------------------------------------
@pytest.mark.slow
def test_mrc_serve_engine_triton_scores_and_sigterm_leaves_no_tritonserver(model, grids) -> None:
    ports = [str(free_port()) for _ in range(3)]
    args = ["--engine", "triton", "--max-batch", "4", *SMALL_FLAGS]
    args += ["--triton-http-port", ports[0], "--triton-grpc-port", ports[1], "--triton-metrics-port", ports[2]]
    with serve_process(*args) as (url, proc):
        r = httpx.post(url + "/mrc", content=png(grids[0]), headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["mrc"] == pytest.approx(float(model(grids[:1]).mrc[0]), abs=1e-6)
        assert "nv_inference_count" in httpx.get(f"http://127.0.0.1:{ports[2]}/metrics").text
        children = _descendants(proc.pid)
        assert "tritonserver" in children.values(), children
        start = time.monotonic()
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10  # the kernel may take a moment to reap
    while (left := {pid: comm for pid, comm in children.items() if _alive(pid, comm)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived mrc serve: {left}"
