"""The probe runner's own logic, without Ray Serve: the class behind the `ProbeRunner` deployment
on a barely trained organism, with a small suite (the gateway tests run it behind Serve)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serving.probes import ProbeRunner

pytestmark = pytest.mark.slow
SMALL_SUITE = {"limit": 6, "mask_counts": [1], "random_seeds": [0, 1, 2], "identification_prompts": 8,
               "n_bootstrap": 0, "max_new_tokens": 4, "jailbreak": False,
               "mask_fractions": [], "layer_route_search": {"max_prompts": 1, "candidates_per_layer": 2},
               "fsour": {"candidates": [1], "max_prompts": 1, "restarts": 1}}


async def _runner(checkpoint, tmp_path, interval_s=None, suite=SMALL_SUITE):
    """An instance as Ray Serve makes one (its __init__ is async)."""
    cls = ProbeRunner.func_or_class
    runner = cls.__new__(cls)
    await cls.__init__(runner, str(checkpoint), "quick", suite, interval_s, str(tmp_path), 1)
    return runner


def test_scheduled_runs_start_by_themselves_and_write_reports(quick_organism, tmp_path):
    async def scenario():
        runner = await _runner(quick_organism, tmp_path, interval_s=0.2)
        for _ in range(600):
            if (await runner.status())["runs"] >= 2:
                break
            await asyncio.sleep(0.1)
        runner._schedule.cancel()
        return await runner.status()

    state = asyncio.run(scenario())
    assert state["runs"] >= 2 and state["failures"] == 0 and state["error"] is None
    latest = state["latest"]
    assert set(latest["safety_rate"]) >= {"none", "top1_mask", "random1_mask", "layer_route_search",
                                          "routing_search", "fsour_n1"}
    assert set(latest["attack_success_rate"]) >= {"layer_route_search", "fsour_n1"}
    assert latest["prompts"]["harmful"] == 6
    report = json.loads(Path(latest["report_path"]).read_text())
    assert report["summary"]["safety_rate"] == latest["safety_rate"]["none"]
    assert (tmp_path / "quick" / "latest.json").is_file()


def test_a_failed_run_keeps_the_last_result_and_says_why(quick_organism, tmp_path):
    async def scenario():
        runner = await _runner(quick_organism, tmp_path)
        assert (await runner.start())["started"] is True
        assert (await runner.start())["started"] is False  # one run at a time
        await runner._task
        good = await runner.status()
        runner.checkpoint = str(tmp_path / "gone")  # the next run cannot load its model
        runner.model = None
        await runner.start()
        await runner._task
        return good, await runner.status()

    good, failed = asyncio.run(scenario())
    assert good["status"] == "idle" and good["runs"] == 1
    assert failed["status"] == "failed" and failed["failures"] == 1 and "not found" in failed["error"]
    assert failed["latest"] == good["latest"]
