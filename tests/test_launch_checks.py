"""Launch safety (issue #7, items 3 and 6): every user mistake is refused before anything is created.

Each bad input runs the CLI as a user does and must give one line `error: KEY=...` on stderr, exit code 2,
no traceback, no Hydra hint, and leave no folder, database or MLflow run behind.
"""
from __future__ import annotations

import pytest

from tests.conftest import TINY, popen, replacing, run_cli


def _refused(res, key: str, *words: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, key, words", [
    # a swept key: the grid would silently replace it
    (["sweep=mcm_mask_ratio", "method.mask_ratio=1.2"], "method.mask_ratio",
     ["grid", "sweep.grid={method.mask_ratio:[1.2]}", "sweeps/conf/sweep/"]),
    (["sweep=mcm_mask_ratio", "method=mae"], "method", ["fixes", "sweep.fixed"]),
    (["sweep=mcm_target", "method.target=pixel"], "method.target", ["points", "sweep.points"]),
    (["sweep=mcm_mask_ratio", "seed=3"], "seed", ["sweep.seeds=[3]"]),
    (["sweep=mcm_mask_ratio", "sweep.seeds=[]"], "sweep.seeds", ["non-empty"]),
    # keys that do not exist, with + (Hydra's own suggestion after a typo) and without
    (["sweep=mcm_mask_ratio", "+method.mask_ration=0.5"], "method.mask_ration", ["Did you mean method.mask_ratio?"]),
    (["sweep=mcm_mask_ratio", "method.mask_ration=0.5"], "method.mask_ration", ["Did you mean method.mask_ratio?"]),
    (["sweep=mcm_mask_ratio", "+pretrain.batchsize=8"], "pretrain.batchsize", ["Did you mean pretrain.batch_size?"]),
    (["sweep=mcm_mask_ratio", "+sweep.seed=[1]"], "sweep.seed", ["sweep spec"]),
    # Hydra's own errors, in our style
    (["sweep=mcm_mask_ratio", "method=foo"], "method", ["config group method", "mcm"]),
    (["sweep=nosuchsweep"], "sweep", ["config group sweep", "mcm_mask_ratio"]),
    # values read by nothing, and wrong shapes
    (["sweep=mcm_mask_ratio", "data.root=/tmp"], "data.root", ["data.source=embedded"]),
    (["sweep=mcm_mask_ratio", "data.crop_scale=0.5"], "data.crop_scale", ["[lo, hi]"]),
    (["sweep=mcm_mask_ratio", "pretrain.betas=0.9"], "pretrain.betas", ["beta1, beta2"]),
    (["sweep=mcm_mask_ratio", "data.num_workers=-1"], "data.num_workers", ["auto or an integer >= 0"]),
    (["sweep=mcm_mask_ratio", "data.num_workers=many"], "data.num_workers", ["auto or an integer >= 0"]),
])
def test_bad_input_is_refused_in_one_line_before_anything(tmp_path, args, key, words):
    out = tmp_path / "out"
    res = run_cli("sweeps/run.py", *args, f"output_root={out}")
    _refused(res, key, *words)
    assert not out.exists()                                        # no folder, no SQLite store, no run


def test_unparsable_override_is_one_line(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "method.mask_ratio=[", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 2 and res.stderr.startswith("error: cannot parse the override 'method.mask_ratio=['")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "HYDRA_FULL_ERROR" not in res.stderr and not (tmp_path / "o").exists()


def test_a_changed_grid_and_added_sweep_points_still_work(tmp_path):
    """What the errors point to works: the grid from the command line, `+sweep.points`, seeds, --help."""
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "sweep.grid={method.mask_ratio:[0.5,0.7]}",
                  "sweep.seeds=[1,2]", "dry_run=true", "estimate=false", f"output_root={tmp_path}")  # timing: ~25 CPU-s
    assert res.returncode == 0, res.stderr
    assert "4 point(s)" in res.stdout and res.stdout.count("seed=2") == 2 and "50%" in res.stdout
    assert not any(tmp_path.iterdir())
    helped = run_cli("sweeps/run.py", "--help")
    assert helped.returncode == 0 and "mcm_mask_ratio" in helped.stdout
    assert "cluster: local, slurm" in helped.stdout.splitlines()     # the group that lives in cluster/, too


def test_offline_pretrained_tag_is_refused_naming_the_key(tmp_path):
    """The CLIP teacher's `openai` tag downloads from the hub: offline (HF_HUB_OFFLINE=1, as on these
    machines, or no network) and not in the local cache, it is refused before any run exists."""
    from core.targets.teachers import pretrained_unavailable
    if pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None:
        pytest.skip("CLIP ViT-B/16 weights are in the local cache here")
    out = tmp_path / "out"
    res = run_cli("sweeps/run.py", "sweep=maskalign_topk", "teacher=clip_vit_b16", *TINY, f"output_root={out}",
                  env={"HF_HUB_OFFLINE": "1"})
    _refused(res, "teacher.pretrained", "'openai'", "local file", "Hugging Face hub")
    assert not out.exists()
    # the same sweep and teacher with weights that need no download pass the checks
    ok = run_cli("sweeps/run.py", "sweep=maskalign_topk", "teacher=clip_vit_b16", "teacher.pretrained=random",
                 *TINY, "dry_run=true", f"output_root={out}")  # TINY: estimate=false (timing a ViT-B teacher: minutes)
    assert ok.returncode == 0, ok.stderr


def test_pretrained_lookup_uses_the_libraries_sources(tmp_path, monkeypatch):
    """A tag found in the Hugging Face cache counts as available, with no network at all."""
    import huggingface_hub.constants as hc

    from core.targets.teachers import _weight_sources, pretrained_unavailable
    files, url, _, _ = _weight_sources("open_clip", "ViT-B-16", "openai")
    assert files and files[0][0] == "timm/vit_base_patch16_clip_224.openai" and url.endswith("ViT-B-16.pt")
    repo, name = files[0]
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / name).write_bytes(b"weights")
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None
    assert "HF_HUB_OFFLINE" in pretrained_unavailable("timm", "vit_base_patch16_224", "augreg2_in21k_ft_in1k")


def test_pretrained_tag_passes_when_the_hub_answers_and_fails_fast_when_not(monkeypatch):
    """Online (a real listening socket stands in for the hub) the tag passes; a closed port fails at once."""
    import socket
    import time

    import huggingface_hub.constants as hc

    from core.targets.teachers import pretrained_unavailable
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None
    t0 = time.perf_counter()
    problem = pretrained_unavailable("open_clip", "ViT-B-16", "openai", timeout=3)
    took = time.perf_counter() - t0
    print(f"closed hub port: refused in {took:.2f} s")
    assert problem is not None and "cannot be reached" in problem and took < 3.5


# ------------------------------------------------------------------------------------------- tracking.uri
def _launch_in_process(compose, overrides):
    from cluster.launch import launch
    return launch(compose(*overrides), overrides)


@pytest.mark.parametrize("uri", ["ftp://x", "s3://bucket/runs", "mlruns"])
def test_tracking_uri_scheme_is_checked(tmp_path, uri):
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", f"tracking.uri={uri}", f"output_root={tmp_path / 'o'}")
    _refused(res, "tracking.uri", "must be an MLflow tracking URI")
    assert not (tmp_path / "o").exists()


def test_unreachable_tracking_server_fails_fast_naming_the_key(compose, tmp_path):
    import socket
    import time

    from core.config import ConfigError
    with socket.socket() as s:               # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["sweep=mcm_recon_range", *TINY, f"output_root={tmp_path / 'o'}"]
    from sweeps.plan import plan
    plan(compose(*args), args)               # imports (torch, timm) done: time the launch, not Python's start
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        _launch_in_process(compose, [*args, f"tracking.uri=http://u:pw@127.0.0.1:{port}"])
    took = time.perf_counter() - t0
    print(f"unreachable tracking server: refused after {took:.2f} s")
    assert str(err.value).startswith(f"tracking.uri='http://u:***@127.0.0.1:{port}' is invalid: the MLflow store "
                                     "cannot be reached"), str(err.value)
    assert took < 10 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- output folder
@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, readonly) -> a real tmpfs mount point, unmounted afterwards (we run as root; a root
    process writes through any permission bits, so read-only and full must be real mounts)."""
    import os
    import subprocess
    mounted = []

    def mount(size: str, ro: bool = False):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs",
                              str(point)], capture_output=True, text=True)
        if res.returncode:
            if os.environ.get("CI"):
                pytest.fail(f"mount failed in CI: {res.stderr}")
            pytest.skip(f"cannot mount a tmpfs here (root needed): {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_read_only_output_folder_is_refused(tmpfs):
    ro = tmpfs("1m", ro=True)
    for dry in ("false", "true"):
        res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, f"output_root={ro}/out", f"dry_run={dry}")
        _refused(res, "output_root", f"{ro} is not a writable folder")


def test_too_little_space_is_refused_with_the_figure(tmpfs, compose):
    import re

    from cluster.checks import checkpoint_bytes
    small = tmpfs("1m")
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, f"output_root={small}/out")
    _refused(res, "output_root", "free", "for their checkpoints")
    need = float(re.search(r"need about ([\d.]+) MiB", res.stderr).group(1))
    # 2 points to run: 2 checkpoints + 1 being written + 64 MiB, each from the point's parameter count
    estimate = 3 * checkpoint_bytes(compose(*TINY)) + 64 * 2 ** 20
    assert abs(need - estimate / 2 ** 20) < 0.1, (need, estimate)
    assert not (small / "out").exists() and not any(small.iterdir())
    # a dry run checks the same and still writes nothing
    dry = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, f"output_root={small}/out", "dry_run=true")
    _refused(dry, "output_root", "free")
    assert not any(small.iterdir())
    # with room for the estimate the same launch passes the check (dry run: nothing written)
    roomy = tmpfs(f"{int(need * 1.2) + 1}m")
    ok = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *TINY, f"output_root={roomy}/out", "dry_run=true")
    assert ok.returncode == 0, ok.stderr


# ------------------------------------------------------------------------------------------- Ctrl-C / SIGTERM
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_local_launch_marks_its_runs_killed(tmp_path, sig):
    """A real launch, a real signal during the first point's training: nothing is left RUNNING/SCHEDULED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from bench.reliability import default_sigint
    from tests.conftest import REPO
    env = {**os.environ, "MIMSWEEP_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = popen([sys.executable, "sweeps/run.py", "sweep=mcm_recon_range",
                  *replacing(TINY, "cluster.workers=auto"), "pretrain.epochs=100",
                  "pretrain.max_steps=5000", f"output_root={tmp_path}"], cwd=REPO, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        for line in proc.stdout:                                  # the first point has started
            if line.startswith("[1/2]"):
                break
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        c = MlflowClient(uri)
        deadline = time.time() + 120
        while time.time() < deadline:                             # ... and is training (RUNNING in the store)
            exp = c.get_experiment_by_name("mcm_recon_range")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if any(r.info.status == "RUNNING" and r.data.tags.get("mimsweep.kind") == "point" for r in runs):
                break
            time.sleep(0.5)
        time.sleep(2)
        t0 = time.perf_counter()
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
        print(f"{sig}: launch ended {time.perf_counter() - t0:.1f} s after the signal")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted by") and "Traceback" not in err, err
    runs = c.search_runs([exp.experiment_id])
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags["mimsweep.kind"], []).append(r)
    from core.config import cpu_count
    # cluster.workers=auto: both points run at once on 2 CPUs; a point that had not started has no run
    assert len(by_kind["launch"]) == 1 and len(by_kind["point"]) == min(2, cpu_count())
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.data.tags["mimsweep.kind"], r.info.status) for r in runs]
    assert all(r.data.tags.get("mimsweep.failure") for r in runs)
    assert "SIGTERM" in by_kind["launch"][0].data.tags["mimsweep.failure"] if sig == "SIGTERM" else \
        "SIGINT" in by_kind["launch"][0].data.tags["mimsweep.failure"]


# ------------------------------------------------------------------------------------------- summary
def test_local_sweep_ends_with_a_summary_and_the_report_command(tmp_path):
    import shlex
    res = run_cli("sweeps/run.py", "sweep=mcm_recon_range", *replacing(TINY, "estimate=auto"), f"output_root={tmp_path}")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = res.stdout[res.stdout.index("\nsummary"):].strip().splitlines()
    assert summary[1].split() == ["point", "seed", "status", "knn_top1", "linear_top1", "wall", "estimate"], summary
    rows = {line.split()[0]: line.split() for line in summary[2:4]}
    assert set(rows) == {"masked", "all"} and all(r[2] == "FINISHED" and r[-1] == "s" for r in rows.values())
    assert all(0 <= float(r[3]) <= 100 and 0 <= float(r[4]) <= 100 for r in rows.values())
    nxt = summary[-1]
    assert nxt.startswith("next: python reports/build.py ") and "sweep=mcm_recon_range" in nxt
    report = run_cli(*shlex.split(nxt[len("next: python "):]))   # the printed command works as printed
    assert report.returncode == 0, report.stdout + report.stderr
    assert "masked" in report.stdout and (tmp_path / "reports" / "mcm_recon_range").is_dir()


# ------------------------------------------------------------------------------------------- issue 19, item 6
@pytest.mark.parametrize("args, key, words", [
    (["data.hflip=maybe"], "data.hflip", ["true or false"]),                   # Hydra reads it as the string 'maybe'
    (["evaluate.floor=1"], "evaluate.floor", ["true or false"]),
    (["pretrain.precision=fp16"], "pretrain.precision", ["CUDA", "bf16 or fp32"]),
    (["pretrain.max_steps=3", "pretrain.max_steps=5"], "pretrain.max_steps", ["twice", "max_steps=3"]),
    (["cluster=local", "cluster=slurm"], "cluster", ["twice", "cluster=local"]),
    (["sweep.grid={}"], "sweep.grid", ["empty grid"]),
    (["model.embed_dim=100000"], "model.embed_dim", ["memory", "GiB"]),       # not a disk-space error on output_root
    (["cluster=slurm", "cluster.python=/nonexistent/bin/python"], "cluster.python", ["not an executable"]),
    (["cluster=slurm", "cluster.python=no-such-python3"], "cluster.python", ["not on PATH"]),
])
def test_the_last_bad_inputs_are_refused_naming_their_key(tmp_path, args, key, words):
    out = tmp_path / "out"
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", *args, f"output_root={out}")
    _refused(res, key, *words)
    assert not out.exists()


@pytest.mark.parametrize("sweep, key", [("maskalign_topk", "method.top_k"),
                                        ("semanticmim_proxy_count", "method.num_proxies")])
def test_an_override_of_a_key_only_the_sweeps_points_have_names_the_sweep(tmp_path, sweep, key):
    """The default method has no `method.top_k`: Hydra's "no such key" would suggest method.target."""
    res = run_cli("sweeps/run.py", f"sweep={sweep}", f"{key}=0", f"output_root={tmp_path / 'o'}")
    _refused(res, key, f"the points of sweep {sweep} set this key", "sweep.points")
    assert "Did you mean" not in res.stderr and not (tmp_path / "o").exists()


def test_a_key_of_the_sweeps_own_method_reaches_every_point(tmp_path, compose):
    """A key that only the sweep's method has (maskalign_topk names method=maskalign in its defaults, so
    `method.adaptor` exists when the command line is read): given plainly or with ++, every point gets it,
    and the dry run says so."""
    from sweeps.plan import plan
    for given in ("method.adaptor=mlp", "++method.adaptor=mlp"):
        args = ["sweep=maskalign_topk", given, "preset=smoke", f"output_root={tmp_path / 'o'}"]
        _, planned = plan(compose(*args), args)
        assert len(planned) == 6 and {pl.cfg.method.adaptor for pl in planned} == {"mlp"}, given
    res = run_cli("sweeps/run.py", "sweep=maskalign_topk", "method.adaptor=mlp", "preset=smoke", "dry_run=true",
                  "estimate=false", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 0 and "6 point(s)" in res.stdout, res.stdout + res.stderr
    assert not (tmp_path / "o" / "runs").exists()


def test_a_sweep_file_with_an_empty_grid_is_refused_in_one_line(tmp_path):
    """A new sweep file (sweeps/conf/sweep/) whose grid is `{}`: one line naming sweep.grid, no traceback.
    The file goes into a copy of the code (cluster/snapshot.py), not into the tree other tests read."""
    from cluster import snapshot
    code = snapshot.write(snapshot.plan(tmp_path / "code"))
    spec = code / "sweeps" / "conf" / "sweep" / "new_sweep.yaml"
    spec.write_text("name: new_sweep\ngrid: {}\nseeds: [0]\n")
    res = run_cli("sweeps/run.py", "sweep=new_sweep", "preset=smoke", f"output_root={tmp_path / 'o'}", cwd=code)
    spec.write_text("name: new_sweep\ngrid: {method.mask_ratio: []}\nseeds: [0]\n")
    empty_values = run_cli("sweeps/run.py", "sweep=new_sweep", "preset=smoke", f"output_root={tmp_path / 'o'}",
                           cwd=code)
    _refused(res, "sweep.grid", "sweep new_sweep needs a grid of at least one key")
    _refused(empty_values, "sweep.grid.method.mask_ratio", "non-empty list")
    assert not (tmp_path / "o").exists()


def test_an_output_root_on_a_virtual_filesystem_is_named_as_such(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "preset=smoke", "output_root=/proc/mimsweep-out")
    _refused(res, "output_root", "virtual filesystem")
    assert "0 B free" not in res.stderr
