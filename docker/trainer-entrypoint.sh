#!/bin/sh
# Entrypoint of the trainer image: refuse clearly when the trainer is not installed or not pointed at a service.
set -eu
if ! command -v carve3d-train >/dev/null 2>&1; then
  echo "trainer: carve3d-train is not installed in this image: services/trainer did not exist when it was built;" \
    "rebuild the image (docker compose build trainer) once it does" >&2
  exit 78
fi
: "${MRC_URL:?trainer: set MRC_URL to the reward service, e.g. http://reward:8080}"
exec "$@"
