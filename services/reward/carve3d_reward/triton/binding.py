"""The MRC model bound with PyTriton: a real Triton Inference Server on CPU, in this process's care.

PyTriton (``pip install 'carve3d-reward[triton]'``) ships a ``tritonserver``
binary and runs it as a child process; requests reach
:func:`~.tensors.run_requests` in this process through the Python backend's
shared-memory proxy. The model is the one every engine serves
(:class:`~carve3d_reward.model.MRCModel`), with the tensor interface of
:mod:`.tensors` and:

- Triton's dynamic batcher: ``max_batch_size = max_batch``, preferred batch
  sizes :func:`preferred_batch_sizes`, ``max_queue_delay = max_delay_ms``
  (all from :class:`~carve3d_reward.service.settings.ServiceSettings`);
- ``triton_instances`` CPU instances, each with its own copy of the metric;
- HTTP, gRPC and metrics (``nv_inference_*``) on ``host`` and the
  ``triton_*_port`` settings.

Two pitfalls are handled here. The Python backend stub links
``libpython3.X.so``; on machines whose system libpython differs from the
interpreter's (pyenv, conda), the stub would load the wrong one, so the
interpreter's ``LIBDIR`` is put first on ``LD_LIBRARY_PATH`` before the server
starts (:func:`use_interpreter_libpython`). And the server must not outlive its
parent: PyTriton stops it on :meth:`MRCTriton.stop` and at exit, and the kernel
sends it SIGTERM if the thread that started it dies; ``mrc serve`` also turns
SIGTERM into a clean stop (see ``cmd_serve``).
"""

from __future__ import annotations

import logging
import os
import socket
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model import MRCModel
from ..service.settings import ServiceSettings
from .tensors import INPUT, MODEL_NAME, OUTPUT_SPECS, run_requests

log = logging.getLogger("carve3d_reward.triton")

#: Triton endpoints PyTriton guards with a random per-run token. Inference, health, metadata, model
#: config and statistics stay open (loopback by default); loading/unloading models, shared-memory
#: registration, tracing and log settings need the token (:attr:`MRCTriton.access_token`).
PROTECTED_ENDPOINTS = ("shared-memory", "model-repository", "trace", "logging")


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes Triton dispatches at once instead of waiting out ``max_queue_delay``.

    ``max_batch`` and its half: a full batch never waits, a half-full one does
    not wait for stragglers either, and smaller groups wait at most the delay.
    Sizes below 2 are left out (a preferred size of 1 would end all batching).
    """
    sizes = {max_batch, max_batch // 2}
    return sorted(s for s in sizes if s >= 2) or [max_batch]


def use_interpreter_libpython(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """Put this interpreter's ``LIBDIR`` first on ``env['LD_LIBRARY_PATH']``; returns the directory.

    PyTriton copies ``os.environ`` into the ``tritonserver`` process, and the
    Python backend stub it starts resolves ``libpython3.X.so`` through that path.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not Path(libdir).is_dir():
        return None
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if not parts or parts[0] != libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *(p for p in parts if p != libdir)])
    return libdir


def check_environment() -> None:
    """Fail with one clear line when PyTriton cannot work here."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise ConfigError(
            "engine 'triton' needs PyTriton and tritonclient: pip install 'carve3d-reward[triton]'"
        ) from None
    if int(np.__version__.split(".")[0]) >= 2:
        raise ConfigError(
            f"PyTriton's Python backend stub is built for NumPy 1.x, this environment has NumPy {np.__version__}: "
            "outputs would come back empty. Install the 'triton' extra (it pins numpy<2)."
        )


def infer_function(model: MRCModel) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """A PyTriton inference callable for one instance: Triton's batch of requests -> one reply each."""

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        results = run_requests(model, [request[INPUT.name] for request in requests])
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            # PyTriton fails a whole batch at once; clients retry (the gateway splits its request).
            raise failed
        return results  # type: ignore[return-value]

    infer.__name__ = f"mrc_infer_{id(model):x}"
    return infer


class MRCTriton:
    """Triton on CPU serving model ``mrc`` (PyTriton): :meth:`start`, :meth:`stop`, or a ``with`` block."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        models: Sequence[MRCModel] | None = None,
        log_file: Path | None = None,
        exit_timeout_s: int = 5,
    ) -> None:
        self.settings = settings
        self._models = list(models or [])
        self.log_file = log_file
        self.exit_timeout_s = exit_timeout_s
        self._triton: Any = None
        self.access_token: str | None = None

    # -- addresses ----------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (what tritonclient.grpc and the gateway use)."""
        return f"{self.host}:{self.settings.triton_grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.settings.triton_http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.settings.triton_metrics_port}/metrics"

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> MRCTriton:
        """Start ``tritonserver`` and load the model; returns when the model is ready (raises otherwise).

        Call it from a thread that outlives the server (the main thread): the
        kernel stops the server when the thread that started it exits.
        """
        check_environment()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        s = self.settings
        self._check_ports()
        while len(self._models) < s.triton_instances:
            self._models.append(MRCModel(s.metric))
        use_interpreter_libpython()
        config = TritonConfig(
            http_address=s.host,
            http_port=s.triton_http_port,
            grpc_address=s.host,
            grpc_port=s.triton_grpc_port,
            allow_metrics=True,
            allow_gpu_metrics=False,
            metrics_address=s.host,
            metrics_port=s.triton_metrics_port,
            exit_timeout_secs=self.exit_timeout_s,
            log_file=self.log_file,
            log_verbose=0,
        )
        security = TritonSecurityConfig(restricted_endpoints=list(PROTECTED_ENDPOINTS))
        self.access_token = security.access_token
        triton = Triton(config=config, security_config=security)
        try:
            triton.bind(
                model_name=MODEL_NAME,
                infer_func=[infer_function(m) for m in self._models[: s.triton_instances]],
                inputs=[Tensor(name=INPUT.name, dtype=INPUT.numpy_dtype, shape=INPUT.dims)],
                outputs=[Tensor(name=o.name, dtype=o.numpy_dtype, shape=o.dims) for o in OUTPUT_SPECS],
                config=ModelConfig(
                    batching=True,
                    max_batch_size=s.max_batch,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=round(s.max_delay_ms * 1000),
                        preferred_batch_size=preferred_batch_sizes(s.max_batch),
                    ),
                ),
                strict=True,
            )
            triton.run()
        except Exception as exc:  # noqa: BLE001 - PyTriton raises many types; all mean "did not start"
            logs = self._log_tail(triton)
            triton.stop()
            raise ConfigError(f"Triton did not start ({type(exc).__name__}: {exc}); its log ends:\n{logs}") from None
        except BaseException:  # SIGTERM / Ctrl-C while starting: no server is left behind
            triton.stop()
            raise
        self._triton = triton
        log.info("triton: model %r ready, grpc %s, http %s, metrics %s", MODEL_NAME, *self._urls())
        return self

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after ``exit_timeout_s``) and remove PyTriton's workspace."""
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()

    def is_alive(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def server_pid(self) -> int | None:
        """PID of the ``tritonserver`` process (for tests and diagnostics)."""
        server = getattr(self._triton, "_triton_server", None)
        cmd = getattr(server, "_tritonserver_running_cmd", None)
        return int(cmd.pid) if cmd is not None else None

    def __enter__(self) -> MRCTriton:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _urls(self) -> tuple[str, str, str]:
        return self.grpc_url, self.http_url, self.metrics_url

    def _check_ports(self) -> None:
        """Fail at once on a taken port (tritonserver would exit, and PyTriton wait 120 s for it)."""
        s = self.settings
        ports = {"http": s.triton_http_port, "grpc": s.triton_grpc_port, "metrics": s.triton_metrics_port}
        if len(set(ports.values())) < 3:
            raise ConfigError(f"the Triton ports must differ, got {ports}")
        for name, port in ports.items():
            with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((s.host, port))
                except OSError as exc:
                    raise ConfigError(f"--triton-{name}-port {port} on {s.host} is not free: {exc.strerror}") from None

    def _log_tail(self, triton: Any, lines: int = 15) -> str:
        try:
            if self.log_file is not None and Path(self.log_file).is_file():
                text = Path(self.log_file).read_text(errors="replace")
            else:
                text = triton._triton_server.logs()
        except Exception:  # noqa: BLE001 - best effort, for the error message only
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"
