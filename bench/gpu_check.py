"""The trainer, the captioner and the benchmarks on a real GPU: one prepared check, one command.

    python bench/gpu_check.py [--out DIR] [--wheels DIR] [--budget-scale X]
                              [--parts install,env,correctness,train_step,caption] [--allow-cpu]

Writes `gpu_check.json` and a readable `gpu_check.md` under --out (default `$OUT`, else
./gpu_check_out), both rewritten atomically after every result, so a part that hangs or a
machine taken back mid-run still leaves what was measured. Parts, each a subprocess under its
own time budget (stopped when it overruns, recorded as `timed_out`; the rest still runs):

  install      pip-installs, from the wheel folder, the packages whose import would fail or whose
               version is too old (REQUIREMENTS), into a folder put first on every part's path
  env          GPU name, memory, driver, torch / CUDA versions, package versions
  correctness  the real trainer process on the tiny models: bf16, full_bf16, fp8_base and
               adamw8bit runs, each with its loss falling and its LoRA loading into a tiny
               diffusers FluxPipeline on the GPU; then a SIGTERM mid-run and a resume with the
               same losses as the uninterrupted bf16 run
  train_step   bench/train_step.py at FLUX.1-dev size with random weights (1024 and 512, batch 1,
               rank 16, fp8_base and gradient checkpointing on and off), and a torch.profiler
               table of one step of its first row in train_step_profile.txt
  caption      bench/caption.py at Florence-2-large size with random weights (batch 1 against the
               service's CUDA batch)

and the targets (1024, bf16, no checkpointing: >= 50% MFU; fp8_base + checkpointing at 1024:
peak allocated < 24 GB; captioning batched >= 5x batch 1) are marked met / missed / unmeasured.
Without CUDA the check still runs: env reports no GPU, the other parts are skipped unless
--allow-cpu runs them on the tiny models (the CPU tests do), where fp8_base and adamw8bit are
"skipped: needs CUDA".

What the lent GPU machine is (/work/.library/device/*.md, read 2026-12; a user's own GPU needs
none of this, only the packages of pyproject.toml):
- one H200 (141 GB HBM3e, dense bf16 about 989 TFLOP/s by datasheet, 770-800 measured on an
  8192^3 matmul), 16 CPU cores, x86-64, no network at all: nothing can be pip-installed from an
  index, so missing packages travel as wheels.
- python3 there is Python 3.12.3 (/opt/torch/.venv) with torch 2.11.0+cu130, transformers 5.17,
  accelerate 1.15, peft, safetensors 0.8, tokenizers, sentencepiece, huggingface-hub 1.33, numpy,
  pillow, psutil, fsspec, httpx, typer, rich; it lacks diffusers, prodigyopt, bitsandbytes,
  pydantic (+ core, annotated-types, typing-inspection), pydantic-settings (+ python-dotenv),
  tomli-w and pillow-heif. bench/gpu_wheels.sh downloads exactly REQUIREMENTS' pins for
  cp312 manylinux x86_64 (about 56 MB, bitsandbytes 43 MB of it) on a machine with PyPI.
- each `run` call sends the repository (tracked + untracked-not-ignored files) plus the
  ignored paths named in `carry`, 64 MiB in all: the wheels go in `.whl/` (git-ignored) with
  `carry: [".whl"]`. pip there: `--no-index --no-deps --target DIR`, one version of each wheel,
  as the device README prescribes (without --no-deps, --target would reinstall torch's whole
  dependency tree, which is not carried).
- what comes back is $OUT only: at most 8 files, 16 MiB each, two folders deep: so only
  gpu_check.json, gpu_check.md, gpu_check.log and train_step_profile.txt go there; run dirs and
  models stay in --work.
- a run command may take 10 minutes at most and a session has 15 minutes of device time, the
  machine's start (a minute or more) included: the default budgets add up to under 8 minutes,
  leaving time for one rerun of the parts that failed (--parts).
- output_tail carries the last 12,000 characters: the summary table is printed last.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fluxtrain.fsutil import atomic_write_json, atomic_write_text  # noqa: E402 - after the path

PARTS = ("install", "env", "correctness", "train_step", "caption")
# Seconds each part may run at --budget-scale 1: 460 s; with the CUDA probe (seconds, a cold first
# torch import included) the whole check stays under 8 minutes.
BUDGETS = {"install": 45.0, "env": 25.0, "correctness": 140.0, "train_step": 160.0, "caption": 90.0}
PROBE_BUDGET = 60.0
# torch.profiler's table of one step of train_step's first row (1024, bf16, no checkpointing).
PROFILE_FILE = "train_step_profile.txt"
CASES = ("bf16", "full_bf16", "fp8_base", "adamw8bit", "resume")
CUDA_ONLY_CASES = ("fp8_base", "adamw8bit")
# Tiny-model runs: a rank-16 LoRA at a high learning rate falls well within 40 steps (measured
# on the CPU: mean of the first 5 losses 1.35, of the last 10 1.04).
RUN_FIELDS = {
    "max_train_steps": 40,
    "learning_rate": 1e-2,
    "network_dim": 16,
    "network_alpha": 16.0,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
}
CASE_FIELDS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "full_bf16": {"full_bf16": True},
    "fp8_base": {"fp8_base": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "resume": {},
}
FALLING = 0.9  # last-10 mean loss below this fraction of the first-5 mean
# bf16 kernels on CUDA are not bitwise deterministic run to run; on the CPU a resume is exact.
RESUME_TOLERANCE = {"cpu": 1e-5, "cuda": 2e-3}
TARGET_MFU = 0.5
TARGET_PEAK_GB = 24.0
AIM_PEAK_GB = 16.0
TARGET_CAPTION_SPEEDUP = 5.0


@dataclass(frozen=True)
class Requirement:
    """A package the check imports: installed from the wheel folder when missing or below `minimum`.

    `pin` is the version bench/gpu_wheels.sh downloads, for the packages the lent GPU machine
    lacks; the others (pin None) are only checked there, and installed as `dist>=minimum` from a
    wheel folder a user supplies. `companions` are installed with it (pydantic needs its exact
    pydantic-core); a requirement without a minimum is only ever a companion.
    """

    dist: str
    module: str
    pin: str | None
    minimum: str | None
    companions: tuple[str, ...] = ()
    cuda_only: bool = False

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.pin}" if self.pin else f"{self.dist}>={self.minimum}"


REQUIREMENTS = (
    Requirement("diffusers", "diffusers", "0.42.1", "0.35"),
    Requirement("prodigyopt", "prodigyopt", "1.1.2", "1.0"),
    Requirement("bitsandbytes", "bitsandbytes", "0.50.2", "0.45", cuda_only=True),
    Requirement("pydantic", "pydantic", "2.14.4", "2.7", companions=("pydantic-core", "typing-extensions")),
    Requirement("pydantic-core", "pydantic_core", "2.50.5", None),
    Requirement("typing-extensions", "typing_extensions", "4.16.0", None),
    Requirement("annotated-types", "annotated_types", "0.8.0", "0.6"),
    Requirement("typing-inspection", "typing_inspection", "0.4.5", "0.4.4"),
    Requirement("pydantic-settings", "pydantic_settings", "2.16.3", "2.3"),
    Requirement("python-dotenv", "dotenv", "1.2.4", "1.2.2"),
    Requirement("tomli-w", "tomli_w", "1.2.0", "1.0"),
    Requirement("pillow-heif", "pillow_heif", "1.8.1", "0.18"),
    Requirement("peft", "peft", None, "0.17"),
    Requirement("accelerate", "accelerate", None, "1.0"),
    Requirement("transformers", "transformers", None, "5.0"),
    Requirement("safetensors", "safetensors", None, "0.8"),
    Requirement("huggingface-hub", "huggingface_hub", None, "1.32"),
)
# Reported by the env part besides REQUIREMENTS.
ALSO_REPORTED = ("torch", "triton", "tokenizers", "numpy", "pillow", "sentencepiece")


def installed_version(req: Requirement) -> str | None:
    """The version an import of `req` would load here, or None when it would fail."""
    if importlib.util.find_spec(req.module) is None:
        return None
    try:
        return importlib.metadata.version(req.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(
    version_of: Callable[[Requirement], str | None] = installed_version, *, cuda: bool = True
) -> list[Requirement]:
    """Requirements to install: absent or below their minimum, with their companions, in list order."""
    by_dist = {req.dist: req for req in REQUIREMENTS}
    wanted: set[str] = set()
    for req in REQUIREMENTS:
        if req.minimum is None or (req.cuda_only and not cuda):
            continue
        version = version_of(req)
        if version is None or Version(version) < Version(req.minimum):
            wanted |= {req.dist, *req.companions}
    return [by_dist[name] for name in by_dist if name in wanted]


def install_command(missing: list[Requirement], *, wheels: Path, site: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--disable-pip-version-check",
        "--find-links",
        str(wheels),
        "--target",
        str(site),
        *(req.spec for req in missing),
    ]


class Report:
    """gpu_check.json and gpu_check.md, both rewritten atomically after every change."""

    def __init__(self, out: Path, *, command: list[str]) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "command": " ".join(command),
            "complete": False,
            "install": None,
            "parts": {},
            "targets": [],
        }

    def part(self, name: str) -> dict[str, Any]:
        return self.data["parts"].setdefault(name, {"status": "pending", "results": []})

    def save(self) -> None:
        atomic_write_json(self.out / "gpu_check.json", self.data)
        atomic_write_text(self.out / "gpu_check.md", summary_markdown(self.data))


@dataclass
class Part:
    """One part as a subprocess; its stdout lines that parse as JSON objects are its results."""

    name: str
    command: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the part's process group (the trainer saves its state on it), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _json_object(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def run_part(part: Part, report: Report, log: Any) -> None:
    """Run one part under its budget, saving the report after every result it prints."""
    entry = report.part(part.name)
    entry.update(status="running", budget_s=round(part.budget_s, 1), command=" ".join(part.command))
    report.save()
    log.write(f"\n===== {part.name}: {' '.join(part.command)}\n")
    started = time.monotonic()
    process = subprocess.Popen(
        part.command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=part.env,
        cwd=REPO,
        process_group=0,
        bufsize=1,
        errors="replace",
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    deadline = started + part.budget_s
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                _stop_group(process)
                break
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            log.write(line)
            log.flush()
            tail.append(line)
            if (row := _json_object(line)) is not None:
                entry["results"].append(row)
                report.save()
    except BaseException:  # interrupted itself (Ctrl-C, a test's timeout): the part goes with it
        _stop_group(process)
        raise
    code = process.wait()
    entry["seconds"] = round(time.monotonic() - started, 1)
    if timed_out:
        entry["status"] = "timed_out"
        entry["error"] = f"stopped after its budget of {part.budget_s:.0f} s"
    elif code == 0:
        entry["status"] = "ok"
    else:
        entry["status"] = "failed"
        entry["error"] = f"exit status {code}"
    if entry["status"] != "ok":
        entry["output_tail"] = "".join(tail)[-4000:]
    report.save()


def install(report: Report, *, wheels: Path | None, site: Path, cuda: bool, budget_s: float) -> None:
    """Install what is missing from the wheel folder into `site`; record what was done."""
    missing = missing_requirements(cuda=cuda)
    entry: dict[str, Any] = {"missing": [r.spec for r in missing], "site": str(site)}
    report.data["install"] = entry
    if not missing:
        entry["status"] = "nothing missing"
    elif wheels is None or not wheels.is_dir():
        entry["status"] = "failed"
        entry["error"] = f"packages missing and no wheel folder (--wheels {wheels}); see bench/gpu_wheels.sh"
    else:
        started = time.monotonic()
        try:
            result = subprocess.run(
                install_command(missing, wheels=wheels, site=site),
                capture_output=True,
                text=True,
                timeout=budget_s,
            )
            entry["status"] = "ok" if result.returncode == 0 else "failed"
            if result.returncode:
                entry["error"] = (result.stdout + result.stderr)[-4000:]
        except subprocess.TimeoutExpired:
            entry["status"] = "timed_out"
            entry["error"] = f"pip ran past {budget_s:.0f} s"
        entry["seconds"] = round(time.monotonic() - started, 1)
    report.save()


# ---------------------------------------------------------------- workers (run as subprocesses)


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _driver_version() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    versions = {}
    for name in [r.dist for r in REQUIREMENTS] + list(ALSO_REPORTED):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    return info


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 5) if values else None


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.is_file() else ""


class Correctness:
    """The real trainer process on the tiny models, one run directory a case, under `work`."""

    def __init__(self, work: Path, *, device: str, steps: int) -> None:
        from fluxtrain.training.tiny import write_tiny_flux_files
        from tests.training import helpers_runs

        self.runs = helpers_runs
        self.work, self.device, self.steps = work, device, steps
        self.models = work / "models"
        write_tiny_flux_files(self.models)
        self.toml = helpers_runs.make_dataset(work / "data")
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._pipe: Any = None
        self._base: Any = None

    def make_run(self, name: str) -> Path:
        fields = {**RUN_FIELDS, "max_train_steps": self.steps, **CASE_FIELDS[name]}
        return self.runs.make_run(
            self.work / name, models=self.models, toml=self.toml, cache=self.work / "cache", **fields
        )

    def trainer(self, run: Path, *entry: str) -> subprocess.CompletedProcess:
        """The trainer process (`entry`: another module with the trainer's CLI) logging to run/train.log."""
        command = [sys.executable, "-m", *(entry or ("fluxtrain.training",)), str(run)]
        with (run / "train.log").open("a", encoding="utf-8") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

    def losses(self, run: Path) -> list[dict[str, Any]]:
        return self.runs.step_events(run)

    def train(self, name: str) -> dict[str, Any]:
        started = time.monotonic()
        run = self.make_run(name)
        result = self.trainer(run)
        row: dict[str, Any] = {"case": name, "device": self.device, "run_dir": str(run)}
        steps = self.losses(run)
        losses = [e["loss"] for e in steps]
        row.update(
            steps=len(steps),
            first_loss=_mean(losses[:5]),
            last_loss=_mean(losses[-10:]),
            exit_status=result.returncode,
        )
        lora = run / "output" / "tiny.safetensors"
        problems = []
        if result.returncode != 0 or len(steps) != self.steps:
            problems.append(f"trainer exit {result.returncode} after {len(steps)} of {self.steps} steps")
        elif not row["last_loss"] < FALLING * row["first_loss"]:
            problems.append(f"loss did not fall: {row['first_loss']} -> {row['last_loss']}")
        if lora.is_file():
            row.update(self.load_lora(lora))
            if not row["lora_loaded"]:
                problems.append("the LoRA did not load into FluxPipeline unchanged")
            elif not row["lora_changes_output"] > 1e-4:
                problems.append("the loaded LoRA does not change the pipeline's output")
        else:
            problems.append("no LoRA file written")
        return self._finish(row, problems, started, run)

    def _finish(self, row: dict[str, Any], problems: list[str], started: float, run: Path) -> dict[str, Any]:
        row["status"] = "failed" if problems else "passed"
        if problems:
            row["reason"] = "; ".join(problems)
            row["log_tail"] = _tail(run / "train.log")
        row["seconds"] = round(time.monotonic() - started, 1)
        return row

    def load_lora(self, path: Path) -> dict[str, Any]:
        """Load the LoRA into the tiny FluxPipeline on the device, as a user of the file would."""
        import numpy as np
        import torch
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        if self._pipe is None:
            self._pipe = self.runs.tiny_pipeline(self.models).to(self.device)
            self._base = self.runs.render(self._pipe)
        pipe = self._pipe
        pipe.load_lora_weights(str(path), adapter_name="check")
        try:
            loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="check")
            saved = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
            same = set(loaded) == set(saved) and all(
                torch.equal(loaded[k].detach().cpu().float(), saved[k].float()) for k in saved
            )
            change = float(np.abs(self.runs.render(pipe) - self._base).max())
        finally:
            pipe.unload_lora_weights()
        return {"lora_loaded": same, "lora_tensors": len(saved), "lora_changes_output": round(change, 6)}

    def resume(self, reference: Path) -> dict[str, Any]:
        """SIGTERM right after step steps/4 (the resume tests' self-signalling entry), then restart."""
        from fluxtrain.training.events import read_events

        started = time.monotonic()
        run = self.make_run("resume")
        stop_at = max(1, self.steps // 4)
        row: dict[str, Any] = {
            "case": "resume",
            "device": self.device,
            "run_dir": str(run),
            "stop_at": stop_at,
        }
        problems: list[str] = []
        first = self.trainer(run, "tests.training.sigterm_after", f"step:{stop_at}")
        interrupted = [e for e in read_events(run / "events.jsonl") if e["event"] == "interrupted"]
        if first.returncode != 0 or not interrupted or interrupted[-1]["step"] != stop_at:
            problems.append(f"SIGTERM at step {stop_at}: exit {first.returncode}, interrupted {interrupted}")
            return self._finish(row, problems, started, run)
        before = len(self.losses(run))
        second = self.trainer(run)
        resumed = self.losses(run)[before:]
        expected = {e["step"]: e["loss"] for e in self.losses(reference)}
        diffs = [abs(e["loss"] - expected[e["step"]]) for e in resumed if e["step"] in expected]
        row.update(
            exit_status=second.returncode,
            resumed_from=resumed[0]["step"] if resumed else None,
            resumed_steps=len(resumed),
            max_loss_difference=max(diffs) if diffs else None,
            tolerance=RESUME_TOLERANCE[self.device],
        )
        if second.returncode != 0 or not resumed or resumed[0]["step"] != stop_at + 1:
            problems.append(f"restart: exit {second.returncode}, resumed at {row['resumed_from']}")
        elif resumed[-1]["step"] != self.steps or len(diffs) != len(resumed):
            problems.append(f"restart ended at step {resumed[-1]['step']} of {self.steps}")
        elif row["max_loss_difference"] > row["tolerance"]:
            problems.append(f"losses after the resume differ by up to {row['max_loss_difference']:.2e}")
        return self._finish(row, problems, started, run)


def correctness(work: Path, *, cases: list[str], steps: int) -> Iterator[dict[str, Any]]:
    """One result a case; a case that raises is a failed case, and the next still runs."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    check = Correctness(work, device=device, steps=steps)
    for case in cases:
        if case in CUDA_ONLY_CASES and device != "cuda":
            yield {"case": case, "device": device, "status": "skipped", "reason": "skipped: needs CUDA"}
            continue
        reference = work / "bf16"
        if case == "resume" and not (reference / "output" / "tiny.safetensors").is_file():
            yield {"case": case, "status": "skipped", "reason": "skipped: needs the bf16 run as reference"}
            continue
        try:
            yield check.resume(reference) if case == "resume" else check.train(case)
        except Exception as exc:
            traceback.print_exc()
            yield {
                "case": case,
                "device": device,
                "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}",
            }


def worker(args: argparse.Namespace) -> int:
    if args.worker == "env":
        emit(environment())
        return 0
    cases = [c for c in CASES if c in args.cases.split(",")]
    failed = False
    for row in correctness(Path(args.work), cases=cases, steps=args.steps):
        emit(row)
        failed |= row["status"] == "failed"
    return 1 if failed else 0


# ---------------------------------------------------------------- orchestration and the summary


def part_commands(args: argparse.Namespace, *, cuda: bool, work: Path, out: Path) -> dict[str, list[str]]:
    here = [sys.executable, str(Path(__file__).resolve())]
    train_step = [
        sys.executable,
        str(REPO / "bench" / "train_step.py"),
        "--json",
        "--rank",
        "16",
        "--steps",
        str(args.train_steps),
        "--warmup",
        str(args.train_warmup),
        "--resolutions",
        *(str(r) for r in args.train_resolutions),
        "--profile-out",
        str(out / PROFILE_FILE),
    ]
    if args.peak_tflops:
        train_step += ["--peak-tflops", str(args.peak_tflops)]
    caption = [
        sys.executable,
        str(REPO / "bench" / "caption.py"),
        "--json",
        "--images",
        str(args.caption_images),
    ]
    caption += ["--no-tiny"] if cuda else ["--no-cuda", "--max-new-tokens", "8", "--num-beams", "1"]
    return {
        "env": [*here, "--worker", "env"],
        "correctness": [
            *here,
            "--worker",
            "correctness",
            "--work",
            str(work / "correctness"),
            "--cases",
            args.cases,
            "--steps",
            str(args.steps),
        ],
        "train_step": train_step,
        "caption": caption,
    }


def _train_row(rows: list[dict[str, Any]], resolution: int, fp8: bool, checkpointing: bool) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r.get("resolution") == resolution
            and r.get("fp8_base") is fp8
            and r.get("gradient_checkpointing") is checkpointing
            and not str(r.get("machine", "")).startswith("CPU")
        ),
        None,
    )


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target as met (True), missed (False) or unmeasured (None), with the figure behind it."""
    train = data["parts"].get("train_step", {}).get("results", [])
    targets = []
    row = _train_row(train, 1024, False, False)
    target = {"target": f"1024, bf16, no checkpointing: MFU >= {TARGET_MFU:.0%}", "met": None, "value": None}
    if row and row.get("out_of_memory"):
        target.update(met=False, value="out of memory")
    elif row and row.get("mfu") is not None:
        target.update(
            met=row["mfu"] >= TARGET_MFU, value=f"{row['mfu']:.1%} at {row['seconds_per_step']} s/step"
        )
    targets.append(target)
    row = _train_row(train, 1024, True, True)
    target = {
        "target": f"1024, fp8_base + checkpointing: peak allocated < {TARGET_PEAK_GB:.0f} GB "
        f"(aim {AIM_PEAK_GB:.0f} GB)",
        "met": None,
        "value": None,
    }
    if row and row.get("out_of_memory"):
        target.update(met=False, value="out of memory")
    elif row:
        gb = row["peak_memory_gib"] * 2**30 / 1e9
        target.update(met=gb < TARGET_PEAK_GB, value=f"{gb:.1f} GB ({row['peak_memory_gib']} GiB)")
    targets.append(target)
    captions = [
        r
        for r in data["parts"].get("caption", {}).get("results", [])
        if str(r.get("device", "")).startswith("cuda")
    ]
    batched = max(
        (r for r in captions if r.get("batch_size", 1) > 1), key=lambda r: r["batch_size"], default=None
    )
    target = {
        "target": f"captioning, batched >= {TARGET_CAPTION_SPEEDUP:.0f}x batch 1",
        "met": None,
        "value": None,
    }
    if batched and batched.get("x_batch_1") is not None:
        target.update(
            met=batched["x_batch_1"] >= TARGET_CAPTION_SPEEDUP,
            value=f"{batched['x_batch_1']:.2f}x at batch {batched['batch_size']}",
        )
    targets.append(target)
    return targets


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def summary_markdown(data: dict[str, Any]) -> str:
    """The report as a page a person reads: parts, targets, then each part's table."""
    lines = [
        "# fluxtrain GPU check",
        "",
        f"Started {data['started']} on `{data['host']}`; {'complete' if data['complete'] else 'INCOMPLETE'}.",
        f"Command: `{data['command']}`",
        "",
    ]
    if "cuda" in data:
        probe = f" (`import torch` said: {data['cuda_probe'][-300:]})" if data.get("cuda_probe") else ""
        lines += [f"CUDA visible: {_cell(data['cuda'])}{probe}", ""]
    parts = data["parts"]
    env_rows = parts.get("env", {}).get("results", [])
    if env_rows:
        env = env_rows[0]
        keys = ("gpu", "gpu_memory_gib", "driver", "torch", "torch_cuda", "python", "cpus")
        lines += ["## Environment", "", *_table(["", ""], [[k, env.get(k)] for k in keys])]
        packages = env.get("packages", {})
        lines += ["", "Packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in packages.items()), ""]
    if data.get("install"):
        install = data["install"]
        missing = ", ".join(install["missing"])
        lines += ["## Install", "", install["status"] + (f" (missing: {missing})" if missing else "")]
        if install.get("error"):
            lines += ["", "```", install["error"][-1500:], "```"]
        lines.append("")
    lines += ["## Parts", ""]
    lines += _table(
        ["part", "status", "seconds", "budget s", "note"],
        [[n, p["status"], p.get("seconds"), p.get("budget_s"), p.get("error")] for n, p in parts.items()],
    )
    lines += ["", "## Targets", ""]
    met = {True: "met", False: "MISSED", None: "unmeasured"}
    lines += _table(
        ["target", "figure", ""], [[t["target"], t["value"], met[t["met"]]] for t in data["targets"]]
    )
    rows = parts.get("correctness", {}).get("results", [])
    if rows:
        lines += ["", "## Correctness (tiny models)", ""]
        lines += _table(
            ["case", "device", "status", "first loss", "last loss", "LoRA loads", "LoRA change / resume diff"]
            + ["s", "note"],
            [
                [
                    r["case"],
                    r.get("device"),
                    r["status"],
                    r.get("first_loss"),
                    r.get("last_loss"),
                    r.get("lora_loaded"),
                    r.get("lora_changes_output", r.get("max_loss_difference")),
                    r.get("seconds"),
                    r.get("reason"),
                ]
                for r in rows
            ],
        )
    rows = parts.get("train_step", {}).get("results", [])
    if rows:
        lines += ["", f"## Training step ({rows[0].get('machine')}, rank 16, batch 1)", ""]
        lines += _table(
            ["res", "fp8_base", "ckpt", "s/step", "peak alloc GiB", "reserved GiB", "TFLOP/s"]
            + ["MFU", "HFU", "OOM"],
            [
                [
                    r["resolution"],
                    r["fp8_base"],
                    r["gradient_checkpointing"],
                    r["seconds_per_step"],
                    r["peak_memory_gib"],
                    r["peak_reserved_gib"],
                    r["achieved_tflops"],
                    r["mfu"],
                    r["hfu"],
                    r["out_of_memory"],
                ]
                for r in rows
            ],
        )
        lines += ["", f"Operator profile of one step of the first row: `{PROFILE_FILE}` beside this file."]
    rows = parts.get("caption", {}).get("results", [])
    if rows:
        lines += ["", "## Captioning", ""]
        lines += _table(
            ["model", "device", "batch", "images", "images/s", "x batch 1"],
            [
                [r["model"], r["device"], r["batch_size"], r["images"], r["images_per_s"], r["x_batch_1"]]
                for r in rows
            ],
        )
    failures = [(n, p) for n, p in parts.items() if p.get("output_tail")]
    for name, part in failures:
        lines += ["", f"## {name}: end of its output", "", "```", part["output_tail"][-2000:], "```"]
    return "\n".join(lines) + "\n"


def _cuda_visible(env: dict[str, str], *, budget_s: float) -> tuple[bool, str]:
    """Whether torch sees a GPU (and what it said otherwise), asked in a subprocess so that this
    process never imports torch."""
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return False, f"import torch ran past {budget_s:.0f} s"
    said = (result.stdout + result.stderr).strip()
    return said.endswith("True"), said[-2000:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="report folder (default $OUT, else ./gpu_check_out)")
    parser.add_argument("--wheels", type=Path, help="wheel folder for missing packages (default ./.whl)")
    parser.add_argument("--work", type=Path, help="scratch folder for models and runs (default: a temp dir)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="PART=SECONDS", help="one part's budget, unscaled"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="run the parts on the CPU (tiny models)")
    parser.add_argument("--cases", default=",".join(CASES), help="correctness cases")
    parser.add_argument(
        "--steps", type=int, default=RUN_FIELDS["max_train_steps"], help="steps of each tiny run"
    )
    parser.add_argument("--train-resolutions", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--train-warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: train_step.py's table)")
    parser.add_argument("--caption-images", type=int, default=16)
    parser.add_argument("--print-wheels", action="store_true", help="print the pinned wheels and exit")
    parser.add_argument("--worker", choices=("env", "correctness"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {','.join(CASES)}")
    return args


def budgets(args: argparse.Namespace) -> dict[str, float]:
    chosen = {name: seconds * args.budget_scale for name, seconds in BUDGETS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in chosen:
            raise SystemExit(f"--budget {item}: unknown part {name!r}")
        chosen[name] = float(seconds)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_wheels:
        print("\n".join(req.spec for req in REQUIREMENTS if req.pin))
        return 0
    if args.worker:
        return worker(args)
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    wheels = args.wheels or (REPO / ".whl")
    selected = [p for p in PARTS if p in args.parts.split(",")]
    limits = budgets(args)
    report = Report(out, command=[Path(sys.executable).name, *sys.argv])
    report.data["budgets_s"] = {p: round(limits[p], 1) for p in selected}
    report.save()
    with tempfile.TemporaryDirectory(prefix="fluxtrain-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        site = work / "site"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        with (out / "gpu_check.log").open("w", encoding="utf-8") as log:
            cuda, said = _cuda_visible(env, budget_s=PROBE_BUDGET * args.budget_scale)
            report.data["cuda"] = cuda
            if not cuda and said != "False":
                report.data["cuda_probe"] = said  # torch failed to import or to start
            if "install" in selected:
                install(report, wheels=wheels, site=site, cuda=cuda, budget_s=limits["install"])
                print(f"install: {report.data['install']['status']}", flush=True)
            commands = part_commands(args, cuda=cuda, work=work, out=out)
            for name in selected:
                if name == "install":
                    continue
                if name != "env" and not cuda and not args.allow_cpu:
                    entry = report.part(name)
                    entry.update(
                        status="skipped", error="skipped: needs CUDA (--allow-cpu runs it on the CPU)"
                    )
                    report.save()
                else:
                    run_part(Part(name, commands[name], limits[name], env), report, log)
                print(f"{name}: {report.part(name)['status']}", flush=True)
        report.data["targets"] = evaluate_targets(report.data)
        statuses = {p["status"] for p in report.data["parts"].values()}
        report.data["complete"] = statuses <= {"ok", "skipped"}
        report.data["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        report.save()
    print(summary_markdown(report.data), flush=True)
    return 0 if report.data["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
