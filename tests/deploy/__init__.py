"""Helpers of the deployment tests (``tests/test_deploy_*.py``); no tests here.

The deployment artefacts: docker-compose.yml, k8s/, the Dockerfiles, Prometheus/Grafana config, `make up`/`make down`.
Everything runs offline with the dev extra's validators: ``check-jsonschema`` (the vendored compose spec),
``kubernetes-validate --strict`` (vendored Kubernetes schemas), ``dockerfile-parse``. The Kubernetes overlays
are rendered by the small kustomize subset in :mod:`tests.deploy.kustomize` (resources, strategic-merge patches,
images, namespace) and, where a ``kustomize`` or ``kubectl`` binary is installed, compared with its rendering.
Nothing here builds or runs a container image: there is no Docker engine on CI's machines.
"""
