"""Code location for Kubernetes: the same assets, checks, job, sensor and schedule as
:mod:`adrec_assets.definitions`, but every step runs in its own pod (``dagster-k8s``'s
``k8s_job_executor``) and the encoding step ``ad_embeddings_raw`` gets a GPU pod.

Load it with ``dagster api grpc -m adrec_assets.deploy`` (see ``deploy/k8s/values.yaml``).
Nothing here changes local behaviour: ``adrec_assets.definitions`` (``make run``, ``make ui``,
the tests) never imports this module, which needs the ``deploy`` extra (``dagster-k8s``).
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster_k8s import k8s_job_executor

from adrec_assets.definitions import defs as local_defs

#: The asset (op) that encodes ad content; its pod asks for one NVIDIA GPU.
GPU_STEP = "ad_embeddings_raw"

#: Raw Kubernetes config merged into the step pod of ``GPU_STEP`` (snake_case keys of
#: ``dagster-k8s/config``). The toleration matches the usual ``nvidia.com/gpu`` taint of GPU
#: node pools; add a ``node_selector`` for a particular GPU model if the cluster mixes them.
GPU_STEP_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"},
        },
    },
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}

#: Every other step (click graph, training, projection): CPU pods.
DEFAULT_STEP_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "2", "memory": "4Gi"},
            "limits": {"memory": "8Gi"},
        },
    },
}

#: ``k8s_job_executor`` config. The run launcher's settings (image, env secrets, volumes with
#: the shared artifact store) are inherited by every step pod.
K8S_EXECUTOR_CONFIG: dict[str, Any] = {
    "max_concurrent": 4,
    "step_k8s_config": DEFAULT_STEP_K8S_CONFIG,
    "per_step_k8s_config": {GPU_STEP: GPU_STEP_K8S_CONFIG},
}

k8s_executor = k8s_job_executor.configured(K8S_EXECUTOR_CONFIG, name="adrec_k8s")

defs = dg.Definitions(
    assets=local_defs.assets,
    asset_checks=local_defs.asset_checks,
    jobs=local_defs.jobs,
    sensors=local_defs.sensors,
    schedules=local_defs.schedules,
    resources=local_defs.resources,
    loggers=local_defs.loggers,
    executor=k8s_executor,
)
