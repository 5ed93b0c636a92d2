"""Triton Python backend for model "mrc": the Carve3D MRC reward on the stock Triton Inference Server.

It runs the model callable every engine serves (``carve3d_reward.model.MRCModel``)
through the same request-batching function as ``mrc serve --engine triton``
(``carve3d_reward.triton.tensors.run_requests``): Triton's dynamic batcher hands
``execute`` a list of requests, requests of equal grid size are scored in one
call, and a request that fails gets its own error without failing the others.

Metric settings: the ``parameters`` of config.pbtxt (non-empty string values),
else the ``MRC_*`` environment variables of the server, else the defaults.
The backend's Python environment needs ``carve3d-reward`` (and torch); see
docs/triton.md.
"""

from __future__ import annotations

import json
import os

import triton_python_backend_utils as pb_utils

from carve3d_reward.model import MRCModel
from carve3d_reward.settings import MetricSettings
from carve3d_reward.triton.tensors import INPUT, run_requests


def metric_settings(model_config: dict, instance_kind: str = "CPU", device_id: str = "0") -> MetricSettings:
    """MetricSettings from the model config's parameters (empty values fall back to MRC_* and defaults)."""
    values: dict[str, object] = {}
    for key, param in (model_config.get("parameters") or {}).items():
        value = str(param.get("string_value", "")).strip()
        if not value:
            continue
        if key not in MetricSettings.model_fields:
            raise ValueError(f"config.pbtxt parameter {key!r} is not a metric setting")
        values[key] = None if key == "view_size" and value.lower() in ("native", "none") else value
    if instance_kind == "GPU" and "device" not in values and "MRC_DEVICE" not in os.environ:
        values["device"] = f"cuda:{device_id}"
    return MetricSettings(**values)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = metric_settings(
            config, args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        )
        self.model = MRCModel(settings)
        pb_utils.Logger.log_info(f"mrc: {self.model.metric_id} on {settings.device}")

    def execute(self, requests: list) -> list:
        grids = [pb_utils.get_input_tensor_by_name(r, INPUT.name).as_numpy() for r in requests]
        responses = []
        for result in run_requests(self.model, grids):
            if isinstance(result, Exception):
                error = pb_utils.TritonError(f"{type(result).__name__}: {result}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensors = [pb_utils.Tensor(name, array) for name, array in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
