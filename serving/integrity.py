"""Model integrity: the router and expert weights as loaded in the serving engine, against the
manifest that the organism builder and the alignment export write beside a checkpoint (README,
Serving: model integrity). A swapped expert or a rescaled router shows as a mismatch."""

from __future__ import annotations

import logging
import time

from moe_routing.fingerprint import MANIFEST_FILE, ManifestError, combine, compare, read_manifest

logger = logging.getLogger("ray.serve")
MAX_REPORTED_MISMATCHES = 50  # /admin/config stays small on a 48-layer x 128-expert model
# mesa_model_integrity_ok by status; anything else (no or unreadable manifest, an error): -1
GAUGE = {"ok": 1, "mismatch": 0}


async def check_engine(engine, checkpoint: str, model_name: str) -> dict:
    """Compare the engine's fingerprints (its worker extension's `routing_fingerprint`) with
    `checkpoint`'s manifest: {"status": ok | mismatch | no manifest | invalid manifest | error,
    ...}. Never raises: a failed check is reported and logged, and serving goes on."""
    started = time.monotonic()
    try:
        manifest = read_manifest(checkpoint)
    except ManifestError as error:
        result = {"status": "invalid manifest", "error": str(error)}
    else:
        result = {"status": "no manifest"} if manifest is None else await _compare_engine(engine, manifest)
    result |= {"checked_at": time.time(), "duration_s": round(time.monotonic() - started, 3)}
    if result["status"] == "mismatch":
        logger.warning("model integrity check FAILED for %s: %s of %s (layer, expert) pairs differ "
                       "from %s", model_name, result.get("mismatch_count", "all"),
                       result.get("checked_pairs", "?"), MANIFEST_FILE)
    elif result["status"] != "ok":
        logger.warning("model integrity not checked for %s: %s", model_name, result["status"])
    return result


async def _compare_engine(engine, manifest: dict) -> dict:
    try:
        served = combine(await engine.collective_rpc("routing_fingerprint"))
    except Exception as error:  # e.g. an engine layout the fingerprint cannot read
        return {"status": "error", "error": f"{type(error).__name__}: {str(error)[:300]}"}
    try:
        result = compare(manifest, served)
    except ManifestError as error:  # the manifest describes another model: not a match
        return {"status": "mismatch", "error": str(error)}
    mismatches = result.pop("mismatches")
    return {"status": "ok" if result.pop("ok") else "mismatch", **result,
            "mismatch_count": len(mismatches), "mismatches": mismatches[:MAX_REPORTED_MISMATCHES]}
