#!/bin/sh
# Entrypoint of the reward images: put the weights the metric needs into the cache, then run the command.
#
#   FETCH_WEIGHTS  what to make sure is in $TORCH_HOME before the command starts, comma-separated:
#                  auto (default): what MRC_DISTANCE needs (lpips-alex / lpips-vgg; nothing for l1 and ssim,
#                                  nothing when MRC_LPIPS_TRUNK_PATH points at a file of your own)
#                  none:           fetch nothing (offline; a missing file then stops `mrc serve` with a
#                                  one-line error naming the file and the command that fetches it)
#                  lpips-alex, lpips-vgg, lpips-all
#                  lrm-large, lrm-base: the InstantMesh NeRF checkpoints (into $HF_HOME); auto fetches the
#                                  preset MRC_LRM_PRESET when MRC_RECONSTRUCTOR=lrm and MRC_LRM_CHECKPOINT is unset
#   Fetching is `mrc weights fetch`: a no-op when a valid copy is already there (sha256-checked), so it only
#   needs the network on the first start with an empty cache volume.
#
# Weights baked into the image at build time (--build-arg FETCH_WEIGHTS=lpips-alex) live in
# $MRC_BAKED_WEIGHTS (/opt/mrc/weights/torch) and are copied into the cache on start when it lacks them.
set -eu

cache="${TORCH_HOME:-/cache/torch}"
baked="${MRC_BAKED_WEIGHTS:-/opt/mrc/weights/torch}"

if [ -d "$baked/hub/checkpoints" ] && [ "$baked" != "$cache" ]; then
  for src in "$baked"/hub/checkpoints/*; do
    [ -f "$src" ] || continue
    dst="$cache/hub/checkpoints/$(basename "$src")"
    [ -f "$dst" ] && continue
    echo "entrypoint: copying baked weights $(basename "$src") into $cache"
    if ! { mkdir -p "$cache/hub/checkpoints" && cp "$src" "$dst.partial.$$" && mv "$dst.partial.$$" "$dst"; }; then
      rm -f "$dst.partial.$$" 2>/dev/null || true
      echo "entrypoint: warning: could not copy into $cache (read-only?); set MRC_LPIPS_TRUNK_PATH=$src to use it" >&2
    fi
  done
fi

want="${FETCH_WEIGHTS:-auto}"
if [ "$want" = "auto" ]; then
  want=none
  if [ -z "${MRC_LPIPS_TRUNK_PATH:-}" ]; then
    case "${MRC_DISTANCE:-l1}" in
      lpips-alex) want=lpips-alex ;;
      lpips-vgg) want=lpips-vgg ;;
    esac
  fi
  if [ "${MRC_RECONSTRUCTOR:-carve}" = "lrm" ] && [ -z "${MRC_LRM_CHECKPOINT:-}" ]; then
    case "${MRC_LRM_PRESET:-instant-nerf-large}" in
      instant-nerf-base) lrm="lrm-base" ;;
      *) lrm="lrm-large" ;;
    esac
    if [ "$want" = "none" ]; then want=$lrm; else want="$want,$lrm"; fi
  fi
fi

for item in $(printf '%s' "$want" | tr ',' ' '); do
  case "$item" in
    none) ;;
    lpips-alex | lpips-vgg | lpips-all)
      echo "entrypoint: mrc weights fetch --lpips ${item#lpips-} (TORCH_HOME=$cache)"
      mrc weights fetch --lpips "${item#lpips-}"
      ;;
    lrm-large | lrm-base)
      echo "entrypoint: mrc weights fetch --lrm instant-nerf-${item#lrm-} (HF_HOME=${HF_HOME:-default})"
      mrc weights fetch --lrm "instant-nerf-${item#lrm-}"
      ;;
    *)
      echo "entrypoint: FETCH_WEIGHTS: unknown entry '$item' (use auto, none, lpips-alex, lpips-vgg, lpips-all, lrm-large, lrm-base)" >&2
      exit 2
      ;;
  esac
done

exec "$@"
