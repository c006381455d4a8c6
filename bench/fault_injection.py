"""Fault injection: sweeps on a real two-node Ray cluster and a real MLflow server, hit by faults at
seeded random points, their spend measured by the ledger and by an outside clock.

    .venv/bin/python bench/fault_injection.py --out bench/results/fault_injection.json  # ~15 min

Sets up, all on loopback: a Ray head (``ray start --head --num-cpus 1``) and a second node
(``ray start --address``, ``--num-cpus 1``), both with ``--temp-dir`` a short folder of this run,
token auth on (``RAY_AUTH_MODE=token``, one random ``RAY_AUTH_TOKEN`` in the environment of every
node and every ``lorasweep`` client; nothing is written to ``~/.ray``); an ``mlflow server`` with a
sqlite backend and ``--artifacts-destination``. Everything started is stopped by PID in a
``finally`` (the MLflow server's process group; for Ray, the processes whose command line names
this run's temp dir and their children, SIGTERM then SIGKILL). ``ray stop`` is not used: it stops
every Ray on the machine, other sessions' included.

Each sweep is the tiny random-init Llama (tests/conftest.py) on CPU, 1 core a trial, 2 at a time,
``max_trials`` 4, 8 steps, eval every 2, a CPU core priced $36/h (1 cent a second), budget $3,
driven by the real CLI (``lorasweep run SPEC --address``; ``lorasweep resume ID --service-db``).
Faults (which sweep gets which is fixed, ``PLAN``; when they strike is drawn from ``--seed``):

- ``kill_worker``: SIGKILL of a live trial process (title ``ray::ImplicitFunc``, at least 2 s old)
  of this cluster, 1-5 s after one is seen; Tune retries the trial from its checkpoint.
- ``kill_driver``: SIGKILL of the ``lorasweep run/resume`` process while a trial runs; then wait
  until the ledger reads the sweep ``interrupted`` (its driver heartbeat 30 s stale) and resume.
- ``sigint``: SIGINT to the driver while a trial runs; exit 130 expected; then resume.
- ``hang`` / ``nan``: ``LORASWEEP_FAULT=hang@Sx1|DIR`` / ``nan@Sx1|DIR`` (workers/faults.py),
  once in the whole sweep at a random step S; the watchdog must kill the hung trial, the NaN
  trial fails.
- ``mlflow_down``: the MLflow server stopped (SIGTERM to its process group) while a trial runs,
  restarted 30 s later on the same port and backend; the driver is expected to stop with exit 2
  and is resumed once the server is back (or it rides the outage out on its retries).

A fault counts as injected only when it was applied (a sweep that ended first does not count it);
``hang``/``nan`` count when their token file (the hook's claim) exists at the end.

Measures, per sweep: the ledger (``Store.totals``: spent) and the outside clock
(``tests/outside_clock.ProcessMeter``, the tests' own): a thread polls the OS every 0.1 s for this
cluster's processes (children of its raylets) titled ``ray::ImplicitFunc`` / ``ray::score_split`` /
``ray::_Inner``, and bills each for the time it held its lease: from the process's start (the
cluster keeps no idle pool, ``enable_worker_prestart`` off, as lorasweep's local clusters: Ray
starts each worker for a lease, and its start-up and imports are held time) to the last poll that
shows it titled, x $36/h, attributed to the sweep running when the span opened.
Then writes the JSON with:

- ``sweeps``, ``sweeps_completed``: sweeps run; those whose ledger state ends ``completed`` (the
  last driver exit 0), resumes included.
- ``faults``: injected faults per kind; ``kills`` = kill_worker + kill_driver (SIGKILLs).
- ``budget_overruns``: sweeps whose ledger spend or outside-clock spend exceeds the cap.
- ``max_overshoot_usd``: max over sweeps of max(0, max(ledger, outside) - cap).
- ``lost_trials``: summed over sweeps, MLflow child runs left RUNNING + ledger accounts left
  unsettled + Optuna trials left RUNNING (every study in the sweep's Optuna storage), at the end.
- ``duplicate_runs``: child runs beyond one per ``lorasweep.trial_id`` + parent runs beyond one
  per sweep + metric steps logged twice (per child run and metric key, a step already seen),
  except the running totals ``cost_usd``/``billed_s``/``tokens``: every trial, faulted or not,
  logs them at each report and again at the last report's step when it closes (tracking.py
  ``log_final``); those re-logs are counted apart as ``summary_relogs``.
- ``spend_counted_twice_usd``: per sweep, max(0, ledger spend - outside-clock spend), summed:
  money the ledger billed that no paid process of the sweep was seen to hold. (A per-trial split
  is not measured: a reused Tune worker runs several trials in one process.) Also reported, as a
  second check, ``account_excess_usd``: per ledger account, max(0, spent - (last update - start)
  x price), i.e. spend beyond the wall time the account existed.
- ``unaccounted_usd``: outside-clock minus ledger spend, summed over sweeps (negative: the ledger
  billed more than the OS saw); ``unaccounted_pct`` of the ledger's total.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the outside clock the tests use
from local_cluster import own_processes, stop_processes  # noqa: E402
from outside_clock import ProcessMeter, title  # noqa: E402

from workers.synthetic import build_demo_inputs  # noqa: E402

BIN = Path(sys.executable).parent
PRICE = 36.0  # $/core-hour: 1 cent a second
CAP = 3.0
DRIVER_FAULTS = ("kill_worker", "kill_driver", "sigint", "mlflow_down")
KINDS = ("kill_worker", "kill_driver", "sigint", "hang", "nan", "mlflow_down")
PLAN = [
    ["kill_worker", "nan", "kill_worker"],
    ["kill_driver", "kill_worker"],
    ["sigint", "hang"],
    ["mlflow_down", "nan", "kill_worker"],
    ["kill_driver", "sigint", "kill_worker"],
    ["hang", "kill_worker", "mlflow_down"],
]
# running totals a trial logs at every report and once more, at the last report's step, when it
# closes (orchestrator/tracking.py log_final): that re-log is counted apart (summary_relogs)
SUMMARY_METRICS = ("cost_usd", "cost_cents", "billed_s", "tokens")  # cost_cents: its twin
RUN_TIMEOUT_S = 300.0  # one driver attempt; past it the driver is SIGINTed (and that reported)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the cluster and its outside clock -------------------------------------------------------
class Cluster:
    def __init__(self, temp_dir: Path, env: dict) -> None:
        self.temp_dir, self.env = temp_dir, env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.seen: set[int] = set()

    def start(self) -> None:
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
        head = [str(BIN / "ray"), "start", "--head", "--port", str(self.port), *common]
        head += ["--temp-dir", str(self.temp_dir), "--include-dashboard", "false"]
        head += ["--node-ip-address", "127.0.0.1"]
        # no idle worker pool (as lorasweep's own local clusters): each worker starts for the
        # lease it serves, so the outside clock can count it from its start
        no_pool = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
        env = {**self.env, **no_pool}
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        self.remember()
        node = [str(BIN / "ray"), "start", "--address", self.address, *common]
        node += ["--node-ip-address", "127.0.0.1"]
        subprocess.run(node, env=env, check=True, capture_output=True, timeout=120)
        self.remember()

    def own(self) -> list[psutil.Process]:
        return own_processes(self.temp_dir)

    def raylets(self) -> list[psutil.Process]:
        return [p for p in self.own() if "raylet" in " ".join(p.info["cmdline"][:1])]

    def remember(self) -> None:
        self.seen |= {p.pid for p in self.own()}

    def stop(self) -> None:
        stop_processes(self.temp_dir, self.seen)


class ClusterProcesses:
    """The cluster's worker processes (its raylets' descendants), for the outside clock."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.raylets, self.scanned = cluster, [], 0.0

    def __call__(self) -> list[psutil.Process]:
        now = time.monotonic()
        if now - self.scanned > 2.0 or not self.raylets:
            self.raylets, self.scanned = self.cluster.raylets(), now
        out = []
        for r in self.raylets:
            with contextlib.suppress(psutil.Error):
                out += r.children(recursive=True)
        return out


# --- MLflow server ---------------------------------------------------------------------------
class MlflowServer:
    def __init__(self, work: Path, env: dict) -> None:
        self.work, self.env = work, env
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(work / "mlflow-server.log", "ab")  # noqa: SIM115

    def start(self) -> None:
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.work / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.work / "mlartifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}")
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up in 120 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# --- one sweep -------------------------------------------------------------------------------
def spec_dict(i: int, work: Path, model: Path, data: dict, tracking_uri: str) -> dict:
    return {
        "name": f"fi{i}",
        "budget_usd": CAP,
        "model": {"name_or_path": str(model)},
        "data": {"source": "files", **{k: str(v) for k, v in data.items()}},
        "search_space": {
            "preset": "default",
            "rank": {"choices": [2, 4]},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
        },
        "trial": {
            "max_steps": 8,
            "eval_every": 2,
            "batch_size": 4,
            "max_seq_len": 160,
            "eval_examples": 4,
            "max_new_tokens": 8,
        },
        "resources": {"accelerator": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 2},
        "max_trials": 4,
        "prices": {"overrides": {"cpu": PRICE}},
        "storage": {
            "data_dir": str(work / f"sweep{i}"),
            "mlflow_tracking_uri": tracking_uri,
            # both nodes run on this machine: its folder is storage every node reads
            "ray_storage": str(work / f"sweep{i}" / "ray"),
        },
    }


class SweepRun:
    def __init__(self, i, faults, work, env, cluster, meter, mlflow, rng, model, data) -> None:
        self.i, self.faults, self.work, self.cluster = i, faults, work, cluster
        self.meter, self.mlflow, self.rng = meter, mlflow, rng
        self.spec_path = work / f"fi{i}.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec_dict(i, work, model, data, mlflow.uri)))
        self.data_dir = work / f"sweep{i}"
        self.ledger_url = f"sqlite:///{self.data_dir / 'lorasweep.db'}"
        self.fault_dir = work / f"faults{i}"
        self.env = dict(env)
        env_faults = []
        self.fault_steps = {}
        for kind in faults:
            if kind in ("hang", "nan"):
                # hang early enough that some trial surely reaches it (ASHA's first rung is at
                # step 4 of 8); the NaN anywhere a trial still reaches before its end
                step = rng.randint(2, 4) if kind == "hang" else rng.randint(2, 6)
                self.fault_steps[kind] = step
                env_faults.append(f"{kind}@{step}x1|{self.fault_dir}")
        if env_faults:
            self.env["LORASWEEP_FAULT"] = ",".join(env_faults)
        self.driver_queue = [f for f in faults if f in DRIVER_FAULTS]
        self.injected: list[dict] = []
        self.attempts: list[dict] = []
        self.sweep_id: str | None = None
        self.proc: subprocess.Popen | None = None

    def _launch(self, resume: bool) -> None:
        n = len(self.attempts)
        logf = open(self.work / f"fi{self.i}.driver{n}.log", "wb")  # noqa: SIM115
        if resume:
            cmd = [str(BIN / "lorasweep"), "resume", self.sweep_id, "--service-db", self.ledger_url]
        else:
            cmd = [str(BIN / "lorasweep"), "run", str(self.spec_path)]
        cmd += ["--address", self.cluster.address]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT, cwd=self.work
        )
        self.attempts.append(
            {"cmd": cmd[1], "log": logf.name, "started": time.time(), "rc": None, "fault": None}
        )
        log(f"sweep {self.i}: {cmd[1]} (pid {self.proc.pid})")

    def _learn_id(self) -> None:
        if self.sweep_id is None and (self.data_dir / "lorasweep.db").exists():
            from orchestrator.store import Store

            with contextlib.suppress(Exception):
                ids = Store(self.ledger_url).sweep_ids()
                if ids:
                    self.sweep_id = ids[-1]

    def _wait_trial(self, deadline: float) -> bool:
        """Until a trial process of this cluster is live (and the driver still runs)."""
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            self._learn_id()
            if self.meter.running("ray::ImplicitFunc", 2.0):
                return True
            time.sleep(0.2)
        return False

    def _wait_exit(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"sweep {self.i}: driver past {timeout:.0f} s, SIGINT")
            self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
            self.attempts[-1]["timed_out"] = True
        self.attempts[-1]["rc"] = rc
        self.attempts[-1]["ended"] = time.time()
        self._learn_id()
        return rc

    def _wait_interrupted(self) -> None:
        from orchestrator.lifecycle import effective_state
        from orchestrator.store import Store

        t0 = time.time()
        while time.time() - t0 < 120:
            row = Store(self.ledger_url).sweep(self.sweep_id)
            if row is not None and effective_state(row) != "running":
                return
            time.sleep(1.0)

    def _inject(self, kind: str) -> bool:
        delay = self.rng.uniform(1.0, 5.0)
        time.sleep(delay)
        if self.proc.poll() is not None:
            return False
        rec = {"kind": kind, "at": time.time(), "delay_s": round(delay, 2)}
        if kind == "kill_worker":
            procs = self.meter.running("ray::ImplicitFunc", 2.0)
            if not procs:
                return False
            victim = self.rng.choice(procs)
            rec.update(pid=victim.pid, title=title(victim))
            with contextlib.suppress(psutil.Error):
                victim.kill()
            log(f"sweep {self.i}: SIGKILL worker {victim.pid} {rec['title']}")
        elif kind == "kill_driver":
            self.proc.kill()
            rec["pid"] = self.proc.pid
            log(f"sweep {self.i}: SIGKILL driver {self.proc.pid}")
        elif kind == "sigint":
            self.proc.send_signal(signal.SIGINT)
            rec["pid"] = self.proc.pid
            log(f"sweep {self.i}: SIGINT driver {self.proc.pid}")
        elif kind == "mlflow_down":
            self.mlflow.stop()
            log(f"sweep {self.i}: MLflow server stopped")
            time.sleep(30.0)
            self.mlflow.start()
            log(f"sweep {self.i}: MLflow server back")
            rec["down_s"] = round(time.time() - rec["at"], 1)
        self.injected.append(rec)
        self.attempts[-1]["fault"] = kind
        return True

    def run(self) -> None:
        self.meter.tag = self.i
        self._launch(resume=False)
        resumes = 0
        while True:
            kind = None
            while self.driver_queue:
                if not self._wait_trial(time.time() + RUN_TIMEOUT_S):
                    break
                kind = self.driver_queue[0]
                if self._inject(kind):
                    self.driver_queue.pop(0)
                    if kind in ("kill_driver", "sigint") or self.proc.poll() is not None:
                        break  # the driver is (to be) gone; resume before the next fault
                kind = None
            rc = self._wait_exit(RUN_TIMEOUT_S)
            log(f"sweep {self.i}: driver exit {rc}")
            if kind == "sigint" and rc != 130:
                self.attempts[-1]["unexpected_rc"] = True
            if rc == 0:
                break
            if self.sweep_id is None or resumes >= 4:
                log(f"sweep {self.i}: giving up (rc {rc}, sweep id {self.sweep_id})")
                break
            if rc == -signal.SIGKILL:
                self._wait_interrupted()
            resumes += 1
            self._launch(resume=True)
        self.meter.tag = -1

    # --- the checks at the end ---------------------------------------------------------------
    def check(self) -> dict:
        from mlflow.tracking import MlflowClient

        from orchestrator.lifecycle import effective_state
        from orchestrator.store import Store

        out: dict = {"sweep": self.i, "sweep_id": self.sweep_id, "faults_planned": self.faults}
        out["fault_env"] = self.env.get("LORASWEEP_FAULT")
        fired = sorted(p.name for p in self.fault_dir.iterdir()) if self.fault_dir.exists() else []
        out["injected"] = [r["kind"] for r in self.injected] + [
            k for k in ("hang", "nan") if f"{k}@{self.fault_steps.get(k)}.0" in fired
        ]
        out["injected_detail"] = self.injected
        out["attempts"] = [
            {k: v for k, v in a.items() if k in ("cmd", "rc", "fault", "timed_out")}
            | {"wall_s": round(a.get("ended", time.time()) - a["started"], 1), "log": a["log"]}
            for a in self.attempts
        ]
        outside = self.meter.cost_usd(PRICE, self.i)
        out["outside_usd"] = outside
        out["processes"] = self.meter.processes(self.i)
        if self.sweep_id is None:
            out.update(ledger_usd=0.0, completed=False, lost=0, duplicates=0, state="never started")
            return out
        store = Store(self.ledger_url)
        totals = store.totals(self.sweep_id)
        row = store.sweep(self.sweep_id)
        out["state"] = effective_state(row)
        out["end_reason"] = row.end_reason
        out["completed"] = out["state"] == "completed" and self.attempts[-1]["rc"] == 0
        out["ledger_usd"] = totals.spent_usd
        out["reserved_usd"] = totals.reserved_usd
        accounts = store.accounts(self.sweep_id)
        unsettled = [a.key for a in accounts if not a.settled]
        excess = 0.0
        for a in accounts:
            if a.started_unix and not a.charge:
                held = max(0.0, a.updated_unix - a.started_unix)
                excess += max(0.0, a.spent_usd - PRICE * held / 3600.0)
        out["account_excess_usd"] = excess
        out["accounts"] = len(accounts)
        # MLflow
        client = MlflowClient(self.mlflow.uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, f"tags.`lorasweep.sweep_id` = '{self.sweep_id}'")
        parents = [r for r in runs if r.data.tags.get("lorasweep.kind") == "sweep"]
        children = [r for r in runs if r.data.tags.get("lorasweep.kind") == "trial"]
        running = [r.info.run_name for r in children if r.info.status == "RUNNING"]
        ids: dict[str, int] = {}
        for r in children:
            tid = r.data.tags.get("lorasweep.trial_id", "")
            ids[tid] = ids.get(tid, 0) + 1
        dup_runs = sum(n - 1 for n in ids.values()) + max(0, len(parents) - 1)
        dup_steps = relogs = 0
        dup_detail = []
        for r in children:
            for key in r.data.metrics:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                d = len(steps) - len(set(steps))
                if d and key in SUMMARY_METRICS:
                    relogs += d
                elif d:
                    dup_steps += d
                    dup_detail.append(f"{r.info.run_name}:{key}:{d}")
        out["parent_runs"] = len(parents)
        out["child_runs"] = len(children)
        out["child_status"] = {
            r.info.run_name: r.data.tags.get("lorasweep.status", "?") for r in children
        }
        out["parent_status"] = [p.info.status for p in parents]
        # Optuna
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{self.data_dir / 'optuna.db'}"
        optuna_running = []
        optuna_states: dict[str, int] = {}
        for name in optuna.study.get_all_study_names(storage):
            for t in optuna.load_study(study_name=name, storage=storage).trials:
                optuna_states[t.state.name] = optuna_states.get(t.state.name, 0) + 1
                if t.state == optuna.trial.TrialState.RUNNING:
                    optuna_running.append(f"{name}#{t.number}")
        out["optuna_states"] = optuna_states
        out["lost_detail"] = {
            "mlflow_running": running,
            "unsettled_accounts": unsettled,
            "optuna_running": optuna_running,
        }
        out["lost"] = len(running) + len(unsettled) + len(optuna_running)
        out["duplicate_detail"] = {"runs": dup_runs, "metric_steps": dup_detail}
        out["duplicates"] = dup_runs + dup_steps
        out["summary_relogs"] = relogs
        return out


def table(per: list[dict]) -> str:
    lines = [
        "| sweep | faults injected | driver runs (exit codes) | completed | ledger $ | outside $ "
        "| unaccounted $ | lost | dup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in per:
        rcs = ",".join(str(a["rc"]) for a in s["attempts"])
        lines.append(
            f"| {s['sweep']} | {', '.join(s['injected']) or '-'} | {len(s['attempts'])} ({rcs}) "
            f"| {'yes' if s['completed'] else 'NO'} | {s['ledger_usd']:.4f} | "
            f"{s['outside_usd']:.4f} | {s['outside_usd'] - s['ledger_usd']:+.4f} | "
            f"{s['lost']} | {s['duplicates']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/fault_injection.json"))
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--sweeps", type=int, default=len(PLAN), help="first N sweeps of PLAN")
    ap.add_argument("--only", default=None, help="comma-separated PLAN indices (development)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.time()
    work = Path(f"/tmp/lsfi-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LORASWEEP_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    cluster = Cluster(work / "ray", env)
    mlflow = MlflowServer(work, env)
    per: list[dict] = []
    try:
        log("building the tiny model")
        model, data = build_demo_inputs(work)
        log(f"starting Ray (head {cluster.address} + 1 node, token auth) and MLflow")
        cluster.start()
        mlflow.start()
        log(f"MLflow {mlflow.uri}")
        with ProcessMeter(ClusterProcesses(cluster)) as meter:
            runs = []
            chosen = [int(x) for x in args.only.split(",")] if args.only else range(args.sweeps)
            for i in chosen:
                faults = PLAN[i]
                sweep = SweepRun(i, faults, work, env, cluster, meter, mlflow, rng, model, data)
                runs.append(sweep)
                try:
                    sweep.run()
                finally:
                    if sweep.proc is not None and sweep.proc.poll() is None:
                        sweep.proc.kill()
                        sweep.proc.wait()
                time.sleep(3.0)  # let the sweep's workers go before the next sweep's appear
        for sweep in runs:
            per.append(sweep.check())
    finally:
        log("stopping MLflow and Ray (by PID)")
        mlflow.stop()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work / "ray", ignore_errors=True)

    faults = {k: sum(s["injected"].count(k) for s in per) for k in KINDS}
    ledger = sum(s["ledger_usd"] for s in per)
    outside = sum(s["outside_usd"] for s in per)
    overs = [max(0.0, max(s["ledger_usd"], s["outside_usd"]) - CAP) for s in per]
    result = {
        "sweeps": len(per),
        "sweeps_completed": sum(1 for s in per if s["completed"]),
        "faults": faults,
        "kills": faults["kill_worker"] + faults["kill_driver"],
        "budget_overruns": sum(1 for s in per if max(s["ledger_usd"], s["outside_usd"]) > CAP),
        "lost_trials": sum(s["lost"] for s in per),
        "duplicate_runs": sum(s["duplicates"] for s in per),
        "spend_counted_twice_usd": round(
            sum(max(0.0, s["ledger_usd"] - s["outside_usd"]) for s in per), 6
        ),
        "unaccounted_usd": round(outside - ledger, 6),
        "max_overshoot_usd": round(max(overs, default=0.0), 6),
        "faults_total": sum(faults.values()),
        "ledger_usd": round(ledger, 6),
        "outside_clock_usd": round(outside, 6),
        "unaccounted_pct": round(100 * (outside - ledger) / ledger, 3) if ledger else None,
        "summary_relogs": sum(s.get("summary_relogs", 0) for s in per),
        "account_excess_usd": round(sum(s.get("account_excess_usd", 0.0) for s in per), 6),
        "cap_usd": CAP,
        "price_usd_per_core_hour": PRICE,
        "seed": args.seed,
        "wall_s": round(time.time() - t_start, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "per_sweep": per,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(per))
    print(json.dumps({k: v for k, v in result.items() if k != "per_sweep"}, indent=2))
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
