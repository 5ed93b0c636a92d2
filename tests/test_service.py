"""The reward service over real HTTP on loopback: every endpoint, wire, error, and the batcher's guarantees."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from carve3d_reward.grid import join_grid, to_uint8_image
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.model import MRCModel
from carve3d_reward.service.app import create_app
from carve3d_reward.service.settings import ServiceSettings

from .fuzz.encoders import png as png_file
from .fuzz.encoders import png_rows
from .serving import serve_app

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model(fast_settings) -> MRCModel:
    return MRCModel(fast_settings)


@pytest.fixture(scope="module")
def grids(clean_views) -> np.ndarray:
    """uint8 grids [6, 128, 128, 3]."""
    return np.stack([to_uint8_image(g) for g in join_grid(clean_views, INSTANT3D_2X2)])


def png(grid: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def expected(model: MRCModel, grids: np.ndarray) -> np.ndarray:
    return model.score(grids).mrc.numpy()


@pytest.fixture(scope="module")
def server(model, fast_settings):
    settings = ServiceSettings(metric=fast_settings, max_delay_ms=20, max_body_bytes=1_000_000, max_pixels=600 * 600)
    with serve_app(create_app(settings, model=model)) as url:
        yield url


def test_health_ready_info_and_openapi(server, model) -> None:
    assert httpx.get(server + "/healthz").json()["status"] == "alive"
    ready = httpx.get(server + "/readyz")
    assert ready.status_code == 200 and ready.json()["metric"] == model.metric_id
    info = httpx.get(server + "/v1/info").json()
    assert info["metric"] == model.metric_id and info["layout"]["rows"] == 2
    assert len(info["cameras"]["c2w"]) == 4 and info["cameras"]["fov_deg"] == 50.0
    assert info["limits"]["max_pixels"] == 600 * 600
    spec = httpx.get(server + "/openapi.json").json()
    body = spec["paths"]["/mrc"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "multipart/form-data", "application/msgpack"} <= set(body)
    assert "ScoreRequestModel" in spec["components"]["schemas"]


def test_the_documented_score_shape_is_the_wire_shape() -> None:
    from carve3d_reward.scores import GridScore, Status, ViewScore
    from carve3d_reward.service.schemas import GridScoreModel, ViewScoreModel

    full = GridScore(0.1, -0.1, Status.OK, [ViewScore(0.1, (0, 0, 1, 1), False)], "m", error="e", renders=[b"png"])
    assert set(full.to_wire()) == set(GridScoreModel.model_fields)
    assert set(full.views[0].to_wire()) == set(ViewScoreModel.model_fields)
    assert set(GridScoreModel.model_json_schema()["$defs"]["Status"]["enum"]) == {s.value for s in Status}


def test_png_body_scores_like_the_library(server, model, grids) -> None:
    r = httpx.post(server + "/mrc", content=png(grids[0]), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["metric"] == model.metric_id and body["version"]
    assert body["mrc"] == pytest.approx(float(expected(model, grids[:1])[0]), abs=1e-6)
    assert body["reward"] == -body["mrc"] and len(body["views"]) == 4
    assert r.headers["x-request-id"]


def test_jpeg_body_is_accepted(server, grids) -> None:
    buf = io.BytesIO()
    Image.fromarray(grids[1]).save(buf, format="JPEG", quality=95)
    r = httpx.post(server + "/mrc", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_multipart_results_keep_request_order(server, model, grids) -> None:
    order = [3, 0, 5, 1]
    files = [("grid", (f"g{i}.png", png(grids[i]), "image/png")) for i in order]
    r = httpx.post(server + "/mrc", files=files)
    assert r.status_code == 200, r.text
    got = [res["mrc"] for res in r.json()["results"]]
    np.testing.assert_allclose(got, expected(model, grids[order]), atol=1e-6)


def test_msgpack_raw_and_png_grids_with_renders(server, model, grids) -> None:
    request = {
        "grids": [
            {"data": grids[2].tobytes(), "shape": list(grids[2].shape), "dtype": "uint8"},
            {"image": png(grids[4])},
        ],
        "return_renders": True,
    }
    r = httpx.post(
        server + "/mrc",
        content=msgpack.packb(request, use_bin_type=True),
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/msgpack")
    reply = msgpack.unpackb(r.content, raw=False)
    np.testing.assert_allclose([x["mrc"] for x in reply["results"]], expected(model, grids[[2, 4]]), atol=1e-6)
    renders = reply["results"][0]["renders"]
    assert len(renders) == 4
    with Image.open(io.BytesIO(renders[0])) as img:
        assert img.size == (64, 64)
    # JSON reply on request.
    r = httpx.post(
        server + "/mrc",
        content=msgpack.packb({"grids": request["grids"][:1]}, use_bin_type=True),
        headers={"content-type": "application/msgpack", "accept": "application/json"},
    )
    assert r.json()["results"][0]["mrc"] == pytest.approx(reply["results"][0]["mrc"], abs=1e-9)
    assert "renders" not in r.json()["results"][0]


def test_json_request_with_base64(server, model, grids) -> None:
    payload = {"grids": [{"image": base64.b64encode(png(grids[5])).decode()}]}
    r = httpx.post(server + "/mrc", json=payload)
    assert r.status_code == 200
    assert r.json()["results"][0]["mrc"] == pytest.approx(float(expected(model, grids[5:6])[0]), abs=1e-6)


def test_bad_grid_in_a_batch_is_flagged_and_the_others_scored(server, grids) -> None:
    files = [
        ("grid", ("ok.png", png(grids[0]), "image/png")),
        ("grid", ("junk.png", b"\x89PNG nonsense", "image/png")),
        ("grid", ("odd.png", png(np.full((129, 128, 3), 255, np.uint8)), "image/png")),
        ("grid", ("ok2.png", png(grids[1]), "image/png")),
    ]
    results = httpx.post(server + "/mrc", files=files).json()["results"]
    assert [x["status"] for x in results] == ["ok", "invalid", "invalid", "ok"]
    assert results[1]["mrc"] is None and "not a decodable image" in results[1]["error"]
    assert "does not split" in results[2]["error"]


def test_empty_view_is_scored_with_a_status(server, grids) -> None:
    grid = grids[0].copy()
    grid[64:, 64:] = 255  # bottom-right view: white only
    body = httpx.post(server + "/mrc", content=png(grid), headers={"content-type": "image/png"}).json()
    assert body["status"] == "empty_view" and body["views"][3]["empty"] is True and body["mrc"] > 0.2


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "text/plain"),
        ({"content": b"not png", "headers": {"content-type": "image/png"}}, 400, "invalid_image", "decodable"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "bad_request", "empty body"),
        ({"content": b"\xc1\xc1", "headers": {"content-type": "application/msgpack"}}, 400, "bad_msgpack", "msgpack"),
        ({"content": b"x" * 1_000_001, "headers": {"content-type": "image/png"}}, 413, "too_large", "limit"),
    ],
)
def test_errors_are_json_with_a_reason(server, kwargs, status, code, needle) -> None:
    r = httpx.post(server + "/mrc", **kwargs)
    assert r.status_code == status
    body = r.json()
    assert body["error"] == code and needle in body["detail"] and body["request_id"]


@pytest.mark.slow
def test_envelope_errors_fail_the_request_and_entry_errors_fail_only_their_grid(server, grids) -> None:
    def post(obj):
        return httpx.post(
            server + "/mrc",
            content=msgpack.packb(obj, use_bin_type=True),
            headers={"content-type": "application/msgpack", "accept": "application/json"},
        )

    for obj, needle in (([1, 2], "'grids' list"), ({"grids": []}, "empty")):
        r = post(obj)
        assert r.status_code == 400, (obj, r.text)
        assert needle in r.json()["detail"], r.json()
    g = grids[0]
    good = {"data": g.tobytes(), "shape": [128, 128, 3]}
    entries = [
        ({"data": g.tobytes(), "shape": [128, 128], "dtype": "uint8"}, "[H, W, 3]"),
        ({"data": g.tobytes(), "shape": [128, 128, 3], "dtype": "float32"}, "float32"),
        ({"data": g.tobytes()[:-1], "shape": [128, 128, 3]}, "needs 49152 bytes"),
        ({"data": g.tobytes(), "shape": [True, 128, 3]}, "positive integers"),
        ({"shape": [1, 1, 3]}, "neither"),
        ({"image": b"png", "data": g.tobytes(), "shape": [128, 128, 3]}, "both"),
        ({"data": bytes(3), "shape": [700, 700, 3]}, "more than the limit"),  # checked before the length
    ]
    for entry, needle in entries:
        r = post({"grids": [good, entry, good]})
        assert r.status_code == 200, (entry.get("shape"), r.text)
        first, bad, last = r.json()["results"]
        assert bad["status"] == "invalid" and bad["mrc"] is None and needle in bad["error"], bad
        assert first["status"] == last["status"] == "ok" and first["mrc"] == last["mrc"]


def test_unknown_routes_and_methods_answer_json(server) -> None:
    r = httpx.get(server + "/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.get(server + "/mrc")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_metrics_count_requests_batches_and_grids(server, grids) -> None:
    httpx.post(server + "/mrc", content=png(grids[0]), headers={"content-type": "image/png"})
    text = httpx.get(server + "/metrics").text
    for name in (
        'mrc_requests_total{code="200",endpoint="/mrc"}',
        "mrc_request_duration_seconds_bucket",
        "mrc_queue_wait_seconds_count",
        "mrc_compute_duration_seconds_count",
        "mrc_batch_size_count",
        "mrc_queue_depth",
        'mrc_grids_scored_total{status="ok"}',
        'mrc_device_memory_bytes{device="cpu"}',
        "mrc_build_info",
    ):
        assert name in text, name


def test_concurrent_requests_are_batched(model, fast_settings, grids) -> None:
    settings = ServiceSettings(metric=fast_settings, max_batch=8, max_delay_ms=200)
    with serve_app(create_app(settings, model=model)) as url:
        bodies = [png(grids[i % 6]) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            rs = list(
                pool.map(
                    lambda b: httpx.post(url + "/mrc", content=b, headers={"content-type": "image/png"}, timeout=60),
                    bodies,
                )
            )
        assert all(r.status_code == 200 for r in rs)
        metrics = httpx.get(url + "/metrics").text
    count = _metric(metrics, "mrc_batch_size_count")
    total = _metric(metrics, "mrc_batch_size_sum")
    assert total == 8 and count < 8, (count, total)  # fewer batches than requests: some were batched


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


class CountingScore:
    """Wraps the real score function: counts grids scored, can sleep or fail on demand."""

    def __init__(self, model: MRCModel, *, sleep: float = 0.0, fail_batches_over: int | None = None) -> None:
        self.inner = lambda grids, renders: model.score_grids(grids, return_renders=renders)
        self.sleep = sleep
        self.fail_batches_over = fail_batches_over
        self.grids = 0
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, grids: np.ndarray, want_renders: bool):
        with self.lock:
            self.batches.append(len(grids))
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail_batches_over is not None and len(grids) > self.fail_batches_over:
            raise RuntimeError("CUDA out of memory (simulated)")
        if (grids == 7).all(axis=(1, 2, 3)).any():
            raise ValueError("poison grid")
        with self.lock:
            self.grids += len(grids)
        return self.inner(grids, want_renders)


@pytest.mark.slow
def test_failed_batch_is_split_and_only_the_bad_grid_fails(model, fast_settings, grids) -> None:
    score = CountingScore(model, fail_batches_over=2)
    settings = ServiceSettings(metric=fast_settings, max_batch=8, max_delay_ms=100)
    with serve_app(create_app(settings, model=model, score_fn=score)) as url:
        poison = np.full_like(grids[0], 7)
        files = [("grid", (f"g{i}.png", png(g), "image/png")) for i, g in enumerate([*grids[:5], poison])]
        r = httpx.post(url + "/mrc", files=files, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == ["ok"] * 5 + ["error"]
        assert "poison grid" in results[5]["error"]
        np.testing.assert_allclose([x["mrc"] for x in results[:5]], expected(model, grids[:5]), atol=1e-6)
        single = httpx.post(url + "/mrc", content=png(poison), headers={"content-type": "image/png"}, timeout=60)
        assert single.status_code == 500 and single.json()["error"] == "scoring_failed"
        assert _metric(httpx.get(url + "/metrics").text, "mrc_batch_failures_total") >= 1
    assert score.batches[0] == 6 and max(score.batches[1:]) <= 3  # split in halves after the failure


@pytest.mark.slow
def test_full_queue_answers_503_at_once(model, fast_settings, grids) -> None:
    score = CountingScore(model, sleep=1.0)
    settings = ServiceSettings(metric=fast_settings, max_batch=1, max_delay_ms=0, max_queue=2)
    with serve_app(create_app(settings, model=model, score_fn=score)) as url:

        def post(_):
            start = time.monotonic()
            r = httpx.post(url + "/mrc", content=png(grids[0]), headers={"content-type": "image/png"}, timeout=60)
            return r, time.monotonic() - start

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
    codes = sorted(r.status_code for r, _ in answers)
    assert codes.count(200) >= 3 and codes.count(503) >= 1, codes
    for r, elapsed in answers:
        if r.status_code == 503:
            assert r.json()["error"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            assert elapsed < 1.0  # refused at once, not after waiting


def test_slow_scoring_times_out_with_504(model, fast_settings, grids) -> None:
    score = CountingScore(model, sleep=1.5)
    settings = ServiceSettings(metric=fast_settings, request_timeout_s=0.3)
    with serve_app(create_app(settings, model=model, score_fn=score)) as url:
        r = httpx.post(url + "/mrc", content=png(grids[0]), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"] == "timeout"


def test_retried_request_id_is_scored_once(model, fast_settings, grids) -> None:
    score = CountingScore(model)
    settings = ServiceSettings(metric=fast_settings)
    with serve_app(create_app(settings, model=model, score_fn=score)) as url:
        body = msgpack.packb({"grids": [{"image": png(grids[0])}, {"image": png(grids[1])}]}, use_bin_type=True)
        headers = {"content-type": "application/msgpack", "x-request-id": "trainer-7-epoch-3-batch-1"}
        first = httpx.post(url + "/mrc", content=body, headers=headers)
        again = httpx.post(url + "/mrc", content=body, headers=headers)
        assert first.status_code == again.status_code == 200
        assert first.content == again.content and score.grids == 2
        other = httpx.post(url + "/mrc", content=body, headers={**headers, "x-request-id": "another"})
        assert other.status_code == 200 and score.grids == 4


def test_bearer_token(model, fast_settings, grids) -> None:
    settings = ServiceSettings(metric=fast_settings, auth_token=TOKEN, open_metrics=False)
    with serve_app(create_app(settings, model=model)) as url:
        body, ctype = png(grids[0]), {"content-type": "image/png"}
        r = httpx.post(url + "/mrc", content=body, headers=ctype)
        assert (
            r.status_code == 401 and r.json()["error"] == "unauthorized" and "Bearer" in r.headers["www-authenticate"]
        )
        r = httpx.post(url + "/mrc", content=body, headers={**ctype, "authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(url + "/mrc", content=body, headers={**ctype, "authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert httpx.get(url + "/healthz").status_code == 200  # open by default
        assert httpx.get(url + "/readyz").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401  # closed by setting
        assert httpx.get(url + "/v1/info").status_code == 401
        ok = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and 'code="401"' in ok.text


def test_readyz_fails_once_shutdown_begins(model, fast_settings) -> None:
    app = create_app(ServiceSettings(metric=fast_settings), model=model)
    with serve_app(app) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        app.state.service.ready = False
        app.state.service.draining = True
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "draining"
        app.state.service.ready = True
        app.state.service.draining = False


def test_float_tensor_helper_matches_uint8_path(model, clean_views) -> None:
    """The service scores uint8 grids; the same pixels as floats give the same score."""
    grid = join_grid(clean_views[:1], INSTANT3D_2X2)
    u8 = to_uint8_image(grid[0])[None]
    as_float = torch.from_numpy(u8.astype(np.float32) / 255.0)
    np.testing.assert_allclose(model(u8).mrc, model.score(as_float).mrc.numpy(), atol=1e-7)


@pytest.mark.slow
def test_python_client_against_the_real_service(server, model, grids) -> None:
    """The client library and the server agree on the wire (raw and PNG), order and request ids."""
    import asyncio

    from carve3d_reward.client import AsyncMRCClient, MRCClient

    with MRCClient(server, wire="raw", max_grids_per_request=4) as client:
        assert client.ready()
        results = client.score(grids, request_id="client-test")
        assert client.info()["metric"] == model.metric_id
    np.testing.assert_allclose([r.mrc for r in results], expected(model, grids), atol=1e-6)
    assert all(r.ok and r.metric == model.metric_id for r in results)

    async def run_async():
        async with AsyncMRCClient(server, wire="png") as client:
            return await client.score(torch.from_numpy(grids[:2]), return_renders=True)

    async_results = asyncio.run(run_async())
    np.testing.assert_allclose([r.mrc for r in async_results], expected(model, grids[:2]), atol=1e-6)
    assert async_results[0].render_arrays()[0].shape == (64, 64, 3)


def test_unexpected_error_is_json_500_and_keeps_the_connection(model, fast_settings) -> None:
    app = create_app(ServiceSettings(metric=fast_settings), model=model)
    with serve_app(app) as url, httpx.Client() as client:
        state = app.state.service
        real = state.model
        state.model = object()  # /v1/info now raises AttributeError inside the route
        try:
            r = client.get(url + "/v1/info")
        finally:
            state.model = real
        assert r.status_code == 500 and r.json()["error"] == "internal" and r.json()["request_id"]
        assert client.get(url + "/healthz").status_code == 200  # same keep-alive connection still works


def test_requests_that_can_never_fit_the_queue_get_413(model, fast_settings, grids) -> None:
    settings = ServiceSettings(metric=fast_settings, max_queue=2, max_queue_pixels=3 * 128 * 128)
    with serve_app(create_app(settings, model=model)) as url:
        files = [("g", (f"{i}.png", png(grids[i]), "image/png")) for i in range(3)]
        r = httpx.post(url + "/mrc", files=files)
        assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
        assert "can never fit" in r.json()["detail"]
        r = httpx.post(url + "/mrc", files=files[:2])
        assert r.status_code == 200, r.text
    settings = ServiceSettings(metric=fast_settings, max_queue_pixels=128 * 128)
    with serve_app(create_app(settings, model=model)) as url:
        r = httpx.post(url + "/mrc", files=[("g", (f"{i}.png", png(grids[i]), "image/png")) for i in range(2)])
        assert r.status_code == 413 and "pixels" in r.json()["detail"], r.text


def test_the_request_pixel_budget_is_checked_before_any_grid_is_decoded(model, fast_settings, grids, monkeypatch):
    from carve3d_reward.service import requests

    decoded = []
    monkeypatch.setattr(requests, "grid_from_image", lambda *a, **k: decoded.append(1) or grids[0])
    settings = ServiceSettings(metric=fast_settings, max_request_pixels=2 * 128 * 128)
    with serve_app(create_app(settings, model=model)) as url:
        body = msgpack.packb({"grids": [{"image": png(g)} for g in grids[:3]]}, use_bin_type=True)
        r = httpx.post(url + "/mrc", content=body, headers={"content-type": "application/msgpack"})
        assert r.status_code == 413 and "49152 pixels in all" in r.json()["detail"], r.text
        assert decoded == []
        body = msgpack.packb({"grids": [{"image": png(g)} for g in grids[:2]]}, use_bin_type=True)
        r = httpx.post(url + "/mrc", content=body, headers={"content-type": "application/msgpack"})
        assert r.status_code == 200 and decoded == [1, 1]


@pytest.mark.slow
def test_at_most_decode_threads_grids_are_decoded_at_once(model, fast_settings, grids, monkeypatch) -> None:
    from carve3d_reward.service import requests

    real = requests.grid_from_image
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow_decode(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.1)  # long enough for the concurrent requests to overlap
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(requests, "grid_from_image", slow_decode)
    settings = ServiceSettings(metric=fast_settings, decode_threads=2)
    with serve_app(create_app(settings, model=model)) as url, ThreadPoolExecutor(6) as pool:
        files = [("g", (f"{i}.png", png(grids[i]), "image/png")) for i in range(3)]
        rs = list(pool.map(lambda _: httpx.post(url + "/mrc", files=files, timeout=60), range(6)))
    assert all(r.status_code == 200 for r in rs)
    assert 1 <= state["most"] <= 2, state


def test_a_retry_with_another_content_type_is_not_answered_from_the_cache(model, fast_settings, grids) -> None:
    settings = ServiceSettings(metric=fast_settings)
    with serve_app(create_app(settings, model=model)) as url:
        files = {"g": ("a.png", png(grids[0]), "image/png")}
        request = httpx.Request("POST", url + "/mrc", files=files, headers={"x-request-id": "same-id"})
        body, ctype = request.read(), request.headers["content-type"]
        first = httpx.post(url + "/mrc", content=body, headers={"content-type": ctype, "x-request-id": "same-id"})
        assert first.status_code == 200
        wrong = ctype.split("boundary=")[0] + "boundary=another"  # the same bytes no longer parse
        retry = httpx.post(url + "/mrc", content=body, headers={"content-type": wrong, "x-request-id": "same-id"})
        assert retry.status_code == 400 and retry.json()["error"] == "bad_multipart"


def test_the_cli_and_the_service_score_a_16_bit_png_identically(model, fast_settings, tmp_path) -> None:
    from carve3d_reward.tools.files import score_files

    rng = np.random.default_rng(5)
    grid = np.full((256, 256, 3), 65535, np.uint16)  # 128 px views: reduced to the 64 px working size
    grid[40:90, 40:90] = rng.integers(0, 65535, (50, 50, 3))  # values between the 8-bit levels
    grid[40:90, 168:218] = rng.integers(0, 65535, (50, 50, 3))
    grid[168:218, 40:90] = grid[40:90, 40:90]
    grid[168:218, 168:218] = grid[40:90, 168:218]
    data = png_file(256, 256, png_rows(grid), bit_depth=16, colour=2)
    (tmp_path / "g16.png").write_bytes(data)
    rows, invalid = score_files([tmp_path / "g16.png"], fast_settings, batch_size=1, renders_dir=None, progress=False)
    assert invalid == 0
    with serve_app(create_app(ServiceSettings(metric=fast_settings), model=model)) as url:
        served = httpx.post(url + "/mrc", content=data, headers={"content-type": "image/png"}).json()
    assert served["status"] == rows[0]["status"] == "ok"
    assert served["mrc"] == rows[0]["mrc"]
    assert [v["distance"] for v in served["views"]] == [v["distance"] for v in rows[0]["views"]]
