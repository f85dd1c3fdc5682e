"""`fluxtrain demo` end to end, as a newcomer runs it: a CLI subprocess, the real service and trainer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.timeout(420), pytest.mark.e2e]


def test_demo_trains_a_lora_reports_its_time_budget_and_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    cli = [sys.executable, "-c", "from fluxtrain.cli.main import app; app()"]
    command = [*cli, "demo", "--data-dir", str(data)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    budget = re.search(r"Time budget: (\d+\.\d) s of 120 s \((within|over) budget; (.+)\)$", output, re.M)
    assert budget is not None, output
    assert budget[3] == "start-up and shutdown included" and float(budget[1]) > 0
    assert (float(budget[1]) <= 120) is (budget[2] == "within")
    lora = Path(re.search(r"^LoRA: (.+)$", output, re.MULTILINE)[1])  # type: ignore[index]
    assert lora.is_file() and lora.is_relative_to(data)
    assert lora.name == "demo.safetensors"
    assert all("lora" in key for key in load_file(lora))
    assert (lora.parent / "demo-000001.safetensors").is_file()
    assert re.search(r"failed http://127\.0\.0\.1:\d+/broken\.png: not an image", output), output
    assert len(list((data / "datasets" / "demo").glob("*.jpg"))) == 4
    assert re.search(r"sample image: .+\.png", output), output

    service = re.search(r"Service up on (http://127\.0\.0\.1:\d+)", output)[1]  # type: ignore[index]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{service}/health", timeout=2)
